"""Fuzzing who the caller is: valid keys mixed with junk, in the Authorization and x-api-key headers and the
`key` parameter, across every route. The pipeline must decide one caller per request whatever arrives, admit
exactly the requests that present one valid key consistently, never answer 500 and never echo a key."""

from __future__ import annotations

import functools
import string
from typing import Any

from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.conftest import (
    ACCESS_KEY,
    HELLO,
    SECOND_ACCESS_KEY,
    UPSTREAM_KEY,
    FakeTransport,
    relay_app,
    unit_config,
)

VALID = (ACCESS_KEY, SECOND_ACCESS_KEY)
# (method, path, JSON body) for every route family; the keyed ones must refuse a caller without a valid key.
KEYED_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/chat", HELLO),
    ("GET", "/chat?prompt=hi", None),
    ("POST", "/v1/chat/completions", {**HELLO, "stream": True}),
    ("GET", "/v1/models", None),
    ("GET", "/doctor?records=1&interval=0.05&gap=0&after=1", None),
    # Served by the (chat) fake over the Messages bridge, which answers streams: as chat completions above.
    ("POST", "/v1/messages", {**HELLO, "model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True}),
    ("POST", "/v1/messages/count_tokens", {**HELLO, "model": "claude-sonnet-4-5"}),
    ("GET", "/v1/models/gpt-4o-mini", None),
    ("POST", "/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}),  # bridged to the chat fake
    ("POST", "/v1/embeddings", {"model": "gpt-4o-mini", "input": "hi"}),  # forwarded as sent
]
OPEN_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/healthz", None), ("GET", "/openapi.yaml", None), ("GET", "/static/web/icon.svg", None),
    ("GET", "/metrics", None), ("OPTIONS", "/chat", None), ("GET", "/no/such/route", None), ("GET", "/ws", None),
    ("GET", "/", None), ("GET", "/usage", None), ("GET", "/debug/stats", None),  # the last two: their own keys
]

junk = st.text(alphabet=string.ascii_letters + string.digits + "-_ .:=%", max_size=40)
key_choice = st.one_of(st.none(), st.sampled_from(VALID), junk, st.just(""), st.just(UPSTREAM_KEY))
header_form = st.sampled_from(["Bearer {}", "{}", "bearer  {} ", "Basic {}", "Bearer {}, Bearer junk"])


def expected_caller(header: str | None, query: str | None, api_key: str | None = None) -> str | None:
    """What the pipeline must decide, written independently of it: the Authorization header's key (Bearer or
    raw), the x-api-key header's, or the parameter's; two present and different means nobody."""
    from_header = ""
    if header is not None:
        value = header.strip()
        scheme, _, rest = value.partition(" ")
        from_header = rest.strip() if scheme.lower() == "bearer" and rest.strip() else value
    from_query = query or ""
    presented_keys = {key for key in (from_header, (api_key or "").strip(), from_query) if key}
    if len(presented_keys) > 1:
        return None
    presented = next(iter(presented_keys), "")
    return presented if presented in VALID else None


def ask(client: FlaskClient, method: str, path: str, body: Any, header: str | None, query: str | None,
        extra: dict[str, str], api_key: str | None = None) -> tuple[int, bytes]:
    headers = dict(extra)
    if header is not None:
        headers["Authorization"] = header
    if api_key is not None:
        headers["X-Api-Key"] = api_key
    query_string = {"key": query} if query is not None else None
    if query_string is not None and "?" in path:
        path, _, existing = path.partition("?")
        query_string.update(dict(part.split("=", 1) for part in existing.split("&")))
    response = client.open(path, method=method, json=body, headers=headers, query_string=query_string)
    try:
        return response.status_code, response.get_data()
    finally:
        response.close()


@functools.cache
def shared_client() -> FlaskClient:
    """One relay for every example: building an app per example was most of this test's time, and no
    example leaves state another could see (no limits are configured, each answer is read whole and
    closed, no cookie jar)."""
    return relay_app(unit_config(max_body_bytes=4096), FakeTransport()).test_client(use_cookies=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(KEYED_ROUTES + OPEN_ROUTES), key=key_choice, form=header_form,
       use_header=st.booleans(), query=key_choice, api_key=key_choice,
       extra=st.dictionaries(st.sampled_from(["X-Forwarded-For", "Cookie", "X-Request-ID",
                                              "Origin", "Forwarded"]), junk, max_size=3))
def test_one_caller_per_request_whatever_the_headers(route: tuple[str, str, Any], key: str | None, form: str,
                                                     use_header: bool, query: str | None, api_key: str | None,
                                                     extra: dict[str, str]) -> None:
    """Keyed routes admit exactly the consistent valid key; nothing answers 500 or echoes a key."""
    client = shared_client()
    header = form.format(key) if use_header and key is not None else None
    method, path, body = route
    try:
        status, data = ask(client, method, path, body, header, query, extra, api_key)
    except ValueError:
        return  # a header value werkzeug's test client itself refuses to send (not the relay's decision)
    assert status < 500, (route, header, query, data[:300])
    for secret in (*VALID, UPSTREAM_KEY):
        assert secret.encode() not in data, (route, "a key came back in the answer")
    if route in KEYED_ROUTES:
        admitted = status != 401
        assert admitted == (expected_caller(header, query, api_key) is not None), (route, header, query, api_key,
                                                                                   status, data[:200])
