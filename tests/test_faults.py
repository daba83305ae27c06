"""The upstream fault matrix: every way the upstream can misbehave, on every streaming endpoint.

Each cell asserts: a clear error record (or, where the fault is survivable, the complete answer) and a
proper end of stream within a bounded time; the relay answers the next request normally; and the gunicorn
worker holds no more greenlets, threads, sockets, descriptors or upstream readers than before the fault.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest

from tests.conftest import RelayProcess, free_port
from tests.hardening import (
    ALL_STREAM_ENDPOINTS,
    FAULT_SETTINGS,
    StreamEndpoint,
    assert_no_secrets,
    assert_settles,
    fake_says,
    healthy_answer,
    worker_stats,
)
from tests.servers import wait_until

# Load and timing tests: run alone, after the parallel run (Makefile `test`).
pytestmark = pytest.mark.serial

HUGE_CHUNK = 4 * 1024 * 1024
HALF_SSE_LINE = 'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel'
HTML_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>\n"
JSON_ERROR_EVENT = ('data: {"error":{"message":"The server is overloaded, please retry.",'
                    '"type":"server_error","code":"overloaded"}}\n\n')


@dataclass(frozen=True)
class Fault:
    """One cell: what the upstream does, and what the client must see (code None: the whole answer)."""

    name: str
    behaviour: dict[str, Any]
    status: int
    code: str | None
    within: float  # seconds from request to the end of the stream, generous for a loaded CI box
    contents: list[str] | None = None  # the content records expected before the error, when known
    message_has: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


FAULTS = (
    Fault("accepts_never_answers", {"never_answer": True}, 504, "upstream_timeout", 4.0,
          message_has="did not answer in time"),
    Fault("headers_later_than_upstream_timeout", {"headers_delay": 3.0}, 504, "upstream_timeout", 4.0),
    Fault("headers_then_stalls_forever", {"stall_after_headers": True}, 200, "upstream_timeout", 5.5,
          contents=[], message_has="did not start answering"),
    Fault("half_sse_line_then_closes", {"raw_body": HALF_SSE_LINE}, 200, "upstream_disconnected", 3.0,
          contents=[], message_has="incomplete"),
    Fault("closes_mid_stream", {"disconnect_after": 2}, 200, "upstream_disconnected", 3.0,
          contents=["Hello", " from"], message_has="incomplete"),
    Fault("resets_mid_stream", {"reset_after": 2}, 200, "upstream_disconnected", 3.0,
          contents=["Hello", " from"], message_has="incomplete"),
    Fault("garbage_event", {"raw_body": "data: \u0000\u00ff not json at all }{\n\n"}, 200, "upstream_malformed",
          3.0, contents=[], message_has="malformed"),
    Fault("malformed_event_mid_stream", {"malformed_after": 2}, 200, "upstream_malformed", 3.0,
          contents=["Hello", " from"], message_has="malformed"),
    Fault("not_sse_at_all", {"raw_body": "lorem ipsum\nthis is no event stream\n"}, 200, "upstream_disconnected",
          3.0, contents=[]),
    Fault("html_page_in_a_200_stream", {"raw_body": HTML_PAGE}, 200, "upstream_disconnected", 3.0, contents=[]),
    Fault("html_error_page", {"status": 502, "error_raw_body": HTML_PAGE}, 502, "upstream_error", 3.0,
          message_has="HTTP 502"),
    Fault("json_error_inside_200_stream", {"raw_body": JSON_ERROR_EVENT}, 200, "upstream_error", 3.0,
          contents=[], message_has="overloaded"),
    Fault("enormous_single_chunk", {"huge_chunk_bytes": HUGE_CHUNK}, 200, None, 10.0,
          contents=["x" * HUGE_CHUNK]),
    Fault("first_token_slower_than_upstream_timeout", {"first_token_delay": 1.6}, 200, None, 4.0,
          contents=["Hello", " from", " the", " fake", " upstream", "."]),
    Fault("first_token_slower_than_first_token_timeout", {"first_token_delay": 4.0}, 200, "upstream_timeout",
          4.5, contents=[], message_has="did not start answering"),
    Fault("silent_mid_stream", {"n_tokens": 3, "token_interval": 4.0}, 200, "upstream_timeout", 3.5,
          contents=[" tok0"], message_has="went silent"),
    Fault("endless_stream", {"n_tokens": 10_000, "token_interval": 0.2}, 200, "stream_time_limit", 6.0,
          message_has="ran past"),
)


@pytest.fixture(scope="module")
def fault_relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    return relay_factory(**FAULT_SETTINGS)


def check_fault_outcome(endpoint: StreamEndpoint, relay: RelayProcess, fault: Fault) -> None:
    outcome = endpoint.request(relay, fake_says(fault.behaviour))
    assert outcome.elapsed < fault.within, f"took {outcome.elapsed:.1f} s, bound {fault.within} s"
    streams_errors = endpoint.ok_status != 200  # /ws: every error comes inside the answer's frame
    assert outcome.status == (endpoint.ok_status if streams_errors else fault.status), outcome.raw[:500]
    assert outcome.ends == 1 and outcome.last_is_end, f"no proper end: {outcome.raw[-300:]!r}"
    if fault.contents is not None:  # the text in order (/ws may join deltas that arrive together)
        assert outcome.text == "".join(fault.contents)
    if fault.code is None:
        assert outcome.errors == []
    else:
        assert [error["code"] for error in outcome.errors] == [fault.code], outcome.errors
        message = outcome.errors[0]["message"]
        assert fault.message_has in message
        assert "Traceback" not in message and "httpx" not in message.lower()
    if fault.status != 200 and not streams_errors:
        assert outcome.headers["content-type"].startswith(endpoint.error_content_type)
    assert_no_secrets(outcome.raw, f"the answer to {fault.name}")


def on_every_endpoint(check: Callable[[StreamEndpoint], object]) -> None:
    """Run `check` for every streaming endpoint at once (each fault waits on the relay's timers, not on the
    CPU: side by side the matrix takes the time of its slowest cell, not of the four); fail naming the
    endpoints whose check failed."""
    with ThreadPoolExecutor(len(ALL_STREAM_ENDPOINTS)) as pool:
        futures = {endpoint.name: pool.submit(check, endpoint) for endpoint in ALL_STREAM_ENDPOINTS}
    failures = {name: future.exception() for name, future in futures.items() if future.exception() is not None}
    if failures:
        raise AssertionError("; ".join(f"{name}: {error!r}" for name, error in failures.items()))


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_upstream_fault(fault: Fault, fault_relay: RelayProcess) -> None:
    """On every endpoint, the fault ends in a clear error (or the full answer) in bounded time, then a normal
    answer, no leaks."""
    on_every_endpoint(lambda endpoint: healthy_answer(endpoint, fault_relay))  # warm: pooled connections
    before = worker_stats(fault_relay)
    on_every_endpoint(lambda endpoint: check_fault_outcome(endpoint, fault_relay, fault))
    on_every_endpoint(lambda endpoint: healthy_answer(endpoint, fault_relay))
    # The endpoints ran side by side, so each may leave one idle upstream connection in the pool.
    assert_settles(fault_relay, before, pooled=len(ALL_STREAM_ENDPOINTS))


@pytest.fixture(scope="module")
def refused_relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    """A relay whose upstream is a port nobody listens on."""
    return relay_factory(OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1", **FAULT_SETTINGS)


@pytest.mark.parametrize("endpoint", ALL_STREAM_ENDPOINTS, ids=str)
def test_upstream_refuses_connections(endpoint: StreamEndpoint, refused_relay: RelayProcess) -> None:
    """An upstream port nobody listens on: 502 upstream_unreachable at once, every time, no leaks."""
    relay = refused_relay
    assert httpx2.get(f"{relay.url}/healthz", timeout=5).status_code == 200
    # Warm, as the matrix does: the first connection attempt starts gevent's resolver thread (and its
    # greenlets), which would otherwise count as held until it idles out seconds later.
    endpoint.request(relay, "hello")
    before = worker_stats(relay)
    for _ in range(3):
        outcome = endpoint.request(relay, "hello")
        assert outcome.elapsed < 2.0
        assert outcome.status == (502 if endpoint.ok_status == 200 else endpoint.ok_status)
        assert outcome.ends == 1 and outcome.last_is_end
        assert [error["code"] for error in outcome.errors] == ["upstream_unreachable"]
        assert "could not reach the upstream" in outcome.errors[0]["message"]
    assert httpx2.get(f"{relay.url}/healthz", timeout=5).status_code == 200
    assert_settles(relay, before)


def test_fault_logs_hold_no_keys(fault_relay: RelayProcess) -> None:
    """After faults (those of the matrix when it ran first, and one of its own on every endpoint, so the test
    holds in any order and alone), the relay's log names outcomes but holds neither key nor a traceback."""
    closes = next(fault for fault in FAULTS if fault.name == "closes_mid_stream")
    on_every_endpoint(lambda endpoint: check_fault_outcome(endpoint, fault_relay, closes))
    assert wait_until(lambda: fault_relay.log_text().count("outcome=upstream_disconnected") >= 3), (
        "an access line for each disconnected HTTP stream")
    log = fault_relay.log_text()
    assert_no_secrets(log, "the relay's log")
    assert "Traceback" not in log
    assert "outcome=upstream_disconnected" in log or "outcome=ok" in log
