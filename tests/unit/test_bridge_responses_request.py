"""The Responses -> chat completions request mapping (proxy/bridge/responses_request.py), rule by rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.bridge.responses_request import ToolName, map_request
from proxy.errors import BadRequest

MODEL = "gpt-4o-mini"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch.",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}
CHAT_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                                 "parameters": WEATHER["parameters"]}}


def chat_of(**body: Any) -> dict[str, Any]:
    return map_request({"model": MODEL, **body}).chat


@pytest.mark.parametrize(("input_", "instructions", "messages"), [
    ("Hi", None, [{"role": "user", "content": "Hi"}]),
    ("Hi", "Be brief.", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    ([{"role": "user", "content": "Hi"}], None, [{"role": "user", "content": "Hi"}]),
    ([{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                      {"type": "input_text", "text": "b"}]}], None,
     [{"role": "user", "content": "a\n\nb"}]),
    ([{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
      {"type": "message", "role": "system", "content": "More rules."},
      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
      {"type": "message", "role": "developer", "content": "Late note."}], "Top.",
     [{"role": "system", "content": "Top.\n\nRules.\n\nMore rules."}, {"role": "user", "content": "Hi"},
      {"role": "system", "content": "Late note."}]),
    ([{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Earlier answer."}]}],
     None, [{"role": "assistant", "content": "Earlier answer."}]),
    ([{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]}], None,
     [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                       "detail": "low"}}]}]),
    ([{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
      {"type": "message", "role": "user", "content": "Hi"}], None, [{"role": "user", "content": "Hi"}]),
], ids=["string", "instructions", "easy-message", "text-parts-joined", "system-merged", "assistant-history",
        "image", "reasoning-dropped"])
def test_input_and_instructions_become_messages(input_: Any, instructions: str | None,
                                                messages: list[dict[str, Any]]) -> None:
    """Strings, message items and their parts map to chat messages; leading system text is one message."""
    body: dict[str, Any] = {"input": input_}
    if instructions is not None:
        body["instructions"] = instructions
    assert chat_of(**body)["messages"] == messages


def test_tool_round_trip_history_maps_to_tool_calls_and_tool_messages() -> None:
    """function_call / custom_tool_call items join the assistant turn as tool_calls; their outputs are tool
    messages; a namespaced call gets its namespaced chat name."""
    chat = chat_of(tools=[WEATHER, APPLY_PATCH], input=[
        {"role": "user", "content": "Weather, then patch."},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "function_call", "call_id": "call_3", "name": "spawn_agent", "namespace": "agents",
         "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
        {"type": "custom_tool_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "Done"}]},
        {"type": "function_call_output", "call_id": "call_3", "output": "spawned"},
    ])
    assert chat["messages"][1:] == [
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "apply_patch", "arguments": '{"input":"*** Begin Patch"}'}},
            {"id": "call_3", "type": "function", "function": {"name": "agents__spawn_agent", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Done"},
        {"role": "tool", "tool_call_id": "call_3", "content": "spawned"},
    ]


@pytest.mark.parametrize(("items", "assistant"), [
    ([{"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Think."}]},
      {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}],
     {"role": "assistant", "content": None, "reasoning_content": "Think.",
      "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}),
    ([{"type": "reasoning", "summary": [{"type": "summary_text", "text": "Summed up."}]},
      {"role": "assistant", "content": "Answer."}],
     {"role": "assistant", "content": "Answer.", "reasoning_content": "Summed up."}),
    ([{"role": "assistant", "content": "Let me look."},
      {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Then call."}]},
      {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}],
     {"role": "assistant", "content": "Let me look.", "reasoning_content": "Then call.",
      "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}),
    ([{"type": "reasoning", "summary": [], "encrypted_content": "opaque"},
      {"role": "assistant", "content": "Answer."}], {"role": "assistant", "content": "Answer."}),
], ids=["before-a-tool-call", "summary-before-text", "between-text-and-call", "encrypted-only"])
def test_reasoning_goes_back_with_the_assistant_turn(items: list[dict[str, Any]], assistant: dict[str, Any]) -> None:
    """A reasoning item's text is the reasoning_content of the assistant message it led to (DeepSeek's
    thinking mode requires it around tool calls); one that only OpenAI can read is dropped."""
    messages = chat_of(tools=[WEATHER], input=[{"role": "user", "content": "Hi"}, *items])["messages"]
    assert messages[1:] == [assistant]


def test_tools_function_custom_namespace_and_built_ins() -> None:
    """Function tools keep their schema; a custom tool is a function of one string; namespaced tools are
    `<namespace>__<name>`; built-ins are left out and named; the table maps names back."""
    bridged = map_request({"model": MODEL, "input": "Hi", "tool_choice": "auto", "parallel_tool_calls": True,
                           "tools": [WEATHER, APPLY_PATCH, {"type": "web_search", "external_web_access": False},
                                     {"type": "namespace", "name": "agents", "description": "Agents.",
                                      "tools": [{"type": "function", "name": "spawn_agent", "parameters": None}]},
                                     {"type": "file_search", "vector_store_ids": ["vs_1"]}]})
    tools = bridged.chat["tools"]
    assert tools[0] == CHAT_WEATHER
    custom = tools[1]["function"]
    assert custom["name"] == "apply_patch" and custom["parameters"]["required"] == ["input"]
    assert "Edit files with a patch." in custom["description"] and "start: /.+/" in custom["description"]
    assert tools[2] == {"type": "function", "function": {"name": "agents__spawn_agent",
                                                         "parameters": {"type": "object", "properties": {}}}}
    assert len(tools) == 3 and bridged.dropped_tools == ("web_search", "file_search")
    assert bridged.chat["tool_choice"] == "auto" and bridged.chat["parallel_tool_calls"] is True
    assert bridged.tools.lookup("apply_patch") == ToolName("custom", "apply_patch")
    assert bridged.tools.lookup("agents__spawn_agent") == ToolName("function", "spawn_agent", "agents")
    assert bridged.tools.lookup("invented") == ToolName("function", "invented")


def test_only_built_in_tools_means_no_tools_upstream() -> None:
    """A request offering only built-ins sends no tools, tool_choice or parallel_tool_calls upstream."""
    bridged = map_request({"model": MODEL, "input": "Hi", "tools": [{"type": "web_search"}], "tool_choice": "auto",
                           "parallel_tool_calls": False})
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(bridged.chat)
    assert bridged.dropped_tools == ("web_search",)


def test_additional_tools_items_add_tools() -> None:
    """Codex's `additional_tools` input items add their (namespaced) tools and are not messages."""
    bridged = map_request({"model": MODEL, "input": [
        {"type": "additional_tools", "role": "developer", "tools": [
            {"type": "namespace", "name": "functions", "tools": [APPLY_PATCH]}]},
        {"role": "user", "content": "Hi"}]})
    assert bridged.chat["messages"] == [{"role": "user", "content": "Hi"}]
    assert [tool["function"]["name"] for tool in bridged.chat["tools"]] == ["functions__apply_patch"]
    assert bridged.tools.lookup("functions__apply_patch") == ToolName("custom", "apply_patch", "functions")


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", "auto"), ("none", "none"), ("required", "required"),
    ({"type": "function", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ({"type": "custom", "name": "apply_patch"}, {"type": "function", "function": {"name": "apply_patch"}}),
    ({"type": "allowed_tools", "mode": "required", "tools": []}, "required"),
])
def test_tool_choice(choice: Any, expected: Any) -> None:
    """Modes pass; a forced function or custom tool names its chat function."""
    assert chat_of(input="Hi", tools=[WEATHER, APPLY_PATCH], tool_choice=choice)["tool_choice"] == expected


