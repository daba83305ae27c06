"""Errors a client can cause or meet, and the one handler that renders them in each endpoint's shape.

Every error is a small `RelayError` (a werkzeug `HTTPException`, subclassing werkzeug's class of the same
name where there is one): `status` is its HTTP status (werkzeug calls it `code`), `kind` its
machine-readable name, which the bodies carry in their `"code"` field as the old relay's clients and
OpenAI's SDKs expect. The handler picks the body shape from the view's declared protocol
(`proxy/pipeline.py`) or, for routing errors, from the path; the records themselves come from
`proxy/encoders.py`, the one place that builds them:

- ``ndjson``: one error record then the ``[DONE]`` record, what clients of the old Node relay can show;
- ``openai``: ``{"error": {"message", "type", "code"}}``, what the official SDKs turn into exceptions;
- ``sse``: the OpenAI shape as a Server-Sent Event named ``error``, then ``data: [DONE]`` (``GET /chat``);
- ``json``: the OpenAI shape too, for everything else (health, 404s);
- ``anthropic``: ``{"type": "error", "error": {"type", "message"}}``, for `POST /v1/messages` (declared
  with that protocol) and routing errors under ``/v1/messages``, so Anthropic's SDKs read them.

An unknown path is `unknown_endpoint(path)`: a 404 whose message names the path and what the relay serves.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Flask, Response, current_app, has_app_context, has_request_context, request
from werkzeug import exceptions as werkzeug_errors
from werkzeug.exceptions import HTTPException

from proxy.encoders import (
    NDJSON_DONE,
    SSE_DONE,
    anthropic_error,
    ndjson_error_record,
    openai_error,
    sse_error_event,
)
from proxy.redaction import redact_secret_like
from proxy.request_state import PUBLIC, current_request_state

log = logging.getLogger("relay.errors")

NDJSON_MIMETYPE = "application/x-ndjson"
SSE_MIMETYPE = "text/event-stream"


class RelayError(HTTPException):
    """Base of every error the relay answers with: `status` (HTTP) and `kind` (machine-readable)."""

    code: int = 500  # the HTTP status, as werkzeug names it; read it as `status`
    kind: str = "internal_error"
    error_type: str = "api_error"  # OpenAI's `type` field for this kind of error
    description: str = "the relay could not handle this request"
    retry_after: int | None = None
    upstream_failures: tuple[tuple[str, str], ...] = ()  # (upstream, kind) behind an upstream error
    upstream_status: int | None = None  # the upstream's HTTP status behind an upstream error, when there was one
    extra_headers: tuple[tuple[str, str], ...] = ()  # headers the status calls for (426: the version spoken)

    def __init__(self, description: str | None = None, *, kind: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(description=description or self.description)  # by name: werkzeug's 405 takes methods first
        if kind is not None:
            self.kind = kind
        if retry_after is not None:
            self.retry_after = retry_after

    @property
    def status(self) -> int:
        return self.code

    @status.setter
    def status(self, status: int) -> None:
        self.code = status


class BadRequest(RelayError, werkzeug_errors.BadRequest):
    code = 400
    kind = "invalid_request"
    error_type = "invalid_request_error"
    description = "the request is not valid"


class Unauthorized(RelayError, werkzeug_errors.Unauthorized):
    code = 401
    www_authenticate: list[Any] = []  # noqa: RUF012 - werkzeug's; never set: no WWW-Authenticate challenge
    kind = "unauthorized"
    error_type = "authentication_error"
    # The same words for a missing and a wrong key: they must not tell which keys exist.
    description = "missing or invalid access key: send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"


class Forbidden(RelayError, werkzeug_errors.Forbidden):
    code = 403
    kind = "forbidden"
    error_type = "permission_error"
    description = "this request is not allowed"


class NotFound(RelayError, werkzeug_errors.NotFound):
    code = 404
    kind = "not_found"
    error_type = "invalid_request_error"
    description = "no such endpoint"


# What `unknown_endpoint` tells a client that took a wrong turn: the relay's endpoint families.
SERVED_ENDPOINTS = ("POST /chat", "GET /chat", "GET /ws (WebSocket)", "POST /v1/chat/completions",
                    "GET /v1/models", "GET /v1/models/{model}", "POST /v1/messages", "GET /healthz",
                    "GET /openapi.yaml")
# A path is echoed only this far: a message is not the place for a client's megabyte of URL.
ECHOED_PATH_CHARACTERS = 200


def unknown_endpoint(path: str) -> NotFound:
    """The 404 for a path the relay does not serve, naming it and the endpoints it does serve (routing
    errors, a disabled endpoint, and whatever route later takes over unknown paths but must refuse one)."""
    shown = _redacted(path if len(path) <= ECHOED_PATH_CHARACTERS else path[:ECHOED_PATH_CHARACTERS] + "...")
    return NotFound(f"no such endpoint: {shown}; this relay serves {', '.join(SERVED_ENDPOINTS)}")


class MethodNotAllowed(RelayError, werkzeug_errors.MethodNotAllowed):
    code = 405
    kind = "method_not_allowed"
    error_type = "invalid_request_error"
    description = "this method is not allowed here"


class PayloadTooLarge(RelayError):
    code = 413
    kind = "body_too_large"
    error_type = "invalid_request_error"
    description = "the request body is too large"


class RequestTimeout(RelayError, werkzeug_errors.RequestTimeout):
    code = 408
    kind = "body_timeout"
    error_type = "invalid_request_error"
    description = "the request body arrived too slowly"


class RateLimited(RelayError):
    code = 429
    kind = "rate_limited"
    error_type = "rate_limit_error"
    description = "too many requests: slow down and retry later"


class UpgradeRequired(RelayError):
    code = 426
    kind = "upgrade_required"
    error_type = "invalid_request_error"
    description = "this WebSocket version is not supported: send Sec-WebSocket-Version: 13"
    extra_headers = (("Sec-WebSocket-Version", "13"),)


class UpstreamFailed(RelayError):
    code = 502
    kind = "upstream_error"
    error_type = "api_error"
    description = "the upstream API failed; try again in a moment"


class UpstreamTimeout(RelayError):
    code = 504
    kind = "upstream_timeout"
    error_type = "api_error"
    description = "the upstream API did not answer in time; try again in a moment"


class LedgerUnavailable(RelayError):
    code = 503
    kind = "ledger_unavailable"
    error_type = "api_error"
    description = "the usage ledger cannot be read right now; try again in a moment"


_BY_STATUS: dict[int, type[RelayError]] = {
    cls.code: cls
    for cls in (BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, PayloadTooLarge,
                RequestTimeout, RateLimited, UpgradeRequired, UpstreamFailed, UpstreamTimeout)
}


def as_relay_error(error: HTTPException) -> RelayError:
    """Turn werkzeug's own errors (404, 405, 413 from the body limit...) into relay errors."""
    if isinstance(error, RelayError):
        return error
    status = error.code or 500
    cls = _BY_STATUS.get(status)
    if cls is None:
        generic = RelayError(_plain_description(error))
        generic.status = status
        return generic
    if cls is NotFound:
        return unknown_endpoint(request.path if has_request_context() else "(this path)")
    if cls is PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is larger than the {current_app.config['MAX_CONTENT_LENGTH']} bytes allowed"
        )
    return cls()


