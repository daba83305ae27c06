"""One small encoder per client protocol: upstream chunks in, bytes for the client out.

The pump calls `start()` once (its bytes, possibly empty, send the response headers), `chunks()` for each
batch read from the upstream, `keepalive()` during silence, and ends every stream with `end()`, after
`error()` when something broke. Encoders do one JSON encode per record and nothing else per token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:  # a type only: proxy.errors renders its error bodies with this module's records
    from proxy.upstream import Chunk

NDJSON_DONE = b'{"done":true,"error":false,"content":"[DONE]"}\n'
SSE_DONE = b"data: [DONE]\n\n"


# The error objects of each protocol, built here and nowhere else (proxy/errors.py's bodies, the encoders'
# and the forwarded streams' error events, the Messages bridge, gunicorn's own refusals).

def openai_error(message: str, error_type: str, kind: str) -> dict[str, Any]:
    """OpenAI's error object, which its SDKs raise as exceptions; `code` carries the relay's kind."""
    return {"error": {"message": message, "type": error_type, "code": kind}}


def anthropic_error(error_type: str, message: str) -> dict[str, Any]:
    """Anthropic's error object (a body, or an `error` event's data), which its SDKs raise by `type`."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


def ndjson_error_record(kind: str, message: str) -> bytes:
    """The old relay's error record; `code` carries the machine-readable kind."""
    return orjson.dumps({"done": False, "error": True, "content": message, "code": kind}) + b"\n"


def sse_error_event(message: str, error_type: str, kind: str, named: bool) -> bytes:
    """An OpenAI-shaped error as one SSE event; `named` makes it `event: error`, which EventSource pages
    receive in their error listener instead of `onmessage`."""
    payload = orjson.dumps(openai_error(message, error_type, kind))
    return (b"event: error\n" if named else b"") + b"data: " + payload + b"\n\n"
_NDJSON_CONTENT = b'{"done":false,"error":false,"content":'
_NDJSON_REASONING = b'{"done":false,"error":false,"content":"","reasoning":'


class Encoder(Protocol):
    def start(self) -> bytes: ...
    def chunks(self, chunks: Sequence[Chunk]) -> bytes: ...
    def keepalive(self) -> bytes: ...
    def error(self, kind: str, message: str) -> bytes: ...
    def end(self, finish_reason: str | None, usage: dict[str, Any] | None) -> bytes: ...


class NdjsonEncoder:
    """The old relay's records: `{"done","error","content"}` per line, always ending in the [DONE] line."""

    def __init__(self, include_reasoning: bool = False) -> None:
        self.include_reasoning = include_reasoning

    def start(self) -> bytes:
        return b""

    def chunks(self, chunks: Sequence[Chunk]) -> bytes:
        out = []
        for chunk in chunks:
            if chunk.reasoning and self.include_reasoning:
                out.append(_NDJSON_REASONING + orjson.dumps(chunk.reasoning) + b"}\n")
            if chunk.content:
                out.append(_NDJSON_CONTENT + orjson.dumps(chunk.content) + b"}\n")
        return b"".join(out)

    def keepalive(self) -> bytes:
        return b"\n"  # a blank line: the old relay's clients skip it

    def error(self, kind: str, message: str) -> bytes:
        return ndjson_error_record(kind, message)

    def end(self, finish_reason: str | None, usage: dict[str, Any] | None) -> bytes:
        if finish_reason is None and usage is None:
            return NDJSON_DONE
        record: dict[str, Any] = {"done": True, "error": False, "content": "[DONE]"}
        if finish_reason is not None:
            record["finish_reason"] = finish_reason
        if usage is not None:
            record["usage"] = usage
        return orjson.dumps(record) + b"\n"


SSE_KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: EventSource and the SDKs skip it


