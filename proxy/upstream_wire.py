"""The relay's own HTTP/1.1 lane to an upstream, for streamed POSTs: the streamed chat request (`WireLane`,
its head built once) and forwarded streams (`forward_stream`: /v1/responses, Anthropic's Messages, the rest
of the API), each written in one send, the answer's head parsed in a few lines, the body read by
`DirectBody` off the same socket. One pool of kept-alive connections per origin (`connections_for`).

Why: at one client, httpx2/httpcore/h11's send and response head cost ~420 µs of a worker's CPU per request
(h11 validates every header of the request it was given and of the head it reads: bench/notes.md), more
than all the relay's own checks. The lane keeps what the SDK decided: the URL, every header the SDK sends
(auth, User-Agent, X-Stainless-*), its error classes (`make_status_error` is the SDK's own, fed an httpx2
Response) and httpx2's TLS context. It differs in one header: `Accept-Encoding: identity`, since a
compressed event stream is held back by the compressor and this lane reads bodies as they come.

Only under gevent (the pump reads the body itself, `proxy/upstream_body.py`), for a plain HTTP/1.1 upstream
reached directly: a proxy from HTTP(S)_PROXY, HTTP/2, or an in-process transport keeps httpx2
(`connections_for` says None). Connections are kept alive LIFO, at most the pool's keep-alive count,
dropped once idle for the pool's keep-alive expiry or when readable while idle (the upstream closed it), as
httpcore does.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import httpcore2
import httpx2
import openai

from proxy import upstream_body
from proxy.upstream_body import (
    READ_BYTES,
    BrokenBody,
    ChunkedDecoder,
    DirectBody,
    DirectByteStream,
    Framing,
    LaneResponse,
    LengthDecoder,
    UntilClose,
    readable_now,
    shut_down,
)

HEAD_LIMIT = 64 * 1024  # a response head longer than this is not an HTTP server talking
ERROR_BODY_LIMIT = 1024 * 1024  # what an error status's body is read of (the SDK's error carries it)
# Set per request by the lane; any others the client's headers carry are the SDK's own and go as they are.
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "accept-encoding", "connection",
                          "x-stainless-read-timeout"})
_BAD_NAME = re.compile(rb"[\x00-\x20:\x7f]")  # a header name is a token: no controls, spaces or colons
_BAD_VALUE = re.compile(rb"[\r\n\x00]")  # a value may hold anything but what ends a line
StatusError = Callable[[httpx2.Response], openai.APIStatusError]


class ProtocolFault(Exception):
    """The upstream's answer is not HTTP/1.1 (raised as the SDK's APIConnectionError, as httpx2's would be)."""


class Answer(NamedTuple):
    """An answer's head as read off its connection, and the connection."""

    status: int
    headers: dict[str, str]
    keep_alive: bool
    sock: socket.socket
    rest: bytes  # what was read past the head


class Connections:
    """Kept-alive HTTP/1.1 connections to one origin, shared by every lane request to it (`connections_for`)."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, max_idle: int,
                 idle_expiry: float | None) -> None:
        self._address = (host, port)
        self._family = _ip_family(host)
        self._ssl_context = ssl_context
        self._max_idle = max_idle
        self._idle_expiry = idle_expiry
        self._idle: list[tuple[socket.socket, float]] = []

    def exchange(self, message: bytes, connect_timeout: float, read_timeout: float) -> Answer:
        """Send `message` (a whole request) and read the answer's head: its status, header fields, socket
        and the bytes read past the head. Raises TimeoutError, OSError or ProtocolFault (the socket closed)."""
        sock = self._connection(connect_timeout)
        try:
            sock.settimeout(read_timeout)
            sock.sendall(message)
            status, headers, keep_alive, rest = _read_head(sock)
        except BaseException:
            sock.close()
            raise
        return Answer(status, headers, keep_alive, sock, rest)

    def body(self, answer: Answer, framing: Framing) -> DirectBody:
        return DirectBody(_SocketWire(self, answer.sock, answer.keep_alive), framing, answer.rest)

    def _connection(self, timeout: float) -> socket.socket:
        now = time.monotonic()
        while self._idle:
            sock, since = self._idle.pop()
            if (self._idle_expiry is None or now - since < self._idle_expiry) and not readable_now(sock.fileno()):
                return sock
            sock.close()
        sock = _connect(self._address, self._family, timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl_context is not None:
            sock = self._ssl_context.wrap_socket(sock, server_hostname=self._address[0])
        return sock

    def keep(self, sock: socket.socket) -> None:
        """A connection whose response was read to its clean end, for the next request."""
        if len(self._idle) < self._max_idle:
            self._idle.append((sock, time.monotonic()))
        else:
            sock.close()


def _ip_family(host: str) -> socket.AddressFamily | None:
    """The address family of a host that is an IP address, None for a name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


