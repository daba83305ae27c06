"""Every setting of the relay, named once, read from the environment once, validated.

`Config.from_env` is the only place that reads environment variables for the app. Each variable is one row
of `SETTINGS` (gunicorn's: `SERVER_SETTINGS`) naming the dataclass field it sets and its parser; the field's
type and default stay on the dataclass. `UPSTREAMS_FILE` entries are a declared pydantic model
(`UpstreamEntry`). A bad value stops start-up with a one-line `ConfigError` whose message names the variable;
no message ever includes a key, nor the value of a setting that may carry one.

The environment is read through a table rather than a pydantic model because every value is a string that
needs a parser of the relay's own (its words for booleans, "positive number of seconds", origins, bind
addresses) with its own wording, and a model would declare each field's type and default a second time
beside `Config`, which stays a plain dataclass (built directly by tests, `dataclasses.replace`d elsewhere).
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from dotenv import dotenv_values, load_dotenv
from pydantic import AfterValidator, Field, StringConstraints, ValidationInfo, model_validator

from proxy.globs import serves
from proxy.keys import MIN_ACCESS_KEY_LENGTH, KeyRing, KeysFileError
from proxy.prices import PricesFileError, PriceTable, load_prices
from proxy.validation import EntryError, FileEntry, Says

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
RATE_LIMIT_STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+unix")
LOG_FORMATS = ("text", "json")
MAX_LOG_FLUSH_SECONDS = 60.0
# The checkout: where `python -m proxy run` and the keys commands find `.env` and deploy/gunicorn.conf.py.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path("data")  # relative to the working directory: the checkout for `make run`
LEDGER_SETTINGS = ("DATA_DIR", "DATABASE_URL", "LEDGER_RETENTION_DAYS")
DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
GUNICORN_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and never shows a secret."""


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream from `UPSTREAMS_FILE`. `api_key` is the secret itself, kept out of every repr."""

    name: str
    base_url: str
    api_key_env: str
    models: tuple[str, ...]  # exact names or globs
    api_key: str = field(default="", repr=False, compare=False)
    api: str = "openai"  # the protocol it speaks: "openai" (/v1/chat/completions...) or "anthropic" (/v1/messages)
    # The client protocols it serves natively (proxy/routing.py bridges the others): "chat", "responses",
    # "messages". The default follows `api`.
    protocols: tuple[str, ...] = ("chat", "responses")
    model_map: tuple[tuple[str, str], ...] = ()  # (client-facing name, the upstream's own name)


@dataclass(frozen=True)
class Config:
    authorization_keys: tuple[str, ...]
    openai_api_key: str
    openai_base_url: str = OPENAI_DEFAULT_BASE_URL
    default_model: str = "gpt-4o-mini"
    allowed_models: tuple[str, ...] = ()
    system_prompt: str | None = None
    cors_origins: tuple[str, ...] = ()
    keepalive_seconds: float = 15.0
    upstream_timeout: float = 30.0
    # How long each upstream's own model list (GET /models) is reused before it is asked again.
    models_cache_seconds: float = 300.0
    first_token_timeout: float = 300.0
    idle_timeout: float = 120.0
    max_stream_seconds: float = 1800.0
    max_body_bytes: int = 1024 * 1024
    # Multipart uploads forwarded under /v1 (audio, files, images): streamed, never held whole. OpenAI's audio cap.
    max_upload_bytes: int = 25 * 1024 * 1024
    max_tokens: int | None = None
    # Answers (`n`) one request may ask for; None: 1 when MAX_TOKENS is set (n would multiply the cap), else any.
    max_choices: int | None = None
    log_content: bool = False
    body_timeout: float = 30.0
    debug_stats: bool = False
    demo: bool = False
    # Named keys with limits of their own (TOML); reread on change, see proxy/keys.py.
    keys_file: Path | None = None
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (nginx/Caddy on this host: 127.0.0.1).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Limits per key (a key's own entry in KEYS_FILE wins) and for the whole relay; None: no limit.
    rate_limit_per_minute: int | None = None
    rate_limit_per_day: int | None = None
    daily_token_budget: int | None = None
    max_streams_per_key: int | None = None
    max_open_streams: int | None = None
    # Where the counters live: memory (one process; budgets in DATA_DIR/limits.db, shared by the host's
    # workers) or a Redis URL shared by every process and instance.
    rate_limit_storage_uri: str | None = None
    metrics_key: str | None = field(default=None, repr=False)
    # prometheus_client's multiprocess directory (deploy/gunicorn.conf.py sets one up when unset).
    prometheus_multiproc_dir: str | None = None
    log_format: str = "text"
    # A closed request's access-log line, metrics and ledger row are written at most this long after it, in
    # a batch (proxy/reports.py; under gevent only); 0: each at once.
    log_flush_seconds: float = 0.1
    # Every valid key and its policy: AUTHORIZATION_KEY's keys plus KEYS_FILE's, built from the above.
    keyring: KeyRing = field(init=False, repr=False, compare=False)
    # Prices per million tokens (TOML, proxy/prices.py), for the money budgets; unset: no price is known.
    prices_file: Path | None = None
    prices: PriceTable = field(init=False, repr=False, compare=False)
    upstreams_file: str | None = None
    upstreams: tuple[UpstreamSpec, ...] = ()  # from UPSTREAMS_FILE; empty: the single OPENAI_* upstream
    # The usage ledger (proxy/ledger): SQLite in DATA_DIR unless DATABASE_URL names a PostgreSQL server.
    # from_env always sets it (default: ./data); a Config built directly without either has no ledger.
    data_dir: Path | None = None
    database_url: str | None = field(default=None, repr=False)
    ledger_retention_days: int = 30
    # Reads every key's usage (GET /usage); None: nobody can.
    admin_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            keyring = KeyRing(self.authorization_keys, self.keys_file)
        except KeysFileError as exc:
            raise ConfigError(f"KEYS_FILE: {exc}") from None
        object.__setattr__(self, "keyring", keyring)
        try:
            object.__setattr__(self, "prices", load_prices(self.prices_file))
        except PricesFileError as exc:
            raise ConfigError(f"PRICES_FILE: {exc}") from None

    @property
    def limits_configured(self) -> bool:
        """Whether any limit can apply: relay-wide settings, or a keys file whose entries may set some."""
        return self.keys_file is not None or any((
            self.rate_limit_per_minute, self.rate_limit_per_day, self.daily_token_budget,
            self.max_streams_per_key, self.max_open_streams,
        ))

    @property
    def choices_cap(self) -> int | None:
        """The most answers (`n`) one request may ask for; None: no cap."""
        if self.max_choices is not None:
            return self.max_choices
        return 1 if self.max_tokens is not None else None

    def secrets(self) -> tuple[str, ...]:
        """Every credential the relay holds, read now: the keys file's keys change while it runs."""
        urls = (self.openai_base_url, self.rate_limit_storage_uri or "", self.database_url or "",
                *(spec.base_url for spec in self.upstreams))
        return tuple(secret for secret in (
            self.openai_api_key, self.metrics_key or "", self.admin_key or "",
            *(spec.api_key for spec in self.upstreams),
            *(policy.key for policy in self.keyring.policies), *(_url_password(url) for url in urls),
        ) if secret)

    def __repr__(self) -> str:  # keys must never reach a log through a stray repr()
        return (f"Config(base_url={loggable_url(self.openai_base_url)!r}, default_model={self.default_model!r}, "
                f"demo={self.demo})")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """Build and validate the configuration from environment variables (the table is `SETTINGS`)."""
        values: dict[str, Any] = {"authorization_keys": (), "openai_api_key": "", **read_settings(SETTINGS, env)}
        values.update(ledger_settings(env))
        upstreams_file = values.get("upstreams_file")
        upstreams = load_upstreams_file(upstreams_file, env) if upstreams_file else ()
        _require_keys(values, bool(upstreams))
        default_model = values.get("default_model", cls.default_model)
        # DEFAULT_MODEL is chat's: only the OpenAI-protocol upstreams can serve it (a file of Anthropic ones
        # alone serves /v1/messages only, and chat then names the model it lacks).
        chat_upstreams = [spec for spec in upstreams if spec.api == "openai"]
        if chat_upstreams and not any(serves(spec.models, spec.model_map, default_model) for spec in chat_upstreams):
            raise ConfigError(f"DEFAULT_MODEL: '{default_model}' is not served by any upstream in "
                              f"UPSTREAMS_FILE {upstreams_file}")
        return cls(**values, upstreams=upstreams)


