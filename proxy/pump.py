"""The one streaming loop behind every endpoint: its I/O.

A reader thread (a greenlet under gunicorn's gevent worker) reads the upstream and hands batches of
parsed chunks over a queue; the pump, running in the response iterator, feeds what arrives to a
`StreamMachine` (proxy/stream_machine.py), which decides about keep-alives, timers, hold-back and
fall-over, and writes what it says. The pump notices a departed client, runs the fall-over in its own
thread, and in `finally` closes the upstream whatever happened. It takes plain arguments, never the request.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy.encoders import Encoder
from proxy.errors import RelayError
from proxy.shutdown import Draining
from proxy.stream_machine import (
    CLIENT_GONE,
    OPEN,
    TICK,
    Batch,
    Event,
    Outcome,
    Reopened,
    StreamMachine,
    StreamTimers,
)
from proxy.stream_sources import Source, open_source
from proxy.upstream import Chunk, StreamEnd, StreamFailure, UpstreamStream
from proxy.usage import TokenUsage

log = logging.getLogger("relay.pump")



@dataclass
class StreamStats:
    """What the access log and metrics want to know about one stream; filled in by the pump."""

    upstream: str = ""
    fallbacks: int = 0
    # (upstream, kind) of every upstream failure in this request, fallen over or not; for the metrics.
    upstream_failures: list[tuple[str, str]] = field(default_factory=list)
    started_at: float = 0.0
    first_token_at: float | None = None
    ended_at: float | None = None
    tokens: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    outcome: str = OPEN  # "ok", an error code, or "client_gone"
    keep_content: bool = False
    content: list[str] = field(default_factory=list)
    answered_model: str | None = None  # as the upstream named it, for the usage ledger

    def token_usage(self) -> TokenUsage:
        """The answer's tokens as the budgets, the metrics and a WebSocket's charge all count them: the
        upstream's reported usage, else the content deltas as completion tokens (`TokenUsage.of_answer`)."""
        return TokenUsage.of_answer(self.usage, self.tokens)

    def take(self, outcome: Outcome) -> None:
        """Copy the machine's account of the stream. Not its `kind`: the pump sets `outcome` when it is
        decided, and a stalled client (noticed by the reader thread) may override it meanwhile."""
        self.upstream = outcome.upstream
        self.fallbacks = outcome.fallbacks
        self.upstream_failures = outcome.upstream_failures
        self.first_token_at = outcome.first_token_at
        self.tokens = outcome.tokens
        self.finish_reason = outcome.finish_reason
        self.usage = outcome.usage
        self.content = outcome.content
        self.answered_model = outcome.model


def never_gone() -> bool:
    return False


class ClientSocket:
    """The client's connection as the pump sees it: calling it tells whether the client has hung up
    (without consuming its data); `hang_up` ends a connection whose client stopped reading."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __call__(self) -> bool:
        # A non-blocking peek, not select(): select() cannot watch descriptors above 1023 and raised
        # ValueError for them, which read as "client gone" and cut healthy streams once a worker held
        # more than about 500 of them (each stream has a client and an upstream socket).
        sock = self._sock
        try:
            timeout = sock.gettimeout()
            sock.settimeout(0.0)  # gevent's socket waits on EWOULDBLOCK unless its timeout is 0
        except OSError:
            return True
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False  # connected and silent: the usual case
        except ValueError:
            return False  # a TLS socket cannot peek; a departed client shows when the next write fails
        except OSError:
            return True
        finally:
            with contextlib.suppress(OSError):  # closed meanwhile: nothing left to restore
                sock.settimeout(timeout)

    def hang_up(self) -> None:
        """Shut the connection: a write blocked on it fails at once and the server closes the response."""
        # Shut down through a duplicate descriptor: the kernel wakes the blocked write with EPIPE, which
        # servers treat as a departed client. (gevent's own shutdown would instead cancel the waiting
        # greenlet with EBADF, which gunicorn logs as an error with a traceback.)
        try:
            with socket.fromfd(self._sock.fileno(), self._sock.family, self._sock.type) as duplicate:
                duplicate.shutdown(socket.SHUT_RDWR)
        except OSError:
            log.debug("client socket was already closed")


def socket_watcher(sock: socket.socket | None) -> Callable[[], bool]:
    """A check that tells whether the client on `sock` has hung up (a `ClientSocket` when there is one)."""
    return never_gone if sock is None else ClientSocket(sock)


class _FallOver:
    """Opens the next upstream in its own thread (greenlet), so the pump keeps sending keep-alives and
    watching the client meanwhile; a stream opened after the pump gave up is closed, never leaked."""

    def __init__(self, failed: UpstreamStream, put: Callable[[object], None]) -> None:
        self._failed = failed
        self._put = put
        self._lock = threading.Lock()
        self._cancelled = False
        threading.Thread(target=self._run, daemon=True, name=f"fall-over-from-{failed.upstream.name}").start()

    def _run(self) -> None:
        result: UpstreamStream | RelayError
        try:
            result = self._failed.fall_over()
        except RelayError as exc:
            result = exc
        with self._lock:
            if not self._cancelled:
                self._put(Reopened(result))
                return
        if isinstance(result, UpstreamStream):
            result.close()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True


def pump(stream: UpstreamStream, encoder: Encoder, timers: StreamTimers, stats: StreamStats,
         client_gone: Callable[[], bool] = never_gone, draining: Draining | None = None) -> Iterator[bytes]:
    """Yield the client's bytes for `stream`; every outcome but a departed client ends with `end()`.

    Until the upstream makes its first progress (content, reasoning or a tool call), what the encoder makes
    of its chunks is held back and the client sees only keep-alives: if that upstream fails meanwhile, the
    next upstream serving the model takes over and nothing is sent twice. After it, no fall-over ever.
    The decisions are the `StreamMachine`'s; this function does the I/O they call for."""
    start = time.monotonic()
    stats.started_at = stats.started_at or start
    machine = StreamMachine(stream, encoder, timers, start, draining, keep_content=stats.keep_content)
    wiring = _Wiring(stream, timers.idle, stats, client_gone)
    try:
        opening = machine.start()
        if opening:
            yield opening
        yield from _drive(machine, wiring, client_gone, stats, announced=bool(opening))
    except GeneratorExit:
        if stats.outcome == OPEN:  # a stalled client (seen by the reader) keeps that outcome
            stats.outcome = "client_gone"
        raise
    finally:
        stats.take(machine.outcome)
        wiring.close()
        stats.ended_at = time.monotonic()  # after the cleanup: the duration includes closing the upstream


