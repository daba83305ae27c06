"""The ledger in the in-process relay: a row per request from the pipeline's close step (streams, refusals,
upstream failures, forwarded and Anthropic routes), GET /usage for the admin, GET /v1/usage/me for a key."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from proxy.ledger import Ledger
from proxy.ledger.schema import requests
from tests.conftest import ACCESS_KEY, SECOND_ACCESS_KEY
from tests.servers import wait_until
from tests.unit.conftest import HELLO, FakeTransport, bearer, relay_app, unit_config

ADMIN = "admin-key-for-the-ledger-tests-0123"


@pytest.fixture
def ledger_client(tmp_path: Path, transport: FakeTransport) -> Iterator[FlaskClient]:
    """A relay with its ledger in tmp_path; its writer thread is stopped (and flushed) afterwards."""
    app = relay_app(unit_config(data_dir=tmp_path, admin_key=ADMIN), transport)
    ledger: Ledger = app.extensions["relay"].ledger
    try:
        yield app.test_client()
    finally:
        ledger.close(app.extensions["relay"].metrics, timeout=5)


def ledger_of(client: FlaskClient) -> Ledger:
    ledger: Ledger = client.application.extensions["relay"].ledger
    return ledger


def rows_of(client: FlaskClient, count: int) -> list[dict[str, Any]]:
    """The ledger's rows once `count` of them are written (the writer thread writes them soon after)."""
    ledger = ledger_of(client)
    assert ledger.engine is not None

    def read() -> list[dict[str, Any]]:
        try:
            with ledger.engine.connect() as connection:  # type: ignore[union-attr]
                return [dict(row) for row in connection.execute(sa.select(requests).order_by(requests.c.id))
                        .mappings()]
        except sa.exc.OperationalError:  # not migrated yet
            return []

    assert wait_until(lambda: len(read()) >= count, timeout=10), read()
    return read()


def read_whole(response: Any) -> None:
    response.get_data()
    response.close()


def test_a_completed_stream_is_one_row_with_its_usage(ledger_client: FlaskClient) -> None:
    """POST /chat: key name, route, protocol, model, upstream, status, outcome, tokens, timings; no key."""
    response = ledger_client.post("/chat", json=HELLO, headers={**bearer(), "X-Request-ID": "req-1"})
    assert response.status_code == 200
    response.get_data()
    response.close()
    [row] = rows_of(ledger_client, 1)
    assert {name: row[name] for name in ("request_id", "key_name", "route", "protocol", "model", "upstream",
                                         "status", "outcome", "prompt_tokens", "completion_tokens",
                                         "usage_reported", "cost_nanos")} == {
        "request_id": "req-1", "key_name": "key1", "route": "/chat", "protocol": "ndjson",
        "model": "gpt-4o-mini", "upstream": "fake", "status": 200, "outcome": "ok", "prompt_tokens": 1,
        "completion_tokens": 2, "usage_reported": True, "cost_nanos": None}
    assert row["ttft_ms"] is not None and row["duration_ms"] >= row["ttft_ms"]
    assert row["answered_model"] == "gpt-4o-mini"  # as the upstream's chunks named it


RefusedCase = Callable[[FlaskClient, FakeTransport], Any]


@pytest.mark.parametrize(("send", "status", "outcome", "key_name"), [
    (lambda c, t: c.post("/chat", json=HELLO), 401, "unauthorized", "-"),
    (lambda c, t: c.post("/chat", json={"messages": []}, headers=bearer()), 400, "invalid_request", "key1"),
    (lambda c, t: (t.reply(status=500, json={"error": {"message": "down"}}),
                   c.post("/v1/chat/completions", json={**HELLO, "stream": True}, headers=bearer())),
     502, "upstream_error", "key1"),
], ids=["no key", "bad body", "failed upstream"])
def test_refused_and_failed_requests_get_a_row_too(ledger_client: FlaskClient, transport: FakeTransport,
                                                   send: RefusedCase, status: int, outcome: str,
                                                   key_name: str) -> None:
    """Refused by authentication or validation, or failed upstream: a row with the status and error kind."""
    answer = send(ledger_client, transport)
    response = answer[-1] if isinstance(answer, tuple) else answer
    assert response.status_code == status
    response.close()
    [row] = rows_of(ledger_client, 1)
    assert (row["status"], row["outcome"], row["key_name"]) == (status, outcome, key_name)


