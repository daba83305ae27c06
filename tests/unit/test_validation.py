"""Every validation rule, in-process and fast: each setting, each TOML field and each request-body field with a
bad value gets its one-line message; the declarations and openapi.yaml say the same thing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import SERVER_SETTINGS, SETTINGS, Config, ConfigError, ServerSettings, Setting, UpstreamEntry
from proxy.errors import BadRequest
from proxy.keys import KeyEntry, KeysFileError, load_keys_file
from proxy.shaping import CHAT_FIELDS, ROLES, request_schemas, shape_chat_request, shape_openai_request

ROOT = Path(__file__).resolve().parents[2]
KEY = "unit-access-key-0123456789"
UPSTREAM_KEY = "sk-unit-upstream-9876543210"
BASE = {"AUTHORIZATION_KEY": KEY, "OPENAI_API_KEY": UPSTREAM_KEY}
CONFIG = Config(authorization_keys=(KEY,), openai_api_key=UPSTREAM_KEY, allowed_models=("gpt-4o*",))


def config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env)
    message = str(caught.value)
    assert "\n" not in message and KEY not in message and UPSTREAM_KEY not in message
    return message


# --- settings (environment variables) ----------------------------------------------------------------------------

BAD_SETTINGS = [
    ("RELAY_DEMO", "maybe", "RELAY_DEMO: expected 1/0, true/false, yes/no or on/off"),
    ("KEYS_FILE", "/nonexistent/keys.toml",
     "KEYS_FILE: cannot read the file it names (No such file or directory)"),
    ("PRICES_FILE", "/nonexistent/prices.toml",
     "PRICES_FILE: cannot read the file it names (No such file or directory)"),
    ("UPSTREAMS_FILE", "/nonexistent/up.toml", "UPSTREAMS_FILE: cannot read the file it names (No such file or "
                                               "directory)"),
    ("CORS_ORIGINS", "https://ok.example, not an origin",
     "CORS_ORIGINS: entry 2 is not an origin like https://example.com"),
    ("CORS_ORIGINS", "https://ok.example/path", "CORS_ORIGINS: entry 1 is not an origin like https://example.com"),
    ("OPENAI_BASE_URL", "api.example.org/v1", "OPENAI_BASE_URL: not an http(s) URL like https://api.openai.com/v1"),
    ("OPENAI_BASE_URL", "ftp://user:hunter2@host/v1",
     "OPENAI_BASE_URL: not an http(s) URL like https://api.openai.com/v1"),
    ("OPENAI_BASE_URL", "http://host:notaport/v1", "OPENAI_BASE_URL: not an http(s) URL like https://api.openai.com/v1"),
    ("MAX_TOKENS", "0", "MAX_TOKENS: expected a positive whole number"),
    ("MAX_CHOICES", "0", "MAX_CHOICES: expected a positive whole number"),
    ("KEEPALIVE_SECONDS", "soon", "KEEPALIVE_SECONDS: expected a positive number of seconds"),
    ("LOG_FLUSH_SECONDS", "-1", "LOG_FLUSH_SECONDS: expected a number of seconds from 0 to 60"),
    ("LOG_FLUSH_SECONDS", "61", "LOG_FLUSH_SECONDS: expected a number of seconds from 0 to 60"),
    ("LOG_FLUSH_SECONDS", "soon", "LOG_FLUSH_SECONDS: expected a number of seconds from 0 to 60"),
    ("LOG_FLUSH_SECONDS", "nan", "LOG_FLUSH_SECONDS: expected a number of seconds from 0 to 60"),
    ("UPSTREAM_TIMEOUT", "-1", "UPSTREAM_TIMEOUT: expected a positive number of seconds"),
    ("MODELS_CACHE_SECONDS", "0", "MODELS_CACHE_SECONDS: expected a positive number of seconds"),
    ("FIRST_TOKEN_TIMEOUT", "nan", "FIRST_TOKEN_TIMEOUT: expected a positive number of seconds"),
    ("IDLE_TIMEOUT", "inf", "IDLE_TIMEOUT: expected a positive number of seconds"),
    ("MAX_STREAM_SECONDS", "0", "MAX_STREAM_SECONDS: expected a positive number of seconds"),
    ("BODY_TIMEOUT", "-0.5", "BODY_TIMEOUT: expected a positive number of seconds"),
    ("MAX_BODY_BYTES", "1.5", "MAX_BODY_BYTES: expected a positive whole number"),
    ("MAX_UPLOAD_BYTES", "25MiB", "MAX_UPLOAD_BYTES: expected a positive whole number"),
    ("LOG_CONTENT", "maybe", "LOG_CONTENT: expected 1/0, true/false, yes/no or on/off"),
    ("RELAY_DEBUG_STATS", "2", "RELAY_DEBUG_STATS: expected 1/0, true/false, yes/no or on/off"),
    ("TRUSTED_PROXIES", "127.0.0.1,nginx",
     "TRUSTED_PROXIES: expected IP addresses or networks (127.0.0.1, 10.0.0.0/8, ::1)"),
    ("RATE_LIMIT_PER_MINUTE", "lots",
     "RATE_LIMIT_PER_MINUTE: expected a positive whole number"),
    ("RATE_LIMIT_PER_DAY", "0", "RATE_LIMIT_PER_DAY: expected a positive whole number"),
    ("DAILY_TOKEN_BUDGET", "-3", "DAILY_TOKEN_BUDGET: expected a positive whole number"),
    ("MAX_STREAMS_PER_KEY", "0", "MAX_STREAMS_PER_KEY: expected a positive whole number"),
    ("MAX_OPEN_STREAMS", "1e3", "MAX_OPEN_STREAMS: expected a positive whole number"),
    ("RATE_LIMIT_STORAGE_URI", "memcached://:s3cret-password@10.0.0.5",
     "RATE_LIMIT_STORAGE_URI: expected a URL starting with one of memory://, redis://, rediss://, redis+unix://"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT: expected text or json"),
    ("DATABASE_URL", "mysql://root:s3cret-password@db/relay",
     "DATABASE_URL: expected a PostgreSQL URL like postgresql://user:password@host/dbname"),
    ("LEDGER_RETENTION_DAYS", "0", "LEDGER_RETENTION_DAYS: expected a positive whole number"),
    ("METRICS_KEY", "metrics-key-15c", "METRICS_KEY: the key is shorter than 16 characters; use a long random "
                                       "string (openssl rand -hex 24)"),
    ("ADMIN_KEY", "admin", "ADMIN_KEY: the key is shorter than 16 characters; use a long random string "
                           "(openssl rand -hex 24)"),
]
# Free text, or checked only against other settings (the tests below): no value of their own is wrong.
FREE_SETTINGS = {"AUTHORIZATION_KEY", "OPENAI_API_KEY", "DEFAULT_MODEL", "ALLOWED_MODELS", "SYSTEM_PROMPT",
                 "PROMETHEUS_MULTIPROC_DIR", "DATA_DIR"}


@pytest.mark.parametrize(("variable", "value", "message"), BAD_SETTINGS)
def test_bad_setting_gets_its_message(variable: str, value: str, message: str) -> None:
    assert config_error({**BASE, variable: value}) == message


def test_no_message_shows_a_credential_carrying_value() -> None:
    """No refusal echoes the value (a key pasted into the wrong variable), even by a parser's own error text."""
    for _variable, value, message in BAD_SETTINGS:
        assert value not in message
    with pytest.raises(ConfigError) as caught:
        Setting("SOME_KEY", "some_key", int, secret=True).read("sk-not-a-number")
    assert str(caught.value) == "SOME_KEY: the value is not valid"


