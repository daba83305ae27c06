"""The one streaming loop behind every endpoint.

A reader thread (a greenlet under gunicorn's gevent worker) reads the upstream and hands batches of
parsed chunks over a queue; the pump, running in the response iterator, encodes them, writes keep-alives
during silence, enforces the first-token, idle and whole-stream timers, notices a departed client, and in
`finally` closes the upstream whatever happened. It takes plain arguments, never the request.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from proxy.config import Config
from proxy.encoders import Encoder
from proxy.errors import RelayError
from proxy.shutdown import RESTART_MESSAGE, SERVER_RESTARTING, Draining
from proxy.upstream import Chunk, StreamEnd, StreamFailure, UpstreamStream

log = logging.getLogger("relay.pump")

CLIENT_CHECK_SECONDS = 1.0  # how often a silent stream checks whether its client is still there
READER_JOIN_SECONDS = 2.0
# Stream failures before the first token after which the next upstream serving the model may take over.
FALL_OVER_STREAM_KINDS = frozenset({"upstream_disconnected", "upstream_timeout", "upstream_error",
                                    "upstream_malformed"})
DRAIN_GRACE_SECONDS = 0.5  # after the end, how long the reader may finish the upstream body (for reuse)
READER_THREAD_PREFIX = "upstream-reader-"  # /debug/stats counts open streams by this name
# Batches (one per network read) the reader may run ahead of the client: enough to smooth bursts, small
# enough that a client that does not read costs the relay little memory.
INBOX_BATCHES = 16


@dataclass(frozen=True)
class StreamTimers:
    keepalive: float
    first_token: float
    idle: float
    max_stream: float

    @classmethod
    def from_config(cls, config: Config) -> StreamTimers:
        return cls(config.keepalive_seconds, config.first_token_timeout, config.idle_timeout,
                   config.max_stream_seconds)


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
    outcome: str = "open"  # "ok", an error code, or "client_gone"
    keep_content: bool = False
    content: list[str] = field(default_factory=list)

    def record(self, chunks: Sequence[Chunk], now: float) -> bool:
        """Account for a batch of chunks; True when the model made progress."""
        progress = False
        for chunk in chunks:
            if chunk.progress:
                progress = True
            if chunk.content:
                self.tokens += 1
                if self.keep_content:
                    self.content.append(chunk.content)
            if chunk.finish_reason is not None:
                self.finish_reason = chunk.finish_reason
            if chunk.usage is not None:
                self.usage = chunk.usage
        if progress and self.first_token_at is None:
            self.first_token_at = now
        return progress


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


class Inbox:
    """What the reader hands the pump, bounded: a client that reads slowly holds back the upstream (through
    TCP) instead of making the relay buffer the whole answer in memory. A reader that cannot hand anything
    over for a whole stall period means the pump is stuck writing to a client that stopped reading:
    `on_stall` then ends the stream. After `close()` the inbox takes nothing and never blocks."""

    def __init__(self, stall_seconds: float, size: int = INBOX_BATCHES) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=size)
        self._stall_seconds = stall_seconds
        self._closed = False
        self.on_stall: Callable[[], None] = _do_nothing

    def put(self, item: object) -> None:
        if self._closed:
            return
        try:
            self._queue.put(item, timeout=self._stall_seconds)
        except queue.Full:
            self._closed = True
            self.on_stall()

    def get(self, timeout: float) -> object:
        """The next item; raises `queue.Empty` after `timeout` seconds without one."""
        return self._queue.get(timeout=timeout)

    def get_nowait(self) -> object:
        """The next item if one is waiting; raises `queue.Empty` otherwise."""
        return self._queue.get_nowait()

    def close(self) -> None:
        """Take nothing more, and wake a reader blocked on a full inbox."""
        self._closed = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


def _do_nothing() -> None:
    return None


class _Reopened(NamedTuple):
    """The outcome of falling over: the next upstream's stream, or why none answered."""

    result: UpstreamStream | RelayError


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
                self._put(_Reopened(result))
                return
        if isinstance(result, UpstreamStream):
            result.close()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True


def _start_reader(stream: UpstreamStream, put: Callable[[object], None]) -> threading.Thread:
    reader = threading.Thread(target=stream.read_into, args=(put,), daemon=True,
                              name=f"{READER_THREAD_PREFIX}{stream.upstream.name}")
    reader.start()
    return reader


