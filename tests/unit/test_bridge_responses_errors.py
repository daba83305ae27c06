"""The status a Responses client gets for an upstream failure before the first token
(proxy/bridge/responses_errors.py): the one the openai SDK maps to the same exception class as OpenAI's."""

from __future__ import annotations

import pytest

from proxy.bridge.responses_errors import client_status


@pytest.mark.parametrize(("kind", "status", "upstream_status", "expected"), [
    ("upstream_bad_request", 400, 400, 400),
    ("context_too_long", 400, 413, 400),
    ("context_too_long", 400, 422, 400),
    ("model_not_found", 400, 404, 404),
    ("upstream_error", 502, 409, 409),
    ("upstream_error", 502, 413, 413),
    ("upstream_bad_request", 400, 422, 422),
    ("upstream_rate_limited", 429, 429, 429),
    ("upstream_error", 502, 500, 502),
    ("upstream_error", 502, 503, 502),
    ("upstream_auth", 502, 401, 502),
    ("upstream_auth", 502, 403, 502),
    ("upstream_timeout", 504, None, 504),
    ("upstream_unreachable", 502, None, 502),
])
def test_client_status(kind: str, status: int, upstream_status: int | None, expected: int) -> None:
    """Statuses whose SDK class names the trouble are kept; the relay's key refused is the operator's 502."""
    assert client_status(kind, status, upstream_status) == expected
