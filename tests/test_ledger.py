"""The usage ledger against the relay under gunicorn with the fake upstream: real SQLite (the default, in
the relay's working directory) and a real PostgreSQL server. Rows for completed, abandoned, failed and
refused requests; a stalled database never delays a stream; shutdown flushes the queue; two relays share
one PostgreSQL ledger; neither a key nor content reaches a table."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import psycopg
import pytest
import simple_websocket

from tests.conftest import ACCESS_KEY, SECOND_ACCESS_KEY, UPSTREAM_KEY, RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.servers import Postgres, running_postgres, wait_until
from tests.test_anthropic import ANTHROPIC_KEY, root_of, upstreams_toml

pytestmark = pytest.mark.serial  # stream timings under a stalled database

STREAM_SECONDS = 3.0  # a short stream's ceiling, far below the 30 s a writer waits on a locked SQLite


def ask(behaviour: dict[str, Any] | None = None, text: str = "Hello") -> dict[str, Any]:
    content = "#fake " + json.dumps(behaviour) if behaviour is not None else text
    return {"messages": [{"role": "user", "content": content}]}


def chat(relay: RelayProcess, body: dict[str, Any] | None = None, key: str = ACCESS_KEY,
         request_id: str | None = None) -> tuple[int, float]:
    """POST /chat read to its end: the status and how long it took."""
    headers = relay.headers(key) | ({"X-Request-ID": request_id} if request_id else {})
    started = time.monotonic()
    response = httpx2.post(f"{relay.url}/chat", json=body or ask(), headers=headers, timeout=30)
    return response.status_code, time.monotonic() - started


def ledger_file(relay: RelayProcess) -> Path:
    return relay.log_path.parent / "data" / "ledger.db"  # DATA_DIR's default, in the relay's working directory


def sqlite_rows(relay: RelayProcess) -> list[dict[str, Any]]:
    path = ledger_file(relay)
    if not path.exists():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute("SELECT * FROM ledger_requests ORDER BY id")]
    except sqlite3.OperationalError:  # the schema is not there yet, or a writer holds the lock
        return []
    finally:
        connection.close()


def rows_when(read: Callable[[], list[dict[str, Any]]], count: int, timeout: float = 10) -> list[dict[str, Any]]:
    assert wait_until(lambda: len(read()) >= count, timeout=timeout), read()
    return read()


@pytest.fixture
def ledger_relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    """A relay of its own (its own ledger file), the schema already made by its writer. One worker, so that
    its in-memory rate limit counts every request (the PostgreSQL test runs two workers per relay)."""
    relay = relay_factory(fresh=True, GUNICORN_WORKERS="1", RATE_LIMIT_PER_MINUTE="3")
    assert wait_until(lambda: ledger_file(relay).exists() and _has_schema(ledger_file(relay)), timeout=10)
    return relay


def _has_schema(path: Path) -> bool:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    try:
        return connection.execute("SELECT count(*) FROM sqlite_master WHERE name='ledger_requests'").fetchone()[0] == 1
    except sqlite3.OperationalError:
        return False
    finally:
        connection.close()


def test_completed_abandoned_failed_and_refused_requests_each_leave_a_row(ledger_relay: RelayProcess) -> None:
    """A whole stream, a client that left mid-stream, a failed upstream and a request refused by the limits."""
    assert chat(ledger_relay, request_id="done")[0] == 200
    with httpx2.stream("POST", f"{ledger_relay.url}/chat", json=ask({"n_tokens": 200, "token_interval": 0.05}),
                       headers=ledger_relay.headers() | {"X-Request-ID": "left"}, timeout=30) as response:
        next(response.iter_bytes())  # the first bytes, then the client hangs up
    assert chat(ledger_relay, ask({"status": 500}), request_id="failed")[0] == 502
    assert chat(ledger_relay, request_id="refused")[0] == 429  # the 4th request this minute (limit 3)
    rows = {row["request_id"]: row for row in rows_when(lambda: sqlite_rows(ledger_relay), 4)}
    assert (rows["done"]["outcome"], rows["done"]["status"], rows["done"]["key_name"]) == ("ok", 200, "key1")
    assert rows["done"]["completion_tokens"] > 0 and rows["done"]["usage_reported"] == 1
    assert rows["done"]["upstream"] == "default" and rows["done"]["ttft_ms"] is not None
    assert rows["done"]["answered_model"] == "gpt-4o-mini"
    assert rows["left"]["outcome"] == "client_gone"
    assert (rows["failed"]["status"], rows["failed"]["outcome"]) == (502, "upstream_error")
    assert (rows["refused"]["status"], rows["refused"]["outcome"]) == (429, "rate_limited")


def test_neither_key_nor_content_is_in_the_database(ledger_relay: RelayProcess) -> None:
    """The SQLite files (database and WAL) never hold an access key or the conversation's text."""
    secret = "a-private-question-about-zanzibar"
    assert chat(ledger_relay, ask(text=secret), key=SECOND_ACCESS_KEY)[0] == 200
    rows_when(lambda: sqlite_rows(ledger_relay), 1)
    stored = b"".join(path.read_bytes() for path in ledger_file(ledger_relay).parent.glob("ledger.db*"))
    assert b"key2" in stored  # the key's name is there...
    for text in (ACCESS_KEY, SECOND_ACCESS_KEY, secret, "Hello"):
        assert text.encode() not in stored  # ...never the key, never what was said


