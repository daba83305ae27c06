"""POST /v1/responses served by a chat-completions-only upstream, in-process: what goes upstream, the events
and objects that come back, the access log, refusals, upstream errors and stored-response lookups."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from proxy import create_app
from tests.unit.conftest import FakeTransport, bearer, chunk_event, unit_config
from tests.unit.test_routing import openai_upstream

MAP = (("gpt-5-codex", "deepseek-chat"),)
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}


def bridge_client(transport: FakeTransport, **overrides: Any) -> FlaskClient:
    app = create_app(unit_config(**overrides))
    upstream = openai_upstream("deepseek", transport, ("deepseek-*",), frozenset({"chat"}), MAP)
    app.extensions["relay"] = dataclasses.replace(app.extensions["relay"], upstreams=(upstream,))
    return app.test_client()


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """The data of each named SSE event, checked against its `event:` line."""
    events = []
    for block in body.split(b"\n\n"):
        if block.startswith(b"event: "):
            name, data = block.split(b"\n", 1)
            event = orjson.loads(data.removeprefix(b"data: "))
            assert event["type"] == name.removeprefix(b"event: ").decode()
            events.append(event)
    return events


def test_streamed_answer_is_the_responses_event_sequence(transport: FakeTransport, access_lines: list[str]) -> None:
    """The upstream gets a chat request under its own model name at /chat/completions; the client gets the
    Responses events ending in response.completed with usage; the access log says it was bridged and which
    built-in tools were left out."""
    answer = bridge_client(transport).post("/v1/responses", headers=bearer(), json={
        "model": "gpt-5-codex", "input": "Hello", "stream": True, "instructions": "Be brief.",
        "tools": [WEATHER, {"type": "web_search"}], "store": False})
    assert answer.status_code == 200 and answer.mimetype == "text/event-stream"
    events = sse_events(answer.get_data())
    answer.close()
    assert [e["type"] for e in events][:2] == ["response.created", "response.in_progress"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello"
    completed = events[-1]
    assert completed["type"] == "response.completed" and completed["response"]["usage"]["total_tokens"] == 3
    assert completed["response"]["id"].startswith("resp_bridged_")
    sent = transport.requests[0]
    assert sent.path == "/v1/chat/completions" and sent.body["model"] == "deepseek-chat"
    assert sent.body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [tool["function"]["name"] for tool in sent.body["tools"]] == ["get_weather"]
    assert sent.body["stream_options"] == {"include_usage": True} and "store" not in sent.body
    line = access_lines[-1]
    assert "bridge=responses->chat" in line and "dropped_tools=web_search" in line and "outcome=ok" in line
    assert "model=gpt-5-codex" in line and "upstream=deepseek" in line


def test_whole_answer_with_a_tool_call(transport: FakeTransport, access_lines: list[str]) -> None:
    """A non-streaming request gets a Response object: the function_call item and usage."""
    transport.reply(json={"id": "c", "object": "chat.completion", "model": "deepseek-chat", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
    answer = bridge_client(transport).post("/v1/responses", headers=bearer(), json={
        "model": "gpt-5-codex", "input": "Weather?", "tools": [WEATHER]})
    assert answer.status_code == 200
    body = answer.get_json()
    answer.close()
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["output"][0]["type"] == "function_call" and body["output"][0]["call_id"] == "call_1"
    assert body["usage"]["total_tokens"] == 7 and "stream" not in transport.requests[0].body
    assert "bridge=responses->chat" in access_lines[-1] and "tokens=2" in access_lines[-1]


def test_a_mid_stream_failure_is_response_failed(transport: FakeTransport) -> None:
    """A stream that breaks after text ends with response.failed, sequence numbers unbroken."""
    transport.reply(blocks=[chunk_event({"role": "assistant", "content": ""}), chunk_event({"content": "Half"}),
                            b"data: {not json\n\n"])
    answer = bridge_client(transport).post("/v1/responses", headers=bearer(),
                                           json={"model": "gpt-5-codex", "input": "Hello", "stream": True})
    events = sse_events(answer.get_data())
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


@pytest.mark.parametrize(("status", "expected", "kind"), [
    (429, 429, "upstream_rate_limited"), (500, 502, "upstream_error"), (401, 502, "upstream_auth"),
    (400, 400, "upstream_bad_request"), (404, 404, "model_not_found"), (422, 422, "upstream_bad_request"),
])
def test_upstream_errors_before_the_answer_keep_their_meaning(transport: FakeTransport, status: int,
                                                              expected: int, kind: str) -> None:
    """An upstream refusal is the relay's usual error in OpenAI's shape (the SDK's exception class follows)."""
    transport.reply(status=status, json={"error": {"message": "nope", "type": "x"}})
    answer = bridge_client(transport).post("/v1/responses", headers=bearer(),
                                           json={"model": "gpt-5-codex", "input": "Hello", "stream": True})
    assert answer.status_code == expected and answer.get_json()["error"]["code"] == kind


@pytest.mark.parametrize(("body", "sent"), [({}, 100), ({"max_output_tokens": 50}, 50),
                                            ({"max_output_tokens": 500}, 100)])
def test_max_tokens_holds_for_bridged_requests(transport: FakeTransport, body: dict[str, Any], sent: int) -> None:
    """A bridged request is a chat request: MAX_TOKENS caps max_output_tokens, or is sent when none was."""
    bridge_client(transport, max_tokens=100).post("/v1/responses", headers=bearer(), json={
        "model": "gpt-5-codex", "input": "Hello", "stream": True, **body}).close()
    assert transport.requests[0].body["max_tokens"] == sent


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), [
    ("POST", "/v1/responses", {"model": "gpt-5-codex", "input": "Hi", "tools": [{"type": "web_search"}],
                               "tool_choice": {"type": "web_search"}}, 400, "web_search"),
    ("POST", "/v1/responses", {"model": "gpt-5-codex", "input": "Hi", "previous_response_id": "resp_1"}, 400,
     "previous_response_id"),
    ("POST", "/v1/responses/input_tokens", {"model": "gpt-5-codex", "input": "Hi"}, 404, "only POST /v1/responses"),
    ("GET", "/v1/responses/resp_bridged_0123", None, 404, "not stored"),
    ("DELETE", "/v1/responses/resp_bridged_0123", None, 404, "not stored"),
    ("GET", "/v1/responses/resp_bridged_0123/input_items", None, 404, "not stored"),
    ("GET", "/v1/responses/resp_0123", None, 404, "no upstream of this relay speaks the Responses API"),
])
def test_refusals_in_openai_shape(transport: FakeTransport, method: str, path: str, body: Any, status: int,
                                  words: str) -> None:
    """What the bridge cannot serve is refused with a clear message in OpenAI's error shape, upstream untouched."""
    answer = bridge_client(transport).open(path, method=method, headers=bearer(), json=body)
    assert answer.status_code == status and words in answer.get_json()["error"]["message"]
    assert transport.requests == []


