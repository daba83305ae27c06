"""The Messages -> chat completions request mapping (proxy/bridge/messages_request.py), rule by rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.bridge.messages_request import MESSAGE_ROLES, MessagesRefused, estimate_input_tokens, to_chat_request

CLAUDE_CODE_REQUEST = Path(__file__).with_name("claude_code_2.1.332_request.json")
CLAUDE_CODE_TOOL_TURN = Path(__file__).with_name("claude_code_2.1.332_tool_turn.json")
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
TOOL = {"name": "get_weather", "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
FUNCTION = {"type": "function", "function": {"name": "get_weather", "parameters": TOOL["input_schema"],
                                             "description": "Weather for a city"}}


def chat(**body: Any) -> dict[str, Any]:
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return to_chat_request({"model": "claude-x", "max_tokens": 100, **body}, "upstream-model").body


@pytest.mark.parametrize(("system", "expected"), [
    ("Be brief.", [{"role": "system", "content": "Be brief."}]),
    ([{"type": "text", "text": "One.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "Two."}],
     [{"role": "system", "content": "One.\n\nTwo."}]),
    ("", []),
    (None, []),
])
def test_system_becomes_the_first_system_message(system: Any, expected: list[dict[str, Any]]) -> None:
    """`system` as a string or text blocks (cache_control dropped) leads as one system message; none adds none."""
    body = chat(system=system) if system is not None else chat()
    assert body["messages"] == [*expected, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(("message", "expected"), [
    ({"role": "user", "content": "plain"}, [{"role": "user", "content": "plain"}]),
    ({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b",
                                                                   "cache_control": {"type": "ephemeral"}}]},
     [{"role": "user", "content": "a\n\nb"}]),
    ({"role": "user", "content": [{"type": "text", "text": "look"}, IMAGE]},
     [{"role": "user", "content": [{"type": "text", "text": "look"}, IMAGE_PART]}]),
    ({"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/cat.png"}}]},
     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}]),
    ({"role": "user", "content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                                  "data": "doc text"}}]},
     [{"role": "user", "content": "doc text"}]),
    ({"role": "system", "content": [{"type": "text", "text": "env", "cache_control": {"type": "ephemeral"}}]},
     [{"role": "system", "content": "env"}]),
    ({"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
                                       {"type": "text", "text": "Sure."}]},
     [{"role": "assistant", "content": "Sure."}]),
    ({"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xx"}]},
     [{"role": "assistant", "content": ""}]),
    ({"role": "assistant", "content": [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}]},
     [{"role": "assistant", "content": "Checking.", "tool_calls": [
         {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
         {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}]),
    ({"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}]},
     [{"role": "assistant", "content": None,
       "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]}]),
    ({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
        {"type": "tool_result", "tool_use_id": "toolu_2",
         "content": [{"type": "text", "text": "no such"}, {"type": "text", "text": "tool"}], "is_error": True},
        {"type": "text", "text": "Thanks"}]},
     [{"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
      {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such\n\ntool"},
      {"role": "user", "content": "Thanks"}]),
    ({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "text", "text": "a picture"}, IMAGE]}]},
     [{"role": "tool", "tool_call_id": "t", "content": "a picture"},
      {"role": "user", "content": [{"type": "text", "text": "(the images the tool results above returned)"},
                                   IMAGE_PART]}]),
    ({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
     [{"role": "tool", "tool_call_id": "t", "content": ""}]),
    ({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                   "content": [{"type": "tool_reference", "tool_name": "WebFetch"}]}]},
     [{"role": "tool", "tool_call_id": "t", "content": "(tool WebFetch is now available)"}]),
])
def test_messages_map_to_chat_messages(message: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    """Text, images (base64 and URL), documents with text, system turns, thinking dropped, tool_use as
    tool_calls, tool_result as tool messages before the user's text (errors marked, images after)."""
    assert chat(messages=[message])["messages"] == expected


@pytest.mark.parametrize(("message", "named"), [
    ({"role": "user", "content": [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                                  "data": "JVBERi0="}}]}, "document"),
    ({"role": "user", "content": [{"type": "search_result", "source": "x", "title": "t", "content": []}]},
     "search_result"),
    ({"role": "assistant", "content": [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}]},
     "server_tool_use"),
    ({"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}, "file"),
    ({"role": "tool", "content": "x"}, "role"),
    ({"role": "user", "content": [{"text": "no type"}]}, "'type'"),
    ({"role": "user", "content": 7}, "must be a list"),
    ({"role": "user", "content": [{"type": "text", "text": 7}]}, "'text' must be a string"),
    ({"role": "assistant", "content": [{"type": "text"}]}, "'text' must be a string"),
])
def test_untranslatable_content_is_refused_naming_it(message: dict[str, Any], named: str) -> None:
    """Block types a chat upstream cannot take are refused (a 400 in the view) naming what to change."""
    with pytest.raises(MessagesRefused, match=named):
        chat(messages=[message])


