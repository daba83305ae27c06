"""Secrets and log integrity in-process: the configured keys redacted wherever upstream text reaches a client
or a log, no value echoed by a refusal, no short access key, URLs logged without credentials, one access-log
line per request whatever its fields hold, the shipped nginx site logging no query string, and Retry-After
parsed by the RFC."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
from flask import Flask

from proxy import configure_logging, create_app
from proxy.accesslog import AccessRecord, quoted
from proxy.config import SERVER_SETTINGS, SETTINGS, Config, ConfigError, ServerSettings, loggable_url
from proxy.keys import KeysFileError, load_keys_file
from proxy.redaction import Redactor
from proxy.relay import current_relay
from proxy.upstream import Upstream, map_sdk_error, parse_chunk, retry_after_seconds

ROOT = Path(__file__).resolve().parents[2]
ACCESS = "unit-secrets-access-key-3f9a1c77"
GROQ = "gsk_Zq81bNw4TTt0gYh3mKeY5pQ2rL9vXc7a"
OPENAI_LIKE = "sk-proj-Q8w2e4r6t8y0u1i3o5p7"
FILE_KEY = "file-key-for-alice-0c6f1e9a7b2d"
METRICS = "metrics-key-for-unit-8b1f2c3d"
URL_PASSWORD = "p4ssw0rd-in-the-base-url"
BASE = {"AUTHORIZATION_KEY": ACCESS, "OPENAI_API_KEY": GROQ}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.alice]\nkey = "{FILE_KEY}"\n')
    return path


@pytest.fixture
def config(keys_file: Path) -> Config:
    return Config(authorization_keys=(ACCESS,), openai_api_key=GROQ, keys_file=keys_file, metrics_key=METRICS,
                  openai_base_url=f"https://relay:{URL_PASSWORD}@api.groq.example/openai/v1")


# --- 1. the configured secrets themselves ------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    f"Invalid API Key: {GROQ}",
    f"header x_api_key_{OPENAI_LIKE} refused",
    f"Authorization: Bearer%20{OPENAI_LIKE}",
    f"xyz{OPENAI_LIKE}",
    f"the key {GROQ[:-1]}",  # a key-shaped prefix of a configured key
    f"access key {ACCESS} is not ours",
    f"glued:{ACCESS}{ACCESS}",
    f"keys-file key {FILE_KEY}.",
    f"metrics {METRICS}",
    f"url-encoded {ACCESS.replace('-', '%2D')} and {URL_PASSWORD}",
    f"quoted \"{GROQ}\" in JSON",
], ids=lambda text: text.split()[0])
def test_redactor_removes_every_configured_secret(config: Config, text: str) -> None:
    """Upstream keys, access keys (AUTHORIZATION_KEY and KEYS_FILE), the metrics key and URL passwords, bare,
    glued to other text or percent-encoded, and anything key-shaped, become [redacted]."""
    redacted = Redactor(config.secrets)(text)
    for secret in (GROQ, OPENAI_LIKE, ACCESS, FILE_KEY, METRICS, URL_PASSWORD, GROQ[:-1]):
        assert secret not in redacted
    assert "[redacted]" in redacted


def test_redactor_reads_the_keys_file_at_use_time(config: Config, keys_file: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A key added to KEYS_FILE while the relay runs is redacted from then on, without a new Redactor."""
    monkeypatch.setattr("proxy.keys.RELOAD_CHECK_SECONDS", 0.0)
    redact = Redactor(config.secrets)
    added = "added-later-secret-77aa88bb99cc"
    assert redact(f"x {added}") == f"x {added}"
    keys_file.write_text(f'[keys.alice]\nkey = "{FILE_KEY}"\n[keys.bob]\nkey = "{added}"\n')
    config.keyring._next_check = 0.0  # the once-a-second check is due
    assert redact(f"x {added}") == "x [redacted]"