@pytest.mark.parametrize("first_reply", [
    {"status": 500, "json": {"error": {"message": "down"}}},
    {"blocks": [chunk_event({"role": "assistant", "content": ""}), b"data: {not json\n\n"]},
], ids=["5xx-at-open", "broken-before-first-token"])
def test_falls_over_to_the_next_chat_upstream(first_reply: dict[str, Any], access_lines: list[str]) -> None:
    """A chat upstream failing at open, or its stream breaking before the first token, hands the bridged
    request to the next one serving the model; the client sees one clean event sequence."""
    first, second = FakeTransport(), FakeTransport()
    first.reply(**first_reply)
    app = create_app(unit_config())
    upstreams = tuple(openai_upstream(name, transport, ("deepseek-*",), frozenset({"chat"}), MAP)
                      for name, transport in (("one", first), ("two", second)))
    app.extensions["relay"] = dataclasses.replace(app.extensions["relay"], upstreams=upstreams)
    answer = app.test_client().post("/v1/responses", headers=bearer(),
                                    json={"model": "gpt-5-codex", "input": "Hello", "stream": True})
    events = sse_events(answer.get_data())
    answer.close()
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["output"][0]["content"][0][
        "text"] == "Hello"
    assert len(first.requests) == len(second.requests) == 1
    assert "upstream=two" in access_lines[-1] and "fallbacks=1" in access_lines[-1]


def test_dropped_tools_are_logged_once_each_and_few(transport: FakeTransport, access_lines: list[str]) -> None:
    """A client's long list of built-in tools makes a short access-log field: each named once, ten at most."""
    tools = [{"type": "web_search"}] * 3 + [{"type": f"builtin_{n}"} for n in range(30)]
    bridge_client(transport).post("/v1/responses", headers=bearer(), json={
        "model": "gpt-5-codex", "input": "Hello", "stream": True, "tools": tools}).close()
    [field] = [part for part in access_lines[-1].split() if part.startswith("dropped_tools=")]
    assert field == "dropped_tools=" + ",".join(["web_search", *(f"builtin_{n}" for n in range(9))])
