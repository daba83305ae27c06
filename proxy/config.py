"""Every setting of the relay, named once, read from the environment once, validated.

`Config.from_env` is the only place that reads environment variables for the app. A bad value stops
start-up with a `ConfigError` whose message names the variable; no message ever includes a key.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from dotenv import load_dotenv

from proxy.keys import KeyRing, KeysFileError

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
RATE_LIMIT_STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+unix")
LOG_FORMATS = ("text", "json")
GUNICORN_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

T = TypeVar("T")


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
    first_token_timeout: float = 300.0
    idle_timeout: float = 120.0
    max_stream_seconds: float = 1800.0
    max_body_bytes: int = 1024 * 1024
    max_tokens: int | None = None
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
    # Where the counters live: memory (one process) or a Redis URL shared by every process and instance.
    rate_limit_storage_uri: str | None = None
    metrics_key: str | None = field(default=None, repr=False)
    # prometheus_client's multiprocess directory (deploy/gunicorn.conf.py sets one up when unset).
    prometheus_multiproc_dir: str | None = None
    log_format: str = "text"
    # Every valid key and its policy: AUTHORIZATION_KEY's keys plus KEYS_FILE's, built from the above.
    keyring: KeyRing = field(init=False, repr=False, compare=False)
    upstreams_file: str | None = None
    upstreams: tuple[UpstreamSpec, ...] = ()  # from UPSTREAMS_FILE; empty: the single OPENAI_* upstream
    # Extra environment the app may need later (e.g. keys named by an upstreams file); never logged.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            keyring = KeyRing(self.authorization_keys, self.keys_file)
        except KeysFileError as exc:
            raise ConfigError(f"KEYS_FILE: {exc}") from None
        object.__setattr__(self, "keyring", keyring)

    @property
    def limits_configured(self) -> bool:
        """Whether any limit can apply: relay-wide settings, or a keys file whose entries may set some."""
        return self.keys_file is not None or any((
            self.rate_limit_per_minute, self.rate_limit_per_day, self.daily_token_budget,
            self.max_streams_per_key, self.max_open_streams,
        ))

    def __repr__(self) -> str:  # keys must never reach a log through a stray repr()
        return f"Config(base_url={self.openai_base_url!r}, default_model={self.default_model!r}, demo={self.demo})"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """Build and validate the configuration from environment variables."""
        demo = _parse(env, "RELAY_DEMO", _boolean, False)
        keys = _csv(env.get("AUTHORIZATION_KEY", ""))
        keys_file = _parse(env, "KEYS_FILE", Path, None)
        api_key = env.get("OPENAI_API_KEY", "").strip()
        upstreams_file = env.get("UPSTREAMS_FILE", "").strip() or None
        upstreams = load_upstreams_file(upstreams_file, env) if upstreams_file else ()
        if not demo:
            if not keys and keys_file is None:
                raise ConfigError("AUTHORIZATION_KEY is missing or empty (and no KEYS_FILE): "
                                  "refusing to run an open relay")
            if not api_key and not upstreams:
                raise ConfigError("OPENAI_API_KEY is missing or empty: the relay has no upstream key")
        elif not keys:
            raise ConfigError("AUTHORIZATION_KEY is missing or empty (demo mode needs an access key too)")
        origins = _csv(env.get("CORS_ORIGINS", ""))
        for origin in origins:
            if origin != "*" and not _is_origin(origin):
                raise ConfigError(f"CORS_ORIGINS: {origin!r} is not an origin like https://example.com")
        base_url = env.get("OPENAI_BASE_URL", "").strip() or OPENAI_DEFAULT_BASE_URL
        if not _is_http_url(base_url):
            raise ConfigError(f"OPENAI_BASE_URL: {base_url!r} is not an http(s) URL")
        max_tokens = _parse(env, "MAX_TOKENS", _positive_int, None)
        default_model = env.get("DEFAULT_MODEL", "").strip() or cls.default_model
        if upstreams and not any(_matches(spec.models, default_model) for spec in upstreams):
            raise ConfigError(f"DEFAULT_MODEL: '{default_model}' is not served by any upstream in "
                              f"UPSTREAMS_FILE {upstreams_file}")
        return cls(
            authorization_keys=keys,
            openai_api_key=api_key,
            openai_base_url=base_url.rstrip("/"),
            default_model=default_model,
            allowed_models=_csv(env.get("ALLOWED_MODELS", "")),
            system_prompt=env.get("SYSTEM_PROMPT", "").strip() or None,
            cors_origins=origins,
            keepalive_seconds=_parse(env, "KEEPALIVE_SECONDS", _positive_float, cls.keepalive_seconds),
            upstream_timeout=_parse(env, "UPSTREAM_TIMEOUT", _positive_float, cls.upstream_timeout),
            first_token_timeout=_parse(env, "FIRST_TOKEN_TIMEOUT", _positive_float, cls.first_token_timeout),
            idle_timeout=_parse(env, "IDLE_TIMEOUT", _positive_float, cls.idle_timeout),
            max_stream_seconds=_parse(env, "MAX_STREAM_SECONDS", _positive_float, cls.max_stream_seconds),
            max_body_bytes=_parse(env, "MAX_BODY_BYTES", _positive_int, cls.max_body_bytes),
            max_tokens=max_tokens,
            log_content=_parse(env, "LOG_CONTENT", _boolean, False),
            body_timeout=_parse(env, "BODY_TIMEOUT", _positive_float, cls.body_timeout),
            debug_stats=_parse(env, "RELAY_DEBUG_STATS", _boolean, False),
            demo=demo,
            keys_file=keys_file,
            trusted_proxies=_parse(env, "TRUSTED_PROXIES", _networks, ()),
            rate_limit_per_minute=_parse(env, "RATE_LIMIT_PER_MINUTE", _positive_int, None),
            rate_limit_per_day=_parse(env, "RATE_LIMIT_PER_DAY", _positive_int, None),
            daily_token_budget=_parse(env, "DAILY_TOKEN_BUDGET", _positive_int, None),
            max_streams_per_key=_parse(env, "MAX_STREAMS_PER_KEY", _positive_int, None),
            max_open_streams=_parse(env, "MAX_OPEN_STREAMS", _positive_int, None),
            rate_limit_storage_uri=_storage_uri(env.get("RATE_LIMIT_STORAGE_URI", "").strip()),
            metrics_key=env.get("METRICS_KEY", "").strip() or None,
            prometheus_multiproc_dir=env.get("PROMETHEUS_MULTIPROC_DIR", "").strip() or None,
            log_format=_parse(env, "LOG_FORMAT", _log_format, "text"),
            upstreams_file=upstreams_file,
            upstreams=upstreams,
            environ=dict(env),
        )


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
        return cls(
            bind=_parse(env, "GUNICORN_BIND", _bind_address, cls.bind),
            workers=_parse(env, "GUNICORN_WORKERS", _positive_int, os.cpu_count() or 1),
            worker_connections=_parse(env, "GUNICORN_WORKER_CONNECTIONS", _positive_int, cls.worker_connections),
            graceful_timeout=_parse(env, "GUNICORN_GRACEFUL_TIMEOUT", _positive_int, cls.graceful_timeout),
            log_level=_parse(env, "GUNICORN_LOG_LEVEL", _log_level, cls.log_level),
        )

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


UPSTREAM_FIELDS = frozenset({"name", "base_url", "api_key_env", "models"})


def load_upstreams_file(path: str, env: Mapping[str, str]) -> tuple[UpstreamSpec, ...]:
    """Read `[[upstreams]]` tables from the TOML file at `path` (see the README); each key is looked up in
    `env` under the variable name the file gives. Every problem is a ConfigError naming the file and entry."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"UPSTREAMS_FILE: cannot read {path} ({exc.strerror or exc})") from None
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
    unknown = set(entry) - UPSTREAM_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"expected {', '.join(sorted(UPSTREAM_FIELDS))}")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: 'name' must be a non-empty string")
    base_url = entry.get("base_url")
    if not isinstance(base_url, str) or not _is_http_url(base_url.strip()):
        raise ConfigError(f"{where}: 'base_url' must be an http(s) URL like https://api.example.com/v1")
    key_env = entry.get("api_key_env")
    if not isinstance(key_env, str) or not key_env.strip():
        raise ConfigError(f"{where}: 'api_key_env' must name the environment variable that holds the key")
    api_key = env.get(key_env.strip(), "").strip()
    if not api_key:
        raise ConfigError(f"{where}: {key_env.strip()} (named by 'api_key_env') is missing or empty")
    models = entry.get("models")
    if not isinstance(models, list) or not models or not all(
            isinstance(model, str) and model.strip() for model in models):
        raise ConfigError(f"{where}: 'models' must be a non-empty array of model names or globs "
                          '(["*"] for any model)')
    return UpstreamSpec(name.strip(), base_url.strip().rstrip("/"), key_env.strip(),
                        tuple(model.strip() for model in models), api_key)