@pytest.mark.parametrize("variable", ["METRICS_KEY", "ADMIN_KEY"])
@pytest.mark.parametrize(("value", "accepted"), [("k" * 15, False), (" " + "k" * 15 + " ", False), ("k" * 16, True),
                                                 ("k" * 15 + "é", True)])
def test_bearer_keys_are_as_long_as_access_keys(variable: str, value: str, accepted: bool) -> None:
    """METRICS_KEY and ADMIN_KEY need 16 characters (after trimming), like access keys; in demo mode too. A
    refusal names the variable and never the value."""
    for env in ({**BASE, variable: value}, {"RELAY_DEMO": "1", "AUTHORIZATION_KEY": "demo", variable: value}):
        if accepted:
            assert getattr(Config.from_env(env), variable.lower()) == value.strip()
        else:
            message = config_error(env)
            assert message.startswith(f"{variable}: the key is shorter than 16 characters") and "k" * 15 not in message


def test_every_setting_has_a_bad_value_test_or_is_free_text() -> None:
    tested = {variable for variable, _, _ in BAD_SETTINGS}
    assert tested | FREE_SETTINGS == {setting.env for setting in SETTINGS}
    assert not tested & FREE_SETTINGS


@pytest.mark.parametrize(("env", "message"), [
    ({"OPENAI_API_KEY": UPSTREAM_KEY},
     "AUTHORIZATION_KEY is missing or empty (and no KEYS_FILE): refusing to run an open relay"),
    ({"AUTHORIZATION_KEY": " , ", "OPENAI_API_KEY": UPSTREAM_KEY},
     "AUTHORIZATION_KEY is missing or empty (and no KEYS_FILE): refusing to run an open relay"),
    ({"AUTHORIZATION_KEY": KEY}, "OPENAI_API_KEY is missing or empty: the relay has no upstream key"),
    ({"AUTHORIZATION_KEY": KEY, "OPENAI_API_KEY": "  "},
     "OPENAI_API_KEY is missing or empty: the relay has no upstream key"),
    ({"RELAY_DEMO": "1"}, "AUTHORIZATION_KEY is missing or empty (demo mode needs an access key too)"),
])
def test_missing_keys_are_refused(env: dict[str, str], message: str) -> None:
    assert config_error(env) == message


