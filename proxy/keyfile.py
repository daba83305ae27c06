"""Editing KEYS_FILE in place for `python -m proxy keys ...` (`proxy/keys_cli.py`): a new hashed entry, an
entry removed, clear-text keys replaced by their hashes.

The edits are made on the text, line by line, so the operator's comments and layout stay; every result is
validated as the relay would read it (`load_keys_file`) before it replaces the file, and it replaces it
atomically (a temporary file in the same directory, fsynced, then renamed over it, with the old file's
permissions), so a running relay rereads either the old file or the new one, never half of one. One edit
runs at a time: each holds an exclusive lock on the file's directory.

What the line edits understand: `[keys.NAME]` (or `[keys."NAME"]`) section headers and a `key = "..."` line
inside them, as `keys create` writes and the README shows. Entries written as dotted keys on one line
(`keys.alice.key = ...`) or inline tables are refused with a message saying to edit them by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

from proxy.keys import KEY_NAME, KeyPolicy, KeysFileError, key_digest, load_keys_file

KEY_PREFIX = "rk-"  # a created key starts with it, so a leaked one is recognizable (and scannable) as the relay's
VISIBLE_CHARACTERS = 10  # "rk-" and 7 random characters, stored as the entry's `prefix`
CONVERTED_VISIBLE_CHARACTERS = 4  # of a clear-text key converted by `keys hash` (its holder chose it)
_HEADER = re.compile(r"""^\s*\[\s*keys\s*\.\s*(?:"([^"]+)"|([A-Za-z0-9_.\-]+))\s*\]\s*(#.*)?$""")
_ANY_HEADER = re.compile(r"^\s*\[")
_KEY_LINE = re.compile(r"^(\s*)key\s*=\s*(.*)$")


class KeyFileEditError(ValueError):
    """The edit cannot be made; the message says why (never with a key in it)."""


def new_key() -> str:
    """A new access key: the prefix and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def toml_value(value: object) -> str:
    """A limit's value in TOML: numbers as they are, strings and lists of strings JSON-quoted (valid TOML)."""
    if isinstance(value, bool):
        raise TypeError("no boolean settings")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__}")


def add_entry(text: str, name: str, key: str, limits: Mapping[str, object]) -> str:
    """The file's text with a `[keys.NAME]` entry holding the key's hash and visible prefix appended."""
    if not KEY_NAME.fullmatch(name):
        raise KeyFileEditError("a name is 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)")
    if name in _entries(text):
        raise KeyFileEditError(f"keys.{name} already exists; revoke it first or choose another name")
    lines = [f"[keys.{name}]", f'hash = "{key_digest(key)}"', f'prefix = "{key[:VISIBLE_CHARACTERS]}"']
    lines += [f"{setting} = {toml_value(value)}" for setting, value in limits.items() if value is not None]
    separator = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return text + separator + "\n".join(lines) + "\n"


def remove_entry(text: str, name: str) -> str:
    """The file's text without the `[keys.NAME]` section. The comment and blank lines just before the next
    section stay with it (they usually describe it)."""
    if name not in _entries(text):
        raise KeyFileEditError(f"there is no keys.{name} in the file")
    lines = text.splitlines(keepends=True)
    start = next((index for index, line in enumerate(lines) if _header_name(line) == name), None)
    if start is None:
        raise KeyFileEditError(f"keys.{name} is not written as a [keys.{name}] section; remove it by hand")
    end = next((index for index in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[index])), len(lines))
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")) \
            and end < len(lines):
        end -= 1
    result = "".join(lines[:start] + lines[end:])
    if name in _entries(result):
        raise KeyFileEditError(f"keys.{name} is also set outside its section; remove it by hand")
    return result


def hash_entries(text: str) -> tuple[str, list[str]]:
    """The file's text with every clear-text `key = "..."` of a `[keys.NAME]` section replaced by its hash and
    a short prefix (comments on other lines stay; one at the end of the key's own line goes with it), and
    the names converted."""
    lines = text.splitlines(keepends=True)
    section: str | None = None
    converted: list[str] = []
    for index, line in enumerate(lines):
        if _ANY_HEADER.match(line):
            section = _header_name(line)
            continue
        found = _KEY_LINE.match(line)
        if section is None or found is None:
            continue
        indent, rest = found.groups()
        try:
            key = tomllib.loads(f"v = {rest}")["v"]
        except tomllib.TOMLDecodeError:
            raise KeyFileEditError(f"keys.{section}: its key line is not a TOML string; fix it first") from None
        ending = "\n" if line.endswith("\n") else ""
        lines[index] = (f'{indent}hash = "{key_digest(key)}"\n'
                        f'{indent}prefix = "{key[:CONVERTED_VISIBLE_CHARACTERS]}"{ending}')
        converted.append(section)
    return "".join(lines), converted


def check(text: str, directory: Path, reserved_names: frozenset[str] = frozenset()) -> tuple[KeyPolicy, ...]:
    """Validate the text as the relay will read it; KeyFileEditError with the relay's own message."""
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".toml", delete=True, encoding="utf-8") as probe:
        probe.write(text)
        probe.flush()
        try:
            policies = load_keys_file(Path(probe.name))
        except KeysFileError as exc:
            raise KeyFileEditError(str(exc).replace(probe.name, "the edited file")) from None
    for policy in policies:
        if policy.name in reserved_names:
            raise KeyFileEditError(f"the name {policy.name!r} is taken by AUTHORIZATION_KEY's keys")
    return policies


@contextlib.contextmanager
def editing(path: Path) -> Iterator[None]:
    """Hold the exclusive edit lock of `path`'s directory (one `keys` edit at a time)."""
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        yield
    finally:
        os.close(directory)  # releases the lock


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, keeping the old file's permissions (a new file: owner only)."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _entries(text: str) -> set[str]:
    try:
        table = tomllib.loads(text).get("keys", {})
    except tomllib.TOMLDecodeError as exc:
        raise KeyFileEditError(f"the keys file is not valid TOML ({exc}); fix it first") from None
    return set(table) if isinstance(table, dict) else set()


def _header_name(line: str) -> str | None:
    found = _HEADER.match(line)
    return (found.group(1) or found.group(2)) if found else None
