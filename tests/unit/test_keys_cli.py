"""`python -m proxy keys ...` in-process (proxy/keys_cli.py, proxy/keyfile.py): keys that are never stored,
edits that keep the operator's comments, and the keyring finding hashed keys (the real relay picking the
changes up is tests/test_keys.py)."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy import keys as keys_module
from proxy.budgets import spend_counter, utc_month
from proxy.host_counters import HostCounters
from proxy.keyfile import KeyFileEditError, add_entry, hash_entries, new_key, remove_entry
from proxy.keys import KeyRing, key_digest, load_keys_file
from proxy.keys_cli import main
from proxy.redaction import REDACTED, redact_secret_like

OLD_KEY = "old-clear-key-0123456789"
FILE = f"""# keys of the team
[keys.old]
key = "{OLD_KEY}"   # from before hashing
daily_tokens = 5

# bob's entry comes next
[keys."bob"]
key = 'bob-clear-key-0123456789'
"""


def run(path: Path, capsys: pytest.CaptureFixture[str], *argv: str, env: dict[str, str] | None = None
        ) -> tuple[int, str, str]:
    code = main(["--file", str(path), *argv], environ=env or {})
    out, err = capsys.readouterr()
    return code, out, err


def created_key(out: str) -> str:
    found = re.search(r"^\s+(rk-\S+)$", out, re.MULTILINE)
    assert found is not None, out
    return found.group(1)


def test_create_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    """The printed key is the relay's (rk-, 256 random bits); the file holds its SHA-256 and first characters
    plus the limits given, and the keyring finds the key by its hash. A new file is private to its owner."""
    path = tmp_path / "keys.toml"
    code, out, _ = run(path, capsys, "create", "alice", "--requests-per-minute", "20", "--daily-tokens", "900",
                       "--daily-spend", "2.5", "--monthly-spend", "20", "--max-streams", "2", "--models", "gpt-4o*, o3")
    key = created_key(out)
    assert code == 0 and len(key) >= 40
    text = path.read_text()
    assert key not in text and key_digest(key) in text and f'prefix = "{key[:10]}"' in text
    assert os.stat(path).st_mode & 0o777 == 0o600
    policy = KeyRing([], path).identify(key)
    assert policy is not None and (policy.name, policy.requests_per_minute, policy.daily_tokens, policy.daily_spend,
                                   policy.monthly_spend, policy.max_streams, policy.models) == (
        "alice", 20, 900, 2.5, 20.0, 2, ("gpt-4o*", "o3"))
    assert KeyRing([], path).identify(key[:-1]) is None


@pytest.mark.parametrize(("argv", "env", "message"), [
    (("create", "old"), {}, "keys.old already exists"),
    (("create", "bad name"), {}, "a name is 1-64 letters"),
    (("create", "default"), {"AUTHORIZATION_KEY": "env-key-0123456789abc"}, "taken by AUTHORIZATION_KEY"),
    (("create", "x", "--daily-spend", "-1"), {}, "'daily_spend' must be a positive amount"),
    (("revoke", "nobody"), {}, "there is no keys.nobody"),
])
def test_refused_edits_leave_the_file_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: tuple[str, ...], env: dict[str, str], message: str) -> None:
    """An edit the relay would refuse (or that makes no sense) is refused with the reason; the file is unchanged."""
    path = tmp_path / "keys.toml"
    path.write_text(FILE)
    code, out, err = run(path, capsys, *argv, env=env)
    assert code == 1 and message in err and "rk-" not in out + err
    assert path.read_text() == FILE


def test_revoke_removes_only_its_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The entry goes; the comments (the one above the next entry included) and other entries stay."""
    path = tmp_path / "keys.toml"
    path.write_text(FILE)
    path.chmod(0o640)
    code, _, _ = run(path, capsys, "revoke", "old")
    assert code == 0
    assert path.read_text() == "# keys of the team\n\n# bob's entry comes next\n[keys.\"bob\"]\n" \
                               "key = 'bob-clear-key-0123456789'\n"
    assert os.stat(path).st_mode & 0o777 == 0o640, "the file keeps its permissions"
    assert [policy.name for policy in load_keys_file(path)] == ["bob"]