def ledger_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The usage ledger's settings alone (what `python -m proxy usage` and `migrate` need), DATA_DIR always
    set: the variable, else systemd's StateDirectory= (deploy/relay.service: /var/lib/relay), else ./data."""
    values = read_settings(tuple(s for s in SETTINGS if s.env in LEDGER_SETTINGS), env)
    if "data_dir" not in values:
        state_directory = env.get("STATE_DIRECTORY", "").split(":")[0].strip()
        values["data_dir"] = Path(state_directory) if state_directory else DEFAULT_DATA_DIR
    return values


def _require_keys(values: Mapping[str, Any], has_upstreams: bool) -> None:
    """Refuse to run open, or with no upstream key (the demo's stand-in model needs none)."""
    keys, keys_file = values["authorization_keys"], values.get("keys_file")
    if values.get("demo"):
        if not keys:
            raise ConfigError("AUTHORIZATION_KEY is missing or empty (demo mode needs an access key too)")
        return
    if not keys and keys_file is None:
        raise ConfigError("AUTHORIZATION_KEY is missing or empty (and no KEYS_FILE): refusing to run an open relay")
    for number, key in enumerate(keys, start=1):
        if len(key) < MIN_ACCESS_KEY_LENGTH:  # a short key can be guessed, and would be shown whole at start-up
            raise ConfigError(f"AUTHORIZATION_KEY: key {number} is shorter than {MIN_ACCESS_KEY_LENGTH} characters; "
                              "use a long random string (openssl rand -hex 24)")
    if not values["openai_api_key"] and not has_upstreams:
        raise ConfigError("OPENAI_API_KEY is missing or empty: the relay has no upstream key")


