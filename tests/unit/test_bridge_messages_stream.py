"""The chat chunks -> Anthropic events state machine (proxy/bridge/messages_stream.py) on recorded chunk
sequences, each checked event by event and through the anthropic SDK's own stream accumulator."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event

from proxy.bridge.messages_encoder import MessagesEncoder, chunk_delta
from proxy.bridge.messages_stream import PING, Event, MessagesStream, delta_of, encode
from proxy.upstream import Chunk, parse_chunk

USAGE = {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    """A chat.completion.chunk as OpenAI-compatible servers write it."""
    choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": finish, **extra}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "up", "choices": [choice]}


def usage_chunk(usage: dict[str, Any] = USAGE) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "up", "choices": [], "usage": usage}


def call(index: int, arguments: str, call_id: str | None = None, name: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    piece: dict[str, Any] = {"index": index, "function": function}
    if call_id is not None:
        piece.update(id=call_id, type="function")
    return piece


ROLE = chunk({"role": "assistant", "content": ""})
TEXT_ONLY = [ROLE, chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk(finish="stop"), usage_chunk()]
ONE_TOOL_SPLIT = [ROLE, chunk({"tool_calls": [call(0, "", "call_a", "get_weather")]}),
                  *[chunk({"tool_calls": [call(0, piece)]}) for piece in ('{"ci', 'ty":', '"Par', 'is"}')],
                  chunk(finish="tool_calls"), usage_chunk()]
PARALLEL_TOOLS = [ROLE, chunk({"content": "Both."}),
                  chunk({"tool_calls": [call(0, '{"city":', "call_a", "get_weather")]}),
                  chunk({"tool_calls": [call(0, '"Paris"}')]}),
                  chunk({"tool_calls": [call(1, "", "call_b", "get_time")]}),
                  chunk({"tool_calls": [call(1, '{"tz":"CET"}')]}),
                  chunk(finish="tool_calls"), usage_chunk()]
REASONING_THEN_TEXT = [ROLE, chunk({"content": None, "reasoning_content": "Think"}),
                       chunk({"content": None, "reasoning_content": "ing."}), chunk({"content": "Answer."}),
                       chunk(finish="stop"), usage_chunk()]
LENGTH = [ROLE, chunk({"content": "Cut"}), chunk(finish="length"), usage_chunk()]
EMPTY = [ROLE, chunk(finish="stop"), usage_chunk({"prompt_tokens": 5, "completion_tokens": 0})]
NO_USAGE = [ROLE, chunk({"content": "Hi"}, finish="stop")]
VLLM_STOP = [ROLE, chunk({"content": "one two"}), chunk(finish="stop", stop_reason="THREE"),
             usage_chunk()]
CACHED = [ROLE, chunk({"content": "Hi"}), chunk(finish="stop"),
          usage_chunk({"prompt_tokens": 100, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 64}})]
DEEPSEEK_CACHED = [ROLE, chunk({"content": "Hi"}), chunk(finish="stop"),
                   usage_chunk({"prompt_tokens": 100, "completion_tokens": 2, "prompt_cache_hit_tokens": 30})]


def run(chunks: list[dict[str, Any]], stop_sequences: tuple[str, ...] = ()) -> list[Event]:
    machine = MessagesStream("claude-x", 11, stop_sequences)
    events = machine.start()
    for item in chunks:
        events += machine.feed(delta_of(item))
    return events + machine.end()


def shape(events: list[Event]) -> list[str]:
    """Each event in short: its type, and for block events the index and the block or delta type."""
    out = []
    for name, data in events:
        if name == "content_block_start":
            out.append(f"start {data['index']} {data['content_block']['type']}")
        elif name == "content_block_delta":
            out.append(f"delta {data['index']} {data['delta']['type']}")
        elif name == "content_block_stop":
            out.append(f"stop {data['index']}")
        else:
            out.append(name)
    return out


def final_message(events: list[Event]) -> Any:
    """The message the anthropic SDK's own accumulator builds from these events (as `messages.stream` does)."""
    snapshot = None
    buffers: dict[int, bytes] = {}
    for _name, data in events:
        if data["type"] in ("ping", "error"):
            continue
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=buffers)  # type: ignore[arg-type]
    return snapshot