def test_hash_converts_clear_keys_in_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keys hash` replaces each clear-text key by its hash and 4-character prefix, keeps the comments on
    other lines, and the same keys keep working; run again, it has nothing to do."""
    path = tmp_path / "keys.toml"
    path.write_text(FILE)
    code, out, _ = run(path, capsys, "hash")
    assert code == 0 and "old, bob" in out
    text = path.read_text()
    assert OLD_KEY not in text and "bob-clear-key" not in text
    assert "# keys of the team" in text and "# bob's entry comes next" in text and "daily_tokens = 5" in text
    ring = KeyRing([], path)
    assert ring.identify(OLD_KEY).name == "old"  # type: ignore[union-attr]
    assert ring.identify("bob-clear-key-0123456789").prefix == "bob-"  # type: ignore[union-attr]
    assert run(path, capsys, "hash")[1].endswith("no clear-text keys to convert\n")


def test_list_shows_names_prefixes_and_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One row per key; with memory storage and no DATA_DIR/limits.db yet, nobody has used a key, and the
    command creates neither the directory nor the file."""
    path = tmp_path / "keys.toml"
    path.write_text(FILE)
    env = {"DATA_DIR": str(tmp_path / "data")}
    run(path, capsys, "create", "carol", "--daily-spend", "3")
    code, out, _ = run(path, capsys, "list", env=env)
    rows = out.splitlines()
    assert code == 0 and rows[0].split()[:3] == ["NAME", "PREFIX", "LIMITS"]
    assert re.match(r"old\s+\(clear text\)\s+5 tokens/day\s+never\s+0\.0000$", rows[1])
    assert re.match(r"carol\s+rk-\S{7}\s+3 spend/day", rows[3])
    assert str(tmp_path / "data" / "limits.db") in out and OLD_KEY not in out
    assert not (tmp_path / "data").exists()


def test_list_reads_last_use_and_spend_from_the_host_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """With memory storage `list` reads what the workers wrote in DATA_DIR/limits.db: last use, month's spend."""
    path = tmp_path / "keys.toml"
    path.write_text(FILE)
    store = HostCounters(tmp_path / "data" / "limits.db")
    used = datetime(2026, 12, 4, 9, 30, tzinfo=UTC).timestamp()
    store.touch("old", used, 10**9)
    store.settle((), [(spend_counter("old", utc_month()), 1.25, 86400)])
    code, out, _ = run(path, capsys, "list", env={"DATA_DIR": str(tmp_path / "data")})
    assert code == 0
    assert re.search(r"^old\s+\(clear text\)\s+5 tokens/day\s+2026-12-04 09:30\s+1\.2500$", out, re.MULTILINE), out
    assert re.search(r"^bob\s+\(clear text\)\s+defaults\s+never\s+0\.0000$", out, re.MULTILINE), out


def test_no_keys_file_named(capsys: pytest.CaptureFixture[str]) -> None:
    """Without KEYS_FILE or --file the command says what is missing."""
    assert main(["list"], environ={}) == 2
    assert "KEYS_FILE is not set" in capsys.readouterr().err


@pytest.mark.parametrize(("variable", "value"), [
    ("RATE_LIMIT_STORAGE_URI", "bogus://:s3cret-password@host"), ("LEDGER_RETENTION_DAYS", "thirty"),
    ("DATABASE_URL", "mysql://user:s3cret-password@host/db"),
])
def test_a_bad_setting_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], variable: str,
                                             value: str) -> None:
    """`keys list` reads the relay's settings with the relay's rules: a bad value is one line naming the
    variable, never its value and never a traceback."""
    code, _out, err = run(tmp_path / "keys.toml", capsys, "list", env={variable: value})
    assert code == 2 and err.startswith(f"keys: {variable}: ") and err.count("\n") == 1
    assert "s3cret" not in err and "thirty" not in err


def test_empty_settings_mean_their_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Blank lines of .env.example (KEYS_FILE=, RATE_LIMIT_STORAGE_URI=, DATA_DIR=) are the defaults."""
    empty = {"KEYS_FILE": " ", "RATE_LIMIT_STORAGE_URI": "", "DATA_DIR": "", "LEDGER_RETENTION_DAYS": ""}
    assert main(["list"], environ=empty) == 2
    assert "KEYS_FILE is not set" in capsys.readouterr().err
    keys = tmp_path / "keys.toml"
    keys.write_text(FILE)
    code, out, _err = run(keys, capsys, "list", env=empty)
    assert code == 0 and "bob" in out and "from data/limits.db" in out  # DATA_DIR's default, ./data


@pytest.mark.parametrize("text", ['keys.a.key = "a-clear-key-0123456789"\n',
                                  'keys = { a = { key = "a-clear-key-0123456789" } }\n'])
def test_entries_not_in_sections_are_left_to_the_operator(text: str) -> None:
    """Dotted or inline entries cannot be removed line by line: refused with a message, not mangled."""
    with pytest.raises(KeyFileEditError, match="by hand"):
        remove_entry(text, "a")


def test_add_entry_separates_sections() -> None:
    """A new entry starts after one blank line whatever the file ends with."""
    for text in ("", "# c", "# c\n", "# c\n\n"):
        added = add_entry(text, "n", "rk-" + "x" * 40, {"daily_tokens": 5, "daily_spend": None})
        assert "\n\n\n" not in added and added.endswith("daily_tokens = 5\n") and "daily_spend" not in added
    assert hash_entries("[other]\nkey = 'x'\n") == ("[other]\nkey = 'x'\n", [])


def test_revoked_key_is_gone_from_the_ring_within_the_reload_check(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A WebSocket asks the ring for its key's hash at each message: after a revocation the ring's next
    reload (at most RELOAD_CHECK_SECONDS later) answers None."""
    clock = [1000.0]
    monkeypatch.setattr(keys_module.time, "monotonic", lambda: clock[0])
    path = tmp_path / "keys.toml"
    key = created_key(run(path, capsys, "create", "dana")[1])
    ring = KeyRing([], path)
    policy = ring.identify(key)
    assert policy is not None
    run(path, capsys, "revoke", "dana")
    assert ring.by_digest(policy.digest) is not None, "until the next check"
    clock[0] += keys_module.RELOAD_CHECK_SECONDS
    assert ring.by_digest(policy.digest) is None


def test_created_keys_are_key_shaped_for_the_redactor() -> None:
    """The relay never holds a created key's clear text, so it is redacted by its shape (rk- and 43 characters)
    wherever it appears in upstream text or a log line; ordinary words with "rk-" are not."""
    key = new_key()
    assert redact_secret_like(f"bad key {key}!") == f"bad key {REDACTED}!"
    assert redact_secret_like("see network-settings and work-items") == "see network-settings and work-items"
