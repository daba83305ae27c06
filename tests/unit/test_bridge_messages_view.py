"""POST /v1/messages for a model only a chat-completions upstream serves, in-process: the request goes up as
chat, the answer comes back as Anthropic's (streamed through the pump, or whole), errors in Anthropic's
statuses, count_tokens as an estimate, and the access log says the request was bridged."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from proxy import create_app
from tests.unit.conftest import (
    FakeTransport,
    Reply,
    answer_events,
    bearer,
    chunk_event,
    fake_upstream,
    unit_config,
)

MODEL = "claude-sonnet-5"
BODY = {"model": MODEL, "max_tokens": 50, "system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]}
USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.split(b"\n\n"):
        if block:
            name, data = block.split(b"\n", 1)
            out.append((name.removeprefix(b"event: ").decode(), orjson.loads(data.removeprefix(b"data: "))))
    return out


def test_a_stream_is_bridged(client: FlaskClient, transport: FakeTransport, access_lines: list[str]) -> None:
    """A streamed Messages request goes up as a chat stream asking for usage; the answer is Anthropic's
    event sequence with the upstream's usage; the access log says bridge=messages->chat."""
    response = client.post("/v1/messages", json={**BODY, "stream": True}, headers=bearer())
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    seen = [(name, data.get("delta", {}).get("text")) for name, data in events(response.get_data())]
    assert seen == [("message_start", None), ("content_block_start", None), ("content_block_delta", "Hel"),
                    ("content_block_delta", "lo"), ("content_block_stop", None), ("message_delta", None),
                    ("message_stop", None)]
    final = events(response.get_data())[-2][1]
    assert final["delta"]["stop_reason"] == "end_turn" and final["usage"]["output_tokens"] == 2
    sent = transport.requests[-1].body
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert "system" not in sent
    response.close()  # the access line is written as the response closes
    line = next(line for line in access_lines if "path=/v1/messages" in line)
    assert "bridge=messages->chat" in line and "status=200" in line and "outcome=ok" in line


def test_a_whole_answer_is_bridged(client: FlaskClient, transport: FakeTransport, access_lines: list[str]) -> None:
    """A non-streamed request gets an Anthropic message made of the chat completion, tool calls included."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    transport.reply(json={"id": "c", "object": "chat.completion", "model": "up", "usage": USAGE, "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
                                                                "tool_calls": [call]}}]})
    response = client.post("/v1/messages", json=BODY, headers=bearer())
    assert response.status_code == 200, response.get_data()
    message = response.get_json()
    assert message["content"] == [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                   "input": {"city": "Paris"}}]
    assert message["stop_reason"] == "tool_use" and message["model"] == MODEL
    assert message["usage"]["input_tokens"] == 9 and message["usage"]["output_tokens"] == 2
    assert "stream" not in transport.requests[-1].body
    response.close()  # the access line is written as the response closes
    line = next(line for line in access_lines if "path=/v1/messages" in line)
    assert "bridge=messages->chat" in line and "tokens=2" in line


def test_count_tokens_is_an_estimate(client: FlaskClient, transport: FakeTransport) -> None:
    """count_tokens on a bridged model answers the estimate without asking the upstream."""
    response = client.post("/v1/messages/count_tokens", json=BODY, headers=bearer())
    assert response.status_code == 200
    assert set(response.get_json()) == {"input_tokens"} and response.get_json()["input_tokens"] > 0
    assert transport.requests == []


def test_count_tokens_refuses_what_the_bridge_could_not_send(client: FlaskClient, transport: FakeTransport) -> None:
    """A count for a request with no messages (or untranslatable ones) is the 400 the request itself gets."""
    response = client.post("/v1/messages/count_tokens", json={"model": MODEL}, headers=bearer())
    assert response.status_code == 400 and response.get_json()["error"]["type"] == "invalid_request_error"
    assert "messages must be a list" in response.get_json()["error"]["message"]


def test_untranslatable_content_is_an_anthropic_400(client: FlaskClient, transport: FakeTransport) -> None:
    """A PDF document block is refused with Anthropic's invalid_request_error naming the block type."""
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}
    response = client.post("/v1/messages", json={**BODY, "messages": [{"role": "user", "content": [pdf]}]},
                           headers=bearer())
    assert response.status_code == 400
    error = response.get_json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "'document'" in error["error"]["message"] and transport.requests == []


