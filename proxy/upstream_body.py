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

import contextlib
import select
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

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
    ends_at_close = False

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
            left = self._left
            if left and pos + left + 2 <= size:  # the whole chunk came (the usual case): taken in one step
                stop = pos + left
                if buffer[stop:stop + 2] != b"\r\n":
                    raise BrokenBody("a chunk did not end with CRLF")
                out.append(buffer[pos:stop])
                pos, self._left = stop + 2, 0
        self.extra = self.extra or (self.done and pos < size)
        self._buffer = buffer[pos:] if pos < size else b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _line(self, line: bytes) -> None:
        if self._state == _TRAILER:
            self.done = not line  # trailer fields are read and ignored until the empty line
            return
        try:
            length = int(line, 16)  # no extension (the usual case)
        except ValueError:
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


def _native_poll() -> Callable[[], Any]:
    """The operating system's poll, also when gevent has patched `select` with its cooperative one (a
    poll(0) never blocks, so the native one is safe, and much cheaper than gevent's watchers)."""
    if "gevent.monkey" in sys.modules:
        from gevent import monkey

        if monkey.is_module_patched("select"):
            native: Callable[[], Any] = monkey.get_original("select", "poll")
            return native
    return select.poll


_POLL = _native_poll()


def readable_now(descriptor: int) -> bool:
    """Whether a socket has something to read, or was closed by its peer, this instant (one poll(0)): an
    idle pooled connection that is readable cannot be reused."""
    poller = _POLL()
    poller.register(descriptor, select.POLLIN)
    return bool(poller.poll(0))


def shut_down(sock: socket.socket | None) -> bool:
    """Shut a socket down from any greenlet, waking a reader blocked on it; False when there is none."""
    if sock is None:
        return False
    with contextlib.suppress(OSError):  # already closed: nothing is left to wake
        sock.shutdown(socket.SHUT_RDWR)
    return True


def _http11_connection(response: httpx2.Response) -> httpcore2.HTTP11Connection | None:
    """The pooled HTTP/1.1 connection a streamed response of httpx2's own transport is read from."""
    stream: Any = response.stream
    try:
        pool_stream = stream._stream._httpcore_stream
        connection = pool_stream._stream._connection
    except AttributeError:
        return None
    return connection if type(connection) is httpcore2.HTTP11Connection else None


class BodyWire(Protocol):
    """Where a body's bytes come from, and where its connection goes when the body is done with."""

    def read(self, max_bytes: int, timeout: float) -> bytes | None:
        """Up to `max_bytes` (b"" when the peer closed), or None when nothing came within `timeout` seconds.
        Raises BrokenBody when the connection breaks."""

    def release(self, reusable: bool) -> None:
        """Done with the body: the connection is pooled again when `reusable` (the body ended cleanly),
        closed otherwise."""

    def abort(self) -> None:
        """Shut the connection down now, from any greenlet, waking a read blocked on it."""


class LengthDecoder:
    """A body framed by Content-Length."""

    __slots__ = ("_left", "done", "extra")
    ends_at_close = False

    def __init__(self, length: int) -> None:
        self._left = length
        self.done = not length
        self.extra = False

    def feed(self, data: bytes) -> bytes:
        if len(data) > self._left:
            self.extra = True
            data = data[:self._left]
        self._left -= len(data)
        self.done = not self._left
        return data


class UntilClose:
    """A body that ends when the peer closes the connection (neither chunked nor with a length)."""

    __slots__ = ("done", "extra")
    ends_at_close = True

    def __init__(self) -> None:
        self.done = False
        self.extra = True  # such a connection can never be reused

    def feed(self, data: bytes) -> bytes:
        return data


Framing = ChunkedDecoder | LengthDecoder | UntilClose


class _PooledH11Wire:
    """A body on httpcore's pooled HTTP/1.1 connection, after h11 has read the head."""

    __slots__ = ("_connection", "_network", "_response")

    def __init__(self, response: httpx2.Response, connection: httpcore2.HTTP11Connection) -> None:
        self._response = response
        self._connection = connection
        self._network = connection._network_stream

    def read(self, max_bytes: int, timeout: float) -> bytes | None:
        try:
            return self._network.read(max_bytes, timeout)
        except httpcore2.ReadTimeout:
            return None
        except (httpcore2.NetworkError, OSError) as exc:
            raise BrokenBody(type(exc).__name__) from exc

    def release(self, reusable: bool) -> None:
        if reusable:
            self._mark_body_read()
        self._response.close()

    def abort(self) -> None:
        shut_down(self._network.get_extra_info("socket"))

    def _mark_body_read(self) -> None:
        """Show h11 the end of an (empty) body, so that httpcore, closing the response, pools the connection."""
        state = self._connection._h11_state
        state.receive_data(_EMPTY_BODY_END)
        try:
            state.next_event()
        except h11.RemoteProtocolError:
            return  # h11 stays mid-body and httpcore closes the connection: safe, merely not reused


