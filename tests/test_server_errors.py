"""Requests gunicorn refuses before the app sees them get the relay's JSON and security headers, not HTML."""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from proxy.server_errors import server_error_response
from tests.conftest import ACCESS_KEY, SECOND_ACCESS_KEY, RelayProcess
from tests.servers import wait_until


def raw_exchange(relay: RelayProcess, request: bytes) -> bytes:
    address = urlsplit(relay.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /chat?prompt=<script>alert(1)</script> HTTP/1.1 extra\r\nHost: x\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),  # all of it read: no reset
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n", b"431"),
], ids=["bad-request-line", "uri-too-long", "too-many-headers"])
def test_gunicorn_refusals_are_json_with_security_headers(relay_factory: Callable[..., RelayProcess],
                                                           request_bytes: bytes, status: bytes) -> None:
    """400, 414 and 431 from gunicorn itself: JSON, nosniff, no frames, no HTML page reflecting the request."""
    answer = raw_exchange(relay_factory(), request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == status, answer[:300]
    headers = head.lower()
    assert b"content-type: application/json" in headers
    assert b"x-content-type-options: nosniff" in headers and b"x-frame-options: deny" in headers
    assert b"<html" not in answer.lower() and b"<script>" not in body


def test_server_error_response_is_one_well_formed_answer() -> None:
    """The bytes are a complete HTTP response whose Content-Length matches its JSON body."""
    response = server_error_response(431, "Request Header Fields Too Large", "too many headers")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert body.startswith(b'{"error":{"message":"Request Header Fields Too Large: too many headers"')


def test_gunicorns_own_warnings_keep_no_key(relay_factory: Callable[..., RelayProcess]) -> None:
    """A malformed request line carrying keys (as a query parameter, or anywhere) is logged by gunicorn with
    the keys redacted, on one line."""
    relay = relay_factory()
    for line in (f"GET /chat?prompt=x&key={ACCESS_KEY}".encode(),  # no version: gunicorn quotes the line
                 f"GET /{SECOND_ACCESS_KEY}".encode()):
        raw_exchange(relay, line + b"\r\nHost: x\r\n\r\n")
    assert wait_until(lambda: relay.log_text().count("Invalid request from") >= 2), relay.log_text()[-2000:]
    log = relay.log_text()
    assert ACCESS_KEY not in log and SECOND_ACCESS_KEY not in log
    assert "key=[redacted]" in log
