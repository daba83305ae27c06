"""proxy/errors.py: error bodies in each endpoint's shape, and werkzeug's errors turned into the relay's."""

from __future__ import annotations

import json

import pytest
from flask import Flask
from werkzeug.exceptions import BadGateway, Conflict, NotFound, RequestEntityTooLarge

from proxy.encoders import NDJSON_DONE
from proxy.errors import (
    BadRequest,
    RateLimited,
    RelayError,
    Unauthorized,
    UpstreamTimeout,
    as_relay_error,
    error_body,
)

ERROR = BadRequest("'model' must be a non-empty string")


def test_ndjson_shape() -> None:
    """/chat: one error record with the kind as `code`, then the [DONE] record."""
    body, mimetype = error_body(ERROR, "ndjson")
    assert mimetype == "application/x-ndjson"
    assert body == (b'{"done":false,"error":true,"content":"\'model\' must be a non-empty string",'
                    b'"code":"invalid_request"}\n' + NDJSON_DONE)


@pytest.mark.parametrize("shape", ["openai", "json"])
def test_openai_shape(shape: str) -> None:
    """/v1 and everything else: OpenAI's {"error": {message, type, code}}."""
    body, mimetype = error_body(Unauthorized(), shape)
    assert mimetype == "application/json"
    assert json.loads(body) == {"error": {"message": Unauthorized.description, "type": "authentication_error",
                                          "code": "unauthorized"}}


def test_sse_shape() -> None:
    """GET /chat: a named `event: error` with the OpenAI object, then `data: [DONE]`."""
    body, mimetype = error_body(UpstreamTimeout(), "sse")
    assert mimetype == "text/event-stream"
    assert body == (b'event: error\ndata: {"error":{"message":"the upstream API did not answer in time; try again '
                    b'in a moment","type":"api_error","code":"upstream_timeout"}}\n\ndata: [DONE]\n\n')


@pytest.mark.parametrize(("error", "status", "kind", "error_type"), [
    (BadRequest(), 400, "invalid_request", "invalid_request_error"),
    (BadRequest("x", kind="invalid_json"), 400, "invalid_json", "invalid_request_error"),
    (RateLimited(retry_after=5), 429, "rate_limited", "rate_limit_error"),
    (RelayError(), 500, "internal_error", "api_error"),
])
def test_error_classes(error: RelayError, status: int, kind: str, error_type: str) -> None:
    """Each error class carries its status, kind and OpenAI type; `kind` and `retry_after` can be overridden."""
    assert (error.status, error.kind, error.error_type) == (status, kind, error_type)
    assert str(error.description)


def test_werkzeug_errors_become_relay_errors() -> None:
    """404/502 map to the relay's classes; 413 names MAX_CONTENT_LENGTH; an unmapped status keeps its code."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 1234
    with app.app_context():
        assert (as_relay_error(NotFound()).status, as_relay_error(NotFound()).kind) == (404, "not_found")
        assert as_relay_error(BadGateway()).kind == "upstream_error"
        too_large = as_relay_error(RequestEntityTooLarge())
        assert too_large.status == 413 and "1234 bytes" in str(too_large.description)
        other = as_relay_error(Conflict())
        assert other.status == 409 and other.kind == "internal_error" and not str(other.description).endswith(".")
    assert as_relay_error(ERROR) is ERROR
