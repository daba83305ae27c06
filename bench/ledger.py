"""The usage ledger's cost (docs/benchmarks.md, "Usage ledger"): what a request pays to leave its row, how fast
a worker's writer thread inserts, and how large the database grows per million requests.

    python -m bench.ledger                     # 100,000 rows into a SQLite file in a temporary directory
    python -m bench.ledger --rows 20000 --database-url postgresql://relay@127.0.0.1:5432/postgres

The request side is measured as the relay runs it (`Ledger.record_request` from a closed request's state:
the row built from its access record, the cost hook called, the row queued); the writer as the relay runs it
(`LedgerWriter`, batches of 500, its own thread). The size is the SQLite file after a checkpoint, scaled to a
million rows; the daily totals that replace the rows after LEDGER_RETENTION_DAYS are measured too.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from proxy.accesslog import AccessRecord
from proxy.config import Config
from proxy.ledger import Ledger
from proxy.ledger.database import SQLITE_FILE, create_engine, migrate
from proxy.ledger.rollup import roll_up
from proxy.ledger.row import LedgerRow
from proxy.ledger.writer import LedgerWriter
from proxy.pump import StreamStats
from proxy.request_state import Declaration, RequestState

KEYS = [f"user-{number}" for number in range(20)]
MODELS = ["gpt-4o-mini", "gpt-4o", "deepseek-chat", "kimi-k2-0905", "claude-sonnet-4"]
ROUTES = [("/chat", "ndjson"), ("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")]


def closed_request(rng: random.Random) -> RequestState:
    """A finished streamed request as `close_request` sees it."""
    route, protocol = rng.choice(ROUTES)
    started = time.monotonic() - rng.uniform(0.5, 20)
    record = AccessRecord("POST", route, "127.0.0.1", uuid.uuid4().hex, started, status=200,
                          key_name=rng.choice(KEYS), model=rng.choice(MODELS))
    prompt, completion = rng.randint(20, 4000), rng.randint(10, 2000)
    record.stats = StreamStats(upstream="openai", started_at=started, first_token_at=started + 0.4,
                               ended_at=time.monotonic(), tokens=completion, outcome="ok",
                               usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                      "total_tokens": prompt + completion}, answered_model=record.model)
    return RequestState(record, Declaration(protocol, streams=True), route)


def request_side(count: int) -> float:
    """Microseconds a request spends leaving its row (build + queue), the writer not running."""
    ledger = Ledger(Config((), ""), None)
    ledger.writer = LedgerWriter(sa.create_engine("sqlite://"), lambda: None, lambda: None, capacity=count + 1)
    rng = random.Random(1)
    states = [closed_request(rng) for _ in range(count)]
    started = time.perf_counter()
    for state in states:
        ledger.record_request(state)
    return (time.perf_counter() - started) / count * 1e6


def spread(rows: list[LedgerRow], days: int) -> list[LedgerRow]:
    """The rows spread over `days` past days (for the roll-up's measurement)."""
    today = datetime.now(UTC)
    out = []
    for number, row in enumerate(rows):
        moment = today - timedelta(days=1 + number % days)
        out.append(replace(row, time=moment, day=moment.date()))
    return out


def writer_side(engine: sa.Engine, rows: list[LedgerRow]) -> float:
    """Rows per second the writer thread inserts (batches of 500, one transaction each)."""
    writer = LedgerWriter(engine, lambda: None, lambda: None, capacity=len(rows) + 1)
    for row in rows:
        writer.put(row)
    started = time.perf_counter()
    writer.start()
    assert writer.close(timeout=600), "the writer did not finish"
    return len(rows) / (time.perf_counter() - started)


def sqlite_bytes(path: Path, engine: sa.Engine) -> int:
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(file.stat().st_size for file in path.parent.glob(f"{SQLITE_FILE}*"))


def measure(rows: int, database_url: str | None, directory: Path | None = None) -> dict[str, Any]:
    directory = directory or Path(tempfile.mkdtemp(prefix="relay-ledger-bench-"))
    config = Config((), "", data_dir=directory, database_url=database_url)
    engine = create_engine(config)
    migrate(engine)
    rng = random.Random(2)
    ledger = Ledger(config, None)
    built: list[LedgerRow] = []
    ledger.writer = LedgerWriter(engine, lambda: None, lambda: None, capacity=rows + 1)
    for _ in range(rows):
        ledger.record_request(closed_request(rng))
    built = spread(list(ledger.writer.queue), days=60)
    result: dict[str, Any] = {"rows": rows, "database": "postgresql" if database_url else "sqlite",
                              "request_us_per_row": request_side(min(rows, 20000)),
                              "writer_rows_per_second": writer_side(engine, built)}
    if database_url is None:
        path = directory / SQLITE_FILE
        size = sqlite_bytes(path, engine)
        result["bytes_per_million_rows"] = size / rows * 1_000_000
        started = time.perf_counter()
        rolled = roll_up(engine, retention_days=1, max_batches=10_000)
        result["rollup_rows_per_second"] = rolled / (time.perf_counter() - started)
        with engine.connect() as connection:
            result["daily_total_rows"] = connection.exec_driver_sql("SELECT count(*) FROM ledger_daily").scalar()
            connection.exec_driver_sql("VACUUM")
        result["bytes_after_rollup"] = sqlite_bytes(path, engine)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--database-url", help="a PostgreSQL URL (as DATABASE_URL) instead of a SQLite file")
    args = parser.parse_args()
    url = Config.from_env({"AUTHORIZATION_KEY": "x" * 16, "OPENAI_API_KEY": "x",
                           "DATABASE_URL": args.database_url}).database_url if args.database_url else None
    result = measure(args.rows, url)
    print(f"{result['database']}, {result['rows']:,} rows")
    print(f"  request side (row built, cost hook, queued): {result['request_us_per_row']:.1f} µs per request")
    print(f"  writer thread: {result['writer_rows_per_second']:,.0f} rows/s (batches of 500)")
    if "bytes_per_million_rows" in result:
        print(f"  database size: {result['bytes_per_million_rows'] / 2**20:,.0f} MiB per million rows")
        print(f"  roll-up: {result['rollup_rows_per_second']:,.0f} rows/s into {result['daily_total_rows']:,} "
              f"daily totals, {result['bytes_after_rollup'] / 2**10:,.0f} KiB once vacuumed")


if __name__ == "__main__":
    main()