def test_redactor_leaves_ordinary_text_alone(config: Config) -> None:
    """Redaction does not eat words: a model name, a path and a number survive."""
    text = "model gpt-4o-mini at /v1/chat/completions answered 42 task-free words"
    assert Redactor(config.secrets)(text) == text


def _status_error(status: int, message: str) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://upstream.invalid/v1/chat/completions")
    response = httpx2.Response(status, json={"error": {"message": message}}, request=request)
    body = {"message": message}
    classes = {400: openai.BadRequestError, 422: openai.UnprocessableEntityError}
    return classes[status](message, response=response, body=body)


@pytest.mark.parametrize("status", [400, 422])
@pytest.mark.parametrize("message", [f"bad key {GROQ}", f"x_api_key_{OPENAI_LIKE}", f"Bearer%20{ACCESS}",
                                     f"{'x' * 290}{GROQ}"])
def test_sdk_error_messages_are_redacted(config: Config, status: int, message: str) -> None:
    """An upstream 400/422 quoting a secret becomes a refusal without it (also when the cut falls inside it)."""
    error = map_sdk_error(_status_error(status, message), "m", Redactor(config.secrets))
    text = str(error.description)
    assert GROQ not in text and OPENAI_LIKE not in text and ACCESS not in text and GROQ[:12] not in text


@pytest.mark.parametrize("message", [f"quota for {GROQ}", f"key=x_api_key_{OPENAI_LIKE}", f"file {FILE_KEY}"])
def test_in_stream_error_events_are_redacted(config: Config, message: str) -> None:
    """An upstream error event mid-stream becomes a StreamFailure whose message names no secret."""
    failure = parse_chunk(orjson.dumps({"error": {"message": message}}), Redactor(config.secrets))
    assert not hasattr(failure, "content") and "[redacted]" in failure.message
    assert GROQ not in failure.message and OPENAI_LIKE not in failure.message and FILE_KEY not in failure.message


def _stand_in(status: int, body: bytes, content_type: str = "application/json") -> httpx2.MockTransport:
    return httpx2.MockTransport(lambda request: httpx2.Response(status, content=body,
                                                                headers={"content-type": content_type}))


def _app_with_upstream(config: Config, transport: httpx2.MockTransport) -> Flask:
    app = create_app(config)
    relay = app.extensions["relay"]
    client = openai.OpenAI(api_key=GROQ, base_url="http://upstream.invalid/v1", max_retries=0,
                           http_client=httpx2.Client(transport=transport))
    app.extensions["relay"] = dataclasses.replace(relay, upstreams=(Upstream("default", client,
                                                                             redact=relay.redact),))
    return app


ERROR_BODY = orjson.dumps({"error": {"message": f"Invalid API Key {GROQ} (x_api_key_{OPENAI_LIKE})"}})
IN_STREAM = b"data: " + orjson.dumps({"error": {"message": f"quota exceeded for {GROQ}"}}) + b"\n\n"
ENDPOINTS = [("/chat", {"messages": [{"role": "user", "content": "hi"}]}),
             ("/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True,
                                       "messages": [{"role": "user", "content": "hi"}]})]


