"""The streamed chat request's own HTTP/1.1 lane (proxy/upstream_wire.py) against real sockets: it sends what
the SDK's client sends, fails as the SDK's client fails, and reads every framing an upstream may answer with."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import orjson
import pytest

from proxy import upstream_body, upstream_wire
from proxy.errors import RelayError
from proxy.forwarding import Opened, Outgoing, forward
from proxy.upstream import Candidates, Upstream, UpstreamStream, with_cheap_idle_check
from proxy.upstream_body import DirectBody
from proxy.upstream_wire import WireLane
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
DONE_EVENT = b"data: [DONE]\n\n"


def make_upstream(base_url: str, lane: bool, monkeypatch: pytest.MonkeyPatch) -> Upstream:
    # The lane exists only under gevent; a plain socket with a timeout behaves the same here.
    monkeypatch.setattr(upstream_body, "gevent_sockets", lambda: lane)
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
    with_cheap_idle_check(client._client)
    upstream = Upstream("u", client)
    assert (upstream.chat_lane is not None) == lane
    return upstream


def open_stream(upstream: Upstream, timeout: float = 5) -> UpstreamStream:
    return Candidates([upstream], dict(BODY), timeout, 30).open_stream()


def read_all(body: DirectBody, timeout: float = 5) -> bytes:
    payload, deadline = b"", time.monotonic() + timeout
    while not body.ended and time.monotonic() < deadline:
        payload += body.read(0.2) or b""
    return payload


def failure_of(upstream: Upstream, timeout: float = 5) -> tuple[str, str | None, int | None]:
    with pytest.raises(RelayError) as caught:
        open_stream(upstream, timeout)
    return caught.value.kind, caught.value.description, caught.value.retry_after


@pytest.mark.parametrize("lane", [False, True], ids=["httpx2", "lane"])
def test_the_lane_sends_what_the_sdk_sends(lane: bool, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path, body and every header the SDK's client sends reach the upstream through the lane too (only
    Accept-Encoding differs: the lane asks for an uncompressed stream)."""
    upstream = make_upstream(fake.base_url, lane, monkeypatch)
    stream = open_stream(upstream)
    body = stream.direct_body() if lane else None
    if body is not None:
        read_all(body)
        body.finish(0.5, 1024)
    else:
        stream.close()
    recorded = fake.requests[-1]
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.json == {**BODY, "stream": True}
    headers = {name.lower(): value for name, value in recorded.headers.items()}
    assert headers.pop("accept-encoding") == ("identity" if lane else "gzip, deflate")
    assert headers.pop("x-stainless-read-timeout") == "5"
    expected = {name.lower(): value for name, value in upstream.chat_request.headers.items()}
    expected.pop("accept-encoding")
    assert headers == {**expected, "host": f"127.0.0.1:{fake.port}", "content-length": str(len(recorded.body))}


