"""The Messages bridge's encoder for the pump (proxy/encoders.py's `Encoder` protocol): chat chunks from a
chat upstream in, Anthropic's event stream out, through the one state machine `MessagesStream`.

The pump gives the bridge what every stream has: keep-alives (`ping` events), first-token and idle timers,
fall-over before the first token (`message_start` is the same whichever upstream answers, and nothing else
is sent before the first progress), cancellation and the usage for budgets (the chat usage, as the pump
reads it). A chunk is parsed again only when the pump's parse lacks something the machine needs (tool
calls, a matched stop sequence); text and reasoning deltas reuse the pump's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from proxy.bridge.messages_stream import PING, Delta, MessagesStream, delta_of, encode

if TYPE_CHECKING:
    from proxy.upstream import Chunk


def chunk_delta(chunk: Chunk) -> Delta:
    """What the machine needs of one chunk, from the pump's parse where that is enough."""
    if b'"tool_calls"' in chunk.raw or b'"stop_reason"' in chunk.raw:
        try:
            parsed = orjson.loads(chunk.raw)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return delta_of(parsed)
    return Delta(content=chunk.content, reasoning=chunk.reasoning, finish_reason=chunk.finish_reason,
                 usage=chunk.usage)


class MessagesEncoder:
    """Anthropic's Messages events for a chat stream."""

    def __init__(self, stream: MessagesStream) -> None:
        self.stream = stream

    def start(self) -> bytes:
        return encode(self.stream.start())

    def chunks(self, chunks: Sequence[Chunk]) -> bytes:
        events = []
        for chunk in chunks:
            events.extend(self.stream.feed(chunk_delta(chunk)))
        return encode(events)

    def keepalive(self) -> bytes:
        return encode([PING])

    def error(self, kind: str, message: str) -> bytes:
        return encode(self.stream.fail(message))

    def end(self, finish_reason: str | None, usage: dict[str, Any] | None) -> bytes:
        return encode(self.stream.end(finish_reason, usage))
