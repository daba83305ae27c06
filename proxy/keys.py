"""Named access keys: the keys of AUTHORIZATION_KEY plus a TOML keys file (KEYS_FILE), each with a name and
optional limits of its own. The file is reread when it changes (checked at most twice a second), so adding
or removing a key needs no restart; a broken edit is logged and the previous keys stay in force.

    # /etc/relay/keys.toml
    [keys.alice]
    key = "a long random string"
    requests_per_minute = 20      # optional; defaults: RATE_LIMIT_PER_MINUTE, RATE_LIMIT_PER_DAY, ...
    requests_per_day = 500
    daily_tokens = 200000         # counted from the upstream's reported usage, renewed at 00:00 UTC
    models = ["gpt-4o-mini", "deepseek-*"]
    max_streams = 2               # requests in flight (open streams) at once

Logs and metrics only ever show the name.

Keys made by `python -m proxy keys create NAME` (`proxy/keys_cli.py`) are never stored: the entry holds
`hash = "sha256:<hex>"` and a short visible `prefix` instead of `key`. The keys are 256-bit random strings,
so a fast hash is enough (no password hashing: nothing is left to guess from a leaked file), and it lets
`identify` find a key with one dictionary lookup by its hash instead of comparing it with every key. The
lookup's timing says nothing useful: a caller cannot choose what a guess hashes to. Clear-text `key = ...`
entries keep working (`keys hash` converts a file); they are hashed when the file is read.

Spend limits (`daily_spend`, `monthly_spend`: money, in the currency of PRICES_FILE) are reserved before the
upstream is called, like `daily_tokens` (`proxy/budgets.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field, PositiveFloat, PositiveInt, StringConstraints

from proxy.validation import EntryError, FileEntry, Says

log = logging.getLogger("relay.keys")

RELOAD_CHECK_SECONDS = 0.5  # a revoked key is refused by every worker within this (one stat() per check)
# Access keys shorter than this are refused (AUTHORIZATION_KEY at start-up outside demo mode, KEYS_FILE always).
MIN_ACCESS_KEY_LENGTH = 16
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
HASH_SCHEME = "sha256:"


def key_digest(key: str) -> str:
    """What a keys file stores instead of a key: `sha256:` and the hex SHA-256 of its UTF-8 bytes."""
    return HASH_SCHEME + hashlib.sha256(key.encode()).hexdigest()


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and the entry, never a key."""


@dataclass(frozen=True)
class KeyPolicy:
    """One access key, its name and its own limits (None: the relay-wide default applies)."""

    name: str
    key: str = field(default="", repr=False)  # the key itself only where it is written in clear (env, old files)
    requests_per_minute: int | None = None
    requests_per_day: int | None = None
    daily_tokens: int | None = None
    models: tuple[str, ...] = ()  # globs; empty: whatever ALLOWED_MODELS allows
    max_streams: int | None = None
    daily_spend: float | None = None
    monthly_spend: float | None = None
    digest: str = field(default="", repr=False)  # key_digest(key): how a presented key is found
    prefix: str = ""  # the start of a created key, shown by `keys list` so its holder can recognize it

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", key_digest(self.key))


def env_key_policies(keys: Sequence[str]) -> tuple[KeyPolicy, ...]:
    """AUTHORIZATION_KEY's keys: "default" when there is one, key1, key2, ... when there are several."""
    if len(keys) == 1:
        return (KeyPolicy("default", keys[0]),)
    return tuple(KeyPolicy(f"key{index + 1}", key) for index, key in enumerate(keys))


def load_keys_file(path: Path) -> tuple[KeyPolicy, ...]:
    """Parse and validate a keys file; raise KeysFileError saying what is wrong and where."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        # Not the path: whatever was pasted into KEYS_FILE (a key, say) would be echoed.
        raise KeysFileError(f"cannot read the file it names ({exc.strerror or type(exc).__name__})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{path} is not valid TOML: {exc}") from None
    unknown = set(document) - {"keys"}
    if unknown:
        raise KeysFileError(f"{path}: unknown top-level entries {sorted(unknown)}; put keys under [keys.<name>]")
    table = document.get("keys", {})
    if not isinstance(table, dict):
        raise KeysFileError(f"{path}: 'keys' must be a table of [keys.<name>] sections")
    policies = tuple(_policy(path, name, entry) for name, entry in table.items())
    seen: dict[str, str] = {}
    for policy in policies:
        if policy.digest in seen:
            raise KeysFileError(f"{path}: keys.{policy.name} has the same key as keys.{seen[policy.digest]}")
        seen[policy.digest] = policy.name
    return policies


_WHOLE = "must be a positive whole number"
_MONEY = "must be a positive amount of money (a number, in PRICES_FILE's currency)"
_KEY_OR_HASH = "'key' must be a non-empty string (or the entry a 'hash' made by python -m proxy keys create)"


def _bare_key(key: str | None) -> str | None:
    if key is None:
        return None
    # A comma would split the key when it is also listed in AUTHORIZATION_KEY; spaces are a paste slip.
    if key != key.strip() or "," in key:
        raise ValueError("'key' must not contain commas or surrounding spaces")
    if len(key) < MIN_ACCESS_KEY_LENGTH:
        raise ValueError(f"'key' must be at least {MIN_ACCESS_KEY_LENGTH} characters (a long random string)")
    return key


class KeyEntry(FileEntry):
    """One `[keys.<name>]` table of KEYS_FILE; its fields are KeyPolicy's."""

    NOT_A_TABLE: ClassVar[str] = "{where} must be a table with at least key = \"...\""

    key: Annotated[str | None, StringConstraints(pattern=r"\S"), Says("'key' must be a non-empty string"),
                   AfterValidator(_bare_key), Field(repr=False)] = None
    hash: Annotated[str | None, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$"),
                    Says("'hash' must be \"sha256:\" and 64 lowercase hex digits (python -m proxy keys create)")] = None
    prefix: Annotated[str, StringConstraints(max_length=16), Says("'prefix' must be a string of at most 16 characters")
                      ] = ""
    requests_per_minute: Annotated[PositiveInt | None, Says(f"'requests_per_minute' {_WHOLE}")] = None
    requests_per_day: Annotated[PositiveInt | None, Says(f"'requests_per_day' {_WHOLE}")] = None
    daily_tokens: Annotated[PositiveInt | None, Says(f"'daily_tokens' {_WHOLE}")] = None
    max_streams: Annotated[PositiveInt | None, Says(f"'max_streams' {_WHOLE}")] = None
    daily_spend: Annotated[PositiveFloat | None, Field(allow_inf_nan=False), Says(f"'daily_spend' {_MONEY}")] = None
    monthly_spend: Annotated[PositiveFloat | None, Field(allow_inf_nan=False), Says(f"'monthly_spend' {_MONEY}")
                             ] = None
    models: Annotated[list[Annotated[str, StringConstraints(min_length=1)]],
                      Says("'models' must be a list of model names or globs")] = Field(default_factory=list)

    @classmethod
    def unknown_fields(cls, names: list[str]) -> str:
        return f"unknown settings {names}"