@pytest.mark.parametrize(("chunks", "expected"), [
    (TEXT_ONLY, ["message_start", "start 0 text", "delta 0 text_delta", "delta 0 text_delta", "stop 0",
                 "message_delta", "message_stop"]),
    (ONE_TOOL_SPLIT, ["message_start", "start 0 tool_use", *["delta 0 input_json_delta"] * 4, "stop 0",
                      "message_delta", "message_stop"]),
    (PARALLEL_TOOLS, ["message_start", "start 0 text", "delta 0 text_delta", "stop 0", "start 1 tool_use",
                      "delta 1 input_json_delta", "delta 1 input_json_delta", "stop 1", "start 2 tool_use",
                      "delta 2 input_json_delta", "stop 2", "message_delta", "message_stop"]),
    (REASONING_THEN_TEXT, ["message_start", "start 0 thinking", "delta 0 thinking_delta", "delta 0 thinking_delta",
                           "stop 0", "start 1 text", "delta 1 text_delta", "stop 1", "message_delta",
                           "message_stop"]),
    (EMPTY, ["message_start", "message_delta", "message_stop"]),
])
def test_event_sequences(chunks: list[dict[str, Any]], expected: list[str]) -> None:
    """Text, a tool call split over many deltas, parallel tool calls (each its own block), reasoning then
    text, and an empty answer give Anthropic's event sequence, blocks opened and closed in order."""
    assert shape(run(chunks)) == expected


@pytest.mark.parametrize(("chunks", "stop_reason", "stop_sequence", "usage"), [
    (TEXT_ONLY, "end_turn", None, {"input_tokens": 20, "output_tokens": 7}),
    (ONE_TOOL_SPLIT, "tool_use", None, {"input_tokens": 20, "output_tokens": 7}),
    (LENGTH, "max_tokens", None, {"input_tokens": 20, "output_tokens": 7}),
    (EMPTY, "end_turn", None, {"input_tokens": 5, "output_tokens": 0}),
    (NO_USAGE, "end_turn", None, {"input_tokens": 11, "output_tokens": 0}),
    (VLLM_STOP, "stop_sequence", "THREE", {"input_tokens": 20, "output_tokens": 7}),
    (CACHED, "end_turn", None, {"input_tokens": 36, "output_tokens": 2, "cache_read_input_tokens": 64}),
    (DEEPSEEK_CACHED, "end_turn", None, {"input_tokens": 70, "output_tokens": 2, "cache_read_input_tokens": 30}),
])
def test_stop_reason_and_usage(chunks: list[dict[str, Any]], stop_reason: str, stop_sequence: str | None,
                               usage: dict[str, int]) -> None:
    """message_delta carries the stop reason (stop sequences only when the upstream names the one matched)
    and the usage-only final chunk's counts (cached prompt tokens as cache reads); with no usage the
    estimate in message_start stands."""
    message = final_message(run(chunks, stop_sequences=("THREE",)))
    assert (message.stop_reason, message.stop_sequence) == (stop_reason, stop_sequence)
    assert {key: value for key, value in message.usage.to_dict().items() if key in usage} == usage


def test_the_sdk_builds_the_whole_message() -> None:
    """The SDK's accumulator turns the events into the message Anthropic would send: text, tool inputs
    parsed from their pieces, thinking, under the client's model name."""
    tools = final_message(run(PARALLEL_TOOLS))
    assert tools.model == "claude-x" and tools.id.startswith("msg_")
    assert [block.type for block in tools.content] == ["text", "tool_use", "tool_use"]
    assert tools.content[0].text == "Both."
    assert (tools.content[1].id, tools.content[1].name, tools.content[1].input) == (
        "call_a", "get_weather", {"city": "Paris"})
    assert (tools.content[2].name, tools.content[2].input) == ("get_time", {"tz": "CET"})
    thinking = final_message(run(REASONING_THEN_TEXT))
    assert [(block.type, getattr(block, "thinking", None) or getattr(block, "text", None))
            for block in thinking.content] == [("thinking", "Thinking."), ("text", "Answer.")]


def test_message_start_estimates_the_input_and_is_complete() -> None:
    """message_start is a whole empty message with the estimated input tokens and no output yet."""
    (name, data), = MessagesStream("claude-x", 42).start()
    assert name == "message_start"
    assert data["message"]["content"] == [] and data["message"]["usage"] == {"input_tokens": 42, "output_tokens": 0}
    assert data["message"]["stop_reason"] is None and data["message"]["role"] == "assistant"


