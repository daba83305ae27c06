"""proxy/keys.py (named keys, the keys file, reloads) and the parts of proxy/config.py not covered by
tests/test_startup.py and tests/test_upstreams.py."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from proxy import keys as keys_module
from proxy.config import Config, ConfigError
from proxy.keys import KeyRing, KeysFileError, env_key_policies, load_keys_file
from tests.conftest import ACCESS_KEY, UPSTREAM_KEY

BASE = {"AUTHORIZATION_KEY": ACCESS_KEY, "OPENAI_API_KEY": UPSTREAM_KEY}
K1, K2 = "first-key-01234567", "second-key-0123456"  # access keys must be 16 characters or more


def test_env_key_names() -> None:
    """One AUTHORIZATION_KEY is "default"; several are key1, key2, ... in order."""
    assert [p.name for p in env_key_policies(["a"])] == ["default"]
    assert [p.name for p in env_key_policies(["a", "b", "c"])] == ["key1", "key2", "key3"]


def test_identify() -> None:
    """The presented key's policy, or None for a wrong, partial, longer or empty key."""
    ring = KeyRing(["alpha-key", "beta-key"])
    assert ring.identify("beta-key").name == "key2"  # type: ignore[union-attr]
    for wrong in ("alpha", "alpha-key ", "alpha-keyx", "", "ALPHA-KEY", "é"):
        assert ring.identify(wrong) is None
    assert "alpha-key" not in repr(ring.policies)


@pytest.mark.parametrize(("text", "words"), [
    ("[keys.a\n", "is not valid TOML"),
    ("[other]\nx = 1\n", "unknown top-level entries ['other']"),
    ("keys = 3\n", "'keys' must be a table"),
    ('[keys."bad name"]\nkey = "{K1}"\n', "keys.bad name: a name is 1-64 letters"),
    ("[keys]\na = 3\n", "keys.a must be a table"),
    ('[keys.a]\nkey = "{K1}"\ncolour = "red"\n', "keys.a: unknown settings ['colour']"),
    ("[keys.a]\n", "keys.a: 'key' must be a non-empty string"),
    ('[keys.a]\nkey = " {K1}"\n', "keys.a: 'key' must not contain commas or surrounding spaces"),
    ('[keys.a]\nkey = "{K1},{K2}"\n', "keys.a: 'key' must not contain commas"),
    ('[keys.a]\nkey = "{K1}"\nrequests_per_minute = 0\n', "keys.a: 'requests_per_minute' must be a positive"),
    ('[keys.a]\nkey = "{K1}"\nmax_streams = true\n', "keys.a: 'max_streams' must be a positive whole number"),
    ('[keys.a]\nkey = "{K1}"\ndaily_tokens = 1.5\n', "keys.a: 'daily_tokens' must be a positive whole number"),
    ('[keys.a]\nkey = "{K1}"\nmodels = "gpt"\n', "keys.a: 'models' must be a list"),
    ('[keys.a]\nkey = "{K1}"\nmodels = [""]\n', "keys.a: 'models' must be a list"),
    ('[keys.a]\nkey = "{K1}"\n[keys.b]\nkey = "{K1}"\n', "keys.b has the same key as keys.a"),
])
def test_keys_file_refusals(tmp_path: Path, text: str, words: str) -> None:
    """Each problem in a keys file is named with the file and entry, never the key."""
    path = tmp_path / "keys.toml"
    path.write_text(text.replace("{K1}", K1).replace("{K2}", K2))
    with pytest.raises(KeysFileError) as caught:
        load_keys_file(path)
    assert words in str(caught.value) and str(path) in str(caught.value)
    assert K1 not in str(caught.value)


def test_keys_file_missing(tmp_path: Path) -> None:
    """An unreadable keys file says so; through Config it is a ConfigError naming KEYS_FILE."""
    with pytest.raises(KeysFileError, match="cannot read"):
        load_keys_file(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match=r"^KEYS_FILE: cannot read"):
        Config(authorization_keys=(), openai_api_key="x", keys_file=tmp_path / "none.toml")


def test_keys_file_may_not_repeat_authorization_key(tmp_path: Path) -> None:
    """A file entry reusing an AUTHORIZATION_KEY key or name is refused."""
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.a]\nkey = "{ACCESS_KEY}"\n')
    with pytest.raises(KeysFileError, match="repeats a key or name of AUTHORIZATION_KEY"):
        KeyRing([ACCESS_KEY], path)
    path.write_text('[keys.default]\nkey = "other-key-0123456789"\n')
    with pytest.raises(KeysFileError, match=r"keys\.default repeats"):
        KeyRing([ACCESS_KEY], path)


