"""The upstream fault matrix: every way the upstream can misbehave, on every streaming endpoint.

Each cell asserts: a clear error record (or, where the fault is survivable, the complete answer) and a
proper end of stream within a bounded time; the relay answers the next request normally; and the gunicorn
worker holds no more greenlets, threads, sockets, descriptors or upstream readers than before the fault.

The forwarded streams (`POST /v1/responses` and Anthropic's `POST /v1/messages` with `stream: true`, bytes
relayed by proxy/forwarding.py) run every cell side by side with chat's endpoints, on a relay of their own
whose UPSTREAMS_FILE names the fake for both protocols; their errors are their protocol's own (a Responses
`error` event, an Anthropic `error` event, JSON error bodies before the stream), and an upstream's own JSON
error passes on as it came (`Fault.forwarded`). With a second upstream, every fault before the answer's
headers falls over to it and the client sees the whole answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest

from tests.conftest import RelayProcess, free_port
from tests.fake_upstream import FakeUpstream
from tests.hardening import (
    ALL_STREAM_ENDPOINTS,
    FAULT_SETTINGS,
    FORWARDED_STREAM_ENDPOINTS,
    StreamEndpoint,
    assert_no_secrets,
    assert_settles,
    fake_says,
    forwarding_settings,
    forwarding_upstreams,
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
UPSTREAMS_OWN = "(the upstream's own)"  # a forwarded error's code: whatever the upstream's error body says


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
    forwarded: dict[str, Any] = field(default_factory=dict)  # what forwarded streams see instead, if other
    heavy: bool = False  # CPU-bound: chat's endpoints and the forwarded ones take turns (a loaded 2-core box)

    def on(self, endpoint: StreamEndpoint) -> Fault:
        """The cell as `endpoint` must see it."""
        return dataclasses.replace(self, **self.forwarded) if endpoint.forwarded else self


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
          contents=[], message_has="overloaded", forwarded={"code": UPSTREAMS_OWN}),  # passed on
    Fault("server_error_json", {"status": 500}, 502, "upstream_error", 3.0, message_has="HTTP 500",
          forwarded={"status": 500, "code": UPSTREAMS_OWN, "message_has": "told to fail"}),
    Fault("rate_limited_json", {"status": 429, "retry_after": "7"}, 429, "upstream_rate_limited", 3.0,
          message_has="rate limiting",
          forwarded={"code": UPSTREAMS_OWN, "message_has": "told to fail", "extra": {"retry-after": "7"}}),
    Fault("enormous_single_chunk", {"huge_chunk_bytes": HUGE_CHUNK}, 200, None, 10.0,
          contents=["x" * HUGE_CHUNK], heavy=True),
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


def root_of(fake: FakeUpstream) -> str:
    return f"http://{fake.host}:{fake.port}"


@pytest.fixture(scope="module")
def forwarding_relay(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
                     tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    """The fault settings, the fake as the one OpenAI upstream and the one Anthropic-protocol upstream."""
    path = tmp_path_factory.mktemp("forwarding") / "upstreams.toml"
    path.write_text(forwarding_upstreams([fake.base_url], [root_of(fake)]))
    return relay_factory(**FAULT_SETTINGS, **forwarding_settings(str(path)))


@pytest.fixture(scope="module")
def relays(fault_relay: RelayProcess, forwarding_relay: RelayProcess) -> dict[str, RelayProcess]:
    """Which relay each endpoint of the matrix is asked on."""
    return {endpoint.name: forwarding_relay if endpoint.forwarded else fault_relay for endpoint in MATRIX}


MATRIX = (*ALL_STREAM_ENDPOINTS, *FORWARDED_STREAM_ENDPOINTS)


def check_fault_outcome(endpoint: StreamEndpoint, relay: RelayProcess, cell: Fault) -> None:
    fault = cell.on(endpoint)
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
        codes = [error["code"] for error in outcome.errors]
        wanted = codes[:1] if fault.code == UPSTREAMS_OWN else [endpoint.code_of(fault.code)]
        assert len(codes) == 1 and codes == wanted, outcome.errors
        message = outcome.errors[0]["message"]
        assert fault.message_has in message
        assert "Traceback" not in message and "httpx" not in message.lower()
    if fault.status != 200 and not streams_errors:
        assert outcome.headers["content-type"].startswith(endpoint.error_content_type)
    for name, value in fault.extra.items():
        assert outcome.headers.get(name) == value, name
    assert_no_secrets(outcome.raw, f"the answer to {fault.name}")


def on_every_endpoint(check: Callable[[StreamEndpoint, RelayProcess], object], relays: dict[str, RelayProcess],
                      endpoints: tuple[StreamEndpoint, ...] = MATRIX) -> None:
    """Run `check` for every streaming endpoint at once, each on its relay (each fault waits on the relay's
    timers, not on the CPU: side by side the matrix takes the time of its slowest cell, not of the six);
    fail naming the endpoints whose check failed."""
    with ThreadPoolExecutor(len(endpoints)) as pool:
        futures = {endpoint.name: pool.submit(check, endpoint, relays[endpoint.name]) for endpoint in endpoints}
    failures = {name: future.exception() for name, future in futures.items() if future.exception() is not None}
    if failures:
        raise AssertionError("; ".join(f"{name}: {error!r}" for name, error in failures.items()))


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_upstream_fault(fault: Fault, relays: dict[str, RelayProcess], fault_relay: RelayProcess,
                        forwarding_relay: RelayProcess) -> None:
    """On every endpoint, the fault ends in a clear error (or the full answer) in bounded time, then a normal
    answer, no leaks."""
    on_every_endpoint(healthy_answer, relays)  # warm: pooled connections
    before = worker_stats(fault_relay), worker_stats(forwarding_relay)
    for group in (ALL_STREAM_ENDPOINTS, FORWARDED_STREAM_ENDPOINTS) if fault.heavy else (MATRIX,):
        on_every_endpoint(lambda endpoint, relay: check_fault_outcome(endpoint, relay, fault), relays, group)
    on_every_endpoint(healthy_answer, relays)
    # The endpoints ran side by side, so each may leave one idle upstream connection in the pool.
    assert_settles(fault_relay, before[0], pooled=len(ALL_STREAM_ENDPOINTS))
    assert_settles(forwarding_relay, before[1], pooled=len(FORWARDED_STREAM_ENDPOINTS))


@pytest.fixture(scope="module")
def refused_relays(relay_factory: Callable[..., RelayProcess], tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, RelayProcess]:
    """Relays whose upstreams (OpenAI's; OpenAI's and Anthropic's in an UPSTREAMS_FILE) are a port nobody
    listens on, by endpoint."""
    dead = f"http://127.0.0.1:{free_port()}"
    chat = relay_factory(OPENAI_BASE_URL=f"{dead}/v1", **FAULT_SETTINGS)
    path = tmp_path_factory.mktemp("refused") / "upstreams.toml"
    path.write_text(forwarding_upstreams([f"{dead}/v1"], [dead]))
    forwarded = relay_factory(**FAULT_SETTINGS, **forwarding_settings(str(path)))
    return {endpoint.name: forwarded if endpoint.forwarded else chat for endpoint in MATRIX}


@pytest.mark.parametrize("endpoint", MATRIX, ids=str)
def test_upstream_refuses_connections(endpoint: StreamEndpoint, refused_relays: dict[str, RelayProcess]) -> None:
    """An upstream port nobody listens on: 502 upstream_unreachable at once, every time, no leaks."""
    relay = refused_relays[endpoint.name]
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
        assert [error["code"] for error in outcome.errors] == [endpoint.code_of("upstream_unreachable")]
        assert "could not reach the upstream" in outcome.errors[0]["message"]
    assert httpx2.get(f"{relay.url}/healthz", timeout=5).status_code == 200
    assert_settles(relay, before)


def test_fault_logs_hold_no_keys(relays: dict[str, RelayProcess], fault_relay: RelayProcess,
                                forwarding_relay: RelayProcess) -> None:
    """After faults (those of the matrix when it ran first, and one of its own on every endpoint, so the test
    holds in any order and alone), the relays' logs name outcomes but hold neither key nor a traceback."""
    closes = next(fault for fault in FAULTS if fault.name == "closes_mid_stream")
    on_every_endpoint(lambda endpoint, relay: check_fault_outcome(endpoint, relay, closes), relays)
    assert wait_until(lambda: fault_relay.log_text().count("outcome=upstream_disconnected") >= 3), (
        "an access line for each disconnected HTTP stream")
    assert wait_until(lambda: forwarding_relay.log_text().count("outcome=upstream_disconnected") >= 2), (
        "an access line for each disconnected forwarded stream")
    for relay in (fault_relay, forwarding_relay):
        log = relay.log_text()
        assert_no_secrets(log, "the relay's log")
        assert "Traceback" not in log


# --- fall-over of the forwarded streams ------------------------------------------------------------------------

FALL_OVER_FAULTS = (
    # (a late answer's headers take the same path as no answer at all: UPSTREAM_TIMEOUT at open)
    Fault("accepts_never_answers", {"never_answer": True}, 200, None, 3.0),
    Fault("server_error_json", {"status": 500}, 200, None, 3.0),
    Fault("html_error_page", {"status": 502, "error_raw_body": HTML_PAGE}, 200, None, 3.0),
    Fault("rate_limited", {"status": 429, "retry_after": "30"}, 200, None, 3.0),
    # After the headers, before the first token (what the faulty upstream sent is held back, then dropped):
    Fault("closes_before_the_first_token", {"disconnect_after": 0}, 200, None, 3.0),
    Fault("resets_before_the_first_token", {"reset_after": 0}, 200, None, 3.0),
    Fault("malformed_first_event", {"malformed_after": 0}, 200, None, 3.0),
    Fault("half_sse_line_then_closes", {"raw_body": HALF_SSE_LINE}, 200, None, 3.0),
    Fault("html_page_in_a_200_stream", {"raw_body": HTML_PAGE}, 200, None, 3.0),
    Fault("error_event_in_a_200_stream", {"raw_body": JSON_ERROR_EVENT}, 200, None, 3.0),
)


@pytest.fixture(scope="module")
def faulty() -> Iterator[FakeUpstream]:
    """A second fake upstream, told how to fail by each test."""
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def fall_over_relay(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream, faulty: FakeUpstream,
                    tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    """For each protocol three upstreams in order: a port nobody listens on, the faulty fake, the fake."""
    dead = f"http://127.0.0.1:{free_port()}"
    path = tmp_path_factory.mktemp("fall-over") / "upstreams.toml"
    path.write_text(forwarding_upstreams([f"{dead}/v1", faulty.base_url, fake.base_url],
                                         [dead, root_of(faulty), root_of(fake)]))
    return relay_factory(**FAULT_SETTINGS, **forwarding_settings(str(path)))


@pytest.mark.parametrize("fault", FALL_OVER_FAULTS, ids=lambda fault: fault.name)
def test_forwarded_streams_fall_over_before_the_answer(fault: Fault, faulty: FakeUpstream,
                                                       fall_over_relay: RelayProcess) -> None:
    """A refused connection, then any fault before the answer's first token (no answer, late headers, 5xx,
    an HTML error page, 429; after the headers a broken, malformed or failed stream): the next upstream
    answers and the client sees only its whole answer, no leaks."""
    relays = dict.fromkeys((endpoint.name for endpoint in FORWARDED_STREAM_ENDPOINTS), fall_over_relay)
    faulty.reset()
    on_every_endpoint(healthy_answer, relays, FORWARDED_STREAM_ENDPOINTS)  # warm
    before = worker_stats(fall_over_relay)
    faulty.behave(**fault.behaviour)

    def check(endpoint: StreamEndpoint, relay: RelayProcess) -> None:
        outcome = healthy_answer(endpoint, relay)
        assert outcome.elapsed < fault.within, f"took {outcome.elapsed:.1f} s, bound {fault.within} s"

    earlier = len(fall_over_relay.log_text().splitlines())
    on_every_endpoint(check, relays, FORWARDED_STREAM_ENDPOINTS)
    paths = {request.path.split("?")[0] for request in faulty.requests}
    assert {"/v1/responses", "/v1/messages"} <= paths, "the faulty upstream was asked first"

    def logged() -> list[str]:  # each answer's access line names the third upstream, after two fall-overs
        return [line for line in fall_over_relay.log_text().splitlines()[earlier:]
                if "upstream=" in line and "fallbacks=2 outcome=ok" in line]
    assert wait_until(lambda: {"upstream=openai-2", "upstream=anthropic-2"} <= {
        word for line in logged() for word in line.split()}), fall_over_relay.log_text()[-3000:]
    faulty.reset()
    assert_settles(fall_over_relay, before, pooled=2 * len(FORWARDED_STREAM_ENDPOINTS))