class DirectBody:
    """The rest of one streamed response's body: `read` it, then `finish` (after a clean end: the connection
    goes back to its pool) or `close` (the connection is closed). Made by `take` (httpx2's pooled responses)
    or by proxy/upstream_wire.py."""

    def __init__(self, wire: BodyWire, framing: Framing, initial: bytes = b"") -> None:
        global _open_bodies
        self._wire = wire
        self._framing = framing
        self._initial = initial  # what was read past the headers
        self._closed = False
        _open_bodies += 1

    @classmethod
    def take(cls, response: UpstreamResponse) -> DirectBody | None:
        """Take over `response`'s body from h11 (or from the lane's stream, proxy/upstream_wire.py), or None
        when this response cannot be read here."""
        if isinstance(response, LaneResponse):
            return response.stream.take()
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
        return cls(_PooledH11Wire(response, connection), ChunkedDecoder(), initial)

    @property
    def ended(self) -> bool:
        """The body's last byte has been read."""
        return self._framing.done

    def read(self, timeout: float) -> bytes | None:
        """The body's next payload bytes (maybe b"" when only framing came), or None when nothing arrived
        within `timeout` seconds; with no time (<= 0), only what was read past the head, else None at once.
        Raises BrokenBody when the connection breaks or ends first."""
        if self._initial:
            data, self._initial = self._initial, b""
        elif timeout <= 0:
            return None
        else:
            read = self._wire.read(READ_BYTES, timeout)
            if read is None:
                return None
            data = read
            if not data:
                if not self._framing.ends_at_close:
                    raise BrokenBody("the upstream closed the connection before the body's end")
                self._framing.done = True
                return b""
        return self._framing.feed(data)

    def finish(self, grace: float, limit: int) -> None:
        """Read what is left of the body (at most `limit` payload bytes, for `grace` seconds) and hand the
        connection back to the pool if it ended cleanly; otherwise it is closed."""
        deadline = time.monotonic() + grace
        drained = 0
        try:
            while not self._framing.done and drained <= limit:
                left = deadline - time.monotonic()
                data = self.read(left) if left > 0 else None
                if data is None:
                    break
                drained += len(data)
        except BrokenBody:
            pass
        self._release(self._framing.done and not self._framing.extra)

    def close(self) -> None:
        """Release the body without reading on: its connection is closed."""
        self._release(False)

    def abort(self) -> None:
        """Shut the connection down now, from any greenlet (a reader blocked on it wakes to a BrokenBody)."""
        self._wire.abort()

    def _release(self, reusable: bool) -> None:
        global _open_bodies
        if self._closed:
            return
        self._closed = True
        _open_bodies -= 1
        self._wire.release(reusable)


class DirectByteStream(httpx2.SyncByteStream):
    """A lane response's body (`LaneResponse`) as httpx2 reads one (`iter_bytes`, `close`), for code written
    against httpx2 Responses; `DirectBody.take` hands the body itself to a loop that reads it directly."""

    def __init__(self, body: DirectBody, read_timeout: float) -> None:
        self._body = body
        self._read_timeout = read_timeout
        self._state = "new"  # "iterated" once read through httpx2, "taken" once handed over by `take`

    def take(self) -> DirectBody | None:
        if self._state != "new":
            return None
        self._state = "taken"
        return self._body

    def __iter__(self) -> Iterator[bytes]:
        self._state = "iterated"
        body = self._body
        while not body.ended:
            try:
                data = body.read(self._read_timeout)
            except BrokenBody as exc:
                raise httpx2.RemoteProtocolError(str(exc)) from exc
            if data is None:
                raise httpx2.ReadTimeout("the upstream stopped sending")
            if data:
                yield data

    def close(self) -> None:
        if self._state == "taken":
            return  # a taken body is closed by whoever took it
        if self._body.ended:
            self._body.finish(0.0, 0)  # nothing left to read: the connection goes back to the lane
        else:
            self._body.close()


class LaneResponse:
    """A forwarded stream's answer from the lane (`upstream_wire.forward_stream`): what the forwarding code
    reads of an httpx2 Response (`status_code`, `headers` by lower-cased name with repeats joined by ", ",
    `extensions`, `iter_bytes`, `close`) without making one, whose headers httpx2 would normalize one by one
    (~30 µs of a worker's CPU per request, `bench.profile_c1`). Its body fails with httpx2's exceptions
    (`DirectByteStream`)."""

    __slots__ = ("extensions", "headers", "is_closed", "status_code", "stream")

    def __init__(self, status_code: int, headers: dict[str, str], stream: DirectByteStream,
                 extensions: dict[str, Any]) -> None:
        self.status_code = status_code
        self.headers = headers
        self.stream = stream
        self.extensions = extensions
        self.is_closed = False

    def iter_bytes(self) -> Iterator[bytes]:
        return iter(self.stream)

    def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            self.stream.close()


# An upstream's answer to a forwarded request: httpx2's, or the lane's.
UpstreamResponse = httpx2.Response | LaneResponse


def backstop_read_timeout(response: UpstreamResponse, seconds: float) -> None:
    """A streamed body's reads are timed by the relay's own timers from here: httpx2's read timeout, where
    httpx2 reads the body, becomes a backstop of `seconds`. A lane's body (`DirectByteStream`) is read with
    its own timeouts and carries no httpx2 Request."""
    if isinstance(response, httpx2.Response):
        response.request.extensions["timeout"]["read"] = seconds