def test_each_protocol_and_route_records_its_row(ledger_client: FlaskClient, transport: FakeTransport) -> None:
    """OpenAI JSON and SSE, SSE over GET /chat: each request a row under its own route and protocol."""
    transport.reply(json={"id": "c", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    for response in (
        ledger_client.post("/v1/chat/completions", json=HELLO, headers=bearer(SECOND_ACCESS_KEY)),
        ledger_client.post("/v1/chat/completions", json={**HELLO, "stream": True}, headers=bearer()),
        ledger_client.get("/chat", query_string={"prompt": "Hello"}, headers=bearer()),
    ):
        response.get_data()
        response.close()
    rows = rows_of(ledger_client, 3)
    assert [(row["route"], row["protocol"], row["key_name"]) for row in rows] == [
        ("/v1/chat/completions", "openai", "key2"), ("/v1/chat/completions", "openai", "key1"),
        ("/chat", "sse", "key1")]
    assert all(row["outcome"] == "ok" and row["prompt_tokens"] == 1 for row in rows)


def test_no_key_and_no_content_reach_the_database(ledger_client: FlaskClient, tmp_path: Path) -> None:
    """The ledger file holds neither the access key nor the conversation."""
    secret_question = "the-secret-question-xyzzy"
    response = ledger_client.post("/chat", json={"messages": [{"role": "user", "content": secret_question}]},
                                  headers=bearer())
    response.get_data()
    response.close()
    rows_of(ledger_client, 1)
    ledger_of(ledger_client).close(ledger_client.application.extensions["relay"].metrics, timeout=5)
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith("ledger.db"))
    assert stored
    for text in (ACCESS_KEY, secret_question, "Hello"):
        assert text.encode() not in stored


def test_own_usage_today_and_this_month(ledger_client: FlaskClient) -> None:
    """GET /v1/usage/me: the caller's key only, today and this month."""
    for key in (ACCESS_KEY, ACCESS_KEY, SECOND_ACCESS_KEY):
        read_whole(ledger_client.post("/chat", json=HELLO, headers=bearer(key)))
    rows_of(ledger_client, 3)
    mine = ledger_client.get("/v1/usage/me", headers=bearer())
    assert mine.status_code == 200
    body = orjson.loads(mine.data)
    assert body["key"] == "key1"
    for period in ("today", "this_month"):
        assert body[period]["requests"] == 2
        assert body[period]["prompt_tokens"] == 2 and body[period]["completion_tokens"] == 4
        assert body[period]["cost"] is None
    assert ledger_client.get("/v1/usage/me").status_code == 401


def test_admin_usage_report(ledger_client: FlaskClient) -> None:
    """GET /usage with ADMIN_KEY: every key's totals, grouped as asked; refused without the admin key."""
    for key in (ACCESS_KEY, SECOND_ACCESS_KEY):
        read_whole(ledger_client.post("/chat", json=HELLO, headers=bearer(key)))
    rows_of(ledger_client, 2)
    answer = ledger_client.get("/usage?by=key&since=7d", headers=bearer(ADMIN))
    assert answer.status_code == 200
    report = orjson.loads(answer.data)
    assert report["by"] == "key"
    assert [(row["key"], row["requests"]) for row in report["rows"]] == [("key1", 1), ("key2", 1)]
    assert ledger_client.get("/usage", headers=bearer(ACCESS_KEY)).status_code == 401
    bad = ledger_client.get("/usage?by=week", headers=bearer(ADMIN))
    assert bad.status_code == 400 and b"'by' must be day, model or key" in bad.data


def test_admin_usage_report_for_one_key(ledger_client: FlaskClient) -> None:
    """`GET /usage?...&key=<name>` (the README's example): `key` names the key to report on, so the pipeline's
    one-caller rule (a header and a `key` parameter that differ are refused) must not apply to it."""
    for key in (ACCESS_KEY, SECOND_ACCESS_KEY):
        read_whole(ledger_client.post("/chat", json=HELLO, headers=bearer(key)))
    rows_of(ledger_client, 2)
    answer = ledger_client.get("/usage?since=7d&by=key&key=key1", headers=bearer(ADMIN))
    assert answer.status_code == 200, answer.data
    report = orjson.loads(answer.data)
    assert report["key"] == "key1"
    assert [(row["key"], row["requests"]) for row in report["rows"]] == [("key1", 1)]
    assert ledger_client.get("/usage?key=key1", headers=bearer(ACCESS_KEY)).status_code == 401


def test_usage_is_off_without_an_admin_key(make_client: Callable[..., FlaskClient]) -> None:
    """Without ADMIN_KEY nobody reads every key's usage."""
    client = make_client()
    assert client.get("/usage", headers=bearer()).status_code == 403


def test_the_database_password_and_admin_key_are_secrets() -> None:
    """DATABASE_URL's password and ADMIN_KEY are redacted like every other secret; the URL is spelled for psycopg."""
    from proxy.config import Config

    config = Config.from_env({"AUTHORIZATION_KEY": ACCESS_KEY, "OPENAI_API_KEY": "sk-upstream-0123456789",
                              "DATABASE_URL": "postgresql://relay:pg-pass-5f2e9a@db.internal/relay",
                              "ADMIN_KEY": ADMIN})
    assert "pg-pass-5f2e9a" in config.secrets() and ADMIN in config.secrets()
    assert config.database_url == "postgresql+psycopg://relay:pg-pass-5f2e9a@db.internal/relay"
    assert "pg-pass" not in repr(config)


def test_an_unwritable_data_dir_fails_the_ledger_not_the_relay(tmp_path: Path, transport: FakeTransport) -> None:
    """DATA_DIR that cannot be made: the relay starts and answers; the rows are counted as not written."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    app = relay_app(unit_config(data_dir=blocker / "data"), transport)
    relay = app.extensions["relay"]
    try:
        response = app.test_client().post("/chat", json=HELLO, headers=bearer())
        assert response.status_code == 200
        read_whole(response)
        assert wait_until(lambda: relay.ledger.writer.counts.errors > 0, timeout=5)
    finally:
        relay.ledger.close(relay.metrics, timeout=1)
    assert relay.ledger.writer.counts.dropped_failed == 1


def test_lost_rows_are_logged_once_a_minute_and_counted() -> None:
    """publish() turns the writer's counts into the metrics and one warning line, not one per request."""
    import logging

    from proxy.config import Config
    from proxy.ledger.writer import LedgerWriter
    from proxy.metrics import Metrics
    from tests.unit.conftest import Lines

    config = Config((), "")
    ledger, metrics = Ledger(config, None), Metrics(config)
    ledger.writer = LedgerWriter(sa.create_engine("sqlite://"), lambda: None, lambda: None)
    handler = Lines()
    logging.getLogger("relay.ledger").addHandler(handler)
    try:
        for _ in range(3):
            ledger.writer.counts.errors += 1
            ledger.writer.counts.dropped_failed += 2
            ledger.writer.counts.last_error = "OperationalError: database is locked"
            ledger.publish(metrics)
    finally:
        logging.getLogger("relay.ledger").removeHandler(handler)
    assert len(handler.lines) == 1 and "database is locked" in handler.lines[0]
    assert metrics.registry.get_sample_value("relay_ledger_rows_dropped_total") == 6


def test_a_priced_model_s_row_carries_its_cost(tmp_path: Path, transport: FakeTransport) -> None:
    """With PRICES_FILE, the row's cost is the price table's for the model asked for (nano-units, exact)."""
    prices = tmp_path / "prices.toml"
    prices.write_text('[[prices]]\nmodel = "gpt-4o*"\ninput = 2.5\noutput = 10\n')
    app = relay_app(unit_config(data_dir=tmp_path, prices_file=prices), transport)
    client = app.test_client()
    try:
        read_whole(client.post("/chat", json=HELLO, headers=bearer()))
        [row] = rows_of(client, 1)
    finally:
        ledger_of(client).close(app.extensions["relay"].metrics, timeout=5)
    # 1 prompt token at 2.5 and 2 completion tokens at 10 per million.
    assert row["cost_nanos"] == round((1 * 2.5 + 2 * 10) / 1_000_000 * 1e9)


def test_request_side_publishing_is_throttled_to_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's close publishes the writer's counts at most once a second (a scrape publishes at once)."""
    from proxy.config import Config
    from proxy.ledger import PUBLISH_EVERY_SECONDS
    from proxy.ledger.writer import LedgerWriter
    from proxy.metrics import Metrics

    config = Config((), "")
    ledger, metrics = Ledger(config, None), Metrics(config)
    ledger.writer = LedgerWriter(sa.create_engine("sqlite://"), lambda: None, lambda: None)
    clock = [1000.0]
    monkeypatch.setattr("proxy.ledger.time.monotonic", lambda: clock[0])

    def written_after(rows: int) -> float | None:
        assert ledger.writer is not None
        ledger.writer.counts.written += rows
        ledger.publish_now_and_then(metrics)
        return metrics.registry.get_sample_value("relay_ledger_rows_written_total")

    assert written_after(1) == 1
    assert written_after(1) == 1  # the same instant: not published again
    clock[0] += PUBLISH_EVERY_SECONDS
    assert written_after(1) == 3
    ledger.publish(metrics)
    assert metrics.registry.get_sample_value("relay_ledger_rows_written_total") == 3
