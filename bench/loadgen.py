"""A light load generator: raw asyncio sockets, HTTP/1.1 keep-alive, NDJSON and SSE readers.

It is deliberately thin (no HTTP library, one read per network chunk, records parsed with orjson)
so that it is never the bottleneck; the benchmark shows that by running it against the fake
upstream directly. Every stream asks the fake upstream, through whatever proxy sits in between,
for a known answer (`#fake {"n_tokens": N, ...}` in the last user message), so the text that
arrives can be checked complete and in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import Callable
from typing import Any, Literal

import orjson

# ndjson: the relay's /chat records; sse: chat completion chunks; responses: the Responses API's named events.
Protocol = Literal["ndjson", "sse", "responses"]
READ_SIZE = 256 * 1024


@dataclasses.dataclass(frozen=True)
class Target:
    """One thing to benchmark: where it listens and how it speaks."""

    name: str
    host: str
    port: int
    path: str
    protocol: Protocol
    authorization: str
    model: str = "bench-model"


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """The answer the fake upstream is asked for."""

    n_tokens: int
    token_interval: float = 0.0
    first_token_delay: float = 0.0

    def expected_text(self) -> str:
        return "".join(f" tok{i}" for i in range(self.n_tokens))

    def fake_override(self) -> str:
        fields = {
            "n_tokens": self.n_tokens,
            "token_interval": self.token_interval,
            "first_token_delay": self.first_token_delay,
        }
        return "#fake " + json.dumps(fields, separators=(",", ":"))


@dataclasses.dataclass
class StreamResult:
    ok: bool
    error: str | None
    started: float  # perf_counter when the request was written
    ttft: float | None  # seconds from request written to first content
    duration: float
    tokens: int  # content records received


@dataclasses.dataclass
class LoadResult:
    target: str
    concurrency: int
    spec: StreamSpec
    wall_seconds: float
    results: list[StreamResult]
    peak_open_streams: int

    @property
    def errors(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.results:
            if not result.ok:
                key = result.error or "unknown"
                counts[key] = counts.get(key, 0) + 1
        return counts

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results if r.ok)

    def ttfts(self) -> list[float]:
        return sorted(r.ttft for r in self.results if r.ok and r.ttft is not None)


class StreamFailed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def build_request(target: Target, spec: StreamSpec) -> bytes:
    message = {"role": "user", "content": spec.fake_override()}
    body: dict[str, Any] = {"model": target.model, "messages": [message]}
    if target.protocol == "responses":
        body = {"model": target.model, "input": spec.fake_override(), "stream": True}
    elif target.protocol == "sse":
        body["stream"] = True
    payload = orjson.dumps(body)
    head = (
        f"POST {target.path} HTTP/1.1\r\n"
        f"Host: {target.host}:{target.port}\r\n"
        f"Authorization: {target.authorization}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: */*\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode("latin-1") + payload


class RecordReader:
    """Turns a response body into content pieces, for NDJSON records or SSE `data:` events."""

    def __init__(self, protocol: Protocol) -> None:
        self.sse = protocol != "ndjson"
        self.responses = protocol == "responses"
        self.pending = b""
        self.parts: list[str] = []
        self.done = False
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        if self.pending:
            data = self.pending + data
        cut = data.rfind(b"\n")
        if cut < 0:
            self.pending = data
            return
        self.pending = data[cut + 1 :]
        for line in data[:cut].split(b"\n"):
            if line:
                self._line(line)

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
            if not line:
                return
        if self.sse:
            if not line.startswith(b"data:"):
                return
            payload = line[5:].lstrip()
            if payload == b"[DONE]":
                self.done = True
                return
            try:
                record = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.error = "bad_record"
                return
            if self.responses:
                self._event(record)
                return
            if record.get("error"):
                self.error = "stream_error"
                return
            choices = record.get("choices")
            if choices:
                content = (choices[0].get("delta") or {}).get("content")
                if content:
                    self.parts.append(content)
            return
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            self.error = "bad_record"
            return
        if record.get("done"):
            self.done = True
        elif record.get("error"):
            self.error = str(record.get("code") or "error_record")
        else:
            content = record.get("content")
            if content:
                self.parts.append(content)


    def _event(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        if kind == "response.output_text.delta":
            if record.get("delta"):
                self.parts.append(record["delta"])
        elif kind == "response.completed":
            self.done = True
        elif kind in ("error", "response.failed", "response.incomplete"):
            self.error = "stream_error"


class ChunkedDecoder:
    """Incremental HTTP/1.1 chunked-transfer decoder (consumes the terminating chunk completely)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.data_left = 0  # payload bytes left in the current chunk
        self.crlf_left = 0  # bytes of the CRLF after the current chunk still to skip
        self.in_trailer = False
        self.finished = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        buffer = self.buffer + data if self.buffer else data
        position = 0
        size = len(buffer)
        while position < size and not self.finished:
            if self.data_left:
                take = min(self.data_left, size - position)
                out.append(buffer[position : position + take])
                position += take
                self.data_left -= take
                continue
            if self.crlf_left:
                take = min(self.crlf_left, size - position)
                position += take
                self.crlf_left -= take
                continue
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                break
            line = buffer[position:line_end]
            position = line_end + 2
            if self.in_trailer:
                if not line:
                    self.finished = True
                continue
            chunk_size = int(line.split(b";", 1)[0], 16)
            if chunk_size == 0:
                self.in_trailer = True
                continue
            self.data_left = chunk_size
            self.crlf_left = 2
        self.buffer = buffer[position:]
        return out


