"""The ledger's storage on a real SQLite file in tmp_path: migrations, token reading, roll-up, reports, the
writer thread (batches, drops counted, never waiting on the database, flushed on close)."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from proxy.config import Config
from proxy.forwarding import anthropic_usage, normalized_usage
from proxy.ledger.database import create_engine, migrate
from proxy.ledger.report import ReportError, UsageQuery, parse_query, parse_since, table, usage
from proxy.ledger.rollup import cutoff_day, roll_up
from proxy.ledger.row import LedgerRow, LedgerUsage
from proxy.ledger.schema import daily, metadata, requests
from proxy.ledger.writer import LedgerWriter
from tests.servers import wait_until

TODAY = date(2026, 12, 4)


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    engine = create_engine(Config((), "", data_dir=tmp_path))
    migrate(engine)
    return engine


def a_row(day: date = TODAY, key: str = "alice", model: str = "gpt-4o-mini", prompt: int = 10,
          completion: int = 20, cost_nanos: int | None = 1500, outcome: str = "ok", **fields: Any) -> LedgerRow:
    values: dict[str, Any] = dict(
        time=datetime(day.year, day.month, day.day, 12, tzinfo=UTC), day=day, request_id="r1", key_name=key,
        route="/chat", protocol="ndjson", model=model, upstream="up", answered_model=None, status=200,
        outcome=outcome, prompt_tokens=prompt, completion_tokens=completion, reasoning_tokens=3,
        cached_tokens=4, usage_reported=True, cost_nanos=cost_nanos, ttft_ms=12.5, duration_ms=50.0)
    values.update(fields)
    return LedgerRow(**values)


def insert(engine: sa.Engine, rows: list[LedgerRow]) -> None:
    with engine.begin() as connection:
        connection.execute(sa.insert(requests), [row.values() for row in rows])


def test_migrations_build_exactly_the_declared_schema(engine: sa.Engine) -> None:
    """Alembic's migrations and schema.py agree: no drift between the declared tables and the real ones."""
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []


def test_sqlite_is_in_wal_mode(engine: sa.Engine, tmp_path: Path) -> None:
    """The default ledger is a SQLite file in DATA_DIR in WAL mode."""
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert (tmp_path / "ledger.db").is_file()


def test_migrating_at_once_from_many_threads_is_safe(tmp_path: Path) -> None:
    """Several workers migrating the same fresh database at the same moment: one migrates, all succeed."""
    engine = create_engine(Config((), "", data_dir=tmp_path / "fresh"))
    failures: list[BaseException] = []

    def run() -> None:
        try:
            migrate(engine)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0001"


@pytest.mark.parametrize(("usage", "deltas", "expected"), [
    (None, 7, LedgerUsage(0, 7, 0, 0, False)),
    ({"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
      "prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 4}},
     1, LedgerUsage(5, 9, 4, 2, True)),
    ({"input_tokens": 5, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 3},
      "output_tokens_details": {"reasoning_tokens": 6}, "prompt_tokens": 5, "completion_tokens": 9},
     0, LedgerUsage(5, 9, 6, 3, True)),
    ({"prompt_tokens": 8, "completion_tokens": 1, "cached_tokens": 5, "reasoning_tokens": 1}, 0,
     LedgerUsage(8, 1, 1, 5, True)),
])
def test_tokens_are_read_as_the_upstream_reported_them(usage: dict[str, Any] | None, deltas: int,
                                                       expected: LedgerUsage) -> None:
    """Prompt, completion, reasoning and cached tokens from each protocol's usage shape."""
    assert LedgerUsage.of_answer(usage, deltas) == expected


def totals(engine: sa.Engine, by: str, since: date) -> list[dict[str, Any]]:
    return usage(engine, UsageQuery(since, None, by))  # type: ignore[arg-type]


