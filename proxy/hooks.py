"""Per-request plumbing shared by every endpoint: request IDs, preflights, security headers, CORS, access log."""

from __future__ import annotations

import re
import time
import uuid

from flask import Flask, Response, g, request

from proxy.access import add_cors_headers, preflight_response
from proxy.accesslog import AccessRecord, redacted_path
from proxy.relay import current_relay

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
    return None


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
