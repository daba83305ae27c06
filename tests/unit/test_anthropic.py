"""Anthropic's Messages API, fast: the caller rule (x-api-key, Bearer, `key`), usage read from Messages events
and answers, the SSE loop in Anthropic's dialect on a fake clock, the error shapes, and the route in-process."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from flask.testing import FlaskClient

from proxy import create_app
from proxy.errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    RateLimited,
    RelayError,
    Unauthorized,
    UpstreamFailed,
    UpstreamTimeout,
    error_body,
    unknown_endpoint,
)
from proxy.forwarding import (
    ANTHROPIC,
    ANTHROPIC_PING,
    AnthropicSseUsage,
    JsonUsage,
    anthropic_usage,
    relay_sse,
)
from proxy.pump import StreamStats
from proxy.upstream import AnthropicUpstream, StreamEnd, StreamFailure
from tests.conftest import ACCESS_KEY, SECOND_ACCESS_KEY, UPSTREAM_KEY
from tests.unit.conftest import bearer, unit_config
from tests.unit.test_passthrough import TIMERS, ScriptedSource

MODEL = "claude-sonnet-4-5"
LIMITED_KEY = "limited-anthropic-key-6b1e0f"
BODY = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "Hello"}]}


def event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + orjson.dumps(payload) + b"\n\n"


START = event("message_start", {"type": "message_start", "message": {
    "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": MODEL, "stop_reason": None,
    "usage": {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 4,
              "cache_read_input_tokens": 3}}})
DELTA = event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": "Hi"}})
FINAL = event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 7}})
STOP = event("message_stop", {"type": "message_stop"})


# --- usage -----------------------------------------------------------------------------------------------------

def test_usage_counts_cache_tokens_as_prompt() -> None:
    """input_tokens plus the cache's read and written tokens are the prompt; output_tokens the completion."""
    assert anthropic_usage({"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 4,
                            "cache_read_input_tokens": 3}) == {"prompt_tokens": 17, "completion_tokens": 5,
                                                               "total_tokens": 22, "cached_tokens": 3}
    assert anthropic_usage({"output_tokens": 2}) == {"prompt_tokens": 0, "completion_tokens": 2, "total_tokens": 2}
    assert anthropic_usage({"service_tier": "standard"}) is None
    assert anthropic_usage(None) is None


def test_stream_usage_from_message_start_and_the_last_message_delta() -> None:
    """message_start gives the input, the last message_delta the output (cumulative), fed in any split."""
    usage = AnthropicSseUsage()
    assert usage.usage is None
    usage.feed(START + DELTA)
    assert usage.usage == {"prompt_tokens": 17, "completion_tokens": 1, "total_tokens": 18, "cached_tokens": 3}
    usage.feed(FINAL + STOP)
    assert usage.usage == {"prompt_tokens": 17, "completion_tokens": 7, "total_tokens": 24, "cached_tokens": 3}
    usage.feed(event("message_delta", {"type": "message_delta", "usage": {"input_tokens": 20, "output_tokens": 9}}))
    assert usage.usage == {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}


def test_stream_usage_ignores_other_events_and_garbage() -> None:
    """A text delta that mentions "usage", a malformed event and an error event change nothing."""
    usage = AnthropicSseUsage()
    usage.feed(event("content_block_delta", {"type": "content_block_delta",
                                             "delta": {"type": "text_delta", "text": '"usage": 99'}}))
    usage.feed(b'event: message_delta\ndata: {"usage": \n\n')
    usage.feed(event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "usage"}}))
    assert usage.usage is None


def test_whole_answer_usage() -> None:
    """A non-streaming message's `usage` is read by JsonUsage with Anthropic's reading."""
    reader = JsonUsage(anthropic_usage)
    reader.feed(orjson.dumps({"type": "message", "content": [], "usage": {"input_tokens": 12, "output_tokens": 6}}))
    assert reader.usage() == {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}


# --- the SSE loop in Anthropic's dialect -----------------------------------------------------------------------

def run(script: list[tuple[float, object]]) -> tuple[list[bytes], StreamStats]:
    source = ScriptedSource(script)
    stats = StreamStats()
    return [part for part in relay_sse(source, TIMERS, stats, clock=source.clock, dialect=ANTHROPIC) if part], stats