@pytest.mark.parametrize(("path", "body"), ENDPOINTS, ids=["chat", "v1"])
@pytest.mark.parametrize(("status", "upstream_body", "content_type"), [
    (400, ERROR_BODY, "application/json"), (422, ERROR_BODY, "application/json"),
    (200, IN_STREAM, "text/event-stream"),
], ids=["400", "422", "in-stream"])
def test_upstream_errors_reach_clients_redacted(config: Config, path: str, body: dict[str, Any], status: int,
                                                upstream_body: bytes, content_type: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """/chat and /v1 answers to an upstream error quoting the gsk_ key carry neither it nor an sk- key, and
    neither does any log line."""
    app = _app_with_upstream(config, _stand_in(status, upstream_body, content_type))
    response = app.test_client().post(path, json=body, headers={"Authorization": f"Bearer {ACCESS}"})
    answer = response.get_data(as_text=True)
    assert "redacted" in answer, answer
    logged = capsys.readouterr().err
    for text in (answer, logged):
        assert GROQ not in text and OPENAI_LIKE not in text and ACCESS not in text


def test_log_lines_and_tracebacks_are_redacted(config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    """Any `relay` log record, its traceback included, is redacted and on one line (text and JSON formats)."""
    for log_format in ("text", "json"):
        app = create_app(dataclasses.replace(config, log_format=log_format))
        with app.app_context():
            configure_logging(log_format, current_relay().redact)
        log = logging.getLogger("relay.test")
        try:
            raise ValueError(f"upstream said {GROQ}")
        except ValueError:
            log.exception("failed for %s\nforged line %s", FILE_KEY, ACCESS)
        err = capsys.readouterr().err
        assert GROQ not in err and FILE_KEY not in err and ACCESS not in err, err
        assert not any(line.startswith("forged") for line in err.splitlines())


# --- 2. no secret in start-up or server logs -------------------------------------------------------------------

PASTED = "sk-pasted-by-mistake-0123456789abcdef"


@pytest.mark.parametrize("setting", [s for s in (*SETTINGS, *SERVER_SETTINGS)
                                     if s.env not in {"AUTHORIZATION_KEY", "OPENAI_API_KEY", "DEFAULT_MODEL",
                                                      "ALLOWED_MODELS", "SYSTEM_PROMPT", "METRICS_KEY",
                                                      "PROMETHEUS_MULTIPROC_DIR", "DATA_DIR", "ADMIN_KEY"}],
                         ids=lambda s: s.env)
def test_a_refused_setting_never_echoes_its_value(setting: Any) -> None:
    """A key pasted into any other setting is refused by name and reason, never shown."""
    with pytest.raises(ConfigError) as caught:
        if setting in SERVER_SETTINGS:
            ServerSettings.from_env({setting.env: PASTED})
        else:
            Config.from_env({**BASE, setting.env: PASTED})
    message = str(caught.value)
    assert message.startswith(setting.env) or setting.env in message
    assert PASTED not in message and PASTED[3:20] not in message


@pytest.mark.parametrize("keys", ["ab", "0123456789abcde", f"{ACCESS},short-key", f"{ACCESS}, zq"])
def test_short_access_keys_are_refused(keys: str) -> None:
    """An AUTHORIZATION_KEY entry under 16 characters stops start-up, by number, without the key."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env({**BASE, "AUTHORIZATION_KEY": keys})
    message = str(caught.value)
    assert message.startswith("AUTHORIZATION_KEY: key ") and "16 characters" in message
    assert all(key.strip() not in message for key in keys.split(","))


def test_demo_mode_accepts_a_short_key() -> None:
    """Demo mode (a stand-in model, no upstream key) keeps accepting a short key."""
    assert Config.from_env({"RELAY_DEMO": "1", "AUTHORIZATION_KEY": "demo"}).authorization_keys == ("demo",)


def test_short_keys_file_key_is_refused(tmp_path: Path) -> None:
    """A KEYS_FILE key under 16 characters is refused (at start-up, and so on reload too)."""
    path = tmp_path / "keys.toml"
    path.write_text('[keys.alice]\nkey = "tiny"\n')
    with pytest.raises(KeysFileError, match="at least 16 characters") as caught:
        load_keys_file(path)
    assert "tiny" not in str(caught.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:hunter2-secret@api.example.com/v1", "https://api.example.com/v1"),
    ("https://api.example.com/v1?api-key=sk-query-secret-123456", "https://api.example.com/v1"),
    ("http://:pw-secret-only@10.0.0.5:8080/openai/v1#frag", "http://10.0.0.5:8080/openai/v1"),
    ("https://tok-secret@[::1]:443/v1", "https://[::1]:443/v1"),
])
def test_urls_are_logged_without_credentials(url: str, shown: str) -> None:
    """The start-up line's URLs lose userinfo, query and fragment; scheme, host, port and path stay."""
    assert loggable_url(url) == shown


def test_startup_line_uses_loggable_urls() -> None:
    """deploy/gunicorn.conf.py prints OPENAI_BASE_URL and UPSTREAMS_FILE base URLs only through loggable_url."""
    source = (ROOT / "deploy" / "gunicorn.conf.py").read_text()
    assert "loggable_url(config.openai_base_url)" in source and "loggable_url(u.base_url)" in source
    assert "else config.openai_base_url" not in source


# --- 3. the shipped nginx site logs no query string --------------------------------------------------------------

def test_nginx_site_logs_without_query_strings() -> None:
    """relay.conf defines a log_format with $uri (no $request, $request_uri, $args, $query_string,
    $remote_user or the whole Referer) and both server blocks log with it."""
    site = (ROOT / "deploy" / "nginx" / "relay.conf").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in site.splitlines())
    match = re.search(r"log_format\s+relay_noquery\s+(.*?);", code, re.S)
    assert match is not None
    log_format = match.group(1)
    assert "$uri" in log_format
    for variable in ("$request ", "$request\"", "$request_uri", "$args", "$query_string", "$remote_user",
                     "$arg_", "$http_referer"):
        assert variable not in log_format, variable
    assert code.count("access_log /var/log/nginx/access.log relay_noquery;") == 2
    assert code.count("error_log /var/log/nginx/error.log crit;") == 2  # its lines quote whole request lines
    assert code.count("server {") == 2


# --- 4. log lines cannot be forged -------------------------------------------------------------------------------

FORGERIES = [
    ("path", "/x\nmethod=GET path=/forged status=200"),
    ("path", "/x\r\n2026-01-01 00:00:00,000 INFO relay.access method=GET"),
    ("model", "gpt\nmethod=GET path=/forged status=200"),
    ("model", "gpt\x00\x1b[2J"),
    ("model", "a b status=200"),
    ("model", 'q"uo\\te'),
    ("model", "sep\u2028line\x85next"),
    ("key_name", ""),
    ("client", "1.2.3.4 status=200"),
]


FIELD = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |$)')


