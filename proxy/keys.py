"""Named access keys: the keys of AUTHORIZATION_KEY plus a TOML keys file (KEYS_FILE), each with a name and
optional limits of its own. The file is reread when it changes (checked at most once a second), so adding
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
"""

from __future__ import annotations

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

from pydantic import AfterValidator, Field, PositiveInt, StringConstraints

from proxy.validation import EntryError, FileEntry, Says

log = logging.getLogger("relay.keys")

RELOAD_CHECK_SECONDS = 1.0
# Access keys shorter than this are refused (AUTHORIZATION_KEY at start-up outside demo mode, KEYS_FILE always).
MIN_ACCESS_KEY_LENGTH = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and the entry, never a key."""


@dataclass(frozen=True)
class KeyPolicy:
    """One access key, its name and its own limits (None: the relay-wide default applies)."""

    name: str
    key: str = field(repr=False)
    requests_per_minute: int | None = None
    requests_per_day: int | None = None
    daily_tokens: int | None = None
    models: tuple[str, ...] = ()  # globs; empty: whatever ALLOWED_MODELS allows
    max_streams: int | None = None


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
        if policy.key in seen:
            raise KeysFileError(f"{path}: keys.{policy.name} has the same key as keys.{seen[policy.key]}")
        seen[policy.key] = policy.name
    return policies


_WHOLE = "must be a positive whole number"


def _bare_key(key: str) -> str:
    # A comma would split the key when it is also listed in AUTHORIZATION_KEY; spaces are a paste slip.
    if key != key.strip() or "," in key:
        raise ValueError("'key' must not contain commas or surrounding spaces")
    if len(key) < MIN_ACCESS_KEY_LENGTH:
        raise ValueError(f"'key' must be at least {MIN_ACCESS_KEY_LENGTH} characters (a long random string)")
    return key


class KeyEntry(FileEntry):
    """One `[keys.<name>]` table of KEYS_FILE; its fields are KeyPolicy's."""

    NOT_A_TABLE: ClassVar[str] = "{where} must be a table with at least key = \"...\""

    key: Annotated[str, StringConstraints(pattern=r"\S"), Says("'key' must be a non-empty string"),
                   AfterValidator(_bare_key), Field(repr=False)]
    requests_per_minute: Annotated[PositiveInt | None, Says(f"'requests_per_minute' {_WHOLE}")] = None
    requests_per_day: Annotated[PositiveInt | None, Says(f"'requests_per_day' {_WHOLE}")] = None
    daily_tokens: Annotated[PositiveInt | None, Says(f"'daily_tokens' {_WHOLE}")] = None
    max_streams: Annotated[PositiveInt | None, Says(f"'max_streams' {_WHOLE}")] = None
    models: Annotated[list[Annotated[str, StringConstraints(min_length=1)]],
                      Says("'models' must be a list of model names or globs")] = Field(default_factory=list)

    @classmethod
    def unknown_fields(cls, names: list[str]) -> str:
        return f"unknown settings {names}"


def _policy(path: Path, name: str, entry: Any) -> KeyPolicy:
    where = f"{path}: keys.{name}"
    if not _NAME.fullmatch(name):
        raise KeysFileError(f"{where}: a name is 1-64 letters, digits, '.', '_' or '-'")
    try:
        checked = KeyEntry.check(entry, where)
    except EntryError as exc:
        raise KeysFileError(str(exc)) from None
    return KeyPolicy(name=name, models=tuple(checked.models), **checked.model_dump(exclude={"models"}))


class KeyRing:
    """Every valid key. `identify` compares against all of them in constant time per key."""

    def __init__(self, env_keys: Sequence[str], keys_file: Path | None = None) -> None:
        self._env = env_key_policies(env_keys) if env_keys else ()
        self._file = keys_file
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._file_stamp: tuple[int, int, int] | None = None
        self._policies = self._env
        if keys_file is not None:
            self._file_stamp = _stamp(keys_file)
            self._policies = self._merge(load_keys_file(keys_file))
            self._next_check = time.monotonic() + RELOAD_CHECK_SECONDS

    @property
    def policies(self) -> tuple[KeyPolicy, ...]:
        self._reload_if_changed()
        return self._policies

    def identify(self, presented: str) -> KeyPolicy | None:
        """The policy of the presented key, or None. Every key is compared, so timing tells nothing."""
        candidate = presented.encode()
        match: KeyPolicy | None = None
        for policy in self.policies:
            if hmac.compare_digest(candidate, policy.key.encode()) and match is None:
                match = policy
        return match

    def _merge(self, from_file: tuple[KeyPolicy, ...]) -> tuple[KeyPolicy, ...]:
        env_keys = {policy.key for policy in self._env}
        env_names = {policy.name for policy in self._env}
        for policy in from_file:
            if policy.key in env_keys or policy.name in env_names:
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
            self._policies = policies
            log.info("keys file reloaded: %d named keys (%s)", len(policies),
                     ", ".join(policy.name for policy in policies))


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when the file is edited or replaced (editors and config tools often swap inodes)."""
    try:
        status = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (status.st_ino, status.st_mtime_ns, status.st_size)