def pump(stream: UpstreamStream, encoder: Encoder, timers: StreamTimers, stats: StreamStats,
         client_gone: Callable[[], bool] = never_gone, draining: Draining | None = None) -> Iterator[bytes]:
    """Yield the client's bytes for `stream`; every outcome but a departed client ends with `end()`.

    Until the upstream makes its first progress (content, reasoning or a tool call), what the encoder makes
    of its chunks is held back and the client sees only keep-alives: if that upstream fails meanwhile, the
    next upstream serving the model takes over and nothing is sent twice. After it, no fall-over ever."""
    inbox = Inbox(stall_seconds=timers.idle)
    inbox.on_stall = lambda: _hang_up_on_stalled_client(stream, stats, client_gone)
    start = time.monotonic()
    stats.started_at = stats.started_at or start
    stats.upstream = stream.upstream.name
    stats.fallbacks = stream.fallbacks
    stats.upstream_failures = stream.failures
    reader: threading.Thread | None = _start_reader(stream, inbox.put)
    reader_done = False
    falling_over: _FallOver | None = None
    held: list[bytes] = []  # encoder output before the first progress
    try:
        yield encoder.start()
        last_progress = start
        waiting_since = start  # when the current upstream was opened: its first-token timer starts here
        next_keepalive = start + timers.keepalive
        give_up_at = start + timers.max_stream
        pending: object = None
        while True:
            now = time.monotonic()
            if draining is not None and now >= draining.deadline:
                stats.outcome = SERVER_RESTARTING
                yield b"".join(held) + encoder.error(SERVER_RESTARTING, RESTART_MESSAGE) + _end(encoder, stats)
                return
            if stats.first_token_at is None:
                silence_limit, silence_deadline = timers.first_token, waiting_since + timers.first_token
            else:
                silence_limit, silence_deadline = timers.idle, last_progress + timers.idle
            wake = min(next_keepalive, silence_deadline, give_up_at, now + CLIENT_CHECK_SECONDS)
            item, pending = pending, None  # an end-of-stream item that came with the last batch goes first
            if item is None:
                item = _next_item(inbox, max(0.0, wake - now))
            if item is None:
                now = time.monotonic()
                if now >= give_up_at:
                    stats.outcome = "stream_time_limit"
                    yield encoder.error(stats.outcome, f"the answer ran past this relay's limit of "
                                        f"{timers.max_stream:g} s; it is incomplete") + _end(encoder, stats)
                    return
                if now >= silence_deadline:
                    stats.outcome = "upstream_timeout"
                    stats.upstream_failures.append((stream.upstream.name, stats.outcome))
                    yield encoder.error(stats.outcome, _silence_message(stats, silence_limit)) + _end(encoder, stats)
                    return
                if client_gone():
                    stats.outcome = "client_gone"
                    return
                if now >= next_keepalive:
                    next_keepalive = now + timers.keepalive
                    yield encoder.keepalive()
                continue
            if type(item) is list:
                pending = _take_ready(inbox, item)
                now = time.monotonic()
                if stats.record(item, now):
                    last_progress = now
                out = encoder.chunks(item)
                if stats.first_token_at is None:
                    if out:
                        held.append(out)
                    continue
                if held:
                    out = b"".join(held) + out
                    held.clear()
                if out:
                    next_keepalive = now + timers.keepalive
                    yield out
                continue
            if isinstance(item, _Reopened):
                falling_over = None
                if isinstance(item.result, RelayError):
                    stats.outcome = item.result.kind
                    yield encoder.error(item.result.kind, str(item.result.description)) + _end(encoder, stats)
                    return
                stream = item.result
                stats.upstream = stream.upstream.name
                stats.fallbacks = stream.fallbacks
                stats.upstream_failures = stream.failures
                waiting_since = time.monotonic()
                reader = _start_reader(stream, inbox.put)
                reader_done = False
                continue
            reader_done = True
            if isinstance(item, StreamFailure):
                stats.upstream_failures.append((stream.upstream.name, item.code))
                if stats.first_token_at is None and item.code in FALL_OVER_STREAM_KINDS and stream.can_fall_over():
                    log.warning("upstream %s failed before the first token (%s); falling over",
                                stream.upstream.name, item.code)
                    held.clear()
                    stats.finish_reason = stats.usage = None
                    if reader is not None:
                        reader.join(READER_JOIN_SECONDS)
                    reader = None
                    falling_over = _FallOver(stream, inbox.put)
                    continue
                stats.outcome = item.code
                yield b"".join(held) + encoder.error(item.code, item.message) + _end(encoder, stats)
                return
            assert isinstance(item, StreamEnd)
            stats.outcome = "ok"
            yield b"".join(held) + _end(encoder, stats)
            return
    except GeneratorExit:
        if stats.outcome == "open":
            stats.outcome = "client_gone"
        raise
    finally:
        if falling_over is not None:
            falling_over.cancel()
            _close_reopened(inbox)  # before close(), which would drop a stream handed over just now
        inbox.close()  # a reader still handing over (or draining the body) never blocks on it
        if reader is not None:
            if reader_done:
                reader.join(DRAIN_GRACE_SECONDS)
            if reader.is_alive():
                stream.abort()
                reader.join(READER_JOIN_SECONDS)
        stats.ended_at = time.monotonic()


def _close_reopened(inbox: Inbox) -> None:
    """Close a stream the fall-over opened and put in the inbox just before the pump ended."""
    while True:
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, _Reopened) and isinstance(item.result, UpstreamStream):
            item.result.close()


def _next_item(inbox: Inbox, timeout: float) -> object:
    try:
        return inbox.get(timeout=timeout)
    except queue.Empty:
        return None


def _take_ready(inbox: Inbox, batch: list[Chunk]) -> object:
    """Add every batch already waiting to `batch`, so a fast upstream costs one write, not one per token.
    Returns the end-of-stream item if one was reached, to be handled after this batch is written."""
    while True:
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return None
        if type(item) is not list:
            return item
        batch += item


def _hang_up_on_stalled_client(stream: UpstreamStream, stats: StreamStats, client_gone: Callable[[], bool]) -> None:
    """Runs in the reader: the client took nothing for a whole idle period. Stop reading the upstream and
    hang up, which fails the pump's blocked write; the server then closes the response and the pump."""
    stats.outcome = "client_stalled"
    log.info("client stopped reading for an idle period; ending its stream")
    stream.abort()
    if isinstance(client_gone, ClientSocket):
        client_gone.hang_up()


def _end(encoder: Encoder, stats: StreamStats) -> bytes:
    return encoder.end(stats.finish_reason, stats.usage)


def _silence_message(stats: StreamStats, limit: float) -> str:
    if stats.first_token_at is None:
        return f"the model did not start answering within {limit:g} s; try again or pick another model"
    return f"the upstream went silent for {limit:g} s mid-answer; the answer is incomplete"