@pytest.mark.parametrize("choice", [{"type": "web_search"}, {"type": "file_search"}, {"type": "image_generation"},
                                    {"type": "code_interpreter"}])
def test_forcing_a_built_in_tool_is_refused(choice: dict[str, str]) -> None:
    """tool_choice forcing a built-in the upstream cannot run is a 400 naming it."""
    with pytest.raises(BadRequest) as refused:
        chat_of(input="Hi", tools=[WEATHER, {"type": choice["type"]}], tool_choice=choice)
    assert choice["type"] in str(refused.value.description) and refused.value.kind == "bridge_untranslatable"


@pytest.mark.parametrize(("body", "expected"), [
    ({"max_output_tokens": 100}, {"max_tokens": 100}),
    ({"temperature": 0.2, "top_p": 0.9}, {"temperature": 0.2, "top_p": 0.9}),
    ({"reasoning": {"effort": "high", "summary": "auto"}}, {"reasoning_effort": "high"}),
    ({"reasoning": {"summary": "auto"}}, {}),
    ({"text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True},
               "verbosity": "low"}},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                 "strict": True}}}),
    ({"text": {"format": {"type": "json_object"}}}, {"response_format": {"type": "json_object"}}),
    ({"text": {"format": {"type": "text"}}}, {}),
    ({"store": False, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k", "metadata": {"a": "b"},
      "user": "u", "client_metadata": {"x": "y"}, "safety_identifier": "s", "service_tier": "auto",
      "truncation": "auto", "max_tool_calls": 3}, {}),
    ({"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}),
], ids=["max-tokens", "sampling", "effort", "summary-only", "json-schema", "json-object", "text", "dropped",
        "stream"])
