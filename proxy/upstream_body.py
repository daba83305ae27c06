"""An upstream's chunked response body, read by the pump's own greenlet straight off the pooled connection.

httpx2/httpcore/h11 send the request and read the status and headers; after that the body is read here with
one socket read per wake-up and a small chunked-transfer decoder, instead of h11's event per HTTP chunk and a
reader greenlet feeding the pump. A read waits at most the time it is given (the pump's next timer), and a
timed-out read loses nothing, so the pump's one greenlet waits for "upstream bytes or the next deadline".
When the body ends cleanly, h11 is shown the end of an empty body (its buffer was handed over here at the
start), so httpcore returns the connection to its pool as if it had read the body itself; any other end
closes the connection. Only under gevent, for HTTP/1.1 connections from httpcore's pool with a chunked,
uncompressed body (`DirectBody.take` says None otherwise: in-process transports, proxies, other framings and
content codings keep the reader thread of proxy/stream_sources.py).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import h11
import httpcore2
import httpx2
from h11._receivebuffer import ReceiveBuffer

READ_BYTES = 64 * 1024
SIZE_LINE_LIMIT = 1024  # a chunk-size line (with extensions) or trailer line longer than this is garbage
_EMPTY_BODY_END = b"0\r\n\r\n"
_SIZE, _DATA_END, _TRAILER = 0, 1, 2

_open_bodies = 0  # bodies taken and not yet closed in this process: /debug/stats counts them as readers


def open_bodies() -> int:
    return _open_bodies


class BrokenBody(Exception):
    """The body cannot go on: the connection broke or closed early, or its framing is not HTTP/1.1's."""


class ChunkedDecoder:
    """HTTP/1.1's chunked transfer coding (RFC 9112 7.1), decoded as bytes arrive, split anywhere."""

    __slots__ = ("_buffer", "_left", "_state", "done", "extra")

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # bytes of the current chunk's data still to come
        self._state = _SIZE
        self.done = False  # the last chunk and the trailer section were read
        self.extra = False  # bytes came after the end: the connection must not be reused

    def feed(self, data: bytes) -> bytes:
        """The payload in `data` (with what an earlier call left undecoded); BrokenBody for bad framing."""
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        pos, size = 0, len(buffer)
        while pos < size and not self.done:
            if self._left:
                take = min(self._left, size - pos)
                out.append(buffer[pos:pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
                continue
            if self._state == _DATA_END:
                if size - pos < 2:
                    break
                if buffer[pos:pos + 2] != b"\r\n":
                    raise BrokenBody("a chunk did not end with CRLF")
                pos += 2
                self._state = _SIZE
                continue
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                if size - pos > SIZE_LINE_LIMIT:
                    raise BrokenBody("a chunk-size or trailer line is too long")
                break
            self._line(buffer[pos:end])
            pos = end + 2
        self.extra = self.extra or (self.done and pos < size)
        self._buffer = buffer[pos:] if pos < size else b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _line(self, line: bytes) -> None:
        if self._state == _TRAILER:
            self.done = not line  # trailer fields are read and ignored until the empty line
            return
        try:
            length = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BrokenBody("a chunk size is not a hexadecimal number") from None
        if length < 0:
            raise BrokenBody("a chunk size is negative")
        if length:
            self._left = length
        else:
            self._state = _TRAILER


def gevent_sockets() -> bool:
    """Whether gevent has patched `socket` (gunicorn's gevent worker): a timed-out read then costs a timer,
    not a thread, and the pump's greenlet can wait on the upstream itself."""
    if "gevent.monkey" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))


def _http11_connection(response: httpx2.Response) -> httpcore2.HTTP11Connection | None:
    """The pooled HTTP/1.1 connection a streamed response of httpx2's own transport is read from."""
    stream: Any = response.stream
    try:
        pool_stream = stream._stream._httpcore_stream
        connection = pool_stream._stream._connection
    except AttributeError:
        return None
    return connection if type(connection) is httpcore2.HTTP11Connection else None


class DirectBody:
    """The rest of one streamed response's chunked body: `read` it, then `finish` (after a clean end: the
    connection goes back to the pool) or `close` (the connection is closed). Made by `take`."""

    def __init__(self, response: httpx2.Response, connection: httpcore2.HTTP11Connection, initial: bytes) -> None:
        global _open_bodies
        self._response = response
        self._connection = connection
        self._network = connection._network_stream
        self._decoder = ChunkedDecoder()
        self._initial = initial  # what h11 had read past the headers
        self._closed = False
        _open_bodies += 1

    @classmethod
    def take(cls, response: httpx2.Response) -> DirectBody | None:
        """Take over `response`'s body from h11, or None when this response cannot be read here."""
        headers = response.headers
        if (not gevent_sockets() or headers.get("transfer-encoding", "").strip().lower() != "chunked"
                or headers.get("content-encoding", "identity").strip().lower() != "identity"):
            return None  # a compressed body is left to httpx2, which decodes it
        connection = _http11_connection(response)
        if connection is None:
            return None
        state = connection._h11_state
        initial, closed = state.trailing_data
        if state.their_state is not h11.SEND_BODY or closed:
            return None
        state._receive_buffer = ReceiveBuffer()  # h11 never sees these bytes: they are handed over here
        return cls(response, connection, initial)

    @property
    def ended(self) -> bool:
        """The body's last chunk has been read."""
        return self._decoder.done

    def read(self, timeout: float) -> bytes | None:
        """The body's next payload bytes (maybe b"" when only framing came), or None when nothing arrived
        within `timeout` seconds (> 0). Raises BrokenBody when the connection breaks or ends first."""
        if self._initial:
            data, self._initial = self._initial, b""
        else:
            try:
                data = self._network.read(READ_BYTES, timeout)
            except httpcore2.ReadTimeout:
                return None
            except (httpcore2.NetworkError, OSError) as exc:
                raise BrokenBody(type(exc).__name__) from exc
            if not data:
                raise BrokenBody("the upstream closed the connection before the body's end")
        return self._decoder.feed(data)

    def finish(self, grace: float, limit: int) -> None:
        """Read what is left of the body (at most `limit` payload bytes, for `grace` seconds) and hand the
        connection back to the pool if it ended cleanly; otherwise it is closed."""
        deadline = time.monotonic() + grace
        drained = 0
        try:
            while not self._decoder.done and drained <= limit:
                left = deadline - time.monotonic()
                data = self.read(left) if left > 0 else None
                if data is None:
                    break
                drained += len(data)
        except BrokenBody:
            pass
        if self._decoder.done and not self._decoder.extra:
            self._mark_body_read()
        self.close()

    def _mark_body_read(self) -> None:
        """Show h11 the end of an (empty) body, so that httpcore, closing the response, pools the connection."""
        state = self._connection._h11_state
        state.receive_data(_EMPTY_BODY_END)
        try:
            state.next_event()
        except h11.RemoteProtocolError:
            return  # h11 stays mid-body and httpcore closes the connection: safe, merely not reused

    def close(self) -> None:
        """Release the response: the connection returns to the pool only after `finish` saw a clean end."""
        global _open_bodies
        if self._closed:
            return
        self._closed = True
        _open_bodies -= 1
        self._response.close()