def test_silence_gets_ping_events_and_usage_is_charged() -> None:
    """A silence gets `ping` events (never SSE comments); the output tokens are the stream's tokens.
    message_start waits for the first text (held back for a fall-over), pings go out meanwhile; the first
    text goes out before the events that came with it are checked."""
    out, stats = run([(0.1, START), (2.5, DELTA + FINAL + STOP), (2.6, StreamEnd())])
    assert out == [ANTHROPIC_PING, ANTHROPIC_PING, START + DELTA, FINAL + STOP]
    assert ANTHROPIC_PING == b'event: ping\ndata: {"type": "ping"}\n\n'
    assert stats.outcome == "ok" and stats.tokens == 7 and stats.usage is not None
    assert stats.usage["prompt_tokens"] == 17


@pytest.mark.parametrize(("script", "kind", "error_type", "message"), [
    ([(0.1, START), (0.2, StreamFailure("upstream_disconnected", "it broke"))], "upstream_disconnected",
     "api_error", "it broke"),
    # message_start (and pings) are the stream's opening, not its first token: the first-token timer runs.
    ([(0.1, START), (3.0, ANTHROPIC_PING)], "upstream_timeout", "timeout_error",
     "the upstream did not start answering within 10 s"),
    ([(0.1, START + DELTA)], "upstream_timeout", "timeout_error",
     "the upstream went silent for 5 s mid-answer; the answer is incomplete"),
    ([(0.1, START + DELTA), (0.2, StreamEnd())], "upstream_disconnected", "api_error",
     "the upstream's answer ended before it was complete; the answer is incomplete"),
    ([(0.1, START + b"event: content_block_delta\ndata: {nope\n\n" + STOP)], "upstream_malformed", "api_error",
     "the upstream sent a malformed event; the answer is incomplete"),
])
def test_a_cut_stream_ends_with_an_anthropic_error_event(script: list[tuple[float, object]], kind: str,
                                                         error_type: str, message: str) -> None:
    """A broken upstream, a timer, a body ending before `message_stop` or a malformed event end the stream
    with Anthropic's `error` event (timeout_error for the timers, else api_error)."""
    out, stats = run(script)
    payload = {"type": "error", "error": {"type": error_type, "message": message}}
    assert out[-1] == b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
    assert stats.outcome == kind


# --- error shapes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "error_type"), [
    (BadRequest(), "invalid_request_error"), (Unauthorized(), "authentication_error"),
    (Forbidden(), "permission_error"), (unknown_endpoint("/v1/messages/x"), "not_found_error"),
    (PayloadTooLarge(), "request_too_large"), (RateLimited(), "rate_limit_error"),
    (RelayError(), "api_error"), (UpstreamFailed(), "api_error"), (UpstreamTimeout(), "timeout_error"),
])
def test_error_shapes(error: RelayError, error_type: str) -> None:
    """Each status has Anthropic's error type in Anthropic's body shape."""
    body, mimetype = error_body(error, "anthropic")
    assert mimetype == "application/json"
    assert orjson.loads(body) == {"type": "error", "error": {"type": error_type, "message": str(error.description)}}


# --- the route and the caller, in-process ----------------------------------------------------------------------

class Upstream(httpx2.BaseTransport):
    """An in-process Anthropic upstream: records requests, answers a message (or a queued status and body)."""

    def __init__(self) -> None:
        self.seen: list[httpx2.Request] = []
        self.answers: list[tuple[int, Any, dict[str, str]]] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        self.seen.append(request)
        if self.answers:
            status, payload, headers = self.answers.pop(0)
            return httpx2.Response(status, json=payload, headers=headers, request=request)
        return httpx2.Response(200, json={"type": "message", "content": [{"type": "text", "text": "Hi"}],
                                          "usage": {"input_tokens": 3, "output_tokens": 2}}, request=request)


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


def messages_client(upstream: Upstream, **overrides: Any) -> FlaskClient:
    app = create_app(unit_config(**overrides))
    relay = app.extensions["relay"]
    target = AnthropicUpstream("anthropic", "http://anthropic.invalid/root", httpx2.Client(transport=upstream),
                               UPSTREAM_KEY, ("claude-*",))
    # The chat upstream serves gpt-* only, so other models are nobody's (a gpt-* model would be bridged).
    chat = tuple(dataclasses.replace(chat, models=("gpt-*",)) for chat in relay.upstreams)
    app.extensions["relay"] = dataclasses.replace(relay, upstreams=chat, anthropic_upstreams=(target,))
    return app.test_client()