def test_a_failure_is_an_error_event_and_the_end() -> None:
    """An upstream failure mid-stream is Anthropic's `error` event; nothing is written after it."""
    machine = MessagesStream("claude-x", 1)
    machine.start()
    machine.feed(delta_of(chunk({"content": "Par"})))
    assert machine.fail("the upstream broke") == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "the upstream broke"}})]
    assert machine.feed(delta_of(chunk({"content": "tial"}))) == [] and machine.end() == []


def test_interleaved_parallel_calls_keep_their_blocks() -> None:
    """A server that interleaves two calls' pieces: each piece still lands in its own call's block."""
    chunks = [chunk({"tool_calls": [call(0, '{"a":', "c0", "f")]}),
              chunk({"tool_calls": [call(1, '{"b":', "c1", "g")]}),
              chunk({"tool_calls": [call(0, "1}")]}), chunk({"tool_calls": [call(1, "2}")]}),
              chunk(finish="tool_calls")]
    message = final_message(run(chunks))
    assert [(block.name, block.input) for block in message.content] == [("f", {"a": 1}), ("g", {"b": 2})]


def test_a_tool_call_without_an_id_gets_one() -> None:
    """Servers that give no tool call id: the block gets a fresh `toolu_` id."""
    message = final_message(run([chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}),
                                 chunk(finish="tool_calls")]))
    assert message.content[0].id.startswith("toolu_") and message.stop_reason == "tool_use"


def encoded(chunks: list[dict[str, Any]]) -> list[Chunk]:
    parsed = [parse_chunk(orjson.dumps(item)) for item in chunks]
    assert all(isinstance(item, Chunk) for item in parsed)
    return parsed  # type: ignore[return-value]


def test_the_encoder_writes_sse_events_from_the_pumps_chunks() -> None:
    """The pump's encoder: named SSE events, `ping` as keep-alive, and the same events as the machine."""
    encoder = MessagesEncoder(MessagesStream("claude-x", 3))
    out = encoder.start() + encoder.keepalive() + encoder.chunks(encoded(PARALLEL_TOOLS)) + encoder.end(
        "tool_calls", USAGE)
    events = [block for block in out.split(b"\n\n") if block]
    assert events[0].startswith(b"event: message_start\ndata: {")
    assert events[1] == b'event: ping\ndata: {"type":"ping"}' and encode([PING]) == events[1] + b"\n\n"
    names = [event.split(b"\n")[0].removeprefix(b"event: ").decode() for event in events]
    assert names[-2:] == ["message_delta", "message_stop"] and names.count("content_block_start") == 3


def test_the_encoder_ends_a_failed_stream_with_the_error_only() -> None:
    """error() then end(): one error event and nothing after it (Anthropic streams end at the error)."""
    encoder = MessagesEncoder(MessagesStream("claude-x", 3))
    encoder.start()
    out = encoder.error("upstream_disconnected", "the upstream broke") + encoder.end(None, None)
    assert out == (b'event: error\ndata: {"type":"error","error":{"type":"api_error",'
                   b'"message":"the upstream broke"}}\n\n')


@pytest.mark.parametrize("item", [*TEXT_ONLY, *PARALLEL_TOOLS, *REASONING_THEN_TEXT, *VLLM_STOP])
def test_the_encoder_reads_chunks_as_the_machine_does(item: dict[str, Any]) -> None:
    """The encoder's shortcut (the pump's parse unless tool calls or a stop reason need a second look)
    gives the same delta as a full parse."""
    parsed = parse_chunk(orjson.dumps(item))
    assert isinstance(parsed, Chunk)
    assert chunk_delta(parsed) == delta_of(item)


def test_calls_without_an_index_are_told_apart_by_id() -> None:
    """Servers that send each call whole without an `index`: two calls with two ids are two blocks; a
    piece with neither index nor id continues the latest call."""
    chunks = [chunk({"tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a":1}'}}]}),
              chunk({"tool_calls": [{"id": "c2", "function": {"name": "g", "arguments": '{"b":'}}]}),
              chunk({"tool_calls": [{"function": {"arguments": "2}"}}]}), chunk(finish="stop")]
    message = final_message(run(chunks))
    assert [(block.id, block.name, block.input) for block in message.content] == [
        ("c1", "f", {"a": 1}), ("c2", "g", {"b": 2})]
    assert message.stop_reason == "tool_use"