def test_roll_up_keeps_totals_exact(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rolling old rows into daily totals (in several small batches) changes no total, by any grouping."""
    monkeypatch.setattr("proxy.ledger.rollup.BATCH_ROWS", 7)
    rows = [a_row(day=TODAY - timedelta(days=n % 40), key=("alice", "bob")[n % 2],
                  model=("m1", "m2", "m3")[n % 3], prompt=n, completion=2 * n,
                  cost_nanos=None if n % 5 == 0 else 1000 + n, outcome="ok" if n % 4 else "client_gone")
            for n in range(100)]
    insert(engine, rows)
    since = TODAY - timedelta(days=60)
    before = {by: totals(engine, by, since) for by in ("day", "model", "key")}
    moved = roll_up(engine, retention_days=30, today=TODAY)
    assert moved == sum(1 for row in rows if row.day < cutoff_day(30, TODAY))
    assert moved > 7  # more than one batch
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.min(requests.c.day))).scalar() == cutoff_day(30, TODAY)
        assert connection.execute(sa.select(sa.func.count()).select_from(daily)).scalar() > 0
    assert {by: totals(engine, by, since) for by in ("day", "model", "key")} == before
    assert roll_up(engine, retention_days=30, today=TODAY) == 0  # nothing left to do


def test_roll_up_adds_to_a_day_already_rolled_up(engine: sa.Engine) -> None:
    """Rows of a day that already has totals (a late row, another instance) are added, not overwritten."""
    old = TODAY - timedelta(days=40)
    insert(engine, [a_row(day=old)])
    roll_up(engine, retention_days=30, today=TODAY)
    insert(engine, [a_row(day=old), a_row(day=old, cost_nanos=None)])
    roll_up(engine, retention_days=30, today=TODAY)
    [row] = totals(engine, "key", old)
    assert (row["requests"], row["prompt_tokens"], row["cost"], row["unpriced"]) == (3, 30, 3e-6, 1)


def test_report_groups_filters_and_prints(engine: sa.Engine) -> None:
    """By key, model or day, one key only, since a day; the table names every column."""
    insert(engine, [a_row(), a_row(key="bob", model="m2"), a_row(day=TODAY - timedelta(days=3))])
    by_key = usage(engine, UsageQuery(TODAY - timedelta(days=1), None, "key"))
    assert [(row["key"], row["requests"]) for row in by_key] == [("alice", 1), ("bob", 1)]
    only_alice = usage(engine, UsageQuery(TODAY - timedelta(days=7), "alice", "day"))
    assert [row["day"] for row in only_alice] == [str(TODAY - timedelta(days=3)), str(TODAY)]
    text = table(by_key, "key")
    assert text.splitlines()[0].split() == ["key", "requests", "errors", "prompt", "completion", "reasoning",
                                             "cached", "cost"]
    assert "alice" in text and "0.000002" in text


@pytest.mark.parametrize(("text", "expected"), [("1d", TODAY), ("7d", TODAY - timedelta(days=6)),
                                                ("2026-11-01", date(2026, 11, 1))])
def test_since_counts_whole_utc_days(text: str, expected: date) -> None:
    """`7d` is today and the 6 days before; a date is taken as it is."""
    assert parse_since(text, TODAY) == expected


@pytest.mark.parametrize(("since", "by"), [("0d", None), ("yesterday", None), (None, "week")])
def test_bad_report_parameters_are_refused_with_a_reason(since: str | None, by: str | None) -> None:
    """A wrong `since` or `by` is a ReportError that says what is expected."""
    with pytest.raises(ReportError, match="must be"):
        parse_query(since, None, by)


def writer_for(engine: sa.Engine, **fields: Any) -> LedgerWriter:
    writer = LedgerWriter(engine, lambda: None, lambda: None, **fields)
    writer.start()
    return writer


def count_rows(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(requests)).scalar() or 0)


def test_writer_writes_batches_and_close_flushes(engine: sa.Engine) -> None:
    """Rows put are written by the thread; close writes what is still queued before it returns."""
    writer = writer_for(engine)
    for _ in range(1200):
        writer.put(a_row())
    assert writer.close(timeout=10)
    assert count_rows(engine) == 1200
    assert writer.counts.written == 1200 and writer.counts.dropped_full == writer.counts.dropped_failed == 0


def test_a_locked_database_never_makes_put_wait_and_rows_wait_for_it(engine: sa.Engine, tmp_path: Path) -> None:
    """Another connection holding SQLite's write lock: `put` returns at once; the rows go in once it lets go."""
    blocker = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    writer = writer_for(engine)
    try:
        started = time.monotonic()
        for _ in range(100):
            writer.put(a_row())
        assert time.monotonic() - started < 0.1
        assert wait_until(lambda: writer.depth < 100)  # the thread took a batch and is waiting on the lock
        assert count_rows(engine) == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert wait_until(lambda: count_rows(engine) == 100, timeout=10)
    assert writer.close(timeout=5)


def test_a_full_queue_and_a_refusing_database_count_what_they_drop(engine: sa.Engine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is lost silently: rows beyond the queue's capacity and batches the database refused are counted."""
    monkeypatch.setattr("proxy.ledger.writer.RETRY_SECONDS", 0.01)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE ledger_requests"))  # every insert now fails
    writer = LedgerWriter(engine, lambda: None, lambda: None, capacity=5)
    for _ in range(8):
        writer.put(a_row())
    assert writer.counts.dropped_full == 3
    writer.start()
    assert wait_until(lambda: writer.counts.dropped_failed + writer.counts.dropped_full == 8, timeout=10)
    assert "no such table" in writer.counts.last_error
    assert writer.close(timeout=5)


@pytest.mark.parametrize(("usage", "expected"), [
    (normalized_usage({"input_tokens": 9, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 4},
                       "output_tokens_details": {"reasoning_tokens": 2}}), LedgerUsage(9, 5, 2, 4, True)),
    (anthropic_usage({"input_tokens": 3, "output_tokens": 5, "cache_read_input_tokens": 6}),
     LedgerUsage(9, 5, 0, 6, True)),
])
def test_forwarded_usage_keeps_cached_and_reasoning_tokens(usage: dict[str, Any], expected: LedgerUsage) -> None:
    """The forwarded families' usage, in the chat shape, still tells the ledger its cached and reasoning tokens."""
    assert LedgerUsage.of_answer(usage, 0) == expected


def test_the_usage_command_prints_a_table(engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m proxy usage --by key --since 7d` reads DATA_DIR's ledger and prints one line per key."""
    from proxy.ledger.cli import usage_main

    today = datetime.now(UTC).date()
    insert(engine, [a_row(day=today), a_row(day=today, key="bob"), a_row(day=today - timedelta(days=10))])
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert usage_main(["--by", "key", "--since", "7d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["alice", "1"], ["bob", "1"]]
    assert usage_main(["--since", "soon"]) == 2
    assert "'since' must be" in capsys.readouterr().err


def test_the_usage_command_makes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Without a ledger yet, the command says so and creates nothing."""
    from proxy.ledger.cli import usage_main

    monkeypatch.setenv("DATA_DIR", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    assert usage_main([]) == 0
    assert "no usage recorded yet" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_the_writer_rolls_up_now_and_then(engine: sa.Engine) -> None:
    """The roll-up runs in the writer's thread soon after it starts, then every `maintain_every` seconds."""
    runs: list[float] = []
    writer = LedgerWriter(engine, lambda: None, lambda: runs.append(time.monotonic()), maintain_every=0.3,
                          first_maintenance=0.0)
    writer.start()
    try:
        assert wait_until(lambda: len(runs) >= 2, timeout=5)
        assert runs[1] - runs[0] >= 0.3
    finally:
        assert writer.close(timeout=5)


def test_a_writer_stuck_in_the_database_at_close_counts_its_rows_as_lost(engine: sa.Engine) -> None:
    """close() gives up at its deadline; the batch in flight and the queue are counted as dropped."""
    release = threading.Event()

    def stuck() -> None:
        release.wait(10)

    writer = LedgerWriter(engine, stuck, lambda: None)  # held in `prepare`: nothing gets written
    for _ in range(5):
        writer.put(a_row())
    writer.start()
    assert not writer.close(timeout=0.3)
    assert writer.counts.dropped_failed == 5 and writer.depth == 0
    release.set()


def test_the_benchmark_runs(tmp_path: Path) -> None:
    """bench/ledger.py measures a small ledger without error (its numbers are in docs/benchmarks.md)."""
    from bench.ledger import measure

    result = measure(300, None, tmp_path)
    assert result["rows"] == 300 and result["bytes_per_million_rows"] > 0
    assert result["daily_total_rows"] > 0 and result["writer_rows_per_second"] > 0
