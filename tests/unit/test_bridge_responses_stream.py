"""The chat chunks -> Responses events state machine (proxy/bridge/responses_stream.py) on recorded chunk
sequences, and the whole-answer mapping (proxy/bridge/responses_answer.py). Every event is validated against
the openai SDK's own event models, and sequence numbers must count up from 0 without a gap."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from proxy.bridge.responses_answer import ResponseFrame, frame_for, response_of_completion, responses_usage
from proxy.bridge.responses_request import BridgedRequest, map_request
from proxy.bridge.responses_stream import ResponsesStream

EVENTS: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
         "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
APPLY_PATCH = {"type": "custom", "name": "apply_patch"}


def counter_ids() -> Callable[[str], str]:
    numbers = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(numbers)}"


def bridged(**body: Any) -> BridgedRequest:
    return map_request({"model": "deepseek-chat", "input": "Hi", "stream": True, **body})


def run(chunks: list[dict[str, Any]], request: BridgedRequest | None = None, finish: tuple[Any, Any] | None = None,
        failure: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """All events of one stream: start, the chunks, then finish (or fail)."""
    request = request or bridged()
    ids = counter_ids()
    stream = ResponsesStream(frame_for(request, 1_700_000_000, ids), request.tools, ids)
    events = stream.start()
    for chunk in chunks:
        events += stream.chunk(chunk)
    events += stream.fail(*failure) if failure else stream.finish(*(finish or (None, None)))
    for number, event in enumerate(events):
        assert event["sequence_number"] == number
        EVENTS.validate_python(event)  # the SDK's own model of each event accepts it
    return events


def delta(finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields,
                                                                       "finish_reason": finish}]}


def tool(index: int, call_id: str | None = None, name: str | None = None, arguments: str | None = None
         ) -> dict[str, Any]:
    function = {key: value for key, value in (("name", name), ("arguments", arguments)) if value is not None}
    call: dict[str, Any] = {"index": index, "function": function}
    if call_id:
        call.update(id=call_id, type="function")
    return call


USAGE_ONLY = {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"].removeprefix("response.") for event in events]


def test_text_only() -> None:
    """Role chunk, text deltas, finish and a usage-only chunk: the full event sequence, usage mapped."""
    events = run([delta(role="assistant", content=""), delta(content="Hel"), delta(content="lo"), delta("stop"),
                  USAGE_ONLY])
    assert types(events) == ["created", "in_progress", "output_item.added", "content_part.added",
                             "output_text.delta", "output_text.delta", "output_text.done", "content_part.done",
                             "output_item.done", "completed"]
    assert events[6]["text"] == "Hello" and events[8]["item"]["content"][0]["text"] == "Hello"
    assert {event.get("item_id") for event in events[3:8]} == {"msg_2"}
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "completed" and final.output_text == "Hello" and final.id == "resp_1"
    assert final.usage is not None and events[-1]["response"]["usage"] == {
        "input_tokens": 11, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 18}


def test_tool_call_split_across_many_deltas() -> None:
    """A function call whose arguments come in pieces: one item, one delta per piece, the whole on .done."""
    pieces = ['{"', "city", '":"', "Par", "is", '"}']
    chunks = [delta(role="assistant", content=None, tool_calls=[tool(0, "call_a", "get_weather", "")]),
              *(delta(tool_calls=[tool(0, arguments=piece)]) for piece in pieces), delta("tool_calls")]
    events = run(chunks, bridged(tools=[WEATHER]))
    assert types(events) == ["created", "in_progress", "output_item.added", *["function_call_arguments.delta"] * 6,
                             "function_call_arguments.done", "output_item.done", "completed"]
    assert events[2]["item"] == {"id": "fc_2", "type": "function_call", "status": "in_progress",
                                 "call_id": "call_a", "name": "get_weather", "arguments": ""}
    assert events[-3]["arguments"] == '{"city":"Paris"}' and events[-3]["name"] == "get_weather"
    assert events[-1]["response"]["output"] == [{"id": "fc_2", "type": "function_call", "status": "completed",
                                                 "call_id": "call_a", "name": "get_weather",
                                                 "arguments": '{"city":"Paris"}'}]


def test_parallel_tool_calls_interleaved() -> None:
    """Text, then two tool calls whose deltas interleave: the text closes when the first call starts, each
    call keeps its own item and output index, both close at the end in order."""
    chunks = [delta(content="Let me check."),
              delta(tool_calls=[tool(0, "call_a", "get_weather", '{"city":')]),
              delta(tool_calls=[tool(1, "call_b", "get_weather", '{"city":')]),
              delta(tool_calls=[tool(0, arguments='"Paris"}')]),
              delta(tool_calls=[tool(1, arguments='"Oslo"}')]), delta("tool_calls"), USAGE_ONLY]
    events = run(chunks, bridged(tools=[WEATHER]))
    output = events[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["message", "function_call", "function_call"]
    assert [(item["call_id"], item["arguments"]) for item in output[1:]] == [
        ("call_a", '{"city":"Paris"}'), ("call_b", '{"city":"Oslo"}')]
    text_done = types(events).index("output_item.done")
    assert text_done < types(events).index("output_item.added", 5)
    argument_deltas = [(e["output_index"], e["delta"]) for e in events
                       if e["type"] == "response.function_call_arguments.delta"]
    assert argument_deltas == [(1, '{"city":'), (2, '{"city":'), (1, '"Paris"}'), (2, '"Oslo"}')]


def test_custom_tool_call_input_streams_unwrapped() -> None:
    """A call of the function a custom tool became is a custom_tool_call whose input streams unwrapped."""
    chunks = [delta(tool_calls=[tool(0, "call_p", "apply_patch", '{"input":"*** Begin')]),
              delta(tool_calls=[tool(0, arguments=' Patch\\n"}')]), delta("tool_calls")]
    events = run(chunks, bridged(tools=[APPLY_PATCH]))
    assert types(events)[2:] == ["output_item.added", "custom_tool_call_input.delta", "custom_tool_call_input.delta",
                                 "custom_tool_call_input.done", "output_item.done", "completed"]
    assert [events[3]["delta"], events[4]["delta"]] == ["*** Begin", " Patch\n"]
    assert events[5]["input"] == "*** Begin Patch\n"
    assert events[-1]["response"]["output"][0] == {"id": "ctc_2", "type": "custom_tool_call", "status": "completed",
                                                   "call_id": "call_p", "name": "apply_patch",
                                                   "input": "*** Begin Patch\n"}


def test_custom_tool_call_of_another_shape_is_sent_whole() -> None:
    """Arguments not shaped `{"input": ...}` give no deltas while they arrive, and the input whole at the end."""
    chunks = [delta(tool_calls=[tool(0, "call_p", "apply_patch", '{"patch":')]),
              delta(tool_calls=[tool(0, arguments=' "x"}')]), delta("tool_calls")]
    events = run(chunks, bridged(tools=[APPLY_PATCH]))
    assert types(events)[2:] == ["output_item.added", "custom_tool_call_input.delta", "custom_tool_call_input.done",
                                 "output_item.done", "completed"]
    assert events[3]["delta"] == events[4]["input"] == "x"


def test_reasoning_then_text() -> None:
    """reasoning_content deltas are a reasoning item (reasoning_text), closed when the text starts."""
    chunks = [delta(reasoning_content="Think"), delta(reasoning_content="ing."), delta(content="Answer."),
              delta("stop")]
    events = run(chunks)
    assert types(events) == ["created", "in_progress", "output_item.added", "content_part.added",
                             "reasoning_text.delta", "reasoning_text.delta", "reasoning_text.done",
                             "content_part.done", "output_item.done", "output_item.added", "content_part.added",
                             "output_text.delta", "output_text.done", "content_part.done", "output_item.done",
                             "completed"]
    reasoning, message = events[-1]["response"]["output"]
    assert reasoning == {"id": "rs_2", "type": "reasoning", "summary": [], "status": "completed",
                         "content": [{"type": "reasoning_text", "text": "Thinking."}]}
    assert message["content"][0]["text"] == "Answer." and events[9]["output_index"] == 1


def test_upstream_error_mid_stream() -> None:
    """A failure after some text ends with response.failed: the error, the partial item marked incomplete,
    no closing events for it."""
    events = run([delta(content="Half")], failure=("upstream_disconnected", "the upstream connection broke"))
    assert types(events)[-2:] == ["output_text.delta", "failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "the upstream connection broke"}
    assert failed["output"][0]["status"] == "incomplete" and failed["output"][0]["content"][0]["text"] == "Half"


@pytest.mark.parametrize(("kind", "code"), [("upstream_rate_limited", "rate_limit_exceeded"),
                                            ("upstream_timeout", "server_error"),
                                            ("stream_time_limit", "server_error")])
def test_failure_codes_are_the_sdk_s(kind: str, code: str) -> None:
    """A failure's code in response.failed is one the SDK knows (a rate limit stays a rate limit)."""
    assert run([], failure=(kind, "broken"))[-1]["response"]["error"]["code"] == code


