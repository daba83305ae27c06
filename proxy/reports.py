"""A finished request's records, written off its path: its metrics, its access-log line, its ledger row.

The pipeline's close step (`pipeline.close_request`) first frees at once what the client's next request may
need: the stream slot and the budget reservation. It then hands the request to `Reports.submit`. Under
gevent (the production server), with LOG_FLUSH_SECONDS above 0, one greenlet per worker writes them at most
that long later. It takes in one go every request that closed meanwhile, and lets other greenlets run
between two of them.

Why: written at once, they cost ~150 µs of the worker's CPU after the stream's last byte, and a client that
sends its next request at once waited behind them (bench/notes.md). nginx's `access_log ... flush=`
batches its lines in the same way.

A scrape of /metrics writes the worker's pending records first (`flush`), and so does the worker's stop
(deploy/gunicorn.conf.py). Elsewhere (`flask run`, the in-process tests), or with LOG_FLUSH_SECONDS=0, each
request is written as it closes.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from proxy.upstream_body import gevent_sockets

log = logging.getLogger("relay.reports")

Record = Callable[[], None]  # writes one closed request's records


class Reports:
    """`submit(record)` runs `record`: at once, or (`delay` > 0) from a greenlet at most `delay` seconds
    later, together with whatever else was submitted meanwhile, in order."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._pending: collections.deque[Record] = collections.deque()
        self._scheduled = False

    @classmethod
    def for_server(cls, delay: float) -> Reports:
        """Deferred by `delay` under gevent only: elsewhere no hub runs a timer between requests."""
        return cls(delay if gevent_sockets() else 0.0)

    def submit(self, record: Record) -> None:
        if self._delay <= 0:
            _run(record)
            return
        self._pending.append(record)
        if not self._scheduled:
            import gevent

            self._scheduled = True
            gevent.spawn_later(self._delay, self._write_in_turn)

    def flush(self) -> None:
        """Write everything pending now (a scrape of /metrics, the worker's stop)."""
        while self._pending:
            _run(self._pending.popleft())

    def _write_in_turn(self) -> None:
        import gevent

        try:
            while self._pending:  # including those submitted while it runs
                _run(self._pending.popleft())
                gevent.sleep(0)  # a request that became ready meanwhile goes first
        finally:
            self._scheduled = False


def _run(record: Record) -> None:
    try:
        record()
    except Exception:  # a bug in one request's records must not lose the others, nor fail an answered request
        log.exception("could not write a finished request's records")