def parsed_line(line: str) -> dict[str, str]:
    """The fields of an access line, read as a log tool would; the line must be nothing but fields."""
    fields = list(FIELD.finditer(line))
    assert "".join(match.group(0) for match in fields) == line, line
    names = [match.group(1) for match in fields]
    assert len(names) == len(set(names)), f"a field is written twice: {line}"
    return {match.group(1): json.loads(match.group(2)) if match.group(2).startswith('"') else match.group(2)
            for match in fields}


@pytest.fixture
def record() -> AccessRecord:
    return AccessRecord(method="POST", path="/chat", client="127.0.0.1", request_id="r1", started=0.0, status=200)


@pytest.mark.parametrize(("field", "value"), FORGERIES)
def test_access_line_is_one_line_whatever_a_field_holds(record: AccessRecord, field: str, value: str) -> None:
    """A newline, NUL, escape, line separator, quote or space in any field stays inside that field's value:
    one request, one line, every field reading back as it was."""
    setattr(record, field, value)
    line = record.line()
    assert len(line.splitlines()) == 1 and not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", line)
    fields = parsed_line(line)
    assert fields[{"key_name": "key"}.get(field, field)] == value
    assert fields["status"] == "200" and fields["method"] == "POST"


@pytest.mark.parametrize(("value", "written"), [
    ("/ws?key=%5Bredacted%5D", "/ws?key=%5Bredacted%5D"), ("200", "200"), ("key1", "key1"),
    ("/chat?prompt=%5B21+chars%5D", "/chat?prompt=%5B21+chars%5D"), ("gpt-4o-mini", "gpt-4o-mini"),
])
def test_ordinary_values_stay_bare(value: str, written: str) -> None:
    """Fields that other tools grep (path=..., status=200, key=name) keep their bare form."""
    assert quoted(value) == written


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    logger = logging.getLogger("relay.access")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(("path", "body"), [
    ("/%0Amethod=GET%20path=/forged%20status=200", None),
    ("/chat", {"model": "m\nmethod=GET path=/forged status=200", "messages": [{"role": "user", "content": "hi"}]}),
    ("/chat", {"model": "m\x00\r\nINFO relay.access method=GET path=/forged",
               "messages": [{"role": "user", "content": "hi"}]}),
])
def test_no_request_forges_an_access_line(config: Config, access_lines: list[str], path: str,
                                          body: dict[str, Any] | None) -> None:
    """Through the app: a percent-encoded newline in the path (no key) or a newline/NUL in `model` is written
    escaped inside one line."""
    app = create_app(config)
    headers = {"Authorization": f"Bearer {ACCESS}"}
    client = app.test_client()
    response = client.post(path, json=body, headers=headers) if body else client.get(path)
    response.close()
    assert len(access_lines) == 1
    assert len(access_lines[0].splitlines()) == 1
    fields = parsed_line(access_lines[0])
    assert fields["status"] != "200" and "forged" in (fields["path"] + fields["model"])