def _drive(machine: StreamMachine, wiring: _Wiring, client_gone: Callable[[], bool],
           stats: StreamStats, announced: bool) -> Iterator[bytes]:
    """Feed the machine what arrives (or a Tick when nothing does) and carry out its actions until it
    ends the stream. Until something is `announced` (written), the status and headers go out with the first
    write when what came with them makes one, else alone (an empty write) before the first wait."""
    pending: object = None  # an end-of-stream item that came with the last batch goes after that batch
    while True:
        action = machine.poll(time.monotonic())
        if action.outcome is None:
            item, pending = pending, None
            if item is None:
                item = wiring.next_item(action.wait if announced else 0.0)
                if item is None and not announced:
                    announced = True
                    yield b""
                    continue
            if type(item) is list:
                pending = wiring.take_ready(item)
            now = time.monotonic()
            action = machine.feed(wiring.received(item), now)
            if action.check_client and client_gone():
                action = machine.feed(CLIENT_GONE, now)
        if action.outcome is not None:
            # Set before the last write, which may block: a stall the reader notices meanwhile overrides it.
            stats.outcome = action.outcome.kind
            if action.write:
                wiring.writing()
                yield action.write
                wiring.written()
            return
        if action.write:
            announced = True
            wiring.writing()
            yield action.write
            wiring.written()
        if action.fall_over:
            wiring.fall_over()


class _Wiring:
    """The I/O side of one stream: the current upstream's source of events (`proxy/stream_sources.py`) and a
    fall-over in progress; `close()` leaves no thread or upstream connection behind, whatever happened."""

    def __init__(self, stream: UpstreamStream, stall_seconds: float, stats: StreamStats,
                 client_gone: Callable[[], bool]) -> None:
        self.stream = stream  # the current upstream's: a fall-over replaces it
        self._stats = stats
        self._client_gone = client_gone
        self._stall_seconds = stall_seconds
        self._source: Source | None = open_source(stream, stall_seconds, self._on_stall)
        self._falling_over: _FallOver | None = None
        self._reopened: queue.Queue[object] | None = None  # where a fall-over hands its result over

    def next_item(self, timeout: float) -> object:
        """The next batch, end, failure or fall-over result, or None after `timeout` seconds."""
        if self._source is not None:
            return self._source.next_item(timeout)
        assert self._reopened is not None
        try:
            return self._reopened.get(timeout=timeout)
        except queue.Empty:
            return None

    def take_ready(self, batch: list[Chunk]) -> object:
        """Add what else is ready to `batch`; returns an end-of-stream item to handle after it, if any."""
        return self._source.take_ready(batch) if self._source is not None else None

    def received(self, item: object) -> Event:
        """The machine's event for an item (None: the wait ran out); a reopened stream gets its source."""
        if item is None:
            return TICK
        if type(item) is list:
            return Batch(item)
        if isinstance(item, StreamEnd | StreamFailure):
            return item
        if isinstance(item, Reopened):
            self._falling_over = None
            if isinstance(item.result, UpstreamStream):
                self.stream = item.result
                self._source = open_source(item.result, self._stall_seconds, self._on_stall)
            return item
        raise TypeError(f"unexpected item from the upstream: {item!r}")

    def writing(self) -> None:
        if self._source is not None:
            self._source.writing()

    def written(self) -> None:
        if self._source is not None:
            self._source.written()

    def fall_over(self) -> None:
        """Open the next upstream in the background; its stream (or error) arrives as a Reopened item."""
        if self._source is not None:
            self._source.stop()
        self._source = None
        self._reopened = queue.Queue()
        self._falling_over = _FallOver(self.stream, self._reopened.put)

    def close(self) -> None:
        if self._falling_over is not None:
            self._falling_over.cancel()
            assert self._reopened is not None
            _close_reopened(self._reopened)
        if self._source is not None:
            self._source.close()

    def _on_stall(self) -> None:
        _hang_up_on_stalled_client(self.stream, self._stats, self._client_gone)


def _close_reopened(reopened: queue.Queue[object]) -> None:
    """Close a stream the fall-over opened and handed over just before the pump ended."""
    while True:
        try:
            item = reopened.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, Reopened) and isinstance(item.result, UpstreamStream):
            item.result.close()


def _hang_up_on_stalled_client(stream: UpstreamStream, stats: StreamStats, client_gone: Callable[[], bool]) -> None:
    """Runs in the reader: the client took nothing for a whole idle period. Stop reading the upstream and
    hang up, which fails the pump's blocked write; the server then closes the response and the pump."""
    stats.outcome = "client_stalled"
    log.info("client stopped reading for an idle period; ending its stream")
    stream.abort()
    if isinstance(client_gone, ClientSocket):
        client_gone.hang_up()
