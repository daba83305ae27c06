"""proxy/accesslog.py: the access-log line, its JSON form, and what never reaches it."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from proxy.accesslog import AccessRecord, JsonLogFormatter, redacted_path
from proxy.pump import StreamStats


@pytest.mark.parametrize(("query", "expected"), [
    ("", "/chat"),
    ("prompt=hello+world&model=m", "/chat?prompt=%5B11+chars%5D&model=m"),
    ("key=secret&KEY=x&api_key=a&access_key=b&token=t",
     "/chat?key=%5Bredacted%5D&KEY=%5Bredacted%5D&api_key=%5Bredacted%5D&access_key=%5Bredacted%5D"
     "&token=%5Bredacted%5D"),
    ("flag&key=", "/chat?flag=&key=%5Bredacted%5D"),
    ("prompt=%C3%A9", "/chat?prompt=%5B1+chars%5D"),
])
def test_redacted_path(query: str, expected: str) -> None:
    """Secret-looking parameters are replaced (any case), prompts become their length, the rest is kept."""
    assert redacted_path("/chat", query) == expected


def record(**fields: object) -> AccessRecord:
    base: dict[str, object] = {"method": "POST", "path": "/chat", "client": "127.0.0.1", "request_id": "r1",
                               "started": 100.0, "status": 200, "key_name": "alice", "model": "m"}
    base.update(fields)
    return AccessRecord(**base)  # type: ignore[arg-type]


def test_line_without_a_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain request's line: method, path, status, duration, model, key name, client, request id."""
    monkeypatch.setattr("proxy.accesslog.time.monotonic", lambda: 100.25)
    assert record().line() == ("method=POST path=/chat status=200 duration_ms=250.0 model=m key=alice "
                               "client=127.0.0.1 request_id=r1")


def test_line_with_a_stream_and_content(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream adds time to first token, tokens, upstream, fallbacks and outcome; the answer and prompt are
    quoted (one line whatever they hold) and only there with LOG_CONTENT."""
    monkeypatch.setattr("proxy.accesslog.time.monotonic", lambda: 101.0)
    stats = StreamStats(upstream="", fallbacks=1, first_token_at=100.5, tokens=2, outcome="ok", keep_content=True,
                        content=["a\n", "b"])
    line = record(stats=stats, prompt="hi\nthere").line()
    assert line.endswith('ttft_ms=500.0 tokens=2 upstream=- fallbacks=1 outcome=ok answer="a\\nb" '
                         'prompt="hi\\nthere"')
    assert "\n" not in line
    no_token = record(stats=StreamStats(outcome="client_gone")).line()
    assert "ttft_ms=- tokens=0" in no_token and "answer=" not in no_token


def test_json_formatter() -> None:
    """LOG_FORMAT=json: access lines are objects of their fields; other lines carry message and traceback."""
    formatter = JsonLogFormatter()
    access = logging.LogRecord("relay.access", logging.INFO, __file__, 1, "ignored", None, None)
    access.access_fields = {"status": 200, "key": "alice"}
    entry = json.loads(formatter.format(access))
    assert entry["status"] == 200 and entry["key"] == "alice" and entry["logger"] == "relay.access"
    assert entry["level"] == "INFO" and entry["time"].endswith("+00:00") and "message" not in entry
    try:
        raise ValueError("boom")
    except ValueError:
        failure = logging.LogRecord("relay.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    entry = json.loads(formatter.format(failure))
    assert entry["message"] == "failed here" and "ValueError: boom" in entry["traceback"]


@pytest.mark.parametrize("model", ["m", "sk-abcdefghijkl0123", "two words\nand a line"])
def test_direct_writer_writes_what_logging_writes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                  model: str) -> None:
    """The access line written without the logging module's records is the same line, redaction and escaping
    included, as the relay's text handler writes through logging (which it falls back to as soon as anything
    else listens on the access logger)."""
    from proxy import configure_logging
    from proxy.redaction import redact_secret_like

    monkeypatch.setattr("proxy.accesslog.time.monotonic", lambda: 100.25)
    configure_logging("text", redact_secret_like)
    capsys.readouterr()
    record(model=model).write()
    direct = capsys.readouterr().err
    extra = logging.Filter()  # any filter on the access logger: the ordinary path
    logging.getLogger("relay.access").addFilter(extra)
    try:
        record(model=model).write()
    finally:
        logging.getLogger("relay.access").removeFilter(extra)
    through_logging = capsys.readouterr().err
    assert direct.count("\n") == through_logging.count("\n") == 1
    assert direct[23:] == through_logging[23:] and "relay.access" in direct  # after the timestamp
    assert direct[:19] == through_logging[:19] or direct[:17] == through_logging[:17]  # same second/minute
    assert "sk-abcdefghijkl0123" not in direct


def test_each_app_logs_in_its_own_format(capsys: pytest.CaptureFixture[str]) -> None:
    """Logging is configured per app: a second app built with LOG_FORMAT=json writes JSON lines (one relay
    handler, the JSON formatter, no direct text writer), and a text app built after it writes text again."""
    from proxy import accesslog, create_app
    from tests.unit.conftest import unit_config

    def relay_handlers() -> list[logging.Handler]:
        return [handler for handler in logging.getLogger("relay").handlers if getattr(handler, "relay_handler", False)]

    create_app(unit_config(log_format="text"))
    create_app(unit_config(log_format="json"))
    assert len(relay_handlers()) == 1 and isinstance(relay_handlers()[0].formatter, JsonLogFormatter)
    assert accesslog._direct is None
    capsys.readouterr()
    record(model="m").write()
    assert json.loads(capsys.readouterr().err)["model"] == "m"
    create_app(unit_config(log_format="text"))
    assert len(relay_handlers()) == 1 and not isinstance(relay_handlers()[0].formatter, JsonLogFormatter)
    assert accesslog._direct is not None
    record(model="m").write()
    assert capsys.readouterr().err.startswith(tuple("0123456789"))  # a text line begins with its timestamp