@dataclass(frozen=True)
class ServerSettings:
    """gunicorn's settings for `deploy/gunicorn.conf.py`, read with the same rules as `Config`: a variable
    set to the empty string (as systemd's `EnvironmentFile` and Docker's `env_file` pass a blank line of
    `.env.example`) means its default, and a bad value is a one-line `ConfigError` naming the variable."""

    bind: str = "127.0.0.1:8000"
    workers: int = 0  # 0: one per CPU core, resolved by from_env
    worker_connections: int = 10000
    graceful_timeout: int = 30
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServerSettings:
        return cls(**{"workers": os.cpu_count() or 1, **read_settings(SERVER_SETTINGS, env)})

    @property
    def url(self) -> str:
        """Where a browser on this host reaches the relay (its chat page is at `/`)."""
        if self.bind.startswith(("unix:", "fd://")):
            return self.bind
        host, _, port = self.bind.rpartition(":")
        if host in ("0.0.0.0", "[::]", ""):
            host = "127.0.0.1"
        return f"http://{host}:{port}/"


def load_env_file() -> None:
    """Read `.env` from the working directory (only there), never overriding real environment variables."""
    load_dotenv(Path.cwd() / ".env", override=False)


def run_environment(environ: Mapping[str, str], env_file: Path) -> dict[str, str]:
    """The environment gunicorn starts with (`python -m proxy run`) and the keys commands read: the real
    variables, and `.env`'s settings under them (real variables win), so that every documented setting,
    GUNICORN_* included, counts when set in `.env`."""
    from_file = dotenv_values(env_file) if env_file.is_file() else {}
    env = {name: value for name, value in from_file.items() if value is not None}
    env.update(environ)
    return env


# --- the environment: one row per variable --------------------------------------------------------------------

class SettingError(ValueError):
    """A parser's complete reason, shown as `NAME: <reason>`; it never includes the value."""


@dataclass(frozen=True)
class Setting:
    """One environment variable: the field of `Config`/`ServerSettings` it sets and how its text is read.
    The field's type and default are the dataclass's own; an empty (or blank) variable means that default.
    No message ever shows a value; `secret` marks those that are or may carry a credential."""

    env: str
    field: str
    parse: Callable[[str], Any]
    secret: bool = False

    def read(self, raw: str) -> Any:
        # Never the value: a key pasted into the wrong variable would be printed to the journal.
        try:
            return self.parse(raw)
        except SettingError as exc:
            raise ConfigError(f"{self.env}: {exc}") from None
        except ValueError:  # a library's own message (int(), float(), ...) may quote the value
            raise ConfigError(f"{self.env}: the value is not valid") from None