class Connection:
    """One keep-alive HTTP/1.1 connection, used for one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def ensure_open(self) -> None:
        if self.writer is None:
            try:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=READ_SIZE)
            except OSError as error:
                raise StreamFailed("connect") from error
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None


async def run_stream(
    connection: Connection,
    target: Target,
    spec: StreamSpec,
    request: bytes,
    on_open: Callable[[], None] | None = None,
    on_close: Callable[[], None] | None = None,
) -> StreamResult:
    """Send one request and read its streamed answer to the end, checking the text."""
    await connection.ensure_open()
    assert connection.reader is not None and connection.writer is not None
    reader, writer = connection.reader, connection.writer
    started = time.perf_counter()
    writer.write(request)
    ttft: float | None = None
    records = RecordReader(target.protocol)
    reusable = False
    opened = False
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await reader.read(READ_SIZE)
            if not data:
                raise StreamFailed("closed_before_headers")
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if on_open is not None:
            on_open()
            opened = True
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"")
        length = int(headers[b"content-length"]) if b"content-length" in headers else None
        keep_alive = headers.get(b"connection") != b"close"
        if status != 200:
            raise StreamFailed(f"http_{status}")
        decoder = ChunkedDecoder() if chunked else None
        received = 0
        data = rest
        while True:
            if data:
                received += len(data)
                pieces = decoder.feed(data) if decoder is not None else [data]
                for piece in pieces:
                    records.feed(piece)
                if ttft is None and records.parts:
                    ttft = time.perf_counter() - started
                if records.error:
                    raise StreamFailed(records.error)
                if decoder is not None and decoder.finished:
                    reusable = keep_alive
                    break
                if length is not None and received >= length:
                    reusable = keep_alive
                    break
            data = await reader.read(READ_SIZE)
            if not data:
                break
        if records.pending:
            records.feed(b"\n")
        if records.error:
            raise StreamFailed(records.error)
        if not records.done:
            raise StreamFailed("incomplete")
        text = "".join(records.parts)
        if text != spec.expected_text():
            raise StreamFailed("wrong_text")
        return StreamResult(True, None, started, ttft, time.perf_counter() - started, len(records.parts))
    except StreamFailed as failure:
        reusable = False
        return StreamResult(False, failure.kind, started, ttft, time.perf_counter() - started, len(records.parts))
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        reusable = False
        return StreamResult(False, "connection_error", started, ttft, time.perf_counter() - started, 0)
    finally:
        if opened and on_close is not None:
            on_close()
        if not reusable:
            connection.close()


async def run_load(
    target: Target,
    spec: StreamSpec,
    concurrency: int,
    requests_per_worker: int | None = None,
    duration: float | None = None,
    ramp_seconds: float = 0.0,
    stream_timeout: float = 120.0,
) -> LoadResult:
    """`concurrency` workers, each running streams one after another on its own keep-alive connection.

    Each worker stops after `requests_per_worker` streams or once `duration` seconds have passed.
    Worker starts are spread evenly over `ramp_seconds`.
    """
    request = build_request(target, spec)
    results: list[StreamResult] = []
    open_now = 0
    peak = 0
    began = time.perf_counter()
    deadline = began + duration if duration is not None else None

    def opened() -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)

    def closed() -> None:
        nonlocal open_now
        open_now -= 1

    async def worker(index: int) -> None:
        if ramp_seconds and concurrency > 1:
            await asyncio.sleep(ramp_seconds * index / concurrency)
        connection = Connection(target.host, target.port)
        done = 0
        try:
            while True:
                if requests_per_worker is not None and done >= requests_per_worker:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(stream_timeout):
                        result = await run_stream(connection, target, spec, request, opened, closed)
                except TimeoutError:
                    connection.close()
                    result = StreamResult(False, "timeout", started, None, time.perf_counter() - started, 0)
                except StreamFailed as failure:
                    connection.close()
                    result = StreamResult(False, failure.kind, started, None, time.perf_counter() - started, 0)
                results.append(result)
                done += 1
        finally:
            connection.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return LoadResult(target.name, concurrency, spec, time.perf_counter() - began, results, peak)


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]
