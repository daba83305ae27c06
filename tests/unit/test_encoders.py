"""proxy/encoders.py: the exact bytes each client protocol gets for chunks, silence, errors and the end."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.encoders import NdjsonEncoder, SseEncoder, WebSocketEncoder, sse_data, without_usage
from proxy.upstream import Chunk, parse_chunk


def chunk(payload: bytes) -> Chunk:
    parsed = parse_chunk(payload)
    assert isinstance(parsed, Chunk)
    return parsed


TEXT = chunk(b'{"choices":[{"delta":{"content":"H\\u00e9 \\"x\\"\\n"}}]}')
REASONING = chunk(b'{"choices":[{"delta":{"reasoning_content":"hmm"}}]}')
BOTH = chunk(b'{"choices":[{"delta":{"reasoning_content":"r","content":"c"}}]}')
EMPTY = chunk(b'{"choices":[{"delta":{"role":"assistant","content":""}}]}')


def test_ndjson_records() -> None:
    """One record per content delta; reasoning only when asked (before the content of its chunk); silence is a
    blank line; nothing before the first record."""
    plain, reasoning = NdjsonEncoder(), NdjsonEncoder(include_reasoning=True)
    assert plain.start() == b""
    assert plain.chunks([TEXT, REASONING, EMPTY]) == b'{"done":false,"error":false,"content":"H\xc3\xa9 \\"x\\"\\n"}\n'
    assert reasoning.chunks([BOTH]) == (b'{"done":false,"error":false,"content":"","reasoning":"r"}\n'
                                        b'{"done":false,"error":false,"content":"c"}\n')
    assert plain.chunks([EMPTY]) == b""
    assert plain.keepalive() == b"\n"


@pytest.mark.parametrize(("finish", "usage", "expected"), [
    (None, None, b'{"done":true,"error":false,"content":"[DONE]"}\n'),
    ("stop", None, b'{"done":true,"error":false,"content":"[DONE]","finish_reason":"stop"}\n'),
    ("length", {"total_tokens": 3}, b'{"done":true,"error":false,"content":"[DONE]","finish_reason":"length",'
                                    b'"usage":{"total_tokens":3}}\n'),
    (None, {"total_tokens": 3}, b'{"done":true,"error":false,"content":"[DONE]","usage":{"total_tokens":3}}\n'),
])
def test_ndjson_end(finish: str | None, usage: dict[str, Any] | None, expected: bytes) -> None:
    """The last record is [DONE], with the finish reason and usage when there are any."""
    assert NdjsonEncoder().end(finish, usage) == expected


def test_ndjson_error() -> None:
    """A failure is one error record with the kind as `code`."""
    assert NdjsonEncoder().error("upstream_timeout", 'slow "x"') == (
        b'{"done":false,"error":true,"content":"slow \\"x\\"","code":"upstream_timeout"}\n')


def test_sse_forwards_raw_chunks() -> None:
    """OpenAI SSE: each chunk's raw bytes as one `data:` event (reasoning and empty deltas too), comment
    keep-alive, [DONE] at the end whatever the finish."""
    encoder = SseEncoder()
    assert encoder.start() == b""
    assert encoder.chunks([TEXT, EMPTY]) == b"data: " + TEXT.raw + b"\n\ndata: " + EMPTY.raw + b"\n\n"
    assert encoder.keepalive() == b": keep-alive\n\n"
    assert encoder.end("stop", {"total_tokens": 1}) == encoder.end(None, None) == b"data: [DONE]\n\n"


def test_sse_event_ids() -> None:
    """With an event id every chunk carries `id: <id>` (for EventSource's Last-Event-ID)."""
    assert SseEncoder(event_id="r1").chunks([EMPTY, EMPTY]) == (b"id: r1\ndata: " + EMPTY.raw + b"\n\n") * 2


def test_sse_errors_unnamed_and_named() -> None:
    """A mid-stream error is OpenAI's error object; named `event: error` for EventSource pages."""
    body = b'data: {"error":{"message":"broke","type":"api_error","code":"upstream_disconnected"}}\n\n'
    assert SseEncoder().error("upstream_disconnected", "broke") == body
    assert SseEncoder(error_event=True).error("upstream_disconnected", "broke") == b"event: error\n" + body


@pytest.mark.parametrize(("payload", "expected"), [
    (b'{"a":1}', b'data: {"a":1}\n\n'),
    (b'{"a":\n1}', b'data: {"a":\ndata: 1}\n\n'),
    (b'{"a":\r\n1}', b'data: {"a":\ndata: 1}\n\n'),
])
def test_sse_data_splits_lines(payload: bytes, expected: bytes) -> None:
    """A payload over several lines becomes one `data:` line each, so it stays one event."""
    assert sse_data(payload) == expected


def test_websocket_records_and_reply() -> None:
    """WebSocket JSON: streaming marker, one reply record per batch (content joined), done; the reply is kept."""
    encoder = WebSocketEncoder()
    assert encoder.start() == b'{"reply":"","isStreaming":true}\n'
    assert encoder.chunks([TEXT, REASONING, BOTH]) == b'{"reply":"H\xc3\xa9 \\"x\\"\\nc"}\n'
    assert encoder.chunks([REASONING, EMPTY]) == b""
    assert encoder.keepalive() == b""
    assert encoder.error("upstream_error", "no") == b'{"reply":"no","error":true,"code":"upstream_error"}\n'
    assert encoder.end("stop", None) == b'{"reply":"","done":true}\n'
    assert encoder.reply == 'Hé "x"\nc'


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"id":"c","choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}',
     b'{"id":"c","choices":[{"index":0,"delta":{"content":"a"}}]}'),
    (b'{"id": "c", "choices": [], "usage" : null, "x": 1}', b'{"id": "c", "choices": [], "x": 1}'),
    (b'{"choices":[{"delta":{"content":"\\",\\"usage\\":null"}}]}',
     b'{"choices":[{"delta":{"content":"\\",\\"usage\\":null"}}]}'),
    (b'{"choices":[],"usage":{"total_tokens":3}}', b'{"choices":[],"usage":{"total_tokens":3}}'),
])
def test_usage_the_relay_added_is_taken_out_of_a_chunk(raw: bytes, expected: bytes) -> None:
    """Only the chunk's own `"usage":null` field goes; text that merely looks like it inside a string stays."""
    assert without_usage(raw) == expected


def test_sse_encoder_hides_the_usage_only_chunk_when_asked() -> None:
    """hide_usage drops the choices-less usage chunk and strips the null usage from the others."""
    content = parse_chunk(b'{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}')
    usage = parse_chunk(b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}')
    assert isinstance(content, Chunk) and isinstance(usage, Chunk) and usage.usage_only
    assert SseEncoder(hide_usage=True).chunks([content, usage]) == (
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
    assert SseEncoder().chunks([content, usage]).count(b"data: ") == 2
