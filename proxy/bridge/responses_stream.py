"""Chat completion chunks -> Responses API stream events: one state machine, pure, no I/O.

`start()` gives `response.created` and `response.in_progress`; `chunk(obj)` takes one parsed chat chunk
and gives the events it calls for; the stream ends with `finish(finish_reason, usage)` (items closed,
`response.completed`, or `response.incomplete` when the answer was cut at `max_output_tokens`) or with
`fail(kind, message)` (`response.failed`, the output so far marked incomplete). Every event carries the
next `sequence_number`; item ids and output indexes stay the same from `output_item.added` to `.done`.

Items open and close as the answer goes: reasoning deltas (`reasoning_content`, or `reasoning`) are a
reasoning item with `reasoning_text` content (raw reasoning, which is what chat upstreams send, not a
summary); text is a message item with one `output_text` part; each tool call (by its chat `index`) is a
`function_call` item whose arguments stream as `function_call_arguments.delta`, or, for a custom tool, a
`custom_tool_call` whose input streams as `custom_tool_call_input.delta` while its JSON wrapper
(`{"input": ...}`) is decoded (proxy/bridge/responses_custom_input.py), then `.done`. Text and reasoning
items close when another kind starts; tool calls stay open until the end, since upstreams may interleave
the deltas of parallel calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.bridge.responses_answer import (
    IdMaker,
    ResponseFrame,
    custom_input,
    message_item,
    output_text_part,
    random_id,
    reasoning_item,
    responses_usage,
    status_of,
    tool_call_item,
)
from proxy.bridge.responses_custom_input import CustomInputDecoder
from proxy.bridge.responses_request import ToolTable, as_dict

Event = dict[str, Any]


def failure_code(kind: str) -> str:
    """The relay's failure kind as one of the codes a Response's `error` may carry (the SDK's list)."""
    return "rate_limit_exceeded" if "rate_limit" in kind else "server_error"


@dataclass
class _TextItem:
    """An open message or reasoning item."""

    kind: str  # "message" or "reasoning"
    index: int
    id: str
    parts: list[str] = field(default_factory=list)


@dataclass
class _ToolItem:
    """An open tool call: announced once its name is known; arguments before that are kept."""

    index: int | None
    id: str
    call_id: str
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    sent: int = 0  # how many argument pieces went out as deltas
    custom: CustomInputDecoder = field(default_factory=CustomInputDecoder)  # a custom tool's input, decoded


class ResponsesStream:
    def __init__(self, frame: ResponseFrame, tools: ToolTable, new_id: IdMaker = random_id) -> None:
        self.frame = frame
        self.tools = tools
        self.new_id = new_id
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # by output index; replaced by the final item on close
        self.text: _TextItem | None = None
        self.calls: dict[int, _ToolItem] = {}  # by the chat tool call index
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.ended = False

    def event(self, type_: str, **fields: Any) -> Event:
        event = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[Event]:
        response = self.frame.response("in_progress", [])
        return [self.event("response.created", response=response),
                self.event("response.in_progress", response=response)]

    def chunk(self, obj: dict[str, Any]) -> list[Event]:
        """The events for one chat chunk (a role-only or usage-only chunk gives none)."""
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []
        choice = choices[0]
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return []
        events: list[Event] = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            events += self._text_delta("reasoning", reasoning)
        content = delta.get("content")
        if isinstance(content, str) and content:
            events += self._text_delta("message", content)
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                if isinstance(call, dict):
                    events += self._tool_delta(call)
        return events

    # --- text and reasoning ------------------------------------------------------------------------------

    def _text_delta(self, kind: str, delta: str) -> list[Event]:
        events: list[Event] = []
        if self.text is not None and self.text.kind != kind:
            events += self._close_text("completed")
        if self.text is None:
            events += self._open_text(kind)
        item = self.text
        assert item is not None
        item.parts.append(delta)
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        events.append(self.event(name, item_id=item.id, output_index=item.index, content_index=0, delta=delta,
                                 **extra))
        return events

    def _open_text(self, kind: str) -> list[Event]:
        index = len(self.output)
        item = _TextItem(kind, index, self.new_id("msg" if kind == "message" else "rs"))
        self.text = item
        if kind == "message":
            added, part = message_item(item.id, "", "in_progress"), output_text_part("")
        else:
            added, part = reasoning_item(item.id, "", "in_progress"), {"type": "reasoning_text", "text": ""}
        self.output.append(added)
        return [self.event("response.output_item.added", output_index=index, item=added),
                self.event("response.content_part.added", item_id=item.id, output_index=index, content_index=0,
                           part=part)]

    def _close_text(self, status: str) -> list[Event]:
        item = self.text
        if item is None:
            return []
        self.text = None
        text = "".join(item.parts)
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        if item.kind == "message":
            done = message_item(item.id, text, status)
            events = [self.event("response.output_text.done", **where, text=text, logprobs=[]),
                      self.event("response.content_part.done", **where, part=output_text_part(text))]
        else:
            done = reasoning_item(item.id, text, status)
            events = [self.event("response.reasoning_text.done", **where, text=text),
                      self.event("response.content_part.done", **where, part={"type": "reasoning_text",
                                                                               "text": text})]
        self.output[item.index] = done
        return [*events, self.event("response.output_item.done", output_index=item.index, item=done)]

    # --- tool calls ----------------------------------------------------------------------------------------

    def _tool_delta(self, call: dict[str, Any]) -> list[Event]:
        key = call["index"] if isinstance(call.get("index"), int) else self._index_of(call)
        events: list[Event] = []
        item = self.calls.get(key)
        if item is None:
            events += self._close_text("completed")
            call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else self.new_id("call")
            item = self.calls[key] = _ToolItem(None, "", str(call_id))
        function = as_dict(call.get("function"))
        if isinstance(function.get("name"), str) and not item.name:
            item.name = function["name"]  # said once; servers that repeat it in every delta do not rename it
        if isinstance(function.get("arguments"), str) and function["arguments"]:
            item.arguments.append(function["arguments"])
        if item.index is None and item.name:
            events += self._announce(item)
        if item.index is not None:
            events += self._argument_deltas(item)
        return events

    def _index_of(self, call: dict[str, Any]) -> int:
        """The key of a tool call sent without `index` (some servers omit it): the open call with its id; a
        piece with neither id nor name continues the last call; anything else is a new call."""
        call_id = call.get("id")
        for key, item in self.calls.items():
            if call_id and item.call_id == call_id:
                return key
        if self.calls and not call_id and not as_dict(call.get("function")).get("name"):
            return list(self.calls)[-1]
        return -1 - len(self.calls)

    def _announce(self, item: _ToolItem) -> list[Event]:
        kind = self.tools.lookup(item.name).kind
        item.index = len(self.output)
        item.id = self.new_id("ctc" if kind == "custom" else "fc")
        added = tool_call_item(item.id, item.call_id, item.name, "", self.tools, "in_progress")
        self.output.append(added)
        return [self.event("response.output_item.added", output_index=item.index, item=added)]

    def _argument_deltas(self, item: _ToolItem) -> list[Event]:
        pieces, item.sent = item.arguments[item.sent:], len(item.arguments)
        if self.tools.lookup(item.name).kind == "custom":
            decoded = "".join(item.custom.feed(piece) for piece in pieces)
            return [self.event("response.custom_tool_call_input.delta", item_id=item.id, output_index=item.index,
                               delta=decoded)] if decoded else []
        return [self.event("response.function_call_arguments.delta", item_id=item.id, output_index=item.index,
                           delta=piece) for piece in pieces]

    def _close_tool(self, item: _ToolItem, status: str) -> list[Event]:
        if item.index is None:  # a call that never got a name cannot be shown as one
            return []
        arguments = "".join(item.arguments)
        done = tool_call_item(item.id, item.call_id, item.name, arguments, self.tools, status)
        where = {"item_id": item.id, "output_index": item.index}
        if done["type"] == "custom_tool_call":
            text = custom_input(arguments)
            events = [] if item.custom.emitted or not text else [
                self.event("response.custom_tool_call_input.delta", **where, delta=text)]
            events.append(self.event("response.custom_tool_call_input.done", **where, input=text))
        else:
            events = [self.event("response.function_call_arguments.done", **where, name=done["name"],
                                 arguments=arguments)]
        self.output[item.index] = done
        return [*events, self.event("response.output_item.done", output_index=item.index, item=done)]

    # --- the end -----------------------------------------------------------------------------------------------

    def _close_all(self, status: str) -> list[Event]:
        events = self._close_text(status)
        for item in sorted(self.calls.values(), key=lambda call: call.index if call.index is not None else -1):
            events += self._close_tool(item, status)
        self.calls.clear()
        return events

    def _abandon_open_items(self) -> None:
        """Mark what is open incomplete, without the closing events: a client must not take a broken
        answer's items for finished ones."""
        if self.text is not None:
            text, item = "".join(self.text.parts), self.text
            made = message_item if item.kind == "message" else reasoning_item
            self.output[item.index] = made(item.id, text, "incomplete")
        for call in self.calls.values():
            if call.index is not None:
                self.output[call.index] = tool_call_item(call.id, call.call_id, call.name, "".join(call.arguments),
                                                         self.tools, "incomplete")
        self.text = None
        self.calls.clear()

    def finish(self, finish_reason: str | None = None, usage: dict[str, Any] | None = None) -> list[Event]:
        """Close what is open and end with `response.completed` (or `response.incomplete`)."""
        if self.ended:
            return []
        self.ended = True
        status, reason = status_of(finish_reason or self.finish_reason)
        events = self._close_all("completed" if status == "completed" else "incomplete")
        response = self.frame.response(status, self.output, responses_usage(usage or self.usage), reason)
        return [*events, self.event(f"response.{status}", response=response)]

    def fail(self, kind: str, message: str) -> list[Event]:
        """End with `response.failed`: the output so far, marked incomplete, and the error."""
        if self.ended:
            return []
        self.ended = True
        self._abandon_open_items()
        response = self.frame.response("failed", self.output, responses_usage(self.usage),
                                       error={"code": failure_code(kind), "message": message})
        return [self.event("response.failed", response=response)]