def read_settings(table: tuple[Setting, ...], env: Mapping[str, str]) -> dict[str, Any]:
    """The fields the set variables give, checked in table order; unset and empty ones are left out."""
    values: dict[str, Any] = {}
    for setting in table:
        raw = env.get(setting.env, "").strip()
        if raw:
            values[setting.field] = setting.read(raw)
    return values


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _text(raw: str) -> str:
    return raw


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan  # float()'s own message quotes the value
    if not math.isfinite(value) or value <= 0:
        raise SettingError("expected a positive number of seconds")
    return value


def _seconds_up_to(most: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan  # float()'s own message quotes the value
        if not math.isfinite(value) or not 0 <= value <= most:
            raise SettingError(f"expected a number of seconds from 0 to {most:g}")
        return value
    return parse


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0  # int()'s own message quotes the value
    if value <= 0:
        raise SettingError("expected a positive whole number")
    return value


def _boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingError("expected 1/0, true/false, yes/no or on/off")


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(part, strict=False) for part in _csv(raw))
    except ValueError:
        raise SettingError("expected IP addresses or networks (127.0.0.1, 10.0.0.0/8, ::1)") from None


def _base_url(raw: str) -> str:
    if not _is_http_url(raw):  # the value is not echoed: a URL may carry user:password@
        raise SettingError(f"not an http(s) URL like {OPENAI_DEFAULT_BASE_URL}")
    return raw.rstrip("/")


def _origins(raw: str) -> tuple[str, ...]:
    origins = _csv(raw)
    for number, origin in enumerate(origins, start=1):
        if origin != "*" and not _is_origin(origin):
            raise SettingError(f"entry {number} is not an origin like https://example.com")
    return origins


def _long_key(raw: str) -> str:
    """A bearer key the relay checks (METRICS_KEY, ADMIN_KEY): as long as an access key must be."""
    if len(raw) < MIN_ACCESS_KEY_LENGTH:  # a short key can be guessed; the value itself is never shown
        raise SettingError(f"the key is shorter than {MIN_ACCESS_KEY_LENGTH} characters; use a long random string "
                           "(openssl rand -hex 24)")
    return raw


def _storage_uri(raw: str) -> str:
    if urlsplit(raw).scheme not in RATE_LIMIT_STORAGE_SCHEMES:  # never echoed: a Redis URL may carry a password
        schemes = ", ".join(f"{scheme}://" for scheme in RATE_LIMIT_STORAGE_SCHEMES)
        raise SettingError(f"expected a URL starting with one of {schemes}")
    return raw


def _database_url(raw: str) -> str:
    """A PostgreSQL URL, spelled for SQLAlchemy's psycopg 3 driver (`postgresql://` and `postgres://` too)."""
    scheme, sep, rest = raw.partition("://")  # never echoed: the URL may carry a password
    if not sep or scheme not in DATABASE_SCHEMES or not rest:
        raise SettingError("expected a PostgreSQL URL like postgresql://user:password@host/dbname")
    return f"postgresql+psycopg://{rest}"


def _bind_address(raw: str) -> str:
    if raw.startswith(("unix:", "fd://")):
        return raw
    host, colon, port = raw.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:  # port 0: any free port
        raise SettingError("expected HOST:PORT (127.0.0.1:8000, 0.0.0.0:8000, [::]:8000) or unix:/path/to.sock")
    return raw