def _connect(address: tuple[str, int], family: socket.AddressFamily | None, timeout: float) -> socket.socket:
    """A TCP connection to `address`. An IP address (`family`) is connected to as it is: `create_connection`
    would ask the resolver for it (under gevent, a round trip through its threadpool, whose thread then idles
    on for seconds); a name is resolved at each new connection, as httpcore does."""
    if family is None:
        return socket.create_connection(address, timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


_ORIGINS: weakref.WeakKeyDictionary[httpx2.Client, dict[tuple[bytes, str, int], Connections | None]] = (
    weakref.WeakKeyDictionary())


def connections_for(http: httpx2.Client, url: httpx2.URL) -> Connections | None:
    """The lane's connections to `url`'s origin for requests `http` would send itself over HTTP/1.1 on its
    own direct pool; None where httpx2 must stay (no gevent, a proxy, HTTP/2, another transport)."""
    origins = _ORIGINS.setdefault(http, {})
    origin = (url.raw_scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
    if origin not in origins:
        origins[origin] = _new_connections(http, url, origin[2])
    return origins[origin]


def _new_connections(http: httpx2.Client, url: httpx2.URL, port: int) -> Connections | None:
    if not upstream_body.gevent_sockets() or url.scheme not in ("http", "https"):
        return None
    transport = http._transport_for_url(url)
    pool: Any = getattr(transport, "_pool", None)
    if (transport is not http._transport or not isinstance(transport, httpx2.HTTPTransport)
            or type(pool) is not httpcore2.ConnectionPool or pool._http2 or not pool._http1):
        return None
    return Connections(url.host, port, pool._ssl_context if url.scheme == "https" else None,
                       pool._max_keepalive_connections, pool._keepalive_expiry)


class WireLane:
    """The streamed chat request to one upstream endpoint: its head built once, sent on `Connections`."""

    def __init__(self, url: httpx2.URL, headers: httpx2.Headers, make_status_error: StatusError,
                 connections: Connections) -> None:
        self.url = url
        self._connections = connections
        self._make_status_error = make_status_error
        self._head = _request_head("POST", url, headers.raw)

    @classmethod
    def of(cls, http: httpx2.Client, url: httpx2.URL, headers: httpx2.Headers, make_status_error: StatusError
           ) -> WireLane | None:
        """The lane for POSTs to `url` with `headers` (the SDK's), or None where httpx2 must stay."""
        connections = connections_for(http, url)
        return None if connections is None else cls(url, headers, make_status_error, connections)

    def send(self, body: bytes, timeout: float) -> DirectBody:
        """POST `body`; its 2xx response's body to read. Fails as the SDK's client would: APITimeoutError,
        APIConnectionError, or the APIStatusError subclass of an HTTP error status."""
        message = b"%sX-Stainless-Read-Timeout: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            self._head, str(timeout).encode(), len(body), body)
        try:
            answer = self._connections.exchange(message, timeout, timeout)
        except TimeoutError as exc:
            raise openai.APITimeoutError(request=self._request()) from exc
        except (OSError, ProtocolFault) as exc:
            raise openai.APIConnectionError(request=self._request()) from exc
        try:
            if not 200 <= answer.status < 300:
                raise self._status_error(answer)
            return self._connections.body(answer, _framing(answer.headers))
        except ProtocolFault as exc:
            answer.sock.close()
            raise openai.APIConnectionError(request=self._request()) from exc

    def _status_error(self, answer: Answer) -> openai.APIStatusError:
        """The SDK's error for an HTTP error status, with the body it would have read (as much as came)."""
        headers, sock = answer.headers, answer.sock
        try:
            framing = _framing(headers)
        except ProtocolFault:  # an error page in a coding not asked for: what comes, up to the limit
            framing, headers = UntilClose(), {name: value for name, value in headers.items()
                                              if name not in ("content-encoding", "transfer-encoding")}
        body = framing.feed(answer.rest)
        try:
            while not framing.done and len(body) < ERROR_BODY_LIMIT:
                data = sock.recv(READ_BYTES)
                if not data:
                    break
                body += framing.feed(data)
        except (OSError, BrokenBody):
            pass  # what came is what the error carries
        finally:
            sock.close()
        response = httpx2.Response(answer.status, headers=list(headers.items()), content=body,
                                   request=self._request())
        return self._make_status_error(response)

    def _request(self) -> httpx2.Request:
        return httpx2.Request("POST", self.url)


def forward_stream(http: httpx2.Client, url: str, headers: dict[str, str], body: bytes, connect_timeout: float,
                   read_timeout: float) -> LaneResponse | None:
    """A forwarded streaming POST (proxy/forwarding.py) by the lane: a `LaneResponse` (whose body
    `DirectBody.take` hands the forwarding loop), failing with httpx2's exceptions as `http.send` would;
    None where httpx2 must send it. `headers` holds no Content-Length: the lane sets it."""
    try:
        prepared = _prepared(http, url, headers)
    except ProtocolFault as exc:
        raise httpx2.LocalProtocolError(str(exc), request=httpx2.Request("POST", url)) from exc
    connections = prepared.connections
    if connections is None:
        return None

    def request() -> httpx2.Request:  # what httpx2's exceptions carry; a Response read here needs none
        return httpx2.Request("POST", prepared.url)

    message = b"%sContent-Length: %d\r\n\r\n%s" % (prepared.head, len(body), body)
    try:
        answer = connections.exchange(message, connect_timeout, read_timeout)
    except TimeoutError as exc:
        raise httpx2.ReadTimeout("the upstream did not answer in time", request=request()) from exc
    except (OSError, ProtocolFault) as exc:
        raise httpx2.ConnectError(str(exc) or type(exc).__name__, request=request()) from exc
    try:
        framing = LengthDecoder(0) if answer.status in (204, 304) else _framing(answer.headers)
    except ProtocolFault as exc:
        answer.sock.close()
        raise httpx2.RemoteProtocolError(str(exc), request=request()) from exc
    stream = DirectByteStream(connections.body(answer, framing), read_timeout)
    return LaneResponse(answer.status, answer.headers, stream, {"network_stream": _SocketInfo(answer.sock)})


class Prepared(NamedTuple):
    """A forwarded stream's URL, the lane's connections to its origin (None: httpx2 must send it) and its
    request head but for the Content-Length."""

    url: httpx2.URL
    connections: Connections | None
    head: bytes


_PREPARED: weakref.WeakKeyDictionary[httpx2.Client, dict[tuple[str, tuple[tuple[str, str], ...]], Prepared]] = (
    weakref.WeakKeyDictionary())
PREPARED_LIMIT = 256  # heads kept per client; past it they are built anew (a header unique to each request)


def _prepared(http: httpx2.Client, url: str, headers: dict[str, str]) -> Prepared:
    """What `forward_stream` sends by, built once for each URL and header set a client forwards with: a
    relay's requests repeat the same few, so each header is checked once, not at every request."""
    known = _PREPARED.setdefault(http, {})
    key = (url, tuple(headers.items()))
    prepared = known.get(key)
    if prepared is None:
        parsed = httpx2.URL(url)
        connections = connections_for(http, parsed)
        head = b"" if connections is None else _request_head("POST", parsed, _overlaid(http.headers, headers))
        if len(known) >= PREPARED_LIMIT:
            known.clear()
        prepared = known[key] = Prepared(parsed, connections, head)
    return prepared


class _SocketInfo:
    """What `forwarding.abort` asks of a response's network stream: its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def get_extra_info(self, info: str) -> Any:
        return self._sock if info == "socket" else None


def _overlaid(defaults: httpx2.Headers, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """The client's default headers with `headers` (lower-case names) put over them, as httpx2 merges a
    request's headers into its client's, as raw pairs (the values as the client sent them: latin-1)."""
    pairs = [(name, value) for name, value in defaults.raw if name.lower().decode("latin-1") not in headers]
    pairs += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    return pairs


def _request_head(method: str, url: httpx2.URL, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The request line, Host and `headers` (but the lane's own: framing, connection, encoding). A header
    that would break the request's framing (a line break or NUL in it) is refused, as h11 refuses it."""
    lines = [f"{method} {url.raw_path.decode('ascii')} HTTP/1.1", f"Host: {url.netloc.decode('ascii')}"]
    for name, value in headers:
        if not name or _BAD_NAME.search(name) or _BAD_VALUE.search(value):
            raise ProtocolFault("a header the relay would send upstream is malformed")
        if name.lower().decode("latin-1") not in _OWN_HEADERS:
            lines.append(f"{name.decode('latin-1')}: {value.decode('latin-1')}")
    lines += ["Accept-Encoding: identity", "Connection: keep-alive"]
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


class _SocketWire:
    """One lane connection's body side (`BodyWire`)."""

    __slots__ = ("_keep_alive", "_lane", "sock")

    def __init__(self, lane: Connections, sock: socket.socket, keep_alive: bool) -> None:
        self._lane = lane
        self.sock = sock
        self._keep_alive = keep_alive

    def read(self, max_bytes: int, timeout: float) -> bytes | None:
        try:
            self.sock.settimeout(timeout)
            return self.sock.recv(max_bytes)
        except TimeoutError:
            return None
        except OSError as exc:
            raise BrokenBody(type(exc).__name__) from exc

    def release(self, reusable: bool) -> None:
        if reusable and self._keep_alive:
            self._lane.keep(self.sock)
        else:
            self.sock.close()

    def abort(self) -> None:
        shut_down(self.sock)


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bool, bytes]:
    """The status, the header fields (names lower-cased, repeats joined with ", "), whether the connection
    may be kept, and the bytes read past the head; informational (1xx) heads are skipped."""
    buffer = b""
    while True:
        end = buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(buffer) > HEAD_LIMIT:
                raise ProtocolFault("the response head is too long")
            data = sock.recv(READ_BYTES)
            if not data:
                raise ProtocolFault("the upstream closed the connection without an answer")
            buffer += data
            end = buffer.find(b"\r\n\r\n")
        status, headers, keep_alive = _parse_head(buffer[:end])
        buffer = buffer[end + 4:]
        if not 100 <= status < 200:
            return status, headers, keep_alive, buffer


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit() or rest[3:4] not in ("", " "):
        raise ProtocolFault("the status line is not HTTP/1.1's")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name:
            raise ProtocolFault("a header line is malformed")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    connection = headers.get("connection", "").lower()
    # HTTP/1.1 keeps a connection unless told to close it; HTTP/1.0 only when told to keep it.
    keep_alive = "close" not in connection if version != "HTTP/1.0" else "keep-alive" in connection
    return int(code), headers, keep_alive


def _framing(headers: dict[str, str]) -> Framing:
    coding = headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("identity", ""):
        raise ProtocolFault(f"the body is {coding}-encoded although identity was asked for")
    transfer = headers.get("transfer-encoding", "").strip().lower()
    if transfer:
        if transfer != "chunked":
            raise ProtocolFault("a transfer coding other than chunked")
        return ChunkedDecoder()
    if "content-length" in headers:
        length = headers["content-length"].strip()
        if not length.isdigit():
            raise ProtocolFault("a malformed Content-Length")
        return LengthDecoder(int(length))
    return UntilClose()