@pytest.mark.parametrize(("upstream", "status", "error_type"), [
    (429, 429, "rate_limit_error"), (529, 529, "overloaded_error"), (503, 503, "overloaded_error"),
    (500, 502, "api_error"), (401, 502, "api_error"), (404, 404, "not_found_error"),
    (413, 413, "request_too_large"), (400, 400, "invalid_request_error"),
])
@pytest.mark.parametrize("stream", [True, False])
def test_upstream_errors_become_anthropic_errors(client: FlaskClient, transport: FakeTransport, upstream: int,
                                                 status: int, error_type: str, stream: bool) -> None:
    """The upstream's refusal before any token reaches the client as the status and error type Anthropic
    would have answered with, streamed or not."""
    transport.default.blocks = None
    transport.default.status = upstream
    transport.default.json = {"error": {"message": "no", "type": "x"}}
    response = client.post("/v1/messages", json={**BODY, "stream": stream}, headers=bearer())
    assert response.status_code == status
    assert response.get_json()["error"]["type"] == error_type


def test_context_too_long_is_a_bad_request(client: FlaskClient, transport: FakeTransport) -> None:
    """The upstream's context-length refusal is Anthropic's 400 invalid_request_error."""
    transport.reply(status=400, json={"error": {"message": "This model's maximum context length is 8192 tokens"}})
    response = client.post("/v1/messages", json=BODY, headers=bearer())
    assert response.status_code == 400 and response.get_json()["error"]["type"] == "invalid_request_error"
    assert "too long" in response.get_json()["error"]["message"]


def test_a_failure_mid_stream_is_an_error_event(client: FlaskClient, transport: FakeTransport) -> None:
    """An upstream that breaks after the first token: the stream ends with Anthropic's error event."""
    transport.reply(blocks=[chunk_event({"content": "Par"}), b'data: {"error": {"message": "boom"}}\n\n'])
    response = client.post("/v1/messages", json={**BODY, "stream": True}, headers=bearer())
    seen = events(response.get_data())
    assert [name for name, _data in seen] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert seen[-1][1]["error"]["type"] == "api_error"


def test_server_tools_are_left_out_and_logged(client: FlaskClient, transport: FakeTransport,
                                              access_lines: list[str]) -> None:
    """Anthropic's server tools never reach a chat upstream; the access log names them."""
    tools = [{"type": "web_search_20250305", "name": "web_search"},
             {"name": "get_weather", "input_schema": {"type": "object"}}]
    transport.reply(blocks=answer_events(["ok"], usage=USAGE))
    response = client.post("/v1/messages", json={**BODY, "stream": True, "tools": tools}, headers=bearer())
    assert response.status_code == 200
    response.get_data()
    assert [tool["function"]["name"] for tool in transport.requests[-1].body["tools"]] == ["get_weather"]
    response.close()  # the access line is written as the response closes
    line = next(line for line in access_lines if "path=/v1/messages" in line)
    assert "dropped_tools=web_search" in line


def two_upstream_client(first: FakeTransport, second: FakeTransport) -> FlaskClient:
    app = create_app(unit_config())
    relay = app.extensions["relay"]
    app.extensions["relay"] = dataclasses.replace(relay, upstreams=(fake_upstream(first, "first"),
                                                                    fake_upstream(second, "second")))
    return app.test_client()


@pytest.mark.parametrize("failure", [
    Reply(status=503, json={"error": {"message": "down"}}),
    Reply(blocks=[chunk_event({"role": "assistant", "content": ""}), b'data: {"error": {"message": "boom"}}\n\n']),
], ids=["refused", "broke-before-the-first-token"])
def test_falls_over_before_the_first_token(failure: Reply, access_lines: list[str]) -> None:
    """The first upstream refuses, or its stream breaks before the first token: the next one answers, and the
    client sees one message_start and the second upstream's answer only."""
    first, second = FakeTransport(), FakeTransport()
    first.replies.append(failure)
    response = two_upstream_client(first, second).post("/v1/messages", json={**BODY, "stream": True},
                                                       headers=bearer())
    seen = events(response.get_data())
    assert [name for name, _data in seen].count("message_start") == 1
    assert "".join(data["delta"].get("text", "") for name, data in seen if name == "content_block_delta") == "Hello"
    assert seen[-1][0] == "message_stop" and len(first.requests) == len(second.requests) == 1
    response.close()
    line = next(line for line in access_lines if "path=/v1/messages" in line)
    assert "upstream=second" in line and "fallbacks=1" in line
