"""Per-request plumbing shared by every endpoint: request IDs, preflights, security headers, CORS, access log."""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, Response, g, request

from proxy.access import add_cors_headers, preflight_response
from proxy.accesslog import AccessRecord, redacted_path
from proxy.errors import RequestTimeout
from proxy.relay import current_relay

T = TypeVar("T")

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")


def install_request_hooks(app: Flask) -> None:
    app.before_request(_begin)
    app.after_request(_finish)


def _begin() -> Response | None:
    supplied = request.headers.get("X-Request-ID", "")
    request_id = supplied if _SAFE_REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
    g.access = AccessRecord(
        method=request.method,
        path=redacted_path(request.path, request.query_string.decode("latin-1")),
        client=request.remote_addr or "-",
        request_id=request_id,
        started=time.monotonic(),
    )
    if request.method == "OPTIONS":
        return preflight_response(current_relay().config)
    limit_body_time(request.environ, current_relay().config.body_timeout)
    return None


def limit_body_time(environ: dict[str, Any], seconds: float) -> None:
    """Give the request body `seconds` to arrive, whichever endpoint reads it (must run before the body is
    touched). Only under gevent (production): elsewhere reads are left as the server does them."""
    from gevent import monkey

    if monkey.is_module_patched("socket") and "wsgi.input" in environ:
        sock = environ.get("gunicorn.socket")
        environ["wsgi.input"] = DeadlineInput(environ["wsgi.input"], seconds, sock)


class DeadlineInput:
    """`wsgi.input` with a deadline for the whole body: a client trickling it (slowloris) gets a 408 instead
    of holding a connection for as long as it likes."""

    def __init__(self, raw: Any, seconds: float, sock: socket.socket | None) -> None:
        self._raw = raw
        self._seconds = seconds
        self._deadline = time.monotonic() + seconds
        self._sock = sock

    def read(self, size: int = -1) -> bytes:
        return self._in_time(self._raw.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._in_time(self._raw.readline, size)

    def _in_time(self, read: Callable[[int], T], size: int) -> T:
        from gevent import Timeout

        remaining = self._deadline - time.monotonic()
        timer = Timeout(max(remaining, 0.001))
        try:
            with timer:
                return read(size)
        except Timeout as expired:
            if expired is not timer:
                raise
            self._stop_reading()
            raise RequestTimeout(f"the request body did not arrive within {self._seconds:g} s") from None

    def _stop_reading(self) -> None:
        # Shut the read side so the server does not wait for the rest of the body before answering and closing.
        if self._sock is None:
            return
        try:
            with socket.fromfd(self._sock.fileno(), self._sock.family, self._sock.type) as duplicate:
                duplicate.shutdown(socket.SHUT_RD)
        except OSError:
            return


def _finish(response: Response) -> Response:
    access: AccessRecord | None = g.get("access")
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("X-Frame-Options", "DENY")
    add_cors_headers(current_relay().config, response)
    if access is not None:
        headers["X-Request-ID"] = access.request_id
        access.status = response.status_code
        # Runs when the server closes the response: after the last byte of a stream, or a departed client.
        response.call_on_close(access.write)
    return response
