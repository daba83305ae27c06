"""Chat completion chunks -> Anthropic's Messages event stream: one state machine, pure, no I/O.

The sequence it writes is Anthropic's: `message_start` (usage: the input tokens ESTIMATED from the request,
as chat servers count them only at the end), then for each content block `content_block_start`, its
deltas and `content_block_stop`, then `message_delta` (stop reason, and the upstream's usage: output
tokens and the real input tokens, which Anthropic's SDKs take over the estimate) and `message_stop`.

- `reasoning_content` deltas are a `thinking` block (`thinking_delta`; its signature stays empty: the relay
  cannot sign, and no SDK requires one), `content` deltas a `text` block (`text_delta`), each tool call
  (by its chat `index`) a `tool_use` block whose argument pieces are `input_json_delta`s as they come.
  A new kind of delta closes the open block and opens the next, so blocks follow one another as in
  Anthropic's own streams; calls sent without an `index` (each whole in one chunk) are told apart by
  id; a late argument piece for a tool call whose block was closed (servers that interleave parallel
  calls) still goes to that call's block index, which is how the SDKs file deltas.
- A failure (`fail`) is Anthropic's `error` event, after which nothing more is written.
- `ping` is the keep-alive event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from proxy.bridge.messages_answer import anthropic_usage, as_dict, message_id, stop_reason, tool_use_id
from proxy.encoders import anthropic_error

Event = tuple[str, dict[str, Any]]
PING: Event = ("ping", {"type": "ping"})


class Delta(NamedTuple):
    """What one chat chunk says, as the machine needs it."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()
    finish_reason: str | None = None
    matched_stop: str | None = None  # vLLM's `stop_reason`: the stop sequence that ended the answer
    usage: dict[str, Any] | None = None


def delta_of(chunk: dict[str, Any]) -> Delta:
    """A parsed chat chunk as a Delta."""
    usage = chunk["usage"] if isinstance(chunk.get("usage"), dict) else None
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return Delta(usage=usage)
    choice = as_dict(choices[0])
    delta = as_dict(choice.get("delta"))
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    calls = delta.get("tool_calls")
    finish, matched = choice.get("finish_reason"), choice.get("stop_reason")
    return Delta(content=_text(delta.get("content")), reasoning=_text(reasoning),
                 tool_calls=tuple(call for call in calls if isinstance(call, dict)) if isinstance(calls, list) else (),
                 finish_reason=_text(finish), matched_stop=_text(matched), usage=usage)


def encode(events: Sequence[Event]) -> bytes:
    """Events as SSE, each named by its type."""
    return b"".join(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n" for name, data in events)


class MessagesStream:
    """One Messages stream's state: which block is open, which blocks the tool calls have."""

    def __init__(self, model: str, input_tokens: int, stop_sequences: Sequence[str] = ()) -> None:
        self.model = model
        self.id = message_id()
        self._input_tokens = input_tokens
        self._stop_sequences = tuple(stop_sequences)
        self._open: tuple[str, int] | None = None  # (block type, block index) of the open block
        self._blocks = 0
        self._tool_blocks: dict[int, int] = {}  # chat tool call index -> block index
        self._unindexed: dict[str, int] = {}  # tool call id -> its number, for calls sent without an index
        self._finish: str | None = None
        self._matched: str | None = None
        self._usage: dict[str, Any] | None = None
        self._done = False

    def start(self) -> list[Event]:
        message: dict[str, Any] = {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self._input_tokens, "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": message})]

    def feed(self, delta: Delta) -> list[Event]:
        if self._done:
            return []
        events: list[Event] = []
        if delta.reasoning:
            index = self._block("thinking", events, {"type": "thinking", "thinking": "", "signature": ""})
            events.append(_delta(index, {"type": "thinking_delta", "thinking": delta.reasoning}))
        if delta.content:
            index = self._block("text", events, {"type": "text", "text": ""})
            events.append(_delta(index, {"type": "text_delta", "text": delta.content}))
        for position, call in enumerate(delta.tool_calls):
            self._tool_call(call, position, events)
        self._finish = delta.finish_reason or self._finish
        self._matched = delta.matched_stop or self._matched
        self._usage = delta.usage or self._usage
        return events

    def end(self, finish_reason: str | None = None, usage: dict[str, Any] | None = None) -> list[Event]:
        """Close the open block and the message; `finish_reason` and `usage` default to what the chunks said."""
        if self._done:
            return []
        self._done = True
        events: list[Event] = []
        self._close(events)
        reason, sequence = stop_reason(finish_reason or self._finish, bool(self._tool_blocks), self._matched,
                                       self._stop_sequences)
        counted = anthropic_usage(usage or self._usage)
        delta_usage: dict[str, int] = {"output_tokens": 0} if counted is None else counted
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                         "usage": delta_usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def fail(self, message: str, error_type: str = "api_error") -> list[Event]:
        """Anthropic's in-stream `error` event; the stream ends there."""
        if self._done:
            return []
        self._done = True
        return [("error", anthropic_error(error_type, message))]

    def _tool_call(self, call: dict[str, Any], position: int, events: list[Event]) -> None:
        number = self._call_number(call, position)
        function = as_dict(call.get("function"))
        index = self._tool_blocks.get(number)
        if index is None:
            block: dict[str, Any] = {"type": "tool_use", "id": tool_use_id(call.get("id")),
                                     "name": function.get("name") or "", "input": {}}
            index = self._block("tool_use", events, block, force_new=True)
            self._tool_blocks[number] = index
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            events.append(_delta(index, {"type": "input_json_delta", "partial_json": arguments}))

    def _call_number(self, call: dict[str, Any], position: int) -> int:
        """Which tool call a piece belongs to: its chat `index`; servers that send none (each call whole in
        one chunk) are told apart by the call's id, and a piece with neither continues the latest call."""
        number = call.get("index")
        if isinstance(number, int):
            return number
        call_id = call.get("id")
        if isinstance(call_id, str) and call_id:
            # Negative numbers: never one a server's own indexes use.
            return self._unindexed.setdefault(call_id, -1 - len(self._unindexed))
        return max(self._tool_blocks, key=self._tool_blocks.__getitem__) if self._tool_blocks else position

    def _block(self, kind: str, events: list[Event], block: dict[str, Any], force_new: bool = False) -> int:
        """The open block's index if it is of `kind`; otherwise close it and open a new one."""
        if self._open is not None and self._open[0] == kind and not force_new:
            return self._open[1]
        self._close(events)
        index = self._blocks
        self._blocks += 1
        self._open = (kind, index)
        events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": block}))
        return index

    def _close(self, events: list[Event]) -> None:
        if self._open is not None:
            events.append(("content_block_stop", {"type": "content_block_stop", "index": self._open[1]}))
            self._open = None


def _delta(index: int, delta: dict[str, Any]) -> Event:
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
