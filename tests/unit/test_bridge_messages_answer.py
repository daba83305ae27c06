"""The non-streaming chat completion -> Anthropic message mapping (proxy/bridge/messages_answer.py) and the
upstream error -> Messages status table (proxy/bridge/messages_errors.py)."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import pytest

from proxy.bridge.messages_answer import to_anthropic_message, tool_input
from proxy.bridge.messages_errors import client_status
from proxy.errors import anthropic_error_type

USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def completion(message: dict[str, Any], finish: str | None = "stop", usage: dict[str, Any] | None = USAGE,
               **choice: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "up",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, **choice}],
            "usage": usage}


WEATHER_CALL = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}


@pytest.mark.parametrize(("answer", "content", "stop_reason"), [
    (completion({"content": "Hello."}), [{"type": "text", "text": "Hello."}], "end_turn"),
    (completion({"content": None, "tool_calls": [WEATHER_CALL]}, "tool_calls"),
     [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}], "tool_use"),
    (completion({"content": "Let me check.", "tool_calls": [WEATHER_CALL]}, "stop"),
     [{"type": "text", "text": "Let me check."},
      {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}], "tool_use"),
    (completion({"content": "Cut", "reasoning_content": "Hmm."}, "length"),
     [{"type": "thinking", "thinking": "Hmm.", "signature": ""}, {"type": "text", "text": "Cut"}], "max_tokens"),
    (completion({"content": ""}), [], "end_turn"),
    (completion({"content": "no"}, "content_filter"), [{"type": "text", "text": "no"}], "refusal"),
])
def test_answers_map_to_messages(answer: dict[str, Any], content: list[dict[str, Any]], stop_reason: str) -> None:
    """Text, tool calls (input parsed; tool calls mean tool_use whatever the finish reason), reasoning as a
    thinking block, length as max_tokens, an empty answer as no blocks."""
    message = to_anthropic_message(answer, "claude-x")
    assert message["content"] == content and message["stop_reason"] == stop_reason
    assert message["type"] == "message" and message["role"] == "assistant" and message["model"] == "claude-x"
    assert message["id"].startswith("msg_")


@pytest.mark.parametrize(("usage", "expected"), [
    (USAGE, {"input_tokens": 12, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}),
    ({**USAGE, "prompt_tokens_details": {"cached_tokens": 10}},
     {"input_tokens": 2, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 10}),
    ({**USAGE, "prompt_cache_hit_tokens": 4},
     {"input_tokens": 8, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4}),
    (None, {"input_tokens": 0, "output_tokens": 0}),
])
def test_usage_maps(usage: dict[str, Any] | None, expected: dict[str, int]) -> None:
    """Prompt tokens minus the cached ones are input tokens, the cached ones cache reads (as Anthropic counts)."""
    assert to_anthropic_message(completion({"content": "x"}, usage=usage), "m")["usage"] == expected


def test_a_matched_stop_sequence_is_reported_when_the_upstream_names_it() -> None:
    """vLLM names the stop string it matched: that is Anthropic's stop_sequence; otherwise end_turn."""
    named = to_anthropic_message(completion({"content": "a"}, stop_reason="END"), "m", ["END"])
    assert (named["stop_reason"], named["stop_sequence"]) == ("stop_sequence", "END")
    unnamed = to_anthropic_message(completion({"content": "a"}), "m", ["END"])
    assert (unnamed["stop_reason"], unnamed["stop_sequence"]) == ("end_turn", None)


@pytest.mark.parametrize(("arguments", "expected"), [
    ('{"a": 1}', {"a": 1}), ("", {}), ("not json", {}), ("[1]", {}), ({"a": 2}, {"a": 2}), (None, {}),
])
def test_tool_input_is_an_object(arguments: Any, expected: dict[str, Any]) -> None:
    """Arguments become the `input` object; anything but a JSON object becomes {}."""
    assert tool_input(arguments) == expected


def test_a_malformed_answer_is_an_empty_message() -> None:
    """An answer without choices maps to an empty end_turn message, never an exception."""
    assert to_anthropic_message({"usage": None}, "m")["content"] == []


# (relay error kind, relay status, upstream status) -> the client's status, its Anthropic type, the SDK class
ERRORS = [
    ("upstream_bad_request", 400, 400, 400, "invalid_request_error", anthropic.BadRequestError),
    ("upstream_bad_request", 400, 422, 400, "invalid_request_error", anthropic.BadRequestError),
    ("context_too_long", 400, 400, 400, "invalid_request_error", anthropic.BadRequestError),
    ("context_too_long", 400, 413, 400, "invalid_request_error", anthropic.BadRequestError),
    ("model_not_found", 400, 404, 404, "not_found_error", anthropic.NotFoundError),
    ("upstream_error", 502, 413, 413, "request_too_large", anthropic.ContentTooLargeError),
    ("upstream_rate_limited", 429, 429, 429, "rate_limit_error", anthropic.RateLimitError),
    ("upstream_error", 502, 500, 502, "api_error", anthropic.InternalServerError),
    ("upstream_error", 502, 503, 503, "overloaded_error", anthropic.ServiceUnavailableError),
    ("upstream_error", 502, 529, 529, "overloaded_error", anthropic.OverloadedError),
    ("upstream_auth", 502, 401, 502, "api_error", anthropic.InternalServerError),
    ("upstream_auth", 502, 403, 502, "api_error", anthropic.InternalServerError),
    ("upstream_timeout", 504, None, 504, "timeout_error", anthropic.InternalServerError),
    ("upstream_unreachable", 502, None, 502, "api_error", anthropic.InternalServerError),
]


@pytest.mark.parametrize(("kind", "status", "upstream", "client", "error_type", "sdk_class"), ERRORS)
def test_upstream_errors_keep_their_meaning(kind: str, status: int, upstream: int | None, client: int,
                                           error_type: str, sdk_class: type[Exception]) -> None:
    """Each upstream failure answers with the status (and so the type) for which the anthropic SDK raises the
    class it raises for the same trouble at Anthropic; an upstream 401/403 is the operator's key (502)."""
    assert client_status(kind, status, upstream) == client
    assert anthropic_error_type(client) == error_type
    response = httpx2.Response(client, request=httpx2.Request("POST", "http://relay/v1/messages"))
    body = {"type": "error", "error": {"type": error_type, "message": "m"}}
    raised = anthropic.Anthropic(api_key="k", base_url="http://relay")._make_status_error("m", body=body,
                                                                                          response=response)
    assert isinstance(raised, sdk_class)
