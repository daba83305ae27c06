"""The pump's encoder (proxy/encoders.py's protocol) for a Responses stream served by a chat upstream.

The pump drives it as it drives every stream, so a bridged stream gets the relay's timers, keep-alives,
fall-over before the first token and cancellation. Each chat chunk's JSON (`Chunk.raw`) goes through the
`ResponsesStream` state machine; its events go out as named SSE events (`event: <type>` / `data: <json>`),
as OpenAI sends them. A chunk that is not progress (a role or usage chunk) makes no event, so what the pump
holds back and drops on a fall-over never used up a sequence number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from proxy.bridge.responses_stream import Event, ResponsesStream
from proxy.encoders import SSE_KEEPALIVE

if TYPE_CHECKING:
    from proxy.upstream import Chunk


def sse_events(events: Sequence[Event]) -> bytes:
    return b"".join(b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
                    for event in events)


class ResponsesEncoder:
    def __init__(self, stream: ResponsesStream) -> None:
        self.stream = stream

    def start(self) -> bytes:
        return sse_events(self.stream.start())

    def chunks(self, chunks: Sequence[Chunk]) -> bytes:
        events: list[Event] = []
        for chunk in chunks:
            try:
                parsed = orjson.loads(chunk.raw)
            except orjson.JSONDecodeError:  # the reader already parsed it once; it cannot fail here
                continue
            if isinstance(parsed, dict):
                events += self.stream.chunk(parsed)
        return sse_events(events)

    def keepalive(self) -> bytes:
        return SSE_KEEPALIVE

    def error(self, kind: str, message: str) -> bytes:
        return sse_events(self.stream.fail(kind, message))

    def end(self, finish_reason: str | None, usage: dict[str, Any] | None) -> bytes:
        return sse_events(self.stream.finish(finish_reason, usage))