def test_metrics_show_the_ledger_health(ledger_relay: RelayProcess) -> None:
    """relay_ledger_rows_written_total counts written rows; the queue depth and dropped rows are exposed."""
    for _ in range(3):
        chat(ledger_relay)
    rows_when(lambda: sqlite_rows(ledger_relay), 3)

    def written() -> float:
        text = httpx2.get(f"{ledger_relay.url}/metrics", timeout=5).text  # a scrape publishes the counts
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("relay_ledger_rows_written_total"))

    assert wait_until(lambda: written() >= 3, timeout=10)
    text = httpx2.get(f"{ledger_relay.url}/metrics", timeout=5).text
    assert "relay_ledger_queue_depth" in text and "relay_ledger_rows_dropped_total" in text


@pytest.fixture
def locked_sqlite(ledger_relay: RelayProcess) -> Iterator[sqlite3.Connection]:
    """Another connection holding the ledger's write lock (a write transaction left open)."""
    connection = sqlite3.connect(ledger_file(ledger_relay), isolation_level=None, timeout=5, check_same_thread=False)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    finally:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        connection.close()


def test_a_locked_database_never_delays_a_stream(ledger_relay: RelayProcess,
                                                 locked_sqlite: sqlite3.Connection) -> None:
    """While the writers wait on a locked SQLite, streams run at full speed; the rows arrive once it frees."""
    durations = []
    for number in range(6):
        status, took = chat(ledger_relay, ask({"n_tokens": 20, "token_interval": 0.01}),
                            request_id=f"while-locked-{number % 3}")
        assert status in (200, 429)
        durations.append(took)
    assert max(durations) < STREAM_SECONDS, durations
    assert sqlite_rows(ledger_relay) == []
    locked_sqlite.execute("ROLLBACK")
    assert len(rows_when(lambda: sqlite_rows(ledger_relay), 6, timeout=30)) == 6


def test_a_graceful_stop_writes_what_is_queued(ledger_relay: RelayProcess, locked_sqlite: sqlite3.Connection
                                               ) -> None:
    """Rows queued behind a locked database at SIGTERM are written before the workers exit."""
    for number in range(3):
        assert chat(ledger_relay, request_id=f"queued-{number}")[0] == 200
    releaser = threading.Timer(1.5, lambda: locked_sqlite.execute("ROLLBACK"))
    releaser.start()
    try:
        assert ledger_relay.stop(signal.SIGTERM, timeout=40) == 0
    finally:
        releaser.join()
    assert sorted(row["request_id"] for row in sqlite_rows(ledger_relay)) == ["queued-0", "queued-1", "queued-2"]


def test_every_route_and_protocol_leaves_its_rows(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
                                                  tmp_path: Path) -> None:
    """NDJSON, OpenAI JSON and SSE, EventSource SSE, WebSocket (a row per answer), the forwarded /v1
    families and Anthropic's /v1/messages: each request one row with its route, protocol and tokens, from
    two workers sharing one SQLite file."""
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text(upstreams_toml(fake.base_url, [root_of(fake)]))
    # Two workers: both migrate the fresh SQLite file at start and write to it side by side.
    relay = relay_factory(fresh=True, UPSTREAMS_FILE=str(upstreams), OPENAI_UPSTREAM_KEY=UPSTREAM_KEY,
                          ANTHROPIC_KEY=ANTHROPIC_KEY, OPENAI_API_KEY="", GUNICORN_WORKERS="2")
    headers, url = relay.headers(), relay.url
    hello = [{"role": "user", "content": "Hello"}]
    sent = [
        httpx2.post(f"{url}/chat", json={"messages": hello}, headers=headers, timeout=20),
        httpx2.post(f"{url}/v1/chat/completions", json={"messages": hello, "model": "gpt-4o-mini"},
                    headers=headers, timeout=20),
        httpx2.post(f"{url}/v1/chat/completions", json={"messages": hello, "model": "gpt-4o-mini", "stream": True},
                    headers=headers, timeout=20),
        httpx2.get(f"{url}/chat", params={"prompt": "Hello"}, headers=headers, timeout=20),
        httpx2.post(f"{url}/v1/responses", json={"model": "gpt-4o-mini", "input": "Hello", "stream": True},
                    headers=headers, timeout=20),
        httpx2.post(f"{url}/v1/embeddings", json={"model": "gpt-4o-mini", "input": "Hello"}, headers=headers,
                    timeout=20),
        httpx2.post(f"{url}/v1/messages", json={"model": "claude-x", "max_tokens": 50, "messages": hello},
                    headers=headers, timeout=20),
    ]
    assert [response.status_code for response in sent] == [200] * len(sent)
    ws = simple_websocket.Client.connect(url.replace("http://", "ws://") + f"/ws?key={ACCESS_KEY}")
    try:
        for _ in range(2):
            ws.send(json.dumps({"content": "Hello"}))
            while not json.loads(ws.receive(timeout=10) or "{}").get("done"):
                pass
    finally:
        ws.close()
    rows = rows_when(lambda: sqlite_rows(relay), 9)
    assert sorted((row["route"], row["protocol"]) for row in rows) == sorted([
        ("/chat", "ndjson"), ("/v1/chat/completions", "openai"), ("/v1/chat/completions", "openai"),
        ("/chat", "sse"), ("/v1/responses", "openai"), ("/v1/embeddings", "openai"),
        ("/v1/messages", "anthropic"), ("/ws", "websocket"), ("/ws", "websocket")])
    assert all(row["outcome"] == "ok" and row["key_name"] == "key1" for row in rows), rows
    assert all(row["prompt_tokens"] + row["completion_tokens"] > 0 for row in rows), rows