def test_options(body: dict[str, Any], expected: dict[str, Any]) -> None:
    """Options map to their chat names; OpenAI-only storage and accounting fields are dropped."""
    chat = chat_of(input="Hi", **body)
    assert {name: value for name, value in chat.items() if name not in ("model", "messages")} == expected


@pytest.mark.parametrize(("body", "words"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]}, "input_file"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]}, "image_url"),
    ({"input": [{"type": "mystery_item"}]}, "mystery_item"),
    ({"text": {"format": {"type": "grammar"}}}, "grammar"),
    ({"input": 7}, "'input'"),
    ({"input": ["text"]}, "item"),
    ({"input": [{"role": "robot", "content": "x"}]}, "role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "call_id"),
    ({"tools": [{"type": "function"}]}, "name"),
    ({"tools": {"type": "function"}}, "'tools'"),
    ({"tool_choice": {"type": "function", "name": "nowhere"}}, "nowhere"),
    ({"model": ""}, "model"),
    ({"input": [{"type": "x" * 5000}]}, "x" * 60 + "..."),
    ({"input": []}, "no message"),
], ids=lambda value: str(value)[:40])
def test_refusals_are_400s_naming_the_field(body: dict[str, Any], words: str) -> None:
    """What the bridge cannot serve or cannot read is a 400 saying which field, never a 500."""
    with pytest.raises(BadRequest) as refused:
        map_request({"model": MODEL, "input": "Hi", **body})
    assert words in str(refused.value.description)


CODEX_REQUEST = Path(__file__).parent / "data" / "codex_0_171_request.json"


def test_codex_default_request_maps() -> None:
    """What Codex CLI 0.171.0 sends by default (recorded: developer messages, function and namespace tools,
    web_search, reasoning, store false, include, prompt_cache_key, client_metadata) maps without a refusal."""
    body = json.loads(CODEX_REQUEST.read_text())
    bridged = map_request(body)
    assert bridged.stream and bridged.dropped_tools == ("web_search",)
    messages = bridged.chat["messages"]
    assert messages[0]["role"] == "system" and messages[-1] == {"role": "user", "content": "hi"}
    assert [m["role"] for m in messages] == ["system", "user", "user"]
    names = [tool["function"]["name"] for tool in bridged.chat["tools"]]
    assert "exec_command" in names and "multi_agent_v1__spawn_agent" in names
    assert set(bridged.chat) == {"model", "messages", "stream", "stream_options", "tools", "tool_choice",
                                 "parallel_tool_calls"}