@pytest.mark.parametrize(("variable", "value", "field", "expected"), [
    ("AUTHORIZATION_KEY", " a-0123456789abcdef , b-0123456789abcdef,, ", "authorization_keys",
     ("a-0123456789abcdef", "b-0123456789abcdef")),
    ("OPENAI_BASE_URL", " https://h.example/v1/ ", "openai_base_url", "https://h.example/v1"),
    ("CORS_ORIGINS", "*, https://a.example, http://b:8080/", "cors_origins",
     ("*", "https://a.example", "http://b:8080/")),
    ("MAX_TOKENS", "256", "max_tokens", 256),
    ("MAX_CHOICES", "4", "max_choices", 4),
    ("IDLE_TIMEOUT", "0.5", "idle_timeout", 0.5),
    ("LOG_CONTENT", "YES", "log_content", True),
    ("RELAY_DEBUG_STATS", "off", "debug_stats", False),
    ("KEYS_FILE", None, "keys_file", None),
    ("LOG_FORMAT", "JSON", "log_format", "json"),
    ("SYSTEM_PROMPT", "  Be brief.  ", "system_prompt", "Be brief."),
    ("METRICS_KEY", " metrics-key-0123456789 ", "metrics_key", "metrics-key-0123456789"),
    ("RATE_LIMIT_STORAGE_URI", "redis://:pw@h:6379/0", "rate_limit_storage_uri", "redis://:pw@h:6379/0"),
])
def test_good_setting_is_parsed(variable: str, value: str | None, field: str, expected: Any) -> None:
    env = dict(BASE) if value is None else {**BASE, variable: value}
    assert getattr(Config.from_env(env), field) == expected


def test_settings_tables_name_real_fields_and_every_variable_of_env_example() -> None:
    """One row per variable; each sets a field of its dataclass, and .env.example lists exactly these."""
    config_fields = {field.name for field in dataclasses.fields(Config)}
    assert {setting.field for setting in SETTINGS} <= config_fields
    server_fields = {field.name for field in dataclasses.fields(ServerSettings)}
    assert {setting.field for setting in SERVER_SETTINGS} == server_fields
    variables = [setting.env for setting in (*SETTINGS, *SERVER_SETTINGS)]
    assert len(variables) == len(set(variables))
    lines = (ROOT / ".env.example").read_text().splitlines()
    listed = {line.partition("=")[0] for line in lines if line and not line.startswith("#")}
    # Set by the deploy files (unit, Dockerfile, compose) and prepared by deploy/gunicorn.conf.py, not by hand.
    assert listed | {"PROMETHEUS_MULTIPROC_DIR"} == set(variables)