def test_json_access_line_stays_one_object(record: AccessRecord) -> None:
    """LOG_FORMAT=json: an access record with a newline in a field is still one JSON object on one line."""
    from proxy.accesslog import JsonLogFormatter

    record.model = "m\nforged"
    entry = logging.LogRecord("relay.access", logging.INFO, __file__, 1, record.line(), None, None)
    entry.access_fields = dict(record.fields())
    line = JsonLogFormatter().format(entry)
    assert len(line.splitlines()) == 1 and json.loads(line)["model"] == "m\nforged"


# --- 5. Retry-After ----------------------------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("value", "seconds"), [
    ("7", 7), ("0", 1), ("3600", 3600), ("3601", 3600), ("86400", 3600),
    ("1e999", None), ("-5", None), ("1.5", None), ("inf", None), ("nan", None), ("", None), ("soon", None),
    ("86401", None), ("9" * 5000, None), ("\u0663", None), ("+7", None), ("0x10", None),
    ("Thu, 01 Jan 2026 12:00:30 GMT", 30), ("Thursday, 01-Jan-26 12:10:00 GMT", 600),
    ("Thu Jan  1 12:00:05 2026", 5), ("Wed, 31 Dec 2025 12:00:00 GMT", 1),
    ("Fri, 02 Jan 2026 13:00:00 GMT", None), ("Thu, 01 Jan 2026 14:00:00 GMT", 3600),
    ("Thu, 99 Foo 2026 99:99:99 GMT", None), ("Thu, 01 Jan 99999 12:00:00 GMT", None),
])
def test_retry_after_is_parsed_by_the_rfc(value: str, seconds: int | None) -> None:
    """delta-seconds (digits only) and HTTP-dates; at least 1 s, capped at an hour; malformed, negative or
    over a day means no Retry-After, never an exception."""
    assert retry_after_seconds(value, now=NOW) == seconds


@pytest.mark.parametrize("value", ["1e999", "-1", "99999999999999999999999", "garbage"])
def test_upstream_429_with_a_bad_retry_after_is_a_429(config: Config, value: str) -> None:
    """An upstream 429 with a malformed Retry-After is still the client's 429, without Retry-After."""
    request = httpx2.Request("POST", "http://upstream.invalid/v1/chat/completions")
    response = httpx2.Response(429, headers={"retry-after": value}, json={"error": {"message": "slow"}},
                               request=request)
    error = map_sdk_error(openai.RateLimitError("slow", response=response, body=None), "m")
    assert error.status == 429 and error.retry_after is None