def _matches(patterns: tuple[str, ...], model: str) -> bool:
    return any(fnmatchcase(model, pattern) for pattern in patterns)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _parse(env: Mapping[str, str], name: str, convert: Callable[[str], T], default: T) -> T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return convert(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {raw!r} is not valid ({exc})") from None


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a positive number of seconds")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("expected a positive whole number")
    return value


def _boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(part, strict=False) for part in _csv(raw))
    except ValueError:
        raise ValueError("expected IP addresses or networks (127.0.0.1, 10.0.0.0/8, ::1)") from None


def _storage_uri(raw: str) -> str | None:
    """RATE_LIMIT_STORAGE_URI, checked without ever echoing it: a Redis URL may carry a password."""
    if not raw:
        return None
    if urlsplit(raw).scheme not in RATE_LIMIT_STORAGE_SCHEMES:
        schemes = ", ".join(f"{scheme}://" for scheme in RATE_LIMIT_STORAGE_SCHEMES)
        raise ConfigError(f"RATE_LIMIT_STORAGE_URI: expected a URL starting with one of {schemes}")
    return raw


def _bind_address(raw: str) -> str:
    if raw.startswith(("unix:", "fd://")):
        return raw
    host, colon, port = raw.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:  # port 0: any free port
        raise ValueError("expected HOST:PORT (127.0.0.1:8000, 0.0.0.0:8000, [::]:8000) or unix:/path/to.sock")
    return raw


def _log_level(raw: str) -> str:
    if raw.lower() not in GUNICORN_LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(GUNICORN_LOG_LEVELS)}")
    return raw.lower()


def _log_format(raw: str) -> str:
    if raw.lower() not in LOG_FORMATS:
        raise ValueError("expected text or json")
    return raw.lower()


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in {"http", "https"} and bool(parts.hostname)


def _is_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    return _is_http_url(origin) and parts.path in {"", "/"} and not parts.query and not parts.fragment