def _policy(path: Path, name: str, entry: Any) -> KeyPolicy:
    where = f"{path}: keys.{name}"
    if not KEY_NAME.fullmatch(name):
        raise KeysFileError(f"{where}: a name is 1-64 letters, digits, '.', '_' or '-'")
    try:
        checked = KeyEntry.check(entry, where)
    except EntryError as exc:
        raise KeysFileError(str(exc)) from None
    if (checked.key is None) == (checked.hash is None):
        raise KeysFileError(f"{where}: {_KEY_OR_HASH}" if checked.key is None
                            else f"{where}: give 'key' or 'hash', not both")
    limits = checked.model_dump(exclude={"models", "key", "hash"})
    return KeyPolicy(name=name, key=checked.key or "", digest=checked.hash or "", models=tuple(checked.models),
                     **limits)


class KeyRing:
    """Every valid key, found by its hash (`identify`)."""

    def __init__(self, env_keys: Sequence[str], keys_file: Path | None = None) -> None:
        self._env = env_key_policies(env_keys) if env_keys else ()
        self._file = keys_file
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._file_stamp: tuple[int, int, int] | None = None
        self._set(self._env)
        if keys_file is not None:
            self._file_stamp = _stamp(keys_file)
            self._set(self._merge(load_keys_file(keys_file)))
            self._next_check = time.monotonic() + RELOAD_CHECK_SECONDS

    def _set(self, policies: tuple[KeyPolicy, ...]) -> None:
        # One assignment of a (tuple, dict) pair: a concurrent reader sees the old pair or the new one.
        self._current = (policies, {policy.digest: policy for policy in policies})

    @property
    def _policies(self) -> tuple[KeyPolicy, ...]:
        return self._current[0]

    @property
    def policies(self) -> tuple[KeyPolicy, ...]:
        self._reload_if_changed()
        return self._policies

    def identify(self, presented: str) -> KeyPolicy | None:
        """The policy of the presented key, or None."""
        return self.by_digest(key_digest(presented))

    def by_digest(self, digest: str) -> KeyPolicy | None:
        """The policy whose key hashes to `digest` now (None once it is revoked): a WebSocket connection asks
        again at each message whether its key still stands."""
        self._reload_if_changed()
        found = self._current[1].get(digest)
        # The dictionary found it by equal hashes; compare_digest states the check without early exit.
        return found if found is not None and hmac.compare_digest(found.digest, digest) else None

    def _merge(self, from_file: tuple[KeyPolicy, ...]) -> tuple[KeyPolicy, ...]:
        env_keys = {policy.digest for policy in self._env}
        env_names = {policy.name for policy in self._env}
        for policy in from_file:
            if policy.digest in env_keys or policy.name in env_names:
                raise KeysFileError(f"{self._file}: keys.{policy.name} repeats a key or name of AUTHORIZATION_KEY")
        return self._env + from_file

    def _reload_if_changed(self) -> None:
        if self._file is None or time.monotonic() < self._next_check:
            return
        with self._lock:
            now = time.monotonic()
            if now < self._next_check:
                return
            self._next_check = now + RELOAD_CHECK_SECONDS
            stamp = _stamp(self._file)
            if stamp == self._file_stamp:
                return
            self._file_stamp = stamp
            try:
                policies = self._merge(load_keys_file(self._file))
            except KeysFileError as exc:
                log.error("keys file not reloaded, the previous keys stay in force: %s", exc)
                return
            self._set(policies)
            log.info("keys file reloaded: %d named keys (%s)", len(policies),
                     ", ".join(policy.name for policy in policies))


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when the file is edited or replaced (editors and config tools often swap inodes)."""
    try:
        status = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (status.st_ino, status.st_mtime_ns, status.st_size)