def _one_of(choices: tuple[str, ...], hint: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise SettingError(hint)
        return raw.lower()
    return parse


# Order matters only for which of several bad values is reported first.
SETTINGS: tuple[Setting, ...] = (
    Setting("RELAY_DEMO", "demo", _boolean),
    Setting("AUTHORIZATION_KEY", "authorization_keys", _csv, secret=True),
    Setting("KEYS_FILE", "keys_file", Path),
    Setting("PRICES_FILE", "prices_file", Path),
    Setting("OPENAI_API_KEY", "openai_api_key", _text, secret=True),
    Setting("UPSTREAMS_FILE", "upstreams_file", _text),
    Setting("CORS_ORIGINS", "cors_origins", _origins),
    Setting("OPENAI_BASE_URL", "openai_base_url", _base_url, secret=True),
    Setting("MAX_TOKENS", "max_tokens", _positive_int),
    Setting("MAX_CHOICES", "max_choices", _positive_int),
    Setting("DEFAULT_MODEL", "default_model", _text),
    Setting("ALLOWED_MODELS", "allowed_models", _csv),
    Setting("SYSTEM_PROMPT", "system_prompt", _text),
    Setting("KEEPALIVE_SECONDS", "keepalive_seconds", _positive_float),
    Setting("UPSTREAM_TIMEOUT", "upstream_timeout", _positive_float),
    Setting("MODELS_CACHE_SECONDS", "models_cache_seconds", _positive_float),
    Setting("FIRST_TOKEN_TIMEOUT", "first_token_timeout", _positive_float),
    Setting("IDLE_TIMEOUT", "idle_timeout", _positive_float),
    Setting("MAX_STREAM_SECONDS", "max_stream_seconds", _positive_float),
    Setting("MAX_BODY_BYTES", "max_body_bytes", _positive_int),
    Setting("MAX_UPLOAD_BYTES", "max_upload_bytes", _positive_int),
    Setting("LOG_CONTENT", "log_content", _boolean),
    Setting("BODY_TIMEOUT", "body_timeout", _positive_float),
    Setting("RELAY_DEBUG_STATS", "debug_stats", _boolean),
    Setting("TRUSTED_PROXIES", "trusted_proxies", _networks),
    Setting("RATE_LIMIT_PER_MINUTE", "rate_limit_per_minute", _positive_int),
    Setting("RATE_LIMIT_PER_DAY", "rate_limit_per_day", _positive_int),
    Setting("DAILY_TOKEN_BUDGET", "daily_token_budget", _positive_int),
    Setting("MAX_STREAMS_PER_KEY", "max_streams_per_key", _positive_int),
    Setting("MAX_OPEN_STREAMS", "max_open_streams", _positive_int),
    Setting("RATE_LIMIT_STORAGE_URI", "rate_limit_storage_uri", _storage_uri, secret=True),
    Setting("METRICS_KEY", "metrics_key", _long_key, secret=True),
    Setting("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", _text),
    Setting("LOG_FORMAT", "log_format", _one_of(LOG_FORMATS, "expected text or json")),
    Setting("LOG_FLUSH_SECONDS", "log_flush_seconds", _seconds_up_to(MAX_LOG_FLUSH_SECONDS)),
    Setting("DATA_DIR", "data_dir", Path),
    Setting("DATABASE_URL", "database_url", _database_url, secret=True),
    Setting("LEDGER_RETENTION_DAYS", "ledger_retention_days", _positive_int),
    Setting("ADMIN_KEY", "admin_key", _long_key, secret=True),
)

SERVER_SETTINGS: tuple[Setting, ...] = (
    Setting("GUNICORN_BIND", "bind", _bind_address),
    Setting("GUNICORN_WORKERS", "workers", _positive_int),
    Setting("GUNICORN_WORKER_CONNECTIONS", "worker_connections", _positive_int),
    Setting("GUNICORN_GRACEFUL_TIMEOUT", "graceful_timeout", _positive_int),
    Setting("GUNICORN_LOG_LEVEL", "log_level", _one_of(GUNICORN_LOG_LEVELS,
                                                        f"expected one of {', '.join(GUNICORN_LOG_LEVELS)}")),
)


# --- UPSTREAMS_FILE ----------------------------------------------------------------------------------------------

def _stripped(value: str) -> str:
    return value.strip()


def _http_url(value: str) -> str:
    if not _is_http_url(value.strip()):
        raise ValueError("'base_url' must be an http(s) URL like https://api.example.com/v1")
    return value.strip().rstrip("/")


def _key_in_env(name: str, info: ValidationInfo) -> str:
    # Checked here, in field order, so a missing key is reported before a bad 'models' as it always was.
    env: Mapping[str, str] = (info.context or {}).get("env", {})
    if not env.get(name.strip(), "").strip():
        raise ValueError(f"{name.strip()} (named by 'api_key_env') is missing or empty")
    return name.strip()


_Named = Annotated[str, StringConstraints(pattern=r"\S")]
PROTOCOL_NAMES = '"chat", "responses", "messages"'


class UpstreamEntry(FileEntry):
    """One `[[upstreams]]` table of UPSTREAMS_FILE (the key itself stays in the environment)."""

    name: Annotated[_Named, Says("'name' must be a non-empty string"), AfterValidator(_stripped)]
    base_url: Annotated[str, Says("'base_url' must be an http(s) URL like https://api.example.com/v1"),
                        AfterValidator(_http_url)]
    api_key_env: Annotated[_Named, Says("'api_key_env' must name the environment variable that holds the key"),
                           AfterValidator(_key_in_env)]
    models: Annotated[list[_Named], Field(min_length=1),
                      Says("'models' must be a non-empty array of model names or globs "
                           '(["*"] for any model)')]
    api: Annotated[Literal["openai", "anthropic"],
                   Says("'api' must be \"openai\" (the default) or \"anthropic\" (Anthropic's Messages API)")
                   ] = "openai"
    protocols: Annotated[list[Literal["chat", "responses", "messages"]] | None, Field(min_length=1),
                         Says(f"'protocols' must be a non-empty array of {PROTOCOL_NAMES}")] = None
    model_map: Annotated[dict[_Named, _Named], Field(default_factory=dict),
                         Says("'model_map' must be a table of client-facing model names to the upstream's own "
                              "names, both non-empty strings")]

    @model_validator(mode="after")
    def _protocols_fit_the_api(self) -> Self:
        given = set(self.protocols or ())
        if self.api == "anthropic" and given - {"messages"}:
            raise ValueError("an upstream with api = \"anthropic\" speaks only \"messages\" ('protocols')")
        if self.api == "openai" and given and ("chat" not in given or "messages" in given):
            raise ValueError("an upstream with api = \"openai\" must list \"chat\" in 'protocols' and may add "
                             "\"responses\" (for \"messages\" declare api = \"anthropic\")")
        return self

    @property
    def native_protocols(self) -> tuple[str, ...]:
        if self.protocols:
            return tuple(dict.fromkeys(self.protocols))
        return ("messages",) if self.api == "anthropic" else ("chat", "responses")

    @classmethod
    def unknown_fields(cls, names: list[str]) -> str:
        return f"unknown field(s) {', '.join(names)}; expected {', '.join(sorted(cls.model_fields))}"


def load_upstreams_file(path: str, env: Mapping[str, str]) -> tuple[UpstreamSpec, ...]:
    """Read `[[upstreams]]` tables from the TOML file at `path` (see the README); each key is looked up in
    `env` under the variable name the file gives. Every problem is a ConfigError naming the file and entry."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        # Not the path: whatever was pasted into the variable (a key, say) would be echoed.
        raise ConfigError(f"UPSTREAMS_FILE: cannot read the file it names ({exc.strerror or type(exc).__name__})"
                          ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"UPSTREAMS_FILE {path}: not valid TOML ({exc})") from None
    unknown = set(document) - {"upstreams"}
    if unknown:
        raise ConfigError(f"UPSTREAMS_FILE {path}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                          "expected only [[upstreams]] tables")
    entries = document.get("upstreams")
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError(f"UPSTREAMS_FILE {path}: expected one or more [[upstreams]] tables")
    specs: list[UpstreamSpec] = []
    for number, entry in enumerate(entries, start=1):
        spec = _upstream_entry(f"UPSTREAMS_FILE {path}: upstream #{number}", entry, env)
        if any(spec.name == earlier.name for earlier in specs):
            raise ConfigError(f"UPSTREAMS_FILE {path}: upstream #{number}: the name '{spec.name}' is used twice")
        specs.append(spec)
    return tuple(specs)


def _upstream_entry(where: str, entry: dict[str, Any], env: Mapping[str, str]) -> UpstreamSpec:
    name = entry.get("name")
    if isinstance(name, str) and name.strip():
        where = f"{where} ('{name.strip()}')"
    try:
        checked = UpstreamEntry.check(entry, where, context={"env": env})
    except EntryError as exc:
        raise ConfigError(str(exc)) from None
    return UpstreamSpec(checked.name, checked.base_url, checked.api_key_env,
                        tuple(model.strip() for model in checked.models), env[checked.api_key_env].strip(),
                        checked.api, checked.native_protocols,
                        tuple((name.strip(), own.strip()) for name, own in checked.model_map.items()))


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in {"http", "https"} and bool(parts.hostname)


def _url_password(url: str) -> str:
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def loggable_url(url: str) -> str:
    """A URL as the start-up line shows it: scheme, host, port and path; userinfo and query may be credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "(unreadable URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _is_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    return _is_http_url(origin) and parts.path in {"", "/"} and not parts.query and not parts.fragment
