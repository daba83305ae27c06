"""Secrets out of everything a client or a log sees: one function, built from the configuration.

`Redactor(config.secrets)` replaces every credential the relay holds (upstream keys, access keys from
AUTHORIZATION_KEY and the keys file, the metrics key, passwords in configured URLs), as written and as
percent-encoded, plus anything shaped like an API key (`sk-...`, `gsk_...`, the relay's own created `rk-...`
keys, whose clear text it never holds) wherever it stands in the text.
The secrets are asked for at each use, because the keys file is reread when it changes.

It is applied where upstream text becomes a message (errors mapped from the SDK, in-stream error events) and to
every line of the `relay` loggers (`RedactingFilter`), which also keeps each log record on one line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from urllib.parse import quote, quote_plus

REDACTED = "[redacted]"
# Shorter secrets (possible only in demo mode) would blank out ordinary words; they protect nothing costly.
MIN_REDACTED_LENGTH = 8
# Key-shaped text whatever precedes it: an upstream quoting `x_api_key_sk-...` or `Bearer%20sk-...` glues the
# key to a letter, a digit or `_`, so no word boundary is required.
# A created access key (`python -m proxy keys create`) is rk- and 43 characters: long, so "network-..." is safe.
SECRET_LIKE = re.compile(r"(?:sk|key|token)-[A-Za-z0-9_\-*.]{6,}|gsk_[A-Za-z0-9]{8,}|rk-[A-Za-z0-9_\-]{40,}", re.I)
# Control characters and the Unicode line separators that `str.splitlines()` also breaks on.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def redact_secret_like(text: str) -> str:
    """Only the key-shaped text: for upstreams built without a configuration (the demo's stand-in)."""
    return SECRET_LIKE.sub(REDACTED, text)


def escape_control(text: str) -> str:
    """Control characters as `\\n`, `\\u0000`, ...: one log record stays one line."""
    return CONTROL.sub(_escaped_character, text)


def _escaped_character(match: re.Match[str]) -> str:
    character = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(character, f"\\u{ord(character):04x}")


class Redactor:
    """`redact(text)`: `text` with every configured secret and every key-shaped string replaced."""

    def __init__(self, secrets: Callable[[], Iterable[str]]) -> None:
        self._secrets = secrets
        self._compiled: tuple[tuple[str, ...], re.Pattern[str] | None] = ((), None)

    def __call__(self, text: str) -> str:
        pattern = self._known_secrets()
        if pattern is not None:
            text = pattern.sub(REDACTED, text)
        return SECRET_LIKE.sub(REDACTED, text)

    def _known_secrets(self) -> re.Pattern[str] | None:
        secrets = tuple(self._secrets())
        cached_secrets, cached = self._compiled  # one tuple, swapped whole: safe for concurrent greenlets/threads
        if secrets == cached_secrets:
            return cached  # every log line passes here: rebuild only when the keys file changed
        forms = {form for secret in secrets if len(secret) >= MIN_REDACTED_LENGTH
                 for form in (secret, quote(secret, safe=""), quote_plus(secret))}
        # Longest first, so a key that contains another is replaced whole.
        ordered = sorted(forms, key=lambda form: (-len(form), form))
        pattern = re.compile("|".join(re.escape(form) for form in ordered)) if ordered else None
        self._compiled = (secrets, pattern)
        return pattern


class RedactingFilter(logging.Filter):
    """On a handler: each record's message, traceback and access-log fields redacted, control characters
    in its message escaped (a traceback keeps its own lines; it cannot carry a client's newline as a record)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = escape_control(self.redact(record.getMessage()))
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        fields = getattr(record, "access_fields", None)
        if isinstance(fields, dict):
            record.access_fields = {name: self.redact(value) if isinstance(value, str) else value
                                    for name, value in fields.items()}
        return True
