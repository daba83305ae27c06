"""One small encoder per client protocol: upstream chunks in, bytes for the client out.

The pump calls `start()` once (its bytes, possibly empty, send the response headers), `chunks()` for each
batch read from the upstream, `keepalive()` during silence, and ends every stream with `end()`, after
`error()` when something broke. Encoders do one JSON encode per record and nothing else per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from proxy.upstream import Chunk

NDJSON_DONE = b'{"done":true,"error":false,"content":"[DONE]"}\n'
_NDJSON_CONTENT = b'{"done":false,"error":false,"content":'
_NDJSON_REASONING = b'{"done":false,"error":false,"content":"","reasoning":'


class Encoder(Protocol):
    def start(self) -> bytes: ...
    def chunks(self, chunks: Sequence[Chunk]) -> bytes: ...
    def keepalive(self) -> bytes: ...
    def error(self, code: str, message: str) -> bytes: ...
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

    def error(self, code: str, message: str) -> bytes:
        return orjson.dumps({"done": False, "error": True, "content": message, "code": code}) + b"\n"

    def end(self, finish_reason: str | None, usage: dict[str, Any] | None) -> bytes:
        if finish_reason is None and usage is None:
            return NDJSON_DONE
        record: dict[str, Any] = {"done": True, "error": False, "content": "[DONE]"}
        if finish_reason is not None:
            record["finish_reason"] = finish_reason
        if usage is not None:
            record["usage"] = usage
        return orjson.dumps(record) + b"\n"