@pytest.mark.parametrize("headers", [{"x-api-key": ACCESS_KEY}, bearer(), {"x-api-key": ACCESS_KEY, **bearer()}])
def test_key_as_x_api_key_or_bearer(upstream: Upstream, headers: dict[str, str]) -> None:
    """x-api-key, Bearer, or both naming the same key: accepted; the upstream gets only its own key."""
    answer = messages_client(upstream).post("/v1/messages?beta=true", json=BODY, headers=headers)
    assert answer.status_code == 200 and answer.json["content"][0]["text"] == "Hi"  # type: ignore[index]
    seen = upstream.seen[0]
    assert str(seen.url) == "http://anthropic.invalid/root/v1/messages?beta=true"
    assert seen.headers["x-api-key"] == UPSTREAM_KEY and "authorization" not in seen.headers
    assert seen.headers["anthropic-version"] == "2023-06-01"


@pytest.mark.parametrize(("headers", "query"), [
    ({"x-api-key": ACCESS_KEY, **bearer(SECOND_ACCESS_KEY)}, ""),
    ({"x-api-key": ACCESS_KEY}, f"?key={SECOND_ACCESS_KEY}"),
    ({"x-api-key": "wrong-key"}, ""),
    ({}, ""),
])
def test_missing_wrong_or_conflicting_keys_are_401(upstream: Upstream, headers: dict[str, str], query: str) -> None:
    """Two sources naming different keys, a wrong key or none: 401 authentication_error, upstream unasked."""
    answer = messages_client(upstream).post(f"/v1/messages{query}", json=BODY, headers=headers)
    assert answer.status_code == 401
    assert answer.json["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert not upstream.seen


def test_x_api_key_works_on_openai_routes_too(upstream: Upstream) -> None:
    """The caller rule is the pipeline's: x-api-key identifies the caller on every keyed endpoint."""
    client = messages_client(upstream)
    assert client.get("/v1/models/gpt-4o-mini", headers={"x-api-key": ACCESS_KEY}).status_code == 200
    assert client.get("/v1/models/gpt-4o-mini", headers={"x-api-key": "wrong-key"}).status_code == 401


@pytest.mark.parametrize(("body", "status", "error_type"), [
    ({**BODY, "model": "llama-3-70b"}, 404, "not_found_error"),
    ({"max_tokens": 1}, 400, "invalid_request_error"),
    ({**BODY, "pad": "x" * 3000}, 413, "request_too_large"),
])
def test_refusals_before_the_upstream(upstream: Upstream, body: dict[str, Any], status: int,
                                      error_type: str) -> None:
    """An unserved model (named), no model, a body over MAX_BODY_BYTES: Anthropic-shaped, upstream unasked."""
    answer = messages_client(upstream, max_body_bytes=2000).post("/v1/messages", json=body,
                                                                 headers={"x-api-key": ACCESS_KEY})
    assert answer.status_code == status
    assert answer.json["type"] == "error" and answer.json["error"]["type"] == error_type  # type: ignore[index]
    if status == 404:
        assert "llama-3-70b" in answer.json["error"]["message"]  # type: ignore[index]
    assert not upstream.seen


def test_rate_limit_is_429_with_retry_after(upstream: Upstream) -> None:
    """The pipeline's own rate limit answers in Anthropic's shape with Retry-After."""
    client = messages_client(upstream, rate_limit_per_minute=1)
    assert client.post("/v1/messages", json=BODY, headers={"x-api-key": ACCESS_KEY}).status_code == 200
    refused = client.post("/v1/messages", json=BODY, headers={"x-api-key": ACCESS_KEY})
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    assert refused.json["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_upstream_error_passes_through_redacted(upstream: Upstream) -> None:
    """An upstream 529 comes back as it was sent, with the relay's secrets taken out."""
    upstream.answers.append((529, {"type": "error", "error": {"type": "overloaded_error",
                                                              "message": f"busy {UPSTREAM_KEY}"}}, {}))
    answer = messages_client(upstream).post("/v1/messages", json=BODY, headers={"x-api-key": ACCESS_KEY})
    assert answer.status_code == 529 and answer.json["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert UPSTREAM_KEY not in answer.get_data(as_text=True)


def test_model_outside_the_key_s_models_is_permission_error(upstream: Upstream, tmp_path: Path) -> None:
    """A key whose KEYS_FILE `models` leave the model out gets 403 permission_error; the upstream is unasked."""
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.limited]\nkey = "{LIMITED_KEY}"\nmodels = ["claude-haiku-*"]\n')
    answer = messages_client(upstream, keys_file=keys).post("/v1/messages", json=BODY,
                                                            headers={"x-api-key": LIMITED_KEY})
    assert answer.status_code == 403
    assert answer.json["error"]["type"] == "permission_error"  # type: ignore[index]
    assert MODEL in answer.json["error"]["message"] and not upstream.seen  # type: ignore[index]