class SseEncoder:
    """OpenAI's streaming format: every upstream chunk forwarded as the upstream wrote it (`data: <JSON>`),
    so content, reasoning_content, tool calls, finish reasons and the usage chunk arrive byte for byte.

    A failure mid-stream becomes `{"error": {"message", "type", "code"}}`, which the openai SDKs raise as
    `APIError`, then `data: [DONE]`. With `error_event` (for EventSource pages) the error goes out as a named
    `event: error` instead, so a page's `onmessage` (which expects chunks) never sees it. With `event_id`,
    every chunk carries `id: <event_id>`, so a browser that reconnects after a dropped connection says so
    with a `Last-Event-ID` header (and the relay can refuse to ask the model a second time)."""

    def __init__(self, error_event: bool = False, event_id: str | None = None, hide_usage: bool = False) -> None:
        self.error_event = error_event
        self._id_line = f"id: {event_id}\n".encode() if event_id else b""
        self.hide_usage = hide_usage

    def start(self) -> bytes:
        return b""

    def chunks(self, chunks: Sequence[Chunk]) -> bytes:
        if self.hide_usage:
            return b"".join(self._id_line + sse_data(without_usage(chunk.raw)) for chunk in chunks
                            if not chunk.usage_only)
        if self._id_line:
            return b"".join(self._id_line + sse_data(chunk.raw) for chunk in chunks)
        return b"".join(sse_data(chunk.raw) for chunk in chunks)

    def keepalive(self) -> bytes:
        return SSE_KEEPALIVE

    def error(self, kind: str, message: str) -> bytes:
        return sse_error_event(message, "api_error", kind, named=self.error_event)

    def end(self, finish_reason: str | None, usage: dict[str, Any] | None) -> bytes:
        return SSE_DONE


# What an upstream adds to every chunk once it is asked for usage; a quote inside a JSON string is escaped,
# so this can only match the chunk's own top-level field.
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null')


def without_usage(raw: bytes) -> bytes:
    """A chunk as the upstream would have written it had the relay not asked for usage."""
    return _NULL_USAGE.sub(b"", raw, count=1) if b'"usage"' in raw else raw


def sse_data(payload: bytes) -> bytes:
    """One SSE event carrying `payload`; a payload spread over several lines gets one `data:` per line."""
    if b"\n" in payload or b"\r" in payload:
        payload = b"\ndata: ".join(payload.splitlines())
    return b"data: " + payload + b"\n\n"


WEBSOCKET_STREAMING = b'{"reply":"","isStreaming":true}\n'
WEBSOCKET_DONE = b'{"reply":"","done":true}\n'
_WEBSOCKET_REPLY = b'{"reply":'


class WebSocketEncoder:
    """The tutorials' WebSocket chat: `{"reply":"","isStreaming":true}`, `{"reply":"<delta>"}`...,
    `{"reply":"","done":true}`; an error is `{"reply":"<message>","error":true,"code":...}` before the end.

    Every record ends in a newline: the `/ws` route sends each record as its own text message. The encoder
    also keeps the answer's text, which the route adds to the connection's history. Keep-alive is the
    WebSocket's own ping (`ping_interval`), so silence encodes to nothing.
    """

    def __init__(self) -> None:
        self.reply_parts: list[str] = []

    @property
    def reply(self) -> str:
        return "".join(self.reply_parts)

    def start(self) -> bytes:
        return WEBSOCKET_STREAMING

    def chunks(self, chunks: Sequence[Chunk]) -> bytes:
        parts = [chunk.content for chunk in chunks if chunk.content]
        if not parts:
            return b""
        self.reply_parts.extend(parts)
        return _WEBSOCKET_REPLY + orjson.dumps("".join(parts)) + b"}\n"

    def keepalive(self) -> bytes:
        return b""

    def error(self, kind: str, message: str) -> bytes:
        return orjson.dumps({"reply": message, "error": True, "code": kind}) + b"\n"

    def end(self, finish_reason: str | None, usage: dict[str, Any] | None) -> bytes:
        return WEBSOCKET_DONE