def test_keys_file_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed (or swapped) keys file is reread at the next check; a broken edit keeps the previous keys."""
    clock = [1000.0]
    monkeypatch.setattr(keys_module.time, "monotonic", lambda: clock[0])
    path = tmp_path / "keys.toml"
    path.write_text('[keys.alice]\nkey = "alice-key-0123456789"\n')
    ring = KeyRing([ACCESS_KEY], path)
    assert [p.name for p in ring.policies] == ["default", "alice"]

    swap = tmp_path / "keys.new"
    swap.write_text('[keys.bob]\nkey = "bob-key-0123456789"\nmodels = ["m*"]\n')
    os.replace(swap, path)
    assert ring.identify("bob-key-0123456789") is None, "checked at most once a second"
    clock[0] += keys_module.RELOAD_CHECK_SECONDS
    bob = ring.identify("bob-key-0123456789")
    assert bob is not None and bob.models == ("m*",) and ring.identify("alice-key-0123456789") is None

    path.write_text('[keys.bob]\nkey = "unterminated\n')
    clock[0] += keys_module.RELOAD_CHECK_SECONDS
    assert ring.identify("bob-key-0123456789") is not None
    path.unlink()
    clock[0] += keys_module.RELOAD_CHECK_SECONDS
    assert ring.identify("bob-key-0123456789") is not None, "a vanished file keeps the previous keys"


@pytest.mark.parametrize(("setting", "value", "field", "expected"), [
    ("TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8,::1", "trusted_proxies",
     tuple(ipaddress.ip_network(n) for n in ("127.0.0.1/32", "10.0.0.0/8", "::1/128"))),
    ("TRUSTED_PROXIES", "10.1.2.3/8", "trusted_proxies", (ipaddress.ip_network("10.0.0.0/8"),)),
    ("RATE_LIMIT_STORAGE_URI", "redis://:pw@host:6379/0", "rate_limit_storage_uri", "redis://:pw@host:6379/0"),
    ("RATE_LIMIT_STORAGE_URI", "memory://", "rate_limit_storage_uri", "memory://"),
    ("LOG_FORMAT", "JSON", "log_format", "json"),
    ("RELAY_DEBUG_STATS", "on", "debug_stats", True),
    ("LOG_CONTENT", "No", "log_content", False),
    ("SYSTEM_PROMPT", "  ", "system_prompt", None),
    ("METRICS_KEY", " metrics-key-0123456789 ", "metrics_key", "metrics-key-0123456789"),
    ("MAX_OPEN_STREAMS", "7", "max_open_streams", 7),
    ("DEFAULT_MODEL", " ", "default_model", "gpt-4o-mini"),
])
def test_settings_parse(setting: str, value: str, field: str, expected: object) -> None:
    """Settings not covered by test_startup parse as documented (blank: the default)."""
    assert getattr(Config.from_env({**BASE, setting: value}), field) == expected


@pytest.mark.parametrize(("env", "variable"), [
    ({**BASE, "BODY_TIMEOUT": "0"}, "BODY_TIMEOUT"),
    ({**BASE, "IDLE_TIMEOUT": "inf"}, "IDLE_TIMEOUT"),
    ({**BASE, "MAX_STREAM_SECONDS": "-5"}, "MAX_STREAM_SECONDS"),
    ({**BASE, "RELAY_DEBUG_STATS": "2"}, "RELAY_DEBUG_STATS"),
    ({**BASE, "DAILY_TOKEN_BUDGET": "1e6"}, "DAILY_TOKEN_BUDGET"),
    ({**BASE, "CORS_ORIGINS": "https://a.example/path"}, "CORS_ORIGINS"),
    ({**BASE, "CORS_ORIGINS": "ftp://a.example"}, "CORS_ORIGINS"),
    ({"RELAY_DEMO": "1"}, "AUTHORIZATION_KEY"),
    ({"RELAY_DEMO": "perhaps", **BASE}, "RELAY_DEMO"),
])
def test_more_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    """Malformed values beyond test_startup's list stop start-up naming the variable, never a key."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env)
    assert str(caught.value).startswith(variable)
    assert ACCESS_KEY not in str(caught.value) and UPSTREAM_KEY not in str(caught.value)


def test_demo_mode_needs_no_upstream_key() -> None:
    """RELAY_DEMO=1 needs only an access key; CORS "*" is accepted."""
    config = Config.from_env({"RELAY_DEMO": "yes", "AUTHORIZATION_KEY": ACCESS_KEY, "CORS_ORIGINS": "*"})
    assert config.demo and config.openai_api_key == "" and config.cors_origins == ("*",)


@pytest.mark.parametrize(("settings", "configured"), [
    ({}, False), ({"rate_limit_per_day": 5}, True), ({"max_open_streams": 1}, True),
    ({"daily_token_budget": 10}, True),
])
def test_limits_configured(settings: dict[str, int], configured: bool) -> None:
    """Limits cost nothing per request unless one is set (or a keys file may set some)."""
    assert Config(authorization_keys=("k",), openai_api_key="x", **settings).limits_configured is configured
