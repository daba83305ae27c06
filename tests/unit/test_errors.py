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


def relay_error_classes() -> list[type[RelayError]]:
    found: list[type[RelayError]] = []
    pending = [RelayError]
    while pending:
        cls = pending.pop()
        found.extend(cls.__subclasses__())
        pending.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__ == "proxy.errors"]


@pytest.mark.parametrize("cls", relay_error_classes(), ids=lambda cls: cls.__name__)
def test_error_classes_subclass_werkzeugs_of_the_same_name(cls: type[RelayError]) -> None:
    """An error class named as one of werkzeug's is that class too (`except werkzeug...NotFound` catches it),
    keeps its own message, and its `status` is werkzeug's `code`."""
    from werkzeug import exceptions as werkzeug_errors

    namesake = getattr(werkzeug_errors, cls.__name__, None)
    if namesake is not None:
        assert issubclass(cls, namesake)
    error = cls("said plainly")
    assert str(error.description) == "said plainly" and error.status == error.code


def test_status_is_the_one_name_for_the_http_status() -> None:
    """A view that changes an error's HTTP status sets `status` (werkzeug's `code` follows): the rendered body
    keeps the kind, the response carries the new status."""
    from proxy.errors import render_error

    error = UpstreamTimeout()
    error.status = 529
    app = Flask(__name__)
    with app.test_request_context("/v1/chat/completions"):
        response = render_error(error)
    assert (error.code, response.status_code) == (529, 529)
    assert json.loads(response.get_data())["error"]["code"] == "upstream_timeout"