@pytest.mark.parametrize("behaviour", [
    {"status": 401}, {"status": 404}, {"status": 429, "retry_after": "7"}, {"status": 500}, {"status": 503},
    {"status": 400, "error_message": "This model's maximum context length is 8192 tokens"},
    {"status": 422, "error_message": "bad sk-live-0123456789abcdef0123456789 field"},
    {"status": 502, "error_raw_body": "<html>Bad gateway</html>", "error_content_type": "text/html"},
], ids=lambda behaviour: "-".join(str(value) for value in behaviour.values())[:30])
def test_an_error_status_fails_as_through_the_sdk(behaviour: dict[str, object], fake: FakeUpstream,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each HTTP error status becomes the same relay error (kind, words, Retry-After) as through httpx2."""
    fake.behave(**behaviour)
    through_httpx = failure_of(make_upstream(fake.base_url, False, monkeypatch))
    assert failure_of(make_upstream(fake.base_url, True, monkeypatch)) == through_httpx


def test_clean_ends_reuse_one_connection_and_broken_ones_do_not(fake: FakeUpstream,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers read to their end go back to the lane (one TCP connection for many); one given up mid-body
    is closed, and the next answer gets a fresh connection."""
    upstream = make_upstream(fake.base_url, True, monkeypatch)
    opened = fake.connections_opened
    for _ in range(3):
        body = open_stream(upstream).direct_body()
        assert body is not None
        assert DONE_EVENT in read_all(body)
        body.finish(0.5, 1024)
    assert fake.connections_opened == opened + 1
    fake.behave(tokens=["a"] * 50, token_interval=0.05)
    body = open_stream(upstream).direct_body()
    assert body is not None and body.read(2) is not None
    body.close()
    assert fake.wait_for(lambda: len(fake.streams_closed) == 4 and not fake.streams_closed[-1].completed, 3)
    fake.behave()
    body = open_stream(upstream).direct_body()
    assert body is not None
    read_all(body)
    body.finish(0.5, 1024)
    assert fake.connections_opened == opened + 2
    assert upstream_body.open_bodies() == 0


def test_unreachable_and_silent_upstreams(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connection is upstream_unreachable; an upstream that accepts and never answers times out
    (upstream_timeout), as through httpx2."""
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
    assert failure_of(make_upstream(f"http://127.0.0.1:{port}/v1", True, monkeypatch))[0] == "upstream_unreachable"
    with RawUpstream(lambda conn: time.sleep(1.5)) as silent:
        assert failure_of(make_upstream(silent.base_url, True, monkeypatch), timeout=0.3)[0] == "upstream_timeout"


class RawUpstream:
    """A loopback server whose every connection is handed to `answer` (which writes raw HTTP bytes)."""

    def __init__(self, answer: Callable[[socket.socket], None], tls: ssl.SSLContext | None = None) -> None:
        self._answer = answer
        self._tls = tls
        self._server = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self._server.getsockname()[1]}/v1"
        self.connections = 0
        self.closed = 0

    def __enter__(self) -> RawUpstream:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            with conn:
                self._answer(conn)
        except OSError:
            pass  # the relay hung up first: as good an end as any here
        finally:
            self.closed += 1


def answering(*heads_and_bodies: bytes, requests: int = 1) -> Callable[[socket.socket], None]:
    """An upstream that reads each request's head and body, then writes the given bytes."""

    def answer(conn: socket.socket) -> None:
        for _ in range(requests):
            data = b""
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"".join(heads_and_bodies))

    return answer


SSE = b'data: {"choices":[{"delta":{"content":"hi"},"index":0}]}\n\n' + DONE_EVENT
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"


@pytest.mark.parametrize(("wire", "reused"), [
    (SSE_HEAD + b"content-length: %d\r\n\r\n" % len(SSE) + SSE, True),
    (SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n%x\r\n" % len(SSE) + SSE + b"\r\n0\r\n\r\n", True),
    (b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + SSE_HEAD + b"content-length: %d\r\n\r\n" % len(SSE) + SSE,
     True),
    (SSE_HEAD + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(SSE) + SSE, False),
    (b"HTTP/1.0 200 OK\r\ncontent-length: %d\r\n\r\n" % len(SSE) + SSE, False),
    (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: %d\r\n\r\n" % len(SSE) + SSE, True),
], ids=["content-length", "chunked", "early-hints-first", "connection-close", "http-1.0", "http-1.0-keep-alive"])
def test_every_framing_is_read_and_reuse_follows_it(wire: bytes, reused: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Length-framed, chunked and early-hinted answers are read whole; the connection is kept only when the
    upstream allows it."""
    with RawUpstream(answering(wire, requests=2)) as raw:
        upstream = make_upstream(raw.base_url, True, monkeypatch)
        for _ in range(2):
            body = open_stream(upstream).direct_body()
            assert body is not None and read_all(body) == SSE
            body.finish(0.5, 1024)
        assert raw.connections == (1 if reused else 2)


def test_a_body_ended_by_closing_the_connection_is_read_to_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer with neither length nor chunks ends when the upstream closes: read whole, never reused."""

    def answer(conn: socket.socket) -> None:
        answering(SSE_HEAD + b"\r\n" + SSE)(conn)
        conn.shutdown(socket.SHUT_WR)

    with RawUpstream(answer) as raw:
        body = open_stream(make_upstream(raw.base_url, True, monkeypatch)).direct_body()
        assert body is not None and read_all(body) == SSE
        body.finish(0.5, 1024)


@pytest.mark.parametrize("wire", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 2OO OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    SSE_HEAD + b"content-encoding: br\r\ncontent-length: 3\r\n\r\nabc",
    SSE_HEAD + b"content-length: 12x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"x-long: " + b"a" * 70_000,
    b"",
], ids=["not-http", "bad-status", "bad-header", "compressed", "bad-length", "endless-head", "closed-at-once"])
def test_an_answer_that_is_not_http_is_an_unreachable_upstream(wire: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the upstream writes instead of an HTTP/1.1 answer is upstream_unreachable (a failure the
    relay falls over on), never a crash or a hang."""
    with RawUpstream(answering(wire)) as raw:
        assert failure_of(make_upstream(raw.base_url, True, monkeypatch))[0] == "upstream_unreachable"


def test_an_idle_connection_the_upstream_closed_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream that closes kept-alive connections between requests costs nothing: the lane sees the
    closed connection before reusing it and opens a new one."""
    wire = SSE_HEAD + b"content-length: %d\r\n\r\n" % len(SSE) + SSE

    def answer(conn: socket.socket) -> None:
        answering(wire)(conn)  # one answer, then the connection is closed while idle

    with RawUpstream(answer) as raw:
        upstream = make_upstream(raw.base_url, True, monkeypatch)
        for _ in range(3):
            body = open_stream(upstream).direct_body()
            assert body is not None and read_all(body) == SSE
            body.finish(0.5, 1024)
            assert wait_until(lambda: raw.closed == raw.connections)  # closed while idle in the lane
        assert raw.connections == 3


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "1", "-subj", "/CN=upstream.test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def tls_upstream(base_url: str, trusted: Path | None, monkeypatch: pytest.MonkeyPatch) -> Upstream:
    monkeypatch.setattr(upstream_body, "gevent_sockets", lambda: True)
    verify = ssl.create_default_context(cafile=str(trusted)) if trusted else True
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0,
                           http_client=openai.DefaultHttpx2Client(verify=verify))
    upstream = Upstream("tls", client)
    assert upstream.chat_lane is not None
    return upstream


def test_an_https_upstream_is_reached_over_verified_tls(certificate: tuple[Path, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An https:// upstream (every hosted API) goes by the lane over TLS with httpx2's own verifying context:
    answers are read whole and the TLS connection is reused; a certificate it does not trust is refused."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(*certificate)
    wire = SSE_HEAD + b"content-length: %d\r\n\r\n" % len(SSE) + SSE
    with RawUpstream(answering(wire, requests=2), tls=server) as raw:
        upstream = tls_upstream(raw.base_url, certificate[0], monkeypatch)
        for _ in range(2):
            body = open_stream(upstream).direct_body()
            assert body is not None and read_all(body) == SSE
            body.finish(0.5, 1024)
        assert raw.connections == 1
    with RawUpstream(answering(wire), tls=server) as untrusted:
        assert failure_of(tls_upstream(untrusted.base_url, None, monkeypatch))[0] == "upstream_unreachable"


def test_the_lane_is_only_for_the_clients_own_direct_pool(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from HTTPS_PROXY/HTTP_PROXY, or a client with a transport of its own, keeps httpx2."""
    monkeypatch.setattr(upstream_body, "gevent_sockets", lambda: True)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    proxied = openai.OpenAI(base_url=fake.base_url, api_key="sk-test", http_client=openai.DefaultHttpx2Client())
    assert Upstream("proxied", proxied).chat_lane is None
    monkeypatch.delenv("HTTP_PROXY")
    direct = openai.OpenAI(base_url=fake.base_url, api_key="sk-test", http_client=openai.DefaultHttpx2Client())
    template = Upstream("direct", direct).chat_request
    assert WireLane.of(direct._client, template.url, template.headers,
                       direct._make_status_error_from_response) is not None


@pytest.fixture(autouse=True)
def no_bodies_left_open() -> Iterator[None]:
    yield
    assert upstream_body.open_bodies() == 0


# --- forwarded streams (proxy/forwarding.py): the lane under httpx2's Response ----------------------------------

RESPONSES_BODY = orjson.dumps({"model": "gpt-4o-mini", "input": "hi", "stream": True})


def forwarded(upstream: Upstream, body: bytes = RESPONSES_BODY, timeout: float = 5, beta: str = "x") -> Opened:
    outgoing = Outgoing("POST", "responses", b"", [("content-type", "application/json"), ("openai-beta", beta)],
                        body, len(body), streaming=True, model="gpt-4o-mini")
    return forward([upstream], outgoing, timeout, 30)


def test_each_forwarded_stream_goes_with_its_own_headers_and_length(fake: FakeUpstream,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The lane builds a head once per URL and header set: a request with other headers (or past the heads
    kept) gets its own, and every request its own Content-Length."""
    monkeypatch.setattr(upstream_wire, "PREPARED_LIMIT", 2)
    upstream = make_upstream(fake.base_url, True, monkeypatch)
    sent = [("a", RESPONSES_BODY), ("b", RESPONSES_BODY + b" "), ("a", RESPONSES_BODY + b"  "), ("c", RESPONSES_BODY),
            ("a", RESPONSES_BODY)]
    for beta, body in sent:
        opened = forwarded(upstream, body, beta=beta)
        b"".join(opened.response.iter_bytes())
        opened.response.close()
    seen = [({name.lower(): value for name, value in recorded.headers.items()}, recorded.body)
            for recorded in fake.requests[-len(sent):]]
    assert [(headers["openai-beta"], headers["content-length"], body) for headers, body in seen] == [
        (beta, str(len(body)), body) for beta, body in sent]


@pytest.mark.parametrize("lane", [False, True], ids=["httpx2", "lane"])
def test_a_forwarded_stream_sends_and_reads_as_httpx2_does(lane: bool, fake: FakeUpstream,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed /v1/responses request reaches the upstream with the same headers and body by the lane as
    by httpx2, and its answer reads the same through the Response (`iter_bytes`) as through `DirectBody.take`."""
    upstream = make_upstream(fake.base_url, lane, monkeypatch)
    opened = forwarded(upstream)
    assert opened.response.status_code == 200
    whole = b"".join(opened.response.iter_bytes())
    assert b"response.completed" in whole
    opened.response.close()
    recorded = fake.requests[-1]
    assert (recorded.path, recorded.body) == ("/v1/responses", RESPONSES_BODY)
    headers = {name.lower(): value for name, value in recorded.headers.items()}
    assert headers["openai-beta"] == "x" and headers["accept-encoding"] == "identity"
    assert headers["authorization"] == "Bearer sk-test"
    through_httpx = {name.lower(): value for name, value in forwarded_headers(fake, monkeypatch).items()}
    assert headers == through_httpx


def forwarded_headers(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    opened = forwarded(make_upstream(fake.base_url, False, monkeypatch))
    b"".join(opened.response.iter_bytes())
    opened.response.close()
    return fake.requests[-1].headers


def test_a_forwarded_stream_is_taken_whole_and_its_connection_reused(fake: FakeUpstream,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The forwarding loop takes the lane's body itself; read to its end, the connection serves the next
    forwarded stream and the next chat stream to the same upstream (one pool per origin)."""
    upstream = make_upstream(fake.base_url, True, monkeypatch)
    opened_before = fake.connections_opened
    for _ in range(2):
        opened = forwarded(upstream)
        body = DirectBody.take(opened.response)
        assert body is not None and DirectBody.take(opened.response) is None  # handed over once
        assert b"response.completed" in read_all(body)
        body.finish(0.5, 1024)
        opened.response.close()
    chat = open_stream(upstream).direct_body()
    assert chat is not None and DONE_EVENT in read_all(chat)
    chat.finish(0.5, 1024)
    assert fake.connections_opened == opened_before + 1


@pytest.mark.parametrize("status", [400, 404, 429, 500])
def test_a_forwarded_error_answer_is_the_same_by_the_lane(status: int, fake: FakeUpstream,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An error status is what the upstream said, body and all, or the same relay error (429/5xx)."""
    fake.behave(status=status, retry_after="3")

    def outcome(lane: bool) -> tuple[object, ...]:
        try:
            opened = forwarded(make_upstream(fake.base_url, lane, monkeypatch))
        except RelayError as error:
            return error.kind, error.description, error.retry_after
        answer = opened.response.status_code, b"".join(opened.response.iter_bytes())
        opened.response.close()
        return answer

    assert outcome(True) == outcome(False)


def test_forwarded_streams_fail_as_through_httpx2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreachable, silent and non-HTTP upstreams give a forwarded stream the relay errors httpx2's gave."""
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]

    def kind(base_url: str, timeout: float = 5) -> str:
        with pytest.raises(RelayError) as caught:
            forwarded(make_upstream(base_url, True, monkeypatch), timeout=timeout)
        return caught.value.kind

    assert kind(f"http://127.0.0.1:{port}/v1") == "upstream_unreachable"
    with RawUpstream(lambda conn: time.sleep(1.5)) as silent:
        assert kind(silent.base_url, timeout=0.3) == "upstream_timeout"
    with RawUpstream(answering(b"garbage\r\n\r\n")) as raw:
        assert kind(raw.base_url) == "upstream_unreachable"
    with RawUpstream(answering(SSE_HEAD + b"content-encoding: gzip\r\ncontent-length: 3\r\n\r\nabc")) as raw:
        assert kind(raw.base_url) == "upstream_unreachable"


@pytest.mark.parametrize("value", ["x\r\ninjected: 1", "x\ninjected: 1", "x\x00"], ids=["crlf", "lf", "nul"])
def test_a_header_that_would_break_the_request_is_never_sent(value: str, fake: FakeUpstream,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A forwarded header value holding a line break or NUL fails the request as httpx2's h11 fails it
    (upstream_unreachable), and nothing reaches the upstream: no header can be smuggled into its request."""
    outgoing = Outgoing("POST", "responses", b"", [("openai-beta", value)], RESPONSES_BODY, len(RESPONSES_BODY),
                        streaming=True, model="gpt-4o-mini")
    seen = len(fake.requests)
    for lane in (False, True):
        with pytest.raises(RelayError) as caught:
            forward([make_upstream(fake.base_url, lane, monkeypatch)], outgoing, 5, 30)
        assert caught.value.kind == "upstream_unreachable"
    assert len(fake.requests) == seen


def test_an_upstream_at_an_ip_address_is_connected_to_without_the_resolver(fake: FakeUpstream,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A lane connection to an IP address asks no resolver (under gevent each ask is a round trip through its
    threadpool); a name is still resolved at each new connection."""
    asked: list[str] = []
    resolve = socket.getaddrinfo

    def recording(host: str, *args: object, **kwargs: object) -> object:
        asked.append(host)
        return resolve(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    for host in ("127.0.0.1", "localhost"):
        connections = upstream_wire.Connections(host, fake.port, None, 1, None)
        connections._connection(5).close()
    assert asked == ["localhost"]
