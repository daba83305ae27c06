"""Where the pump's events come from: one upstream stream's body, as batches of chunks and its end.

`DirectSource` reads the body in the pump's own greenlet (`proxy/upstream_body.py`): each wait is one socket
read with the pump's next deadline as its timeout, so there is no reader greenlet, no queue and no hub switch
between reading a token and writing it. A client that stops reading blocks the pump's write, and so the
reading (TCP holds the upstream back); a timer armed around each write hangs up on a client that took nothing
for a whole stall period. `ThreadedSource` is the reader thread (a greenlet under gevent) feeding a bounded
`Inbox`, for bodies the pump cannot read itself: in-process transports, proxies, plain threads.
Both offer the pump the same calls: `next_item(timeout)`, `take_ready(batch)`, `writing()`/`written()`
around each write, `stop()` before a fall-over and `close()`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from proxy.upstream import Chunk, SseParser, StreamEnd, StreamFailure, UpstreamStream
from proxy.upstream_body import BrokenBody, DirectBody

log = logging.getLogger("relay.pump")

READER_JOIN_SECONDS = 2.0
DRAIN_GRACE_SECONDS = 0.5  # after the end, how long the reader may finish the upstream body (for reuse)
DRAIN_LIMIT_BYTES = 64 * 1024
READER_THREAD_PREFIX = "upstream-reader-"  # /debug/stats counts open streams by this name
# Batches (one per network read) the reader may run ahead of the client: enough to smooth bursts, small
# enough that a client that does not read costs the relay little memory.
INBOX_BATCHES = 16
BROKE = StreamFailure("upstream_disconnected", "the upstream connection broke mid-answer; the answer is incomplete")


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


class ThreadedSource:
    """A reader thread reading the upstream into a bounded `Inbox`; a reader that cannot hand anything over
    for a stall period calls `on_stall`."""

    def __init__(self, stream: UpstreamStream, stall_seconds: float, on_stall: Callable[[], None]) -> None:
        self._stream = stream
        self._inbox = Inbox(stall_seconds=stall_seconds)
        self._inbox.on_stall = on_stall
        self._reader = threading.Thread(target=stream.read_into, args=(self._inbox.put,), daemon=True,
                                        name=f"{READER_THREAD_PREFIX}{stream.upstream.name}")
        self._reader.start()
        self.ended = False  # the reader handed over its end: it is only finishing the body now

    def next_item(self, timeout: float) -> object:
        """A list of chunks, the stream's end or failure, or None after `timeout` seconds of nothing."""
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if type(item) is not list:
            self.ended = True
        return item

    def take_ready(self, batch: list[Chunk]) -> object:
        """Add every batch already waiting to `batch`, so a fast upstream costs one write, not one per
        token. Returns the end-of-stream item if one was reached, to be handled after this batch."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return None
            if type(item) is not list:
                self.ended = True
                return item
            batch += item

    def writing(self) -> None:
        return None  # a stalled client shows as a full inbox

    def written(self) -> None:
        return None

    def stop(self) -> None:
        """The stream failed: wait for the reader, which has handed over its last item and closes it."""
        self._reader.join(READER_JOIN_SECONDS)

    def close(self) -> None:
        self._inbox.close()  # a reader still handing over (or draining the body) never blocks on it
        if self.ended:
            self._reader.join(DRAIN_GRACE_SECONDS)
        if self._reader.is_alive():
            self._stream.abort()
            self._reader.join(READER_JOIN_SECONDS)


class StallTimer:
    """A gevent hub timer around a write that may block: `arm()` before it, `disarm()` after; if it stays
    armed for `seconds`, `on_stall` runs in a greenlet of its own (the hub must not block)."""

    def __init__(self, seconds: float, on_stall: Callable[[], None]) -> None:
        import gevent

        self._on_stall = on_stall
        self._spawn = gevent.spawn
        self._timer: Any = gevent.get_hub().loop.timer(seconds)

    def arm(self) -> None:
        self._timer.start(self._fire)

    def disarm(self) -> None:
        self._timer.stop()

    def _fire(self) -> None:
        self._spawn(self._on_stall)

    def close(self) -> None:
        self._timer.stop()
        self._timer.close()


class DirectSource:
    """The pump's own greenlet reads the body (`DirectBody`) and parses it; only under gevent."""

    def __init__(self, stream: UpstreamStream, body: DirectBody, stall_seconds: float,
                 on_stall: Callable[[], None]) -> None:
        self._stream = stream
        self._body = body
        self._parser = SseParser(stream.upstream.redact)
        self._pending: object = None  # the end that came with the last batch
        self._progressed = False  # until the first token, it is parsed and handed over before what came with it
        self._ended_ok = False
        self._stall = StallTimer(stall_seconds, on_stall)

    def next_item(self, timeout: float) -> object:
        """A list of chunks, the stream's end or failure, or None when `timeout` seconds passed first (with no
        time: at once, after what came with the head)."""
        deadline = time.monotonic() + timeout
        parser = self._parser
        while True:
            block = b""  # with lines held (what came with the first token): parsed before any read
            if not parser.holds_lines:
                try:
                    received = self._body.read(timeout)  # with no time left: only what came with the head
                except BrokenBody as exc:
                    log.info("upstream %s stream broke: %s", self._stream.upstream.name, exc)
                    return BROKE
                if received is None:
                    return None
                block = received
            chunks, end = parser.feed(block, not self._progressed) if block or parser.holds_lines else ([], None)
            if chunks and chunks[-1].progress:
                self._progressed = True
            if end is None and self._body.ended and not parser.holds_lines:
                end = parser.at_eof()
            self._ended_ok = type(end) is StreamEnd
            if chunks:
                self._pending = end
                return chunks
            if end is not None:
                return end
            timeout = deadline - time.monotonic()  # only framing or part of an event came: wait on
            if timeout <= 0:
                return None

    def take_ready(self, batch: list[Chunk]) -> object:
        pending, self._pending = self._pending, None
        return pending

    def writing(self) -> None:
        self._stall.arm()

    def written(self) -> None:
        self._stall.disarm()

    def stop(self) -> None:
        self.close()

    def close(self) -> None:
        self._stall.close()
        if self._ended_ok:
            self._body.finish(DRAIN_GRACE_SECONDS, DRAIN_LIMIT_BYTES)
        else:
            self._body.close()


Source = ThreadedSource | DirectSource


def open_source(stream: UpstreamStream, stall_seconds: float, on_stall: Callable[[], None]) -> Source:
    """The pump's own reading of `stream` when it can, else a reader thread."""
    body = stream.direct_body()
    if body is not None:
        return DirectSource(stream, body, stall_seconds, on_stall)
    return ThreadedSource(stream, stall_seconds, on_stall)