def test_tools_become_function_tools_and_server_tools_are_left_out() -> None:
    """Client tools map to function tools; Anthropic's server tools are left out and named in `dropped_tools`."""
    request = to_chat_request({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                               "tools": [TOOL, {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
                                         {"type": "custom", "name": "bare", "input_schema": {"type": "object"}}]},
                              "up")
    assert request.body["tools"] == [FUNCTION, {"type": "function", "function": {
        "name": "bare", "parameters": {"type": "object"}}}]
    assert request.dropped_tools == ["web_search"]


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "get_weather"},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
])
def test_tool_choice_maps(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    """auto/any/none/tool become chat's auto/required/none/function choice; no parallel calls carries over."""
    body = chat(tools=[TOOL], tool_choice=choice)
    assert {key: body[key] for key in expected} == expected


@pytest.mark.parametrize(("body", "error"), [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}], "tool_choice": {"type": "tool",
                                                                                        "name": "web_search"}},
     "only Anthropic's own servers"),
    ({"tools": [TOOL], "tool_choice": {"type": "sometimes"}}, "unknown tool_choice"),
    ({"tools": [TOOL], "tool_choice": "auto"}, "must be an object"),
])
def test_impossible_tool_choices_are_refused(body: dict[str, Any], error: str) -> None:
    """Forcing a server tool the upstream cannot run, or a malformed choice, is a clear refusal."""
    with pytest.raises(MessagesRefused, match=error):
        chat(**body)


def test_tool_choice_without_tools_is_left_out() -> None:
    """Chat servers refuse a tool_choice with no tools: it is not sent."""
    assert "tool_choice" not in chat(tool_choice={"type": "auto"})


def test_options_carry_over_and_anthropic_only_ones_are_dropped() -> None:
    """max_tokens, stop_sequences, temperature, top_p and stream (with usage) carry over; thinking, metadata,
    top_k, context_management and output_config.effort do not reach the upstream."""
    body = chat(max_tokens=321, stop_sequences=["END"], temperature=0.2, top_p=0.9, top_k=5, stream=True,
                metadata={"user_id": "u"}, thinking={"type": "enabled", "budget_tokens": 2048},
                context_management={"edits": []}, output_config={"effort": "high"}, service_tier="auto")
    assert body == {"model": "upstream-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 321,
                    "stop": ["END"], "temperature": 0.2, "top_p": 0.9, "stream": True,
                    "stream_options": {"include_usage": True}}


def test_a_json_schema_output_format_becomes_response_format() -> None:
    """Structured output (`output_config.format`) becomes chat's json_schema response_format."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = chat(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": schema, "strict": True}}


def test_claude_codes_default_request_maps() -> None:
    """What Claude Code 2.1.332 sends by default (billing header block, cache_control, a system turn inside
    messages, adaptive thinking, context_management, output_config, a deferred-loading tool) maps."""
    sent = json.loads(CLAUDE_CODE_REQUEST.read_text())
    request = to_chat_request(sent, "deepseek-chat")
    body = request.body
    assert [message["role"] for message in body["messages"]] == ["system", "user", "system"]
    assert body["messages"][0]["content"].startswith("x-anthropic-billing-header")
    assert isinstance(body["messages"][1]["content"], str) and body["messages"][1]["content"].endswith("Read notes.txt")
    assert {tool["function"]["name"] for tool in body["tools"]} == {tool["name"] for tool in sent["tools"]}
    assert body["max_tokens"] == sent["max_tokens"] and body["stream"] is True
    assert not {"thinking", "metadata", "context_management", "output_config"} & set(body)
    assert request.dropped_tools == []


def test_the_input_token_estimate_is_about_four_characters_a_token() -> None:
    """count_tokens' estimate: a quarter of the JSON length of system, messages and tools, at least 1."""
    body = {"system": "s" * 400, "messages": [{"role": "user", "content": "x" * 800}]}
    assert 290 <= estimate_input_tokens(body) <= 320
    assert estimate_input_tokens({"messages": []}) >= 1


def test_claude_codes_tool_turn_maps() -> None:
    """Claude Code 2.1.332's second request of a tool round trip (its thinking block sent back unsigned, the
    Read call, the tool_result, a system reminder with cache_control after it) maps to chat's order: the
    assistant's tool_calls, the tool message, then the system reminder; the thinking block is left out."""
    sent = json.loads(CLAUDE_CODE_TOOL_TURN.read_text())
    messages = to_chat_request(sent, "deepseek-chat").body["messages"]
    assert [message["role"] for message in messages] == ["system", "user", "system", "assistant", "tool", "system"]
    call, result = messages[3], messages[4]
    assert call["content"] is None and call["tool_calls"][0]["function"]["name"] == "Read"
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"file_path": "/home/user/work/note.txt"}
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"],
                      "content": "1\tThe word is apricot-7d41.\n2\t"}
    assert "tokens left" in messages[5]["content"]


@pytest.mark.parametrize("role", [*MESSAGE_ROLES, "tool", "developer"])
def test_the_roles_the_schema_states_are_the_roles_translated(role: str) -> None:
    """openapi.yaml's AnthropicMessage roles (MESSAGE_ROLES, also what test_validation compares the file
    with) are exactly the roles the bridge translates; any other is refused naming it."""
    from proxy.shaping import request_schemas

    assert request_schemas()["AnthropicMessage"]["properties"]["role"]["enum"] == list(MESSAGE_ROLES)
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": role, "content": "hi"}]}
    if role in MESSAGE_ROLES:
        assert to_chat_request(body, "m").body["messages"][-1]["role"] == role
    else:
        with pytest.raises(MessagesRefused, match=repr(role)):
            to_chat_request(body, "m")
