"""The usage ledger: one row per request in a real database, written off the request path, rolled up to
daily totals after LEDGER_RETENTION_DAYS, read by `python -m proxy usage`, `GET /usage` and
`GET /v1/usage/me`.

- `schema.py`: the tables; `migrations/`: Alembic's migrations that make them; `database.py`: the engine
  (SQLite in DATA_DIR, or PostgreSQL from DATABASE_URL) and `migrate`;
- `row.py`: a row from the access record, and the cost seam (`CostOf`, `no_prices`);
- `writer.py`: the bounded queue and the thread that inserts batches; `rollup.py`: retention and roll-up;
- `report.py`: the totals.

The pipeline's close step calls `Ledger.record_request` (a WebSocket's answers call `record_answer`, one
row per answer); nothing else writes.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.config import Config
from proxy.ledger.row import CostOf, LedgerRow, no_prices, row_of, row_of_request

if TYPE_CHECKING:
    import sqlalchemy as sa

    from proxy.accesslog import AccessRecord
    from proxy.ledger.report import UsageQuery
    from proxy.ledger.writer import LedgerWriter
    from proxy.metrics import Metrics
    from proxy.request_state import RequestState

log = logging.getLogger("relay.ledger")
T = TypeVar("T")
MAINTAIN_EVERY_SECONDS = 600.0
LOG_EVERY_SECONDS = 60.0  # at most one line a minute per worker about rows not written
PUBLISH_EVERY_SECONDS = 1.0  # the request side's publishing of the writer's counts (a scrape: at once)


class LedgerUnavailable(Exception):
    """This relay keeps no ledger (a Config built without DATA_DIR or DATABASE_URL)."""


class Ledger:
    """One per app (`Relay.ledger`). Without a database (`engine` None) it records nothing."""

    def __init__(self, config: Config, engine: sa.Engine | None, cost_of: CostOf = no_prices) -> None:
        self.config = config
        self.engine = engine
        self.cost_of = cost_of
        self.writer: LedgerWriter | None = None
        self._published = (0, 0)  # written, dropped: what the metrics already counted
        self._published_at = 0.0
        self._logged_at = 0.0
        self._logged_errors = 0

    def start(self) -> None:
        """Start this process' writer thread (in each gunicorn worker, once the app is built there)."""
        if self.engine is None or self.writer is not None:
            return
        from proxy.ledger.database import migrate
        from proxy.ledger.writer import LedgerWriter

        engine, retention = self.engine, self.config.ledger_retention_days
        self.writer = LedgerWriter(engine, lambda: migrate(engine), lambda: _roll_up(engine, retention),
                                   maintain_every=MAINTAIN_EVERY_SECONDS)
        self.writer.start()
        atexit.register(self.close, None, 5.0)

    # --- writing (the request side: never waits) ---------------------------------------------------------

    def record_request(self, state: RequestState) -> None:
        """The pipeline's close step: this request's row, for every endpoint that calls a model (those
        declared `streams=True`: chat in every protocol, the forwarded /v1 families, /v1/messages, the
        doctor), answered or refused; not health checks, metrics, model lists or static files; nor a
        WebSocket connection whose answers wrote rows of their own."""
        if (self.writer is None or state.access.method == "OPTIONS" or state.charged
                or not state.declaration.streams):
            return
        self._put(lambda: row_of_request(state, self.cost_of))

    def record_answer(self, record: AccessRecord, route: str, error_kind: str | None = None) -> None:
        """One WebSocket answer, a row of its own (a connection holds many; each is a request to the upstream)."""
        if self.writer is not None:
            self._put(lambda: row_of(record, route, "websocket", self.cost_of, error_kind))

    def _put(self, build: Callable[[], LedgerRow]) -> None:
        assert self.writer is not None
        try:
            self.writer.put(build())
        except Exception:  # a bug building a row must not fail a request that is already answered
            log.exception("could not build a ledger row")
            self.writer.counts.dropped_full += 1

    # --- health -----------------------------------------------------------------------------------------

    def publish_now_and_then(self, metrics: Metrics) -> None:
        """`publish`, at most once every PUBLISH_EVERY_SECONDS: each request's close calls it, and six
        metric updates per request cost more (about 45 µs through the multiprocess mmap values) than the
        rest of the close. A scrape publishes at once."""
        now = time.monotonic()
        if now - self._published_at >= PUBLISH_EVERY_SECONDS:
            self._published_at = now
            self.publish(metrics)

    def publish(self, metrics: Metrics) -> None:
        """The writer's counters into the metrics, and one log line (at most a minute apart) for rows lost."""
        writer = self.writer
        if writer is None:
            return
        counts = writer.counts
        written, dropped = counts.written, counts.dropped_full + counts.dropped_failed
        metrics.ledger_health(written - self._published[0], dropped - self._published[1], writer.depth)
        now = time.monotonic()
        if counts.errors > self._logged_errors and now - self._logged_at >= LOG_EVERY_SECONDS:
            log.warning("ledger: the database failed %d time(s) (last: %s); %d row(s) not written so far",
                        counts.errors - self._logged_errors, counts.last_error, dropped)
            self._logged_errors, self._logged_at = counts.errors, now
        elif dropped > self._published[1] and now - self._logged_at >= LOG_EVERY_SECONDS:
            log.warning("ledger: %d row(s) not written so far (queue full or database refusing)", dropped)
            self._logged_at = now
        self._published = (written, dropped)

    def close(self, metrics: Metrics | None, timeout: float = 10.0) -> None:
        """Graceful shutdown: write what is queued (within `timeout`), stop the thread, say what was lost.
        gunicorn's `worker_exit` calls it; `atexit` too, for any other server (a second call is quick)."""
        writer = self.writer
        if writer is None:
            return
        writer.close(timeout)
        self._logged_at = 0.0
        if metrics is not None:
            self.publish(metrics)
        elif writer.counts.dropped_full + writer.counts.dropped_failed > self._published[1]:
            log.warning("ledger: %d row(s) not written", writer.counts.dropped_full + writer.counts.dropped_failed)

    # --- reading (GET /usage, GET /v1/usage/me) ---------------------------------------------------------

    def usage(self, query: UsageQuery) -> list[dict[str, Any]]:
        from proxy.ledger.report import usage

        return self._read(lambda engine: usage(engine, query))

    def own_usage(self, key_name: str) -> dict[str, Any]:
        from proxy.ledger.report import own_usage

        return self._read(lambda engine: own_usage(engine, key_name))

    def _read(self, query: Callable[[sa.Engine], T]) -> T:
        """Run a read in a real thread under gevent (gevent's pool), so a slow database waits only the
        request that asked."""
        engine = self.engine
        if engine is None:
            raise LedgerUnavailable
        from gevent import get_hub, monkey

        if monkey.is_module_patched("threading"):
            result: T = get_hub().threadpool.apply(query, (engine,))
            return result
        return query(engine)


def _roll_up(engine: sa.Engine, retention_days: int) -> None:
    from proxy.ledger.rollup import roll_up

    roll_up(engine, retention_days)


def build_ledger(config: Config, cost_of: CostOf = no_prices) -> Ledger:
    """The app's ledger; `cost_of` is the seam for prices (the relay passes `no_prices` for now)."""
    if config.data_dir is None and not config.database_url:
        return Ledger(config, None, cost_of)
    from proxy.ledger.database import create_engine

    return Ledger(config, create_engine(config), cost_of)