def test_readme_documents_every_setting() -> None:
    """Every variable of the settings tables has its row in one of the README's settings tables."""
    readme = (ROOT / "README.md").read_text()
    rows = {line.split("`")[1] for line in readme.splitlines() if line.startswith("| `")}
    assert [setting.env for setting in (*SETTINGS, *SERVER_SETTINGS) if setting.env not in rows] == []


def test_config_keeps_no_copy_of_the_environment() -> None:
    """The environment holds every secret; Config keeps only the settings it names."""
    assert "environ" not in {field.name for field in dataclasses.fields(Config)}


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("GUNICORN_BIND", "8000", "GUNICORN_BIND: expected HOST:PORT (127.0.0.1:8000, 0.0.0.0:8000, "
                              "[::]:8000) or unix:/path/to.sock"),
    ("GUNICORN_BIND", "127.0.0.1:70000", "GUNICORN_BIND: expected HOST:PORT "
                                         "(127.0.0.1:8000, 0.0.0.0:8000, [::]:8000) or unix:/path/to.sock"),
    ("GUNICORN_WORKERS", "two", "GUNICORN_WORKERS: expected a positive whole number"),
    ("GUNICORN_WORKER_CONNECTIONS", "-5", "GUNICORN_WORKER_CONNECTIONS: expected a positive whole number"),
    ("GUNICORN_GRACEFUL_TIMEOUT", "0", "GUNICORN_GRACEFUL_TIMEOUT: expected a positive whole number"),
    ("GUNICORN_LOG_LEVEL", "loud", "GUNICORN_LOG_LEVEL: expected one of debug, info, warning, error, critical"),
])
def test_bad_server_setting_gets_its_message(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServerSettings.from_env({variable: value})
    assert str(caught.value) == message


def test_server_settings_blank_means_default() -> None:
    blank = {setting.env: " " for setting in SERVER_SETTINGS}
    assert ServerSettings.from_env(blank) == ServerSettings.from_env({})
    assert ServerSettings.from_env({"GUNICORN_BIND": "unix:/run/relay.sock"}).bind == "unix:/run/relay.sock"


# --- KEYS_FILE ---------------------------------------------------------------------------------------------------

A = '[keys.a]\nkey = "k-0123456789abcdef"\n'  # an entry with a long enough key


@pytest.mark.parametrize(("toml", "message"), [
    ('x = 1', "unknown top-level entries ['x']; put keys under [keys.<name>]"),
    ('keys = 3', "'keys' must be a table of [keys.<name>] sections"),
    ('[keys."bad name"]\nkey = "a"', "keys.bad name: a name is 1-64 letters, digits, '.', '_' or '-'"),
    ('keys.a = 3', 'keys.a must be a table with at least key = "..."'),
    (A + 'zz = 1\nyy = 2', "keys.a: unknown settings ['yy', 'zz']"),
    ('[keys.a]\nmodels = ["m"]', "keys.a: 'key' must be a non-empty string (or the entry a 'hash' made by "
                                  "python -m proxy keys create)"),
    ('[keys.a]\nhash = "sha256:00"', "keys.a: 'hash' must be \"sha256:\" and 64 lowercase hex digits "
                                     "(python -m proxy keys create)"),
    (A + f'hash = "sha256:{"0" * 64}"', "keys.a: give 'key' or 'hash', not both"),
    (A + 'daily_spend = 0', "keys.a: 'daily_spend' must be a positive amount of money (a number, in "
                            "PRICES_FILE's currency)"),
    (A + 'monthly_spend = "5"', "keys.a: 'monthly_spend' must be a positive amount of money (a number, in "
                                "PRICES_FILE's currency)"),
    ('[keys.a]\nkey = "  "', "keys.a: 'key' must be a non-empty string"),
    ('[keys.a]\nkey = 3', "keys.a: 'key' must be a non-empty string"),
    ('[keys.a]\nkey = " k"', "keys.a: 'key' must not contain commas or surrounding spaces"),
    ('[keys.a]\nkey = "k,l"', "keys.a: 'key' must not contain commas or surrounding spaces"),
    ('[keys.a]\nkey = "fifteen-chars-k"', "keys.a: 'key' must be at least 16 characters (a long random string)"),
    (A + 'requests_per_minute = 0', "keys.a: 'requests_per_minute' must be a positive whole number"),
    (A + 'requests_per_day = "5"', "keys.a: 'requests_per_day' must be a positive whole number"),
    (A + 'daily_tokens = 1.0', "keys.a: 'daily_tokens' must be a positive whole number"),
    (A + 'max_streams = true', "keys.a: 'max_streams' must be a positive whole number"),
    (A + 'models = "m"', "keys.a: 'models' must be a list of model names or globs"),
    (A + 'models = [""]', "keys.a: 'models' must be a list of model names or globs"),
    ('[keys.a]\nkey = 3\nmax_streams = 0\nmodels = 1', "keys.a: 'key' must be a non-empty string"),
    (A + '[keys.b]\nkey = "k-0123456789abcdef"', "keys.b has the same key as keys.a"),
])
def test_bad_keys_file_gets_its_message(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(toml)
    with pytest.raises(KeysFileError) as caught:
        load_keys_file(path)
    assert str(caught.value) == f"{path}: {message}"


def test_keys_file_entry_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[keys.alice]\nkey = "alice-key-0123456789"\nrequests_per_minute = 3\nmodels = ["gpt-4o*"]\n'
                    '[keys.bob]\nkey = "bob-key-0123456789ab"\n')
    alice, bob = load_keys_file(path)
    assert (alice.name, alice.key, alice.requests_per_minute, alice.models) == (
        "alice", "alice-key-0123456789", 3, ("gpt-4o*",))
    assert (bob.requests_per_day, bob.daily_tokens, bob.max_streams, bob.models) == (None, None, None, ())
    assert "alice-key-0123456789" not in repr(KeyEntry.model_validate({"key": "alice-key-0123456789"}))


def test_every_file_field_has_a_message() -> None:
    """`messages()` raises for a field declared without its Says(...)."""
    assert set(KeyEntry.messages()) == {"key", "hash", "prefix", "requests_per_minute", "requests_per_day",
                                        "daily_tokens", "max_streams", "daily_spend", "monthly_spend", "models"}
    assert set(UpstreamEntry.messages()) == {"name", "base_url", "api_key_env", "models", "api", "protocols",
                                             "model_map"}


# --- UPSTREAMS_FILE ----------------------------------------------------------------------------------------------

U = "[[upstreams]]\n"
ENTRY = 'name = "kimi"\nbase_url = "https://api.moonshot.cn/v1"\napi_key_env = "K"\nmodels = ["kimi-*"]\n'


@pytest.mark.parametrize(("toml", "message"), [
    ("[[upstreams]\nname=", "not valid TOML"),
    ("", "expected one or more [[upstreams]] tables"),
    ("upstreams = [1]", "expected one or more [[upstreams]] tables"),
    ("[server]\nport = 1\n", "unknown top-level key(s) server; expected only [[upstreams]] tables"),
    (U + ENTRY.replace('name = "kimi"\n', ""), "upstream #1: 'name' must be a non-empty string"),
    (U + ENTRY.replace('"kimi"', '" "'), "upstream #1: 'name' must be a non-empty string"),
    (U + ENTRY.replace('"kimi"', "3"), "upstream #1: 'name' must be a non-empty string"),
    (U + ENTRY.replace("https://api.moonshot.cn/v1", "api.moonshot.cn"),
     "upstream #1 ('kimi'): 'base_url' must be an http(s) URL like https://api.example.com/v1"),
    (U + ENTRY.replace('"https://api.moonshot.cn/v1"', "5"),
     "upstream #1 ('kimi'): 'base_url' must be an http(s) URL like https://api.example.com/v1"),
    (U + ENTRY.replace('"K"', '""'),
     "upstream #1 ('kimi'): 'api_key_env' must name the environment variable that holds the key"),
    (U + ENTRY.replace('"K"', '"MISSING_KEY"'), "upstream #1 ('kimi'): MISSING_KEY (named by 'api_key_env') is missing "
                                            "or empty"),
    (U + ENTRY.replace('"K"', '"MISSING_KEY"').replace('["kimi-*"]', "[]"),
     "upstream #1 ('kimi'): MISSING_KEY (named by 'api_key_env') is missing or empty"),
    (U + ENTRY.replace('api_key_env = "K"', 'api_key = "sk-x"'),
     "upstream #1 ('kimi'): unknown field(s) api_key; expected api, api_key_env, base_url, model_map, models, name, "
     "protocols"),
    (U + ENTRY + 'protocols = []\n', "upstream #1 ('kimi'): 'protocols' must be a non-empty array of \"chat\""),
    (U + ENTRY + 'protocols = ["chat", "grpc"]\n', "'protocols' must be a non-empty array of \"chat\", \"responses\""),
    (U + ENTRY + 'protocols = ["responses"]\n',
     "upstream #1 ('kimi'): an upstream with api = \"openai\" must list \"chat\" in 'protocols'"),
    (U + ENTRY + 'protocols = ["chat", "messages"]\n', "(for \"messages\" declare api = \"anthropic\")"),
    (U + ENTRY + 'api = "anthropic"\nprotocols = ["chat"]\n',
     "upstream #1 ('kimi'): an upstream with api = \"anthropic\" speaks only \"messages\" ('protocols')"),
    (U + ENTRY + 'model_map = { "claude-x" = 3 }\n', "upstream #1 ('kimi'): 'model_map' must be a table of"),
    (U + ENTRY + 'model_map = { "claude-x" = " " }\n', "'model_map' must be a table of client-facing model names"),
    (U + ENTRY + 'api = "gemini"\n',
     "upstream #1 ('kimi'): 'api' must be \"openai\" (the default) or \"anthropic\" (Anthropic's Messages API)"),
    (U + ENTRY + "api = 1\n", "upstream #1 ('kimi'): 'api' must be \"openai\""),
    (U + ENTRY.replace('["kimi-*"]', "[]"),
     "upstream #1 ('kimi'): 'models' must be a non-empty array of model names or globs ([\"*\"] for any model)"),
    (U + ENTRY.replace('["kimi-*"]', '["a", " "]'), "upstream #1 ('kimi'): 'models' must be a non-empty array"),
    (U + ENTRY.replace('["kimi-*"]', '"kimi-*"'), "upstream #1 ('kimi'): 'models' must be a non-empty array"),
    (U + ENTRY + U + ENTRY, "upstream #2: the name 'kimi' is used twice"),
])
def test_bad_upstreams_file_gets_its_message(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(toml)
    text = config_error({"AUTHORIZATION_KEY": KEY, "UPSTREAMS_FILE": str(path), "K": "sk-x",
                         "DEFAULT_MODEL": "kimi-k2"})
    assert text.startswith(f"UPSTREAMS_FILE {path}: ") and message in text and "sk-x" not in text


def test_upstreams_file_is_parsed_and_serves_the_default_model(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(U + ENTRY.replace('"kimi"', '" kimi "').replace("/v1", "/v1/"))
    env = {"AUTHORIZATION_KEY": KEY, "UPSTREAMS_FILE": str(path), "K": " sk-1 "}
    assert config_error(env) == f"DEFAULT_MODEL: 'gpt-4o-mini' is not served by any upstream in UPSTREAMS_FILE {path}"
    (spec,) = Config.from_env({**env, "DEFAULT_MODEL": "kimi-k2"}).upstreams
    assert (spec.name, spec.base_url, spec.api_key_env, spec.models, spec.api_key, spec.api) == (
        "kimi", "https://api.moonshot.cn/v1", "K", ("kimi-*",), "sk-1", "openai")


def test_protocols_default_by_api_and_model_map_names_serve_the_default_model(tmp_path: Path) -> None:
    """`protocols` defaults to chat+responses (openai) or messages (anthropic); a `model_map` name counts as
    served, DEFAULT_MODEL included, and keeps its upstream name."""
    path = tmp_path / "upstreams.toml"
    chat_only = ENTRY + 'protocols = ["chat"]\n[upstreams.model_map]\n"claude-sonnet-5" = "kimi-k2"\n'
    anthropic_entry = ENTRY.replace('"kimi"', '"native"') + 'api = "anthropic"\n'
    path.write_text(U + chat_only + U + anthropic_entry + U + ENTRY.replace('"kimi"', '"full"'))
    env = {"AUTHORIZATION_KEY": KEY, "UPSTREAMS_FILE": str(path), "K": "sk-1", "DEFAULT_MODEL": "claude-sonnet-5"}
    kimi, native, full = Config.from_env(env).upstreams
    assert (kimi.protocols, kimi.model_map) == (("chat",), (("claude-sonnet-5", "kimi-k2"),))
    assert (native.protocols, full.protocols) == (("messages",), ("chat", "responses"))


def test_anthropic_upstream_is_parsed_and_left_out_of_chat(tmp_path: Path) -> None:
    """`api = "anthropic"` is kept on the spec; DEFAULT_MODEL need only be served by the OpenAI upstreams,
    and a file of Anthropic upstreams alone starts."""
    path = tmp_path / "upstreams.toml"
    anthropic_entry = ENTRY.replace('"kimi"', '"kimi-anthropic"').replace("/v1", "/anthropic") + 'api = "anthropic"\n'
    path.write_text(U + anthropic_entry + U + ENTRY)
    env = {"AUTHORIZATION_KEY": KEY, "UPSTREAMS_FILE": str(path), "K": "sk-1"}
    assert [spec.api for spec in Config.from_env({**env, "DEFAULT_MODEL": "kimi-k2"}).upstreams] == ["anthropic",
                                                                                                    "openai"]
    path.write_text(U + anthropic_entry + U + ENTRY.replace('["kimi-*"]', '["gpt-*"]'))
    assert "DEFAULT_MODEL: 'kimi-k2' is not served" in config_error({**env, "DEFAULT_MODEL": "kimi-k2"})
    path.write_text(U + anthropic_entry)
    first, = Config.from_env(env).upstreams
    assert (first.api, first.base_url) == ("anthropic", "https://api.moonshot.cn/anthropic")


# --- request bodies ----------------------------------------------------------------------------------------------

HELLO = [{"role": "user", "content": "Hello"}]


def bad_request(shape: Any, body: dict[str, Any]) -> str:
    with pytest.raises(BadRequest) as caught:
        shape(body, CONFIG)
    return str(caught.value.description)


@pytest.mark.parametrize(("body", "message"), [
    ({}, "'messages' is required: a non-empty array of {role, content} objects"),
    ({"messages": []}, "'messages' must be a non-empty array of {role, content} objects"),
    ({"messages": "hi"}, "'messages' must be a non-empty array of {role, content} objects"),
    ({"messages": [1]}, "'messages[0]' must be an object with 'role' and 'content'"),
    ({"messages": [*HELLO, {"role": "wizard", "content": "x"}]},
     "'messages[1].role' must be one of system, user, assistant, tool, function or developer"),
    ({"messages": [{"content": "x"}]},
     "'messages[0].role' must be one of system, user, assistant, tool, function or developer"),
    ({"messages": [{"role": "user", "content": 5}]}, "'messages[0].content' must be a string or an array of content "
                                                      "parts"),
    ({"messages": [{"role": "user"}]}, "'messages[0].content' must be a string or an array of content parts"),
    ({"messages": HELLO, "model": 3}, "'model' must be a non-empty string"),
    ({"messages": HELLO, "model": " "}, "'model' must be a non-empty string"),
    ({"messages": HELLO, "model": "claude-3"}, "model 'claude-3' is not allowed on this relay (allowed: gpt-4o*)"),
    ({"messages": HELLO, "temperature": "hot"}, "'temperature' must be a number"),
    ({"messages": HELLO, "temperature": True}, "'temperature' must be a number"),
    ({"messages": HELLO, "temperature": 9}, "'temperature' must be between 0 and 2"),
    ({"messages": HELLO, "top_p": 1.5}, "'top_p' must be between 0 and 1"),
    ({"messages": HELLO, "presence_penalty": -3}, "'presence_penalty' must be between -2 and 2"),
    ({"messages": HELLO, "frequency_penalty": [1]}, "'frequency_penalty' must be a number"),
    ({"messages": HELLO, "max_tokens": True}, "'max_tokens' must be a whole number"),
    ({"messages": HELLO, "max_tokens": 0}, "'max_tokens' must be at least 1"),
    ({"messages": HELLO, "max_completion_tokens": 2.5}, "'max_completion_tokens' must be a whole number"),
    ({"messages": HELLO, "seed": -1}, "'seed' must be at least 0"),
    ({"messages": HELLO, "stop": [1]}, "'stop' must be a string or an array of up to 4 strings"),
    ({"messages": HELLO, "stop": ["a"] * 5}, "'stop' must be a string or an array of up to 4 strings"),
    ({"messages": HELLO, "include_reasoning": "yes"}, "'include_reasoning' must be true or false"),
    ({"messages": HELLO, "include_reasoning": None}, "'include_reasoning' must be true or false"),
])
def test_bad_chat_body_gets_its_message(body: dict[str, Any], message: str) -> None:
    assert bad_request(shape_chat_request, body) == message


def test_chat_body_values_reach_the_upstream_as_sent() -> None:
    body = {"messages": [*HELLO, {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}],
            "temperature": 1, "top_p": None, "max_tokens": 256.0, "seed": 0, "stop": "\n", "user": {"any": 1},
            "response_format": {"type": "json_object"}, "ignored": 1, "include_reasoning": True}
    shaped = shape_chat_request(body, CONFIG)
    assert shaped.include_reasoning is True and shaped.model == CONFIG.default_model
    assert shaped.upstream_body == {"model": "gpt-4o-mini", "messages": body["messages"], "temperature": 1,
                                    "max_tokens": 256, "seed": 0, "stop": "\n", "response_format": body[
                                        "response_format"], "user": {"any": 1},
                                    "stream_options": {"include_usage": True}}
    assert type(shaped.upstream_body["temperature"]) is int and type(shaped.upstream_body["max_tokens"]) is int


@pytest.mark.parametrize("role", ROLES)
def test_every_role_is_accepted(role: str) -> None:
    assert shape_chat_request({"messages": [{"role": role, "content": "x"}]}, CONFIG).upstream_body["messages"]


@pytest.mark.parametrize(("body", "message"), [
    ({"model": "gpt-4o-mini"}, "'messages' is required: a non-empty array of message objects"),
    ({"messages": []}, "'messages' is required: a non-empty array of message objects"),
    ({"messages": ["hi"]}, "'messages[0]' must be an object with a string 'role'"),
    ({"messages": [*HELLO, {"content": "no role"}]}, "'messages[1]' must be an object with a string 'role'"),
    ({"messages": HELLO, "stream": "yes"}, "'stream' must be true or false"),
    ({"messages": HELLO, "stream_options": "usage"},
     "'stream_options' must be an object like {\"include_usage\": true}"),
    ({"messages": HELLO, "stream_options": {"include_usage": 1}}, "'stream_options.include_usage' must be true or "
                                                                  "false"),
    ({"messages": HELLO, "model": 42}, "'model' must be a non-empty string"),
])
def test_bad_openai_body_gets_its_message(body: dict[str, Any], message: str) -> None:
    assert bad_request(shape_openai_request, body) == message


def test_openai_body_passes_upstream_untouched_but_for_the_relays_rules() -> None:
    body = {"messages": [{"role": "anything", "content": 5}], "stream": None, "stream_options": None, "n": 2,
            "temperature": "the upstream's business"}
    shaped = shape_openai_request(body, CONFIG)
    assert shaped.stream is False and shaped.upstream_body == {**body, "model": "gpt-4o-mini"}


# --- openapi.yaml holds the same rules ---------------------------------------------------------------------------

def without_descriptions(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: without_descriptions(value) for key, value in schema.items() if key != "description"}
    if isinstance(schema, list):
        return [without_descriptions(item) for item in schema]
    return schema


@pytest.mark.parametrize("name", sorted(request_schemas()))
def test_openapi_request_schema_is_what_the_relay_checks(name: str) -> None:
    """openapi.yaml's request bodies are exactly the declared rules (roles, sampling fields and their types and
    ranges, required fields): changing either without the other fails here."""
    document = yaml.safe_load((ROOT / "proxy" / "openapi.yaml").read_text())
    assert without_descriptions(document["components"]["schemas"][name]) == request_schemas()[name]


def test_every_chat_field_is_in_the_schema() -> None:
    properties = request_schemas()["ChatRequest"]["properties"]
    assert set(CHAT_FIELDS) | {"messages", "model", "include_reasoning"} == set(properties)