def _redacted(text: str) -> str:
    # A key pasted into a URL must not come back in the body a proxy or browser extension may log.
    relay = current_app.extensions.get("relay") if has_app_context() else None
    return relay.redact(text) if relay is not None else redact_secret_like(text)


def _plain_description(error: HTTPException) -> str:
    # werkzeug's descriptions are English sentences meant for HTML pages; keep them short and plain.
    return (error.description or error.name or "error").strip().rstrip(".")


def error_body(error: RelayError, shape: str) -> tuple[bytes, str]:
    """The body and mimetype of `error` in the given shape."""
    message = str(error.description)
    if shape == "ndjson":
        return ndjson_error_record(error.kind, message) + NDJSON_DONE, NDJSON_MIMETYPE
    if shape == "sse":
        return sse_error_event(message, error.error_type, error.kind, named=True) + SSE_DONE, SSE_MIMETYPE
    if shape == "anthropic":
        return orjson.dumps(anthropic_error(anthropic_error_type(error.status), message)), "application/json"
    return orjson.dumps(openai_error(message, error.error_type, error.kind)), "application/json"


# Anthropic's error `type` for each status (its API reference, "Errors").
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
                    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def anthropic_error_type(status: int) -> str:
    """Anthropic's error `type` for an HTTP status (what its SDKs and Claude Code read)."""
    return _ANTHROPIC_TYPES.get(status, "api_error")


def _shape_for_request() -> str:
    """The declared view's protocol; for routing errors and static files, the path's family."""
    state = current_request_state()
    if state is not None and state.declaration is not PUBLIC:
        return state.declaration.protocol
    path = request.path
    if path == "/chat" or path.startswith("/chat/"):
        return "ndjson"
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "json"


def render_error(error: HTTPException) -> Response:
    relay_error = as_relay_error(error)
    note_error(relay_error)
    body, mimetype = error_body(relay_error, _shape_for_request())
    response = Response(body, status=relay_error.status, mimetype=mimetype)
    if relay_error.retry_after is not None:
        response.headers["Retry-After"] = str(relay_error.retry_after)
    for name, value in relay_error.extra_headers:
        response.headers[name] = value
    if relay_error.status == 405 and isinstance(error, HTTPException):
        allowed = error.get_headers()
        for name, value in allowed:
            if name.lower() == "allow":
                response.headers["Allow"] = value
    return response


def note_error(error: RelayError) -> None:
    """Keep the error on the request's state, for the metrics recorded when the request closes."""
    state = current_request_state()
    if state is not None:
        state.error = error


def render_unexpected(error: Exception) -> Response:
    """A bug, not a client error: log the traceback here, never send it."""
    log.exception("unhandled error on %s %s", request.method, request.path)
    return render_error(RelayError("the relay hit an internal error; the operator can find it in the logs"))


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(HTTPException, render_error)
    app.register_error_handler(Exception, render_unexpected)