def test_empty_answer() -> None:
    """An upstream that says nothing: created, in_progress, completed with no output."""
    events = run([delta(role="assistant", content=""), delta("stop")], finish=("stop", USAGE))
    assert types(events) == ["created", "in_progress", "completed"]
    assert events[-1]["response"]["output"] == [] and events[-1]["response"]["usage"]["total_tokens"] == 18


def test_finish_reason_length_is_incomplete() -> None:
    """A cut answer ends with response.incomplete, reason max_output_tokens, its item incomplete."""
    events = run([delta(content="Cut"), delta("length")])
    assert types(events)[-1] == "incomplete"
    response = events[-1]["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"


def test_tool_call_name_after_its_first_delta_and_without_index() -> None:
    """A call whose name arrives after its id (and a server that omits `index`) still makes one item."""
    chunks = [delta(tool_calls=[{"id": "call_x", "type": "function", "function": {"arguments": ""}}]),
              delta(tool_calls=[{"id": "call_x", "function": {"name": "get_weather", "arguments": "{}"}}]),
              delta("tool_calls")]
    events = run(chunks, bridged(tools=[WEATHER]))
    assert types(events)[2:] == ["output_item.added", "function_call_arguments.delta", "function_call_arguments.done",
                                 "output_item.done", "completed"]


def test_tool_calls_without_index_and_with_repeated_names() -> None:
    """Whole calls without `index` (two in one chunk, one in the next) are three items; a name repeated in
    every delta does not grow; a continuation piece with neither id nor name extends the last call."""
    chunks = [delta(tool_calls=[{"id": "a", "function": {"name": "get_weather", "arguments": "{}"}},
                                {"id": "b", "function": {"name": "get_weather", "arguments": "{"}}]),
              delta(tool_calls=[{"function": {"arguments": "}"}}]),
              delta(tool_calls=[{"id": "c", "function": {"name": "get_weather", "arguments": "{}"}}]),
              delta(tool_calls=[{"index": 5, "id": "d", "function": {"name": "get_weather", "arguments": "{"}}]),
              delta(tool_calls=[{"index": 5, "function": {"name": "get_weather", "arguments": "}"}}]),
              delta("tool_calls")]
    output = run(chunks, bridged(tools=[WEATHER]))[-1]["response"]["output"]
    assert [(item["call_id"], item["name"], item["arguments"]) for item in output] == [
        ("a", "get_weather", "{}"), ("b", "get_weather", "{}"), ("c", "get_weather", "{}"), ("d", "get_weather", "{}")]


def test_a_finished_stream_emits_nothing_more() -> None:
    """finish or fail after the end adds no event (the pump ends every stream with end(), after error())."""
    request = bridged()
    stream = ResponsesStream(frame_for(request, 0, counter_ids()), request.tools)
    stream.start()
    assert stream.fail("upstream_timeout", "silent")
    assert stream.finish() == [] and stream.fail("x", "y") == []


# --- the whole answer --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("message", "finish", "kinds", "status"), [
    ({"role": "assistant", "content": "Hello"}, "stop", ["message"], "completed"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
        {"id": "call_2", "type": "function", "function": {"name": "apply_patch", "arguments": '{"input":"x"}'}}]},
     "tool_calls", ["function_call", "custom_tool_call"], "completed"),
    ({"role": "assistant", "reasoning_content": "Hmm.", "content": "Yes"}, "stop", ["reasoning", "message"],
     "completed"),
    ({"role": "assistant", "content": "Cut"}, "length", ["message"], "incomplete"),
    ({"role": "assistant", "content": ""}, "stop", [], "completed"),
], ids=["text", "tool-calls", "reasoning", "length", "empty"])
def test_whole_answer(message: dict[str, Any], finish: str, kinds: list[str], status: str) -> None:
    """A chat completion becomes a Response the SDK reads: items, status, usage."""
    request = bridged(stream=False, tools=[WEATHER, APPLY_PATCH], metadata={"a": "b"})
    ids = counter_ids()
    completion = {"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": message,
                                                                       "finish_reason": finish}], "usage": USAGE}
    response = Response.model_validate(response_of_completion(completion, request, frame_for(request, 0, ids), ids))
    assert [item.type for item in response.output] == kinds and response.status == status
    assert response.usage is not None and response.usage.total_tokens == 18 and response.metadata == {"a": "b"}
    if finish == "tool_calls":
        assert response.output[1].model_dump()["input"] == "x"