# --- PostgreSQL ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


def pg_rows(postgres: Postgres) -> list[dict[str, Any]]:
    try:
        with psycopg.connect(postgres.url, connect_timeout=2) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT request_id, key_name, outcome FROM ledger_requests ORDER BY id")
            return [{"request_id": r[0], "key_name": r[1], "outcome": r[2]} for r in cursor.fetchall()]
    except psycopg.Error:
        return []


def test_two_relays_share_one_postgresql_ledger(relay_factory: Callable[..., RelayProcess],
                                                postgres: Postgres) -> None:
    """Two relay instances (two workers each) write to one PostgreSQL; a stalled server delays no stream."""
    first = relay_factory(fresh=True, DATABASE_URL=postgres.url, GUNICORN_WORKERS="2")
    second = relay_factory(fresh=True, DATABASE_URL=postgres.url, GUNICORN_WORKERS="2")
    for relay, name in ((first, "one"), (second, "two")):
        for number in range(2):
            assert chat(relay, request_id=f"{name}-{number}")[0] == 200
    rows = rows_when(lambda: pg_rows(postgres), 4, timeout=20)
    assert sorted(row["request_id"] for row in rows) == ["one-0", "one-1", "two-0", "two-1"]
    assert not ledger_file(first).exists()  # DATABASE_URL replaces the SQLite file
    # Either instance reads the shared ledger: key1's four requests, two through each.
    mine = httpx2.get(f"{second.url}/v1/usage/me", headers=second.headers(), timeout=10).json()
    assert mine["key"] == "key1" and mine["today"]["requests"] == 4 and mine["this_month"]["requests"] == 4

    postgres.pause()
    try:
        durations = [chat(relay, ask({"n_tokens": 20, "token_interval": 0.01}), request_id=f"paused-{n}")[1]
                     for n, relay in enumerate((first, second, first, second))]
        assert max(durations) < STREAM_SECONDS, durations
    finally:
        postgres.resume()
    rows = rows_when(lambda: pg_rows(postgres), 8, timeout=30)
    assert {row["request_id"] for row in rows} >= {f"paused-{n}" for n in range(4)}


def test_roll_up_on_postgresql_is_exact_even_run_twice_at_once(postgres: Postgres) -> None:
    """PostgreSQL's roll-up (FOR UPDATE SKIP LOCKED, ON CONFLICT upserts), run by two workers at the same
    moment, keeps every total exact; the reports read it as they read SQLite."""
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    from proxy.config import Config
    from proxy.ledger.database import create_engine, migrate
    from proxy.ledger.report import UsageQuery, usage
    from proxy.ledger.rollup import roll_up
    from proxy.ledger.schema import requests
    from tests.unit.test_ledger_store import a_row

    # A database of its own on the same server: the relays' ledger stays as the other test left it.
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        connection.execute("DROP DATABASE IF EXISTS rollup")
        connection.execute("CREATE DATABASE rollup")
    config = Config.from_env({"AUTHORIZATION_KEY": ACCESS_KEY, "OPENAI_API_KEY": UPSTREAM_KEY,
                              "DATABASE_URL": postgres.url.rsplit("/", 1)[0] + "/rollup"})
    engine = create_engine(config)
    migrate(engine)
    today = datetime.now(UTC).date()
    rows = [a_row(day=today - timedelta(days=n % 50), key=f"k{n % 3}", model=f"m{n % 4}", prompt=n,
                  cost_nanos=None if n % 7 == 0 else n) for n in range(3000)]
    with engine.begin() as connection:
        connection.execute(sa.insert(requests), [row.values() for row in rows])
    since = today - timedelta(days=60)
    before = {by: usage(engine, UsageQuery(since, None, by)) for by in ("day", "model", "key")}
    workers = [threading.Thread(target=roll_up, args=(engine, 30)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    with engine.connect() as connection:
        oldest = connection.execute(sa.select(sa.func.min(requests.c.day))).scalar()
    assert oldest is not None and oldest >= today - timedelta(days=29)
    assert {by: usage(engine, UsageQuery(since, None, by)) for by in ("day", "model", "key")} == before
