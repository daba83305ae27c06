"""A fake OpenAI-compatible upstream: a real HTTP/1.1 server on loopback, stdlib asyncio only.

It streams Server-Sent Events the way the real chat completions API does, and can be told to
misbehave (slow tokens, errors, disconnects, malformed or split lines) so that the relay's tests
and the benchmark talk real HTTP to something that looks like OpenAI.

Use from tests::

    with FakeUpstream() as fake:
        fake.behave(tokens=["Hello", " world"], first_token_delay=0.5)
        client = openai.OpenAI(base_url=fake.base_url, api_key="sk-test")
        ...

A single request can override the default behaviour: when the content of its last user message
is a string starting with ``#fake `` followed by a JSON object, the object's keys replace the
default behaviour's fields for that request only (the benchmark uses this through other proxies).

From the command line (the benchmark runs it as its own process)::

    python -m tests.fake_upstream --port 0 [--tokens N --interval S] [--uvloop]

prints ``READY http://127.0.0.1:PORT/v1`` once listening and runs until SIGTERM or SIGINT.

Wire details that clients may rely on:
- Response headers are sent (after ``headers_delay``) together with the first chunk, whose delta is
  ``{"role":"assistant","content":"","refusal":null}``; ``first_token_delay`` is the silence between
  that chunk and the first reasoning or content token; ``token_interval`` the silence between tokens.
- With ``tool_call`` the answer is a function tool call (``tool_name``, ``tool_arguments`` streamed one piece
  per delta) instead of content tokens; with ``tool_call_once`` only while the request holds no ``tool``
  message, so a client's tool round trip ends with the answer's tokens.
- ``stall_after_done`` sends everything up to ``data: [DONE]`` but never ends the HTTP body.
- ``StreamClosed.tokens_sent`` counts content tokens (and tool-call argument pieces) handed to the
  socket; reasoning tokens are not counted.
- Every ``stream: true`` chat request gets exactly one ``StreamClosed`` record, however it ends.
- Beside chat it answers, for the relay's forwarding tests: ``POST /v1/responses`` (a Responses object, or
  with ``stream: true`` the named events OpenAI sends: ``response.created``, the message item and its text
  part opened, ``response.output_text.delta`` per token, text, part and item closed, and
  ``response.completed`` with usage, recorded as a ``StreamClosed``; the Codex CLI accepts it; a ``#fake``
  override in the last user item of its ``input`` applies as for chat),
  ``/v1/embeddings``,
  ``/v1/audio/speech`` (binary ``audio/mpeg``), ``/v1/audio/transcriptions`` (reads the multipart upload),
  ``/v1/images/generations`` and ``/v1/files`` (upload, list, retrieve, content, delete). The default
  behaviour's ``status``, delays and tokens apply to them; every request's headers are recorded.
- Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``), streamed or whole, with the
  same faults; ``GET /v1/models`` with an ``anthropic-version`` header answers Anthropic's list shape
  (``ANTHROPIC_MODELS``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import random
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

DEFAULT_TOKENS = ("Hello", " from", " the", " fake", " upstream", ".")
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "fake-model")
ANTHROPIC_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "kimi-k2-0905")  # GET /v1/models with anthropic-version
FAKE_PREFIX = "#fake "
MAX_HEADER_BYTES = 64 * 1024
SPLIT_UTF8_PAUSE = 0.02
SPLIT_LINES_PAUSE = 0.01
# Give the client time to read what was sent before a RST makes its kernel drop unread data.
RESET_GRACE_SECONDS = 0.05
TOOL_NAME = "get_weather"
TOOL_ARGUMENT_PIECES = ('{"', "city", '":"', "Par", "is", '","unit":"', "celsius", '"}')

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Overloaded",
}


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """How the fake answers chat completion requests; every field has a harmless default."""

    tokens: tuple[str, ...] | list[str] = DEFAULT_TOKENS
    n_tokens: int | None = None
    reasoning: tuple[str, ...] | list[str] = ()
    tool_call: bool = False
    tool_name: str = TOOL_NAME
    tool_arguments: tuple[str, ...] | list[str] = TOOL_ARGUMENT_PIECES  # streamed one piece per delta
    tool_call_once: bool = False  # the tool call while the conversation holds no tool result, then the tokens
    first_token_delay: float = 0.0
    token_interval: float = 0.0
    headers_delay: float = 0.0
    status: int = 200
    error_message: str = "The fake upstream was told to fail."
    error_type: str | None = None
    error_code: str | None = None
    retry_after: str | None = None
    error_content_type: str | None = None
    error_raw_body: bytes | str | None = None
    disconnect_after: int | None = None
    reset_after: int | None = None
    malformed_after: int | None = None
    split_utf8: bool = False
    split_lines: bool = False
    never_answer: bool = False
    stall_after_headers: bool = False
    stall_after_done: bool = False
    raw_body: bytes | str | None = None
    huge_chunk_bytes: int | None = None
    finish_reason: str = "stop"
    usage: bool = True
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS
    models_status: int = 200  # GET /models answers this status (an error body unless 200)
    models_delay: float = 0.0  # seconds before GET /models answers

    def content_tokens(self) -> list[str]:
        if self.huge_chunk_bytes is not None:
            return ["x" * self.huge_chunk_bytes]
        if self.n_tokens is not None:
            return [f" tok{i}" for i in range(self.n_tokens)]
        return list(self.tokens)


BEHAVIOUR_FIELDS = frozenset(field.name for field in dataclasses.fields(Behaviour))


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    body: bytes = b""


@dataclasses.dataclass(frozen=True)
class StreamClosed:
    at: float
    tokens_sent: int
    completed: bool


class _Recorder:
    """State shared by all connections of one server; only the event loop thread mutates it."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.requests: list[RecordedRequest] = []
        self.streams_closed: list[StreamClosed] = []
        # Bumped by FakeUpstream.reset: a stream begun before it (a previous test's, finishing late) is not
        # recorded after it.
        self.generation = 0
        self.connections_opened = 0
        self.connections_closed = 0
        self.live: set[_Connection] = set()
        self.files: dict[str, tuple[str, bytes]] = {}  # file id -> (filename, content), for /v1/files


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunked-transfer chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _split_point_utf8(event: bytes) -> int:
    """An offset inside the first multi-byte UTF-8 character, else the middle of the event."""
    for index, byte in enumerate(event):
        if byte >= 0xC0:
            return index + 1
    return max(1, len(event) // 2)


def _count_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    words = 0
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            words += len(message["content"].split())
    return max(1, words)


def _request_override(body: Any) -> dict[str, Any] | None:
    """The ``#fake {...}`` object in the last user message (chat's and Anthropic's ``messages``, or a
    Responses ``input``: a string or a list of messages), if any."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(body.get("input"), str):
        messages = [{"role": "user", "content": body["input"]}]
    elif isinstance(body.get("input"), list):
        messages = body["input"]
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = _text_of(message.get("content"))
            if content.startswith(FAKE_PREFIX):
                override, _end = json.JSONDecoder().raw_decode(content[len(FAKE_PREFIX) :].lstrip())
                if not isinstance(override, dict):
                    raise ValueError("#fake must be followed by a JSON object")
                return override
            return None
    return None


def _text_of(content: Any) -> str:
    """A message's text: a string, or its first text part (chat, Responses and Anthropic parts alike)."""
    if isinstance(content, str):
        return content
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            return cast(str, part["text"])
    return ""


def _behaviour_with(base: Behaviour, override: dict[str, Any]) -> Behaviour:
    unknown = set(override) - BEHAVIOUR_FIELDS
    if unknown:
        raise ValueError(f"unknown fake behaviour field(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(base, **override)


class _ClientGone(Exception):
    """The client closed the connection; stop answering."""


class _Connection(asyncio.Protocol):
    """One TCP connection: parses requests one after another (keep-alive) and answers them."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handler: asyncio.Task[None] | None = None
        self.closed = False
        self.closed_event = asyncio.Event()
        self.can_write = asyncio.Event()
        self.can_write.set()

    # --- asyncio.Protocol callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport but have the same interface.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.recorder.connections_opened += 1
        self.recorder.live.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.handler is None:
            self._next_request()

    def eof_received(self) -> bool:
        # A client that half-closes is gone for our purposes: close promptly so streams stop.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closed_event.set()
        self.can_write.set()
        if self in self.recorder.live:
            self.recorder.live.discard(self)
            self.recorder.connections_closed += 1
        if self.handler is not None:
            self.handler.cancel()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    # --- request parsing ------------------------------------------------------------------------

    def _next_request(self) -> None:
        if self.closed:
            return
        parsed = self._parse_request()
        if parsed is None:
            return
        method, path, headers, body = parsed
        self.handler = asyncio.get_running_loop().create_task(self._handle(method, path, headers, body))

    def _parse_request(self) -> tuple[str, str, dict[str, str], bytes] | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                self._fail_fast(431, "request headers too large")
            return None
        head = bytes(self.buffer[:end]).decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            self._fail_fast(400, "malformed request line")
            return None
        method, target, _version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body_start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            decoded = self._parse_chunked(body_start)
            if decoded is None:
                return None
            body, consumed = decoded
            del self.buffer[:consumed]
        else:
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._fail_fast(400, "bad content-length")
                return None
            if len(self.buffer) < body_start + length:
                return None
            body = bytes(self.buffer[body_start : body_start + length])
            del self.buffer[: body_start + length]
        return method, target, headers, body

    def _parse_chunked(self, start: int) -> tuple[bytes, int] | None:
        body = bytearray()
        position = start
        while True:
            line_end = self.buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(bytes(self.buffer[position:line_end]).split(b";")[0], 16)
            position = line_end + 2
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", position - 2)
                if trailer_end < 0:
                    return None
                return bytes(body), trailer_end + 4
            if len(self.buffer) < position + size + 2:
                return None
            body += self.buffer[position : position + size]
            position += size + 2

    def _fail_fast(self, status: int, message: str) -> None:
        if self.transport is not None:
            body = _dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
            self.transport.write(self._head(status, "application/json", len(body), close=True) + body)
            self.transport.close()

    # --- answering ------------------------------------------------------------------------------

    async def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        keep_alive = headers.get("connection", "").lower() != "close"
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = None
        self.recorder.requests.append(RecordedRequest(method, path, headers, parsed, body))
        route = path.split("?", 1)[0].rstrip("/")
        try:
            if route.endswith("/chat/completions"):
                if method != "POST":
                    self._send_error_json(405, "Method not allowed.", "invalid_request_error", None)
                else:
                    keep_alive = await self._chat(parsed, keep_alive) and keep_alive
            elif route.endswith("/models") and method == "GET":
                await self._pause(self.recorder.behaviour.models_delay)
                self._send_models(anthropic="anthropic-version" in headers)
            elif route.endswith("/messages/count_tokens") and method == "POST":
                await self._pause(self.recorder.behaviour.headers_delay)
                self._anthropic_count(parsed)
            elif route.endswith("/messages") and method == "POST":
                keep_alive = await self._anthropic(parsed) and keep_alive
            elif _api_route(route, method) is not None:
                keep_alive = await self._api(method, route, headers, body, parsed) and keep_alive
            else:
                self._send_error_json(404, f"Unknown path {route}.", "invalid_request_error", None)
        except (_ClientGone, asyncio.CancelledError):
            return
        finally:
            self.handler = None
        if not keep_alive or self.closed:
            if self.transport is not None:
                self.transport.close()
            return
        if self.buffer:
            self._next_request()

    # --- the rest of the API (/v1/responses, embeddings, audio, images, files) -----------------------

    async def _api(self, method: str, route: str, headers: dict[str, str], body: bytes, parsed: Any) -> bool:
        """Answer one of the non-chat API paths; the default behaviour's status, headers_delay,
        first_token_delay, token_interval and tokens apply to them too (with a Responses request's ``#fake``
        override)."""
        behaviour = self._behaviour_for(parsed)
        if behaviour is None:
            return True
        await self._pause(behaviour.headers_delay)
        if behaviour.status != 200:
            await self._answer_error(behaviour)
            return True
        name = _api_route(route, method)
        if name == "responses" and isinstance(parsed, dict) and parsed.get("stream") is True:
            stream = _StreamRecord(self.recorder)
            try:
                await self._responses_stream(parsed, behaviour, stream)
            finally:
                stream.finish()
            return True
        if name == "speech":
            audio = b"ID3\x04fake-mp3" + bytes(range(256)) * 4
            self._write(self._head(200, "audio/mpeg", len(audio)) + audio)
            return True
        if name == "file_content":
            _filename, content = self.recorder.files.get(route.split("/")[-2], ("", b""))
            self._write(self._head(200, "application/octet-stream", len(content)) + content)
            return True
        self._send_json(200, self._api_answer(name, method, route, headers, body, parsed, behaviour),
                        extra=(("openai-processing-ms", "7"), ("x-ratelimit-remaining-requests", "99")))
        return True

    def _api_answer(self, name: str | None, method: str, route: str, headers: dict[str, str], body: bytes,
                    parsed: Any, behaviour: Behaviour) -> Any:
        request = parsed if isinstance(parsed, dict) else {}
        text = "".join(behaviour.content_tokens())
        if name == "responses":
            return _response_object(request.get("model"), text, "completed")
        if name == "embeddings":
            inputs = request.get("input")
            count = len(inputs) if isinstance(inputs, list) else 1
            return {"object": "list", "model": request.get("model"),
                    "data": [{"object": "embedding", "index": i, "embedding": [0.5, -0.25, 0.125]}
                             for i in range(count)],
                    "usage": {"prompt_tokens": 4 * count, "total_tokens": 4 * count}}
        if name == "images":
            return {"created": int(time.time()), "data": [{"b64_json": "aW1hZ2U=", "revised_prompt": "an image"}]}
        fields = _multipart_fields(headers.get("content-type", ""), body)
        if name == "transcriptions":
            _filename, audio = fields.get("file", ("", b""))
            model = fields.get("model", ("", b""))[1].decode()
            return {"text": f"heard {len(audio)} bytes with {model}",
                    "usage": {"type": "tokens", "input_tokens": 11, "output_tokens": 5, "total_tokens": 16}}
        return self._files(method, route, fields)

    def _files(self, method: str, route: str, fields: dict[str, tuple[str, bytes]]) -> Any:
        files = self.recorder.files
        if route.endswith("/files") and method == "POST":
            file_id = f"file-{secrets.token_hex(6)}"
            filename, content = fields.get("file", ("upload", b""))
            files[file_id] = (filename, content)
            return _file_object(file_id, filename, len(content))
        if route.endswith("/files"):
            return {"object": "list", "data": [_file_object(i, n, len(c)) for i, (n, c) in files.items()],
                    "has_more": False}
        file_id = route.split("/")[-1]
        filename, content = files.get(file_id, ("missing", b""))
        if method == "DELETE":
            files.pop(file_id, None)
            return {"id": file_id, "object": "file", "deleted": True}
        return _file_object(file_id, filename, len(content))

    async def _responses_stream(self, request: dict[str, Any], behaviour: Behaviour, stream: _StreamRecord) -> None:
        """A Responses API event stream, the sequence OpenAI sends and the Codex CLI reads: created; after the
        first token's delay the message item and its text part opened (output_item.added, content_part.added);
        one delta per token (with the behaviour's delays); the text, part and item closed (output_text.done,
        content_part.done, output_item.done); completed with usage. StreamClosed records it like a chat stream;
        the behaviour's stream faults apply (`_faulty_stream`)."""
        model = request.get("model")
        sequence = itertools.count()

        def event(name: str, fields: dict[str, Any]) -> bytes:
            return _named_event(name, {"type": name, "sequence_number": next(sequence), **fields})

        text_at = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
        created = event("response.created", {"response": _response_object(model, "", "in_progress")})
        opening = (event("response.output_item.added", {"output_index": 0, "item": _message_item("", "in_progress")})
                   + event("response.content_part.added", {**text_at, "part": _text_part("")}))
        tokens = behaviour.content_tokens()
        deltas = [(opening if number == 0 else b"")
                  + event("response.output_text.delta", {**text_at, "delta": token, "logprobs": []})
                  for number, token in enumerate(tokens)]
        text = "".join(tokens)
        closing = ((b"" if tokens else opening)
                   + event("response.output_text.done", {**text_at, "text": text, "logprobs": []})
                   + event("response.content_part.done", {**text_at, "part": _text_part(text)})
                   + event("response.output_item.done", {"output_index": 0, "item": _message_item(text, "completed")})
                   + event("response.completed", {"response": _response_object(model, text, "completed")}))
        malformed = b"event: response.output_text.delta\ndata: {this is not json\n\n"
        await self._faulty_stream(_EventPlan([created], deltas, closing, malformed, behaviour), behaviour, stream)

    async def _faulty_stream(self, plan: _EventPlan, behaviour: Behaviour, stream: _StreamRecord) -> None:
        """An event stream (Responses, Messages) with the behaviour's faults: never answering, stalling after
        the headers, a raw body instead of events, or the plan's spliced faults (disconnect, reset, malformed)."""
        if behaviour.never_answer:
            await self.closed_event.wait()
            raise _ClientGone
        head = self._head(200, "text/event-stream; charset=utf-8", None)
        if behaviour.stall_after_headers:
            self._write(head)
            await self.closed_event.wait()
            raise _ClientGone
        if behaviour.raw_body is not None:
            raw = behaviour.raw_body.encode() if isinstance(behaviour.raw_body, str) else behaviour.raw_body
            self._write(head + (_chunk(raw) if raw else b"") + b"0\r\n\r\n")
            stream.completed = True
            return
        await self._play(head, plan, behaviour, stream)

    # --- Anthropic's Messages API (/v1/messages, as Anthropic, Kimi and DeepSeek serve it) ----------

    async def _anthropic(self, parsed: Any) -> bool:
        """A Messages answer: an Anthropic error body for a non-200 behaviour, else the message, streamed
        (the real event sequence) or whole. The behaviour (with the request's ``#fake`` override) applies."""
        behaviour = self._behaviour_for(parsed)
        if behaviour is None:
            return True
        request = parsed if isinstance(parsed, dict) else {}
        await self._pause(behaviour.headers_delay)
        if behaviour.status != 200:
            self._anthropic_error(behaviour)
            return True
        if request.get("stream") is not True:
            tokens = behaviour.content_tokens()
            await self._pause(behaviour.first_token_delay)
            message = _anthropic_message(request.get("model"), "".join(tokens), len(tokens))
            self._send_json(200, message, extra=(("request-id", "req_fake_anthropic"),))
            return True
        stream = _StreamRecord(self.recorder)
        try:
            await self._anthropic_stream(request, behaviour, stream)
        finally:
            stream.finish()
        return True

    async def _anthropic_stream(self, request: dict[str, Any], behaviour: Behaviour, stream: _StreamRecord) -> None:
        start = _anthropic_message(request.get("model"), "", 1)
        start["stop_reason"] = None
        opening = [_named_event("message_start", {"type": "message_start", "message": start}),
                   _named_event("content_block_start", {
                       "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                   _named_event("ping", {"type": "ping"})]
        tokens = behaviour.content_tokens()
        deltas = [_named_event("content_block_delta", {
            "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}})
            for token in tokens]
        closing = (_named_event("content_block_stop", {"type": "content_block_stop", "index": 0})
                   + _named_event("message_delta", {
                       "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": len(tokens)}})
                   + _named_event("message_stop", {"type": "message_stop"}))
        malformed = b"event: content_block_delta\ndata: {this is not json\n\n"
        await self._faulty_stream(_EventPlan(opening, deltas, closing, malformed, behaviour), behaviour, stream)

    def _behaviour_for(self, parsed: Any) -> Behaviour | None:
        """The default behaviour with the request's ``#fake`` override; None after answering a bad one."""
        try:
            override = _request_override(parsed)
            return _behaviour_with(self.recorder.behaviour, override) if override else self.recorder.behaviour
        except (ValueError, TypeError) as error:
            self._send_error_json(400, f"Bad #fake override: {error}", "invalid_request_error", None)
            return None

    def _anthropic_count(self, parsed: Any) -> None:
        behaviour = self.recorder.behaviour
        if behaviour.status != 200:
            self._anthropic_error(behaviour)
            return
        messages = parsed.get("messages") if isinstance(parsed, dict) else None
        self._send_json(200, {"input_tokens": ANTHROPIC_INPUT_TOKENS + _count_prompt_tokens(messages)})

    def _anthropic_error(self, behaviour: Behaviour) -> None:
        if behaviour.error_raw_body is not None:  # e.g. a load balancer's HTML page
            self._write_raw_error(behaviour)
            return
        extra: tuple[tuple[str, str], ...] = ()
        if behaviour.retry_after is not None:
            extra = (("retry-after", str(behaviour.retry_after)),)
        error_type = behaviour.error_type or _ANTHROPIC_ERROR_TYPES.get(behaviour.status, "api_error")
        self._send_json(behaviour.status, {"type": "error", "error": {"type": error_type,
                                                                     "message": behaviour.error_message}},
                        extra=extra)

    def _head(
        self,
        status: int,
        content_type: str,
        content_length: int | None,
        close: bool = False,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            f"content-type: {content_type}",
            f"x-request-id: req_{secrets.token_hex(12)}",
        ]
        if content_length is None:
            lines.append("transfer-encoding: chunked")
        else:
            lines.append(f"content-length: {content_length}")
        lines.append("connection: close" if close else "connection: keep-alive")
        lines.extend(f"{name}: {value}" for name, value in extra)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise _ClientGone
        self.transport.write(data)

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)
        if not self.can_write.is_set():
            await self.can_write.wait()
        if self.closed:
            raise _ClientGone

    def _send_json(self, status: int, payload: Any, extra: tuple[tuple[str, str], ...] = ()) -> None:
        body = _dumps(payload).encode()
        self._write(self._head(status, "application/json", len(body), extra=extra) + body)

    def _send_error_json(self, status: int, message: str, error_type: str | None, code: str | None) -> None:
        error = {"message": message, "type": error_type, "param": None, "code": code}
        self._send_json(status, {"error": error})

    def _send_models(self, anthropic: bool = False) -> None:
        behaviour = self.recorder.behaviour
        if behaviour.models_status != 200:
            self._send_error_json(behaviour.models_status, "The fake upstream was told not to list its models.",
                                  "api_error", None)
            return
        if anthropic:  # Anthropic's list shape, one page
            data_ = [{"type": "model", "id": m, "display_name": f"Fake {m}", "created_at": "2025-09-29T00:00:00Z"}
                     for m in ANTHROPIC_MODELS]
            self._send_json(200, {"data": data_, "has_more": False, "first_id": data_[0]["id"],
                                  "last_id": data_[-1]["id"]})
            return
        created = int(time.time())
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "fake"} for m in behaviour.models
        ]
        self._send_json(200, {"object": "list", "data": data})

    async def _chat(self, body: Any, keep_alive: bool) -> bool:
        """Answer one chat completion request; returns whether the connection may be reused."""
        try:
            override = _request_override(body)
            behaviour = self.recorder.behaviour
            if override:
                behaviour = _behaviour_with(behaviour, override)
        except (ValueError, TypeError) as error:
            self._send_error_json(400, f"Bad #fake override: {error}", "invalid_request_error", None)
            return True
        if not isinstance(body, dict):
            self._send_error_json(
                400, "We could not parse the JSON body of your request.", "invalid_request_error", None
            )
            return True
        if behaviour.tool_call_once:
            behaviour = dataclasses.replace(behaviour, tool_call=not _holds_tool_result(body))
        streaming = body.get("stream") is True
        if not streaming:
            return await self._answer_plain(body, behaviour)
        stream = _StreamRecord(self.recorder)
        try:
            return await self._answer_stream(body, behaviour, stream)
        finally:
            stream.finish()

    async def _answer_error(self, behaviour: Behaviour) -> None:
        extra: tuple[tuple[str, str], ...] = ()
        if behaviour.retry_after is not None:
            extra = (("retry-after", str(behaviour.retry_after)),)
        if behaviour.error_raw_body is not None:
            self._write_raw_error(behaviour)
            return
        error_type = behaviour.error_type
        if error_type is None:
            error_type = "server_error" if behaviour.status >= 500 else "invalid_request_error"
            if behaviour.status == 429:
                error_type = "requests"
        error = {
            "message": behaviour.error_message,
            "type": error_type,
            "param": None,
            "code": behaviour.error_code,
        }
        self._send_json(behaviour.status, {"error": error}, extra=extra)

    def _write_raw_error(self, behaviour: Behaviour) -> None:
        extra = (("retry-after", str(behaviour.retry_after)),) if behaviour.retry_after is not None else ()
        raw = behaviour.error_raw_body or b""
        raw_bytes = raw.encode() if isinstance(raw, str) else raw
        content_type = behaviour.error_content_type or "text/html; charset=utf-8"
        self._write(self._head(behaviour.status, content_type, len(raw_bytes), extra=extra) + raw_bytes)

    async def _answer_plain(self, body: dict[str, Any], behaviour: Behaviour) -> bool:
        await self._pause(behaviour.headers_delay)
        if behaviour.never_answer or behaviour.stall_after_headers:
            await self.closed_event.wait()
            raise _ClientGone
        if behaviour.status != 200:
            await self._answer_error(behaviour)
            return True
        tokens = behaviour.content_tokens()
        thinking = list(behaviour.reasoning)
        steps = len(tokens) + len(thinking)
        await self._pause(behaviour.first_token_delay + behaviour.token_interval * max(0, steps - 1))
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if behaviour.tool_call else "".join(tokens),
            "refusal": None,
        }
        if thinking:
            message["reasoning_content"] = "".join(thinking)
        finish_reason = behaviour.finish_reason
        if behaviour.tool_call:
            message["tool_calls"] = [_tool_call_whole(behaviour)]
            finish_reason = "tool_calls"
        prompt_tokens = _count_prompt_tokens(body.get("messages"))
        completion_tokens = (len(behaviour.tool_arguments) if behaviour.tool_call else len(tokens)) + len(
            thinking
        )
        self._send_json(
            200,
            {
                "id": f"chatcmpl-{secrets.token_hex(12)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )
        return True

    async def _answer_stream(self, body: dict[str, Any], behaviour: Behaviour, stream: _StreamRecord) -> bool:
        await self._pause(behaviour.headers_delay)
        if behaviour.never_answer:
            await self.closed_event.wait()
            raise _ClientGone
        if behaviour.status != 200:
            await self._answer_error(behaviour)
            return True
        sse_head = self._head(200, "text/event-stream; charset=utf-8", None)
        if behaviour.stall_after_headers:
            self._write(sse_head)
            await self.closed_event.wait()
            raise _ClientGone
        if behaviour.raw_body is not None:
            raw = behaviour.raw_body
            raw_bytes = raw.encode() if isinstance(raw, str) else raw
            self._write(sse_head + (_chunk(raw_bytes) if raw_bytes else b"") + b"0\r\n\r\n")
            stream.completed = True
            return True
        plan = _StreamPlan(body, behaviour)
        await self._play(sse_head, plan, behaviour, stream)
        return True

    async def _play(
        self, head: bytes, plan: _StreamPlan | _EventPlan, behaviour: Behaviour, stream: _StreamRecord
    ) -> None:
        """Write the planned events, batching everything that is due at the same moment."""
        pending: list[bytes] = [head]
        pause = 0.0
        for step in plan.steps:
            kind, event, delay = step
            if delay > 0:
                if pending:
                    self._write(b"".join(pending))
                    pending.clear()
                await self._pause(delay)
                pause = delay
            if kind == "disconnect":
                self._write(b"".join(pending))
                assert self.transport is not None
                self.transport.close()
                raise _ClientGone
            if kind == "reset":
                self._write(b"".join(pending))
                pending.clear()
                await self._pause(RESET_GRACE_SECONDS)
                assert self.transport is not None
                sock = self.transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.transport.abort()
                raise _ClientGone
            if behaviour.split_utf8 or behaviour.split_lines:
                pieces = plan.split(event)
                for index, piece in enumerate(pieces):
                    pending.append(_chunk(piece))
                    if index < len(pieces) - 1:
                        self._write(b"".join(pending))
                        pending.clear()
                        await self._pause(plan.split_pause)
            else:
                pending.append(_chunk(event))
            if kind == "token":
                stream.tokens_sent += 1
                if pause or behaviour.split_utf8 or behaviour.split_lines:
                    # Sent at its own moment: hand it to the socket now, so tokens_sent stays honest.
                    self._write(b"".join(pending))
                    pending.clear()
        if behaviour.stall_after_done:
            # [DONE] sent, but the HTTP body never ends: a client must not wait for its end.
            self._write(b"".join(pending))
            await self.closed_event.wait()
            raise _ClientGone
        pending.append(b"0\r\n\r\n")
        self._write(b"".join(pending))
        stream.completed = True


def _tool_call_whole(behaviour: Behaviour) -> dict[str, Any]:
    return {
        "id": "call_fake0",
        "type": "function",
        "function": {"name": behaviour.tool_name, "arguments": "".join(behaviour.tool_arguments)},
    }


def _holds_tool_result(body: dict[str, Any]) -> bool:
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(message, dict) and message.get("role") == "tool" for message in messages
    )


_API_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("POST", "/responses", "responses"),
    ("POST", "/embeddings", "embeddings"),
    ("POST", "/audio/speech", "speech"),
    ("POST", "/audio/transcriptions", "transcriptions"),
    ("POST", "/images/generations", "images"),
    ("POST", "/files", "files"),
    ("GET", "/files", "files"),
)


def _api_route(route: str, method: str) -> str | None:
    """Which non-chat API path `route` is, if the fake answers it."""
    for wanted_method, suffix, name in _API_ROUTES:
        if method == wanted_method and route.endswith(suffix):
            return name
    parts = route.split("/")
    if len(parts) >= 3 and parts[-2] == "files" and method in ("GET", "DELETE"):
        return "files"
    if len(parts) >= 4 and parts[-3] == "files" and parts[-1] == "content" and method == "GET":
        return "file_content"
    return None


def _multipart_fields(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    """name -> (filename, value) of a multipart/form-data body."""
    import email.parser
    import email.policy

    if not content_type.lower().startswith("multipart/"):
        return {}
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields: dict[str, tuple[str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str):
            fields[name] = (part.get_filename() or "", payload if isinstance(payload, bytes) else b"")
    return fields


ANTHROPIC_INPUT_TOKENS = 12  # every Messages answer's input_tokens (count_tokens adds the prompt's words)
_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                          500: "api_error", 529: "overloaded_error"}


def _anthropic_message(model: Any, text: str, output_tokens: int) -> dict[str, Any]:
    """A Messages API `message` object with its usage."""
    return {"id": "msg_fake_anthropic", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}] if text else [], "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": ANTHROPIC_INPUT_TOKENS, "output_tokens": output_tokens,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}


def _named_event(name: str, payload: Any) -> bytes:
    return f"event: {name}\ndata: {_dumps(payload)}\n\n".encode()


def _response_object(model: Any, text: str, status: str) -> dict[str, Any]:
    """A Responses API object; a completed one carries usage (one output token per word piece)."""
    done = status == "completed"
    output = [_message_item(text, "completed")] if done else []
    return {"id": "resp_fake", "object": "response", "created_at": int(time.time()), "status": status,
            "model": model, "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 21, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 30} if done else None}


def _message_item(text: str, status: str) -> dict[str, Any]:
    """The one assistant message item of a fake Responses answer."""
    return {"type": "message", "id": "msg_fake", "status": status, "role": "assistant", "content":
            [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _file_object(file_id: str, filename: str, size: int) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
            "filename": filename, "purpose": "assistants", "status": "processed"}


class _StreamRecord:
    """Collects what one streaming response did; appends one StreamClosed when it ends."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder
        self.generation = recorder.generation
        self.tokens_sent = 0
        self.completed = False

    def finish(self) -> None:
        if self.generation == self.recorder.generation:
            self.recorder.streams_closed.append(StreamClosed(time.monotonic(), self.tokens_sent, self.completed))


class _StreamPlan:
    """The SSE events of one streaming answer, with the pause before each, as bytes."""

    def __init__(self, body: dict[str, Any], behaviour: Behaviour) -> None:
        model = body.get("model")
        stream_options = body.get("stream_options")
        include_usage = (
            behaviour.usage
            and isinstance(stream_options, dict)
            and stream_options.get("include_usage") is True
        )
        created = int(time.time())
        chunk_id = f"chatcmpl-{secrets.token_hex(12)}"
        self.head = (
            f'data: {{"id":"{chunk_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":{_dumps(model)},"system_fingerprint":"fp_fake","choices":[{{"index":0,"delta":'
        ).encode()
        usage_tail = ',"usage":null' if include_usage else ""
        self.tail = f',"logprobs":null,"finish_reason":null}}]{usage_tail}}}\n\n'.encode()
        self.random = random.Random(chunk_id)
        self.split_pause = SPLIT_UTF8_PAUSE if behaviour.split_utf8 else SPLIT_LINES_PAUSE
        self.behaviour = behaviour
        steps: list[tuple[str, bytes, float]] = []
        steps.append(("meta", self._event('{"role":"assistant","content":"","refusal":null}'), 0.0))
        first = True

        def next_delay() -> float:
            nonlocal first
            delay = behaviour.first_token_delay if first else behaviour.token_interval
            first = False
            return delay

        for piece in behaviour.reasoning:
            steps.append(
                (
                    "reasoning",
                    self._event(f'{{"content":null,"reasoning_content":{_dumps(piece)}}}'),
                    next_delay(),
                )
            )
        if behaviour.tool_call:
            pieces = [
                _dumps(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_fake0",
                                "type": "function",
                                "function": {"name": behaviour.tool_name, "arguments": ""},
                            }
                        ]
                    }
                )
            ]
            pieces += [
                _dumps({"tool_calls": [{"index": 0, "function": {"arguments": argument}}]})
                for argument in behaviour.tool_arguments
            ]
            deltas = [(pieces[0], "meta")] + [(piece, "token") for piece in pieces[1:]]
        else:
            deltas = [(f'{{"content":{_dumps(token)}}}', "token") for token in behaviour.content_tokens()]
        sent = 0
        for delta, kind in deltas:
            steps.append((kind, self._event(delta), next_delay() if kind == "token" else 0.0))
            if kind != "token":
                continue
            sent += 1
            if behaviour.malformed_after == sent:
                steps.append(("meta", b"data: {this is not json\n\n", 0.0))
            if behaviour.disconnect_after == sent:
                steps.append(("disconnect", b"", 0.0))
            if behaviour.reset_after == sent:
                steps.append(("reset", b"", 0.0))
        if behaviour.malformed_after == 0:
            steps.insert(1, ("meta", b"data: {this is not json\n\n", 0.0))
        if behaviour.disconnect_after == 0:
            steps.insert(1, ("disconnect", b"", 0.0))
        if behaviour.reset_after == 0:
            steps.insert(1, ("reset", b"", 0.0))
        finish_reason = "tool_calls" if behaviour.tool_call else behaviour.finish_reason
        finish_tail = (
            f',"logprobs":null,"finish_reason":{_dumps(finish_reason)}}}]{usage_tail}}}\n\n'.encode()
        )
        steps.append(("meta", self.head + b"{}" + finish_tail, 0.0))
        if include_usage:
            prompt_tokens = _count_prompt_tokens(body.get("messages"))
            completion_tokens = sent + len(behaviour.reasoning)
            usage = _dumps(
                {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
            )
            usage_event = (
                f'data: {{"id":"{chunk_id}","object":"chat.completion.chunk","created":{created},'
                f'"model":{_dumps(model)},"system_fingerprint":"fp_fake","choices":[],"usage":{usage}}}\n\n'
            ).encode()
            steps.append(("meta", usage_event, 0.0))
        steps.append(("meta", b"data: [DONE]\n\n", 0.0))
        self.steps = steps

    def _event(self, delta: str) -> bytes:
        return self.head + delta.encode() + self.tail

    def split(self, event: bytes) -> list[bytes]:
        if len(event) < 2:
            return [event]
        if self.behaviour.split_utf8:
            cut = _split_point_utf8(event)
            return [event[:cut], event[cut:]]
        count = self.random.choice((2, 3)) if len(event) >= 3 else 2
        cuts = sorted(self.random.sample(range(1, len(event)), count - 1))
        bounds = [0, *cuts, len(event)]
        return [event[a:b] for a, b in itertools.pairwise(bounds)]


class _EventPlan:
    """A named-event stream (Responses, Messages) as `_play` steps: the opening events at once, one event per
    token with the behaviour's delays, the closing events; the behaviour's malformed event, disconnect or
    reset spliced in after that many tokens."""

    split_pause = SPLIT_LINES_PAUSE

    def __init__(self, opening: list[bytes], tokens: list[bytes], closing: bytes, malformed: bytes,
                 behaviour: Behaviour) -> None:
        faults = (("meta", malformed, behaviour.malformed_after), ("disconnect", b"", behaviour.disconnect_after),
                  ("reset", b"", behaviour.reset_after))
        steps: list[tuple[str, bytes, float]] = [("meta", event, 0.0) for event in opening]
        steps += [(kind, event, 0.0) for kind, event, after in faults if after == 0]
        for number, event in enumerate(tokens, start=1):
            steps.append(("token", event, behaviour.first_token_delay if number == 1 else behaviour.token_interval))
            steps += [(kind, event, 0.0) for kind, event, after in faults if after == number]
        steps.append(("meta", closing, 0.0))
        self.steps = steps

    def split(self, event: bytes) -> list[bytes]:
        return [event]


class FakeUpstream:
    """The fake upstream server, run in a daemon thread with its own event loop (see module doc)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._recorder = _Recorder()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(_listen(self._recorder, self.host, self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as error:
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(_shutdown(self._server, self._recorder), loop)
        future.result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- control and observation ----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def behave(self, **fields: Any) -> None:
        """Set the default behaviour for later requests; unspecified fields go back to defaults."""
        self._recorder.behaviour = _behaviour_with(Behaviour(), fields)

    def reset(self) -> None:
        """Forget recorded requests, streams and connection counts; restore the default behaviour."""
        self._recorder.generation += 1
        self._recorder.behaviour = Behaviour()
        self._recorder.requests.clear()
        self._recorder.streams_closed.clear()
        self._recorder.files.clear()
        self._recorder.connections_opened = len(self._recorder.live)
        self._recorder.connections_closed = 0

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self._recorder.requests)

    @property
    def streams_closed(self) -> list[StreamClosed]:
        return list(self._recorder.streams_closed)

    @property
    def connections_opened(self) -> int:
        return self._recorder.connections_opened

    @property
    def connections_closed(self) -> int:
        return self._recorder.connections_closed

    @property
    def open_connections(self) -> int:
        return len(self._recorder.live)

    def wait_for(self, condition: Callable[[], object], timeout: float = 5.0) -> bool:
        """Poll ``condition`` until it is truthy or ``timeout`` seconds pass; returns whether it held."""
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


async def _listen(recorder: _Recorder, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Connection(recorder), host, port, backlog=4096, reuse_address=True
    )


async def _shutdown(server: asyncio.Server | None, recorder: _Recorder) -> None:
    if server is not None:
        server.close()
    for connection in list(recorder.live):
        if connection.transport is not None:
            connection.transport.abort()
    await asyncio.sleep(0)
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _serve_forever(args: argparse.Namespace) -> None:
    recorder = _Recorder()
    fields: dict[str, Any] = {}
    if args.tokens is not None:
        fields["n_tokens"] = args.tokens
    if args.interval:
        fields["token_interval"] = args.interval
        fields["first_token_delay"] = args.interval
    recorder.behaviour = _behaviour_with(Behaviour(), fields)
    server = await _listen(recorder, args.host, args.port)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"READY http://{args.host}:{port}/v1", flush=True)
    await stop.wait()
    await _shutdown(server, recorder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream for tests and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=None, help="answer with N tokens ' tok0', ' tok1', ...")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds before and between tokens")
    parser.add_argument("--uvloop", action="store_true", help="use uvloop when it is installed")
    args = parser.parse_args(argv)
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            print("uvloop is not installed; using the stdlib event loop", file=sys.stderr, flush=True)
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(_serve_forever(args))
            return 0
    asyncio.run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