@pytest.mark.parametrize(("usage", "expected"), [
    (None, None),
    ({"prompt_tokens": 3, "completion_tokens": 4}, {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0,
                                                                                             "cache_write_tokens": 0},
                                                    "output_tokens": 4,
                                                    "output_tokens_details": {"reasoning_tokens": 0},
                                                    "total_tokens": 7}),
    ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "prompt_cache_hit_tokens": 2},
     {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0}, "output_tokens": 4,
      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7}),
], ids=["none", "no-total", "deepseek-cache"])
def test_usage_mapping(usage: dict[str, Any] | None, expected: dict[str, Any] | None) -> None:
    """Chat usage becomes Responses usage with its details (DeepSeek's cache hits as cached tokens)."""
    assert responses_usage(usage) == expected


def test_frame_echoes_the_request() -> None:
    """The Response object repeats the request's instructions, tools, tool_choice and limits."""
    request = bridged(instructions="Be brief.", tools=[WEATHER], max_output_tokens=50, store=False)
    frame = frame_for(request, 5, counter_ids())
    assert isinstance(frame, ResponseFrame)
    response = Response.model_validate(frame.response("in_progress", []))
    assert response.instructions == "Be brief." and response.max_output_tokens == 50 and response.store is False
    assert response.tools[0].type == "function" and response.created_at == 5
