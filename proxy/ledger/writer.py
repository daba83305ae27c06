"""Ledger writes off the request path: each worker appends rows to a bounded in-memory queue, and a real OS
thread of its own inserts them in batches.

Why a real thread: the workers are gevent's, and a database call (SQLite waiting on a lock, a stalled
PostgreSQL) blocks whatever thread makes it. The thread is started with the unpatched `start_new_thread`
and sleeps with the unpatched `time.sleep`, so a slow or dead database never holds up the worker's hub, and
with it every stream. The request side only appends to a `collections.deque` (atomic, no lock, no wait).

Nothing is silently lost: a row that finds the queue full, or whose batch the database refused
`WRITE_ATTEMPTS` times, is counted as dropped. The thread never touches logging or the metrics (their locks
are gevent's, not to be shared with another OS thread): it keeps plain counters, which `publish` (run by
the worker: at a request's close at most once a second, and at each /metrics scrape) turns into the metrics
and into one throttled log line. On graceful shutdown (gunicorn's `worker_exit`), `close` drains the queue
within a deadline.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

from proxy.ledger.row import LedgerRow
from proxy.ledger.schema import requests

log = logging.getLogger("relay.ledger")

QUEUE_ROWS = 10_000  # about 10 MB of rows at most; a full queue drops (and counts) new rows
BATCH_ROWS = 500
POLL_SECONDS = 0.2  # how long the thread sleeps when the queue is empty
WRITE_ATTEMPTS = 3  # a batch the database refused this many times is dropped (and counted)
RETRY_SECONDS = 1.0


def _original(module: str, name: str) -> object:
    """The standard library's own function, even in a gevent-patched worker."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return getattr(__import__(module), name)
    return monkey.get_original(module, name)


@dataclass
class WriterCounts:
    """Plain counters the writer thread updates and the worker reads (ints: atomic under the GIL)."""

    written: int = 0
    dropped_full: int = 0
    dropped_failed: int = 0
    last_error: str = ""
    errors: int = 0


@dataclass
class LedgerWriter:
    engine: sa.Engine
    prepare: Callable[[], None]  # the schema migrated, before the first insert; retried until it works
    maintain: Callable[[], None]  # the periodic roll-up and pruning, run by this same thread
    maintain_every: float = 600.0
    first_maintenance: float = 5.0  # seconds after start: soon, but not in the middle of start-up
    capacity: int = QUEUE_ROWS
    queue: deque[LedgerRow] = field(default_factory=deque)
    counts: WriterCounts = field(default_factory=WriterCounts)
    _stop: bool = False
    _running: bool = False
    _in_flight: int = 0  # rows taken from the queue and not yet written or counted as dropped

    def start(self) -> None:
        start_new_thread = _original("_thread", "start_new_thread")
        self._running = True
        start_new_thread(self._run, ())  # type: ignore[operator]

    def put(self, row: LedgerRow) -> None:
        """The request side: never waits, never fails."""
        if len(self.queue) >= self.capacity:
            self.counts.dropped_full += 1
            return
        self.queue.append(row)

    @property
    def depth(self) -> int:
        return len(self.queue)

    def close(self, timeout: float) -> bool:
        """Write what is queued, then stop the thread; whether the queue was drained within `timeout`."""
        sleep = _original("time", "sleep")
        self._stop = True
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            sleep(0.02)  # type: ignore[operator]
        if self._running:  # the database still holds the thread: what it and the queue hold is lost
            self.counts.dropped_failed += len(self.queue) + self._in_flight
            self.queue.clear()
            self._in_flight = 0
            return False
        return not self.queue

    def _run(self) -> None:
        sleep = _original("time", "sleep")
        try:
            self._until_prepared(sleep)
            next_maintenance = time.monotonic() + self.first_maintenance
            while not (self._stop and not self.queue):
                if not self.queue:
                    if self._stop:
                        break
                    if time.monotonic() >= next_maintenance:
                        self._guarded(self.maintain)
                        next_maintenance = time.monotonic() + self.maintain_every
                    sleep(POLL_SECONDS)  # type: ignore[operator]
                    continue
                if self._write_batch(sleep) < BATCH_ROWS and not self._stop:
                    # Rows gather for a while: a batch's cost is mostly its transaction (a connection, the
                    # pragmas, the commit), so small batches at a steady trickle cost ~200 µs of CPU a row.
                    sleep(POLL_SECONDS)  # type: ignore[operator]
        finally:
            self._running = False

    def _until_prepared(self, sleep: object) -> None:
        while not self._stop:
            if self._guarded(self.prepare):
                return
            sleep(RETRY_SECONDS)  # type: ignore[operator]
        self._guarded(self.prepare)  # asked to stop before the database answered: one last try

    def _write_batch(self, sleep: object) -> int:
        """Write up to BATCH_ROWS queued rows; how many were taken."""
        batch = [self.queue.popleft() for _ in range(min(BATCH_ROWS, len(self.queue)))]
        self._in_flight = len(batch)
        values = [row.values() for row in batch]
        for attempt in range(WRITE_ATTEMPTS):
            if self._guarded(lambda: self._insert(values)):
                self.counts.written += len(batch)
                self._in_flight = 0
                return len(batch)
            if attempt + 1 < WRITE_ATTEMPTS and not self._stop:
                sleep(RETRY_SECONDS)  # type: ignore[operator]
        self.counts.dropped_failed += len(batch)
        self._in_flight = 0
        return len(batch)

    def _insert(self, values: list[dict[str, object]]) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.insert(requests), values)

    def _guarded(self, action: Callable[[], None]) -> bool:
        """Run `action`; a database error is remembered for the worker's log line, never raised here."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - any failure of the database must not end the thread
            self.counts.errors += 1
            self.counts.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            return False
        return True
