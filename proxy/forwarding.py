"""The one forwarding path for the OpenAI API's other endpoints (`/v1/responses`, `/v1/embeddings`,
`/v1/audio/...`, `/v1/files`...): what an nginx `proxy_pass` with the key swapped in would do, plus the
relay's rules.

- **Headers**, both ways, through allow-lists (`forwardable_headers`, `client_response_headers`):
  nothing that says who or where the client is reaches the upstream, no hop-by-hop header crosses either way.
- **Model**: read from a JSON body, or from a multipart form's `model` field as the upload streams past
  (`ModelFieldWatch`), so that ALLOWED_MODELS and per-key models apply and the model picks the upstream.
- **Upstream**: the raw request goes out on the upstream's own pooled httpx2 client with its key; fall-over
  to the next upstream serving the model on the same failures as chat (`forward`), while the client has
  seen nothing and the body can be sent again.
- **Answer**: streamed back as it arrives. `text/event-stream` answers go through `relay_sse`, a small
  byte-level loop (keep-alives, first-token/idle/whole-stream timers, client departure, the drain deadline)
  whose time decisions are `SseClock`'s, testable with a fake clock. It reads just enough of each event
  (`EventCheck`) to know a malformed stream, the model's first token and an answer's last event: events
  are held back until the first token (`Held`), so a stream failing before it falls over to the next
  upstream (`next_upstreams`, `ReopenedSource`), and a stream that fails after it, or ends before its last
  event, ends with the protocol's own error event (`Dialect`). Everything else goes through `relay_bytes`.
  Usage is read from the bytes as they pass (`SseUsage`, `JsonUsage`) for the token budgets, never
  re-encoded.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import httpx2
import orjson
from werkzeug.datastructures import Headers

from proxy.config import Config
from proxy.encoders import SSE_KEEPALIVE, anthropic_error, openai_error
from proxy.errors import BadRequest, PayloadTooLarge, RateLimited, RelayError, UpstreamFailed, UpstreamTimeout
from proxy.pump import StreamStats
from proxy.shaping import answer_size, size_changes
from proxy.shutdown import RESTART_MESSAGE, SERVER_RESTARTING, Draining
from proxy.stream_machine import StreamTimers
from proxy.stream_sources import READER_THREAD_PREFIX, Inbox, StallTimer
from proxy.upstream import StreamEnd, StreamFailure, _worth_falling_over, retry_after_seconds
from proxy.upstream_body import BrokenBody, DirectBody, UpstreamResponse, backstop_read_timeout, shut_down
from proxy.upstream_wire import forward_stream

log = logging.getLogger("relay.forwarding")

# --- headers ---------------------------------------------------------------------------------------------------

# Request headers an upstream may need to understand the request, and nothing else: no Authorization (the
# relay's key goes instead), no Cookie, no X-Forwarded-*/X-Real-IP/Forwarded/Via/CF-*/True-Client-IP (they
# tell a region-restricted provider where the client is), no OpenAI-Organization/-Project (they would let a
# caller pick which of the operator's accounts pays), no X-Stainless-* (SDK telemetry: the client's OS,
# runtime and retry count), no hop-by-hop header. Content-Length is set by the relay from the body it sends.
REQUEST_HEADERS = ("content-type", "accept", "openai-beta", "idempotency-key", "anthropic-version", "anthropic-beta")
# The relay reads answers as they come and must not decompress them to forward them: the upstream is asked
# for the identity encoding (httpx2 would still decode a compressed answer, which then goes out decoded).
ACCEPT_ENCODING = "identity"
# Response headers that matter to a client; the upstream's X-Request-ID goes out as X-Upstream-Request-ID,
# because X-Request-ID is the relay's own (the access log's), set by the pipeline on every answer.
RESPONSE_HEADERS = frozenset({"content-type", "content-disposition", "retry-after", "openai-processing-ms",
                              "openai-version", "request-id"})  # request-id: Anthropic's own request id
RESPONSE_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
UPSTREAM_REQUEST_ID = "X-Upstream-Request-ID"


def forwardable_headers(incoming: Headers) -> list[tuple[str, str]]:
    """The client's headers that may go upstream (REQUEST_HEADERS), looked up by name: a request carries
    many others, none of which is ever forwarded."""
    return [(name, value) for name in REQUEST_HEADERS if (value := incoming.get(name)) is not None]


def upstream_request_headers(incoming: Iterable[tuple[str, str]], auth: Mapping[str, str],
                             content_length: int | None) -> dict[str, str]:
    """What goes upstream: the client's allow-listed headers (`incoming`, from `forwardable_headers`), the
    upstream's key in its protocol's header (`auth`: `Authorization: Bearer` for OpenAI, `x-api-key` for
    Anthropic), identity encoding."""
    headers = {name.lower(): value for name, value in incoming}
    headers.update(auth)
    headers["accept-encoding"] = ACCEPT_ENCODING
    if content_length is not None:
        headers["content-length"] = str(content_length)
    return headers


def client_response_headers(upstream: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """What comes back: the allow-listed upstream headers (never hop-by-hop or Set-Cookie)."""
    kept: list[tuple[str, str]] = []
    for name, value in upstream:
        lowered = name.lower()
        if lowered in RESPONSE_HEADERS or lowered.startswith(RESPONSE_PREFIXES):
            kept.append((name, value))
        elif lowered == "x-request-id":
            kept.append((UPSTREAM_REQUEST_ID, value))
    return kept


# --- the model -------------------------------------------------------------------------------------------------

# Byte-order marks (UTF-8, UTF-32 and UTF-16, both ways): Python's json module, which many upstream servers
# parse bodies with, reads JSON behind any of them, where orjson and the relay's checks would not.
BYTE_ORDER_MARKS = (b"\xef\xbb\xbf", b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00", b"\xfe\xff", b"\xff\xfe")


def json_object(raw: bytes, declared_json: bool) -> dict[str, Any] | None:
    """A non-multipart body as a JSON object, or None when it is none. A body that says it is JSON (or looks
    like it) must parse: otherwise the upstream might read a model the relay could not check. For the same
    reason a body behind a byte-order mark is refused (RFC 8259: JSON carries none)."""
    if raw.startswith(BYTE_ORDER_MARKS):
        raise BadRequest("the request body starts with a byte-order mark: send UTF-8 JSON without one",
                         kind="invalid_json")
    if not raw.strip() or (not declared_json and not raw.lstrip().startswith(b"{")):
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON", kind="invalid_json") from None
    return body if isinstance(body, dict) else None


def model_of(body: dict[str, Any] | None) -> str | None:
    """The `model` a JSON body names; a present but unusable one is refused rather than left unchecked."""
    model = body.get("model") if body is not None else None
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise BadRequest("'model' must be a non-empty string")
    return model


MULTIPART_BOUNDARY = re.compile(r'boundary="?([^";,]+)"?', re.I)
_FIELD_NAME = re.compile(rb'(?:^|[;\s])name="?model"?(?:[;\s]|$)', re.I)
_FILENAME = re.compile(rb"(?:^|[;\s])filename\*?=", re.I)
MAX_PART_HEADERS = 8 * 1024
MAX_MODEL_FIELD = 512


def multipart_boundary(content_type: str) -> bytes | None:
    match = MULTIPART_BOUNDARY.search(content_type)
    return match.group(1).strip().encode("latin-1") if match else None


class ModelFieldWatch:
    """Finds the values of a multipart form's `model` fields in the body as it streams past, block by block,
    keeping only a few KiB (never the upload). Fed the first bounded prefix it tells the routing model; fed
    the rest it catches a `model` field after the file (curl's `-F file=@x -F model=y` order)."""

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._buffer = b"\r\n"  # the body's first delimiter has no CRLF before it
        self._mode = "seek"

    def feed(self, block: bytes) -> list[str]:
        """The `model` values completed by this block (a malformed or overlong one as '')."""
        self._buffer += block
        found: list[str] = []
        while True:
            step = getattr(self, f"_{self._mode}")()
            if step is None:
                return found
            if isinstance(step, str):
                found.append(step)

    def _seek(self) -> bool | None:
        at = self._buffer.find(self._delimiter + b"\r\n")
        if at < 0:
            self._buffer = self._buffer[-(len(self._delimiter) + 1):]
            return None
        self._buffer = self._buffer[at + len(self._delimiter) + 2:]
        self._mode = "headers"
        return True

    def _headers(self) -> bool | None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_PART_HEADERS:
                self._buffer, self._mode = b"", "seek"
            return None
        headers, self._buffer = self._buffer[:end], self._buffer[end + 4:]
        is_model = bool(_FIELD_NAME.search(headers)) and not _FILENAME.search(headers)
        self._mode = "value" if is_model else "seek"
        return True

    def _value(self) -> str | bool | None:
        end = self._buffer.find(self._delimiter)
        if end < 0:
            if len(self._buffer) > MAX_MODEL_FIELD + len(self._delimiter):
                self._buffer, self._mode = b"", "seek"
                return ""
            return None
        value, self._buffer = self._buffer[:end], self._buffer[end:]
        self._mode = "seek"
        try:
            return value.decode("utf-8").strip()
        except UnicodeDecodeError:
            return ""


# --- the upload ------------------------------------------------------------------------------------------------

UPLOAD_BLOCK = 64 * 1024
MODEL_PREFIX_BYTES = 64 * 1024  # read before choosing the upstream: a form's small fields come in it


def read_prefix(stream: IO[bytes], size: int = MODEL_PREFIX_BYTES) -> bytes:
    """Up to `size` bytes (fewer only at the body's end)."""
    parts: list[bytes] = []
    wanted = size
    while wanted > 0:
        block = stream.read(wanted)
        if not block:
            break
        parts.append(block)
        wanted -= len(block)
    return b"".join(parts)


def upload_blocks(prefix: bytes, stream: IO[bytes], cap: int, on_model: Callable[[str], None],
                  watch: ModelFieldWatch | None) -> Iterator[bytes]:
    """The rest of an upload, block by block as it arrives, held to `cap` bytes. Runs as httpx2 sends the
    body: an error raised here (413, a refused late `model`) aborts the upstream request before it is whole,
    so the upstream never acts on it."""
    sent = len(prefix)
    yield prefix
    while True:
        block = stream.read(UPLOAD_BLOCK)
        if not block:
            return
        sent += len(block)
        if sent > cap:
            raise PayloadTooLarge(f"the upload is larger than the {cap} bytes allowed (MAX_UPLOAD_BYTES)")
        if watch is not None:
            for model in watch.feed(block):
                on_model(model)
        yield block


# --- usage -----------------------------------------------------------------------------------------------------

def normalized_usage(usage: Any) -> dict[str, int] | None:
    """An answer's usage in the chat shape the budgets read: Responses' and audio's input/output tokens
    become prompt/completion; embeddings report prompt and total only."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage, "prompt_tokens", "input_tokens")
    completion = _count(usage, "completion_tokens", "output_tokens")
    total = usage.get("total_tokens")
    if prompt is None and completion is None and not isinstance(total, int):
        return None
    prompt, completion = prompt or 0, completion or 0
    if not isinstance(total, int) or isinstance(total, bool):
        total = prompt + completion
    found = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    # The details the usage ledger keeps (proxy/ledger/row.py), flat, only when reported.
    for name, parents in (("cached_tokens", ("prompt_tokens_details", "input_tokens_details")),
                          ("reasoning_tokens", ("completion_tokens_details", "output_tokens_details"))):
        details = [usage.get(parent) for parent in parents]
        count = next((_count(d, name) for d in details if isinstance(d, dict) and _count(d, name)), None)
        if count:
            found[name] = count
    return found


def _count(usage: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def anthropic_usage(usage: Any) -> dict[str, int] | None:
    """An Anthropic `usage` object in the chat shape. Its `input_tokens` leaves out the prompt tokens read
    from or written to the cache, which are still tokens the prompt used: they count as prompt tokens."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage, "input_tokens")
    completion = _count(usage, "output_tokens")
    if prompt is None and completion is None:
        return None
    cached = _count(usage, "cache_read_input_tokens") or 0
    prompt = (prompt or 0) + (_count(usage, "cache_creation_input_tokens") or 0) + cached
    completion = completion or 0
    found = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached:
        found["cached_tokens"] = cached  # for the usage ledger (proxy/ledger/row.py)
    return found


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_BREAKS = re.compile(rb"[\r\n]+")


def last_event_end(data: bytes, before: int) -> int:
    """Where the last event end (`_EVENT_END`, as a scan from the start would match it) that ends by
    `before` ends; 0 when there is none. Found from the back: only the run of line breaks it lies in is
    scanned, since a match never spans anything else and its alignment depends on that run alone."""
    last = _last_break_pair(data, before)
    while last >= 0:
        run = _LINE_BREAKS.match(data, _run_start(data, last))
        assert run is not None  # `last` is a line break
        end = 0
        for match in _EVENT_END.finditer(data, run.start(), min(run.end(), before)):
            end = match.end()
        if end:
            return end
        last = _last_break_pair(data, run.start())
    return 0


def _last_break_pair(data: bytes, before: int) -> int:
    """Where the last of `_EVENT_END`'s three spellings begins before `before` (-1: none)."""
    return max(data.rfind(b"\r\n\r\n", 0, before), data.rfind(b"\n\n", 0, before), data.rfind(b"\r\r", 0, before))


def _run_start(data: bytes, at: int) -> int:
    """The start of the run of line breaks `data[at]` is in."""
    while at > 0 and data[at - 1] in b"\r\n":
        at -= 1
    return at


_LINE_END = re.compile(rb"[\r\n]")


def sse_data(event: bytes) -> bytes | None:
    """One SSE event's data (the values of its `data:` lines, joined by line feeds), or None when it has no
    `data:` line."""
    at = event.find(b"data:")
    if at < 0:
        return None
    if (at == 0 or event[at - 1] in b"\r\n") and event.find(b"data:", at + 5) < 0:
        # The usual event, one data line and "data:" nowhere else: cut out without splitting the event.
        end = _LINE_END.search(event, at + 5)
        return event[at + 5:end.start() if end is not None else len(event)].lstrip(b" ")
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def event_data(event: bytes) -> dict[str, Any] | None:
    """One SSE event's `data` as a JSON object, or None when it is none."""
    data = sse_data(event) or b""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')


class _UsageScanner:
    """Whole SSE events as they pass; only those that carry a `"usage"` key are parsed (by `_read`)."""

    def feed(self, events: bytes) -> None:
        # Only the events around each `"usage"` are cut out: a block of a whole fast answer holds
        # hundreds of events, and splitting all of them cost ~9% of a worker's CPU per token. A `"usage":null`
        # (a Responses stream's opening events carry two) says nothing: the search goes on past it.
        at = events.find(b'"usage"')
        while at >= 0:
            if _NULL_USAGE.match(events, at):
                at = events.find(b'"usage"', at + 7)
                continue
            start = last_event_end(events, at)
            after = _EVENT_END.search(events, at)
            end = after.end() if after is not None else len(events)
            self._read(events[start:end])
            at = events.find(b'"usage"', end)

    def _read(self, event: bytes) -> None:
        raise NotImplementedError


class SseUsage(_UsageScanner):
    """The usage of an SSE answer: a Responses stream's `response.completed` (`response.usage`), or a
    top-level `usage` (completions streams)."""

    def __init__(self) -> None:
        self.usage: dict[str, int] | None = None

    def _read(self, event: bytes) -> None:
        payload = event_data(event)
        if payload is None:
            return
        response = payload.get("response")
        found = normalized_usage(response.get("usage")) if isinstance(response, dict) else None
        found = found or normalized_usage(payload.get("usage"))
        if found is not None:
            self.usage = found


class AnthropicSseUsage(_UsageScanner):
    """The usage of an Anthropic Messages stream as it passes: `message_start` carries the input tokens
    (`message.usage`), each `message_delta` the output tokens so far (cumulative, so the last one counts).
    Some servers repeat the input tokens in `message_delta`; the latest figure wins."""

    def __init__(self) -> None:
        self._prompt: int | None = None
        self._completion: int | None = None
        self._cached = 0

    @property
    def usage(self) -> dict[str, int] | None:
        if self._prompt is None and self._completion is None:
            return None
        prompt, completion = self._prompt or 0, self._completion or 0
        found = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self._cached:
            found["cached_tokens"] = self._cached
        return found

    def _read(self, event: bytes) -> None:
        payload = event_data(event)
        if payload is None:
            return
        kind = payload.get("type")
        message = payload.get("message")
        raw = message.get("usage") if kind == "message_start" and isinstance(message, dict) else None
        raw = payload.get("usage") if kind == "message_delta" else raw
        if not isinstance(raw, dict):
            return
        found = anthropic_usage(raw)
        if found is None:
            return
        if "input_tokens" in raw:
            self._prompt = found["prompt_tokens"]
            self._cached = found.get("cached_tokens", 0)
        if "output_tokens" in raw:
            self._completion = found["completion_tokens"]


JSON_USAGE_WHOLE_LIMIT = 1024 * 1024  # parse answers up to this whole; past it, only their tail
JSON_USAGE_TAIL = 8 * 1024


class JsonUsage:
    """The top-level `usage` of a JSON answer: parsed whole when small, else found in its last bytes (where
    embeddings and Responses objects put it), so a large answer is never held whole."""

    def __init__(self, normalize: Callable[[Any], dict[str, int] | None] = normalized_usage) -> None:
        self._whole: bytearray | None = bytearray()
        self._tail = b""
        self._normalize = normalize  # the protocol's usage object in the chat shape

    def feed(self, block: bytes) -> None:
        if self._whole is not None:
            self._whole += block
            if len(self._whole) > JSON_USAGE_WHOLE_LIMIT:
                self._tail = bytes(self._whole[-JSON_USAGE_TAIL:])
                self._whole = None
            return
        self._tail = (self._tail + block)[-JSON_USAGE_TAIL:]

    def usage(self) -> dict[str, int] | None:
        if self._whole is not None:
            try:
                answer = orjson.loads(self._whole)
            except orjson.JSONDecodeError:
                return None
            return self._normalize(answer.get("usage")) if isinstance(answer, dict) else None
        text = self._tail.decode("utf-8", errors="replace")
        at = text.rfind('"usage"')
        colon = text.find(":", at + 7) if at >= 0 else -1
        if colon < 0:
            return None
        start = colon + 1
        while start < len(text) and text[start].isspace():
            start += 1
        try:
            usage, _end = json.JSONDecoder().raw_decode(text, start)
        except ValueError:
            return None
        return self._normalize(usage)


class UsageReader(Protocol):
    """Reads an event stream's usage from whole events as they pass."""

    @property
    def usage(self) -> dict[str, int] | None: ...
    def feed(self, events: bytes) -> None: ...


def openai_error_event(kind: str, message: str) -> bytes:
    """An `error` event both ways OpenAI's clients read one: the Responses API's own (`type`, `code`,
    `message`) for readers that go by the event's type (Codex CLI, the SDKs' typed events), and an `error`
    object, which the SDKs raise as an APIError mid-stream (as they do on a chat stream)."""
    payload = orjson.dumps({"type": "error", "code": kind, "message": message, "param": None,
                            **openai_error(message, "api_error", kind)})
    return b"event: error\ndata: " + payload + b"\n\n"


ANTHROPIC_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
# The Anthropic error `type` of a stream the relay cuts short (the kinds of timers say timeout_error, as
# Anthropic's own 504s do; everything else is api_error).
_ANTHROPIC_STREAM_TYPES = {"upstream_timeout": "timeout_error", "stream_time_limit": "timeout_error"}


def anthropic_stream_error_type(kind: str) -> str:
    """The error `type` by the relay's kind (a stream has no HTTP status to go by: proxy/errors.py's
    `anthropic_error_type` maps statuses)."""
    return _ANTHROPIC_STREAM_TYPES.get(kind, "api_error")


def anthropic_error_event(kind: str, message: str) -> bytes:
    """Anthropic's in-stream error event, which its SDKs raise as an APIStatusError mid-stream."""
    payload = orjson.dumps(anthropic_error(anthropic_stream_error_type(kind), message))
    return b"event: error\ndata: " + payload + b"\n\n"


# Responses events sent before the model says anything (they do not count as its first token: a reasoning
# model opens its reasoning item at once, then may think in silence for minutes), and those that end a
# Responses stream. Other OpenAI event streams (audio, images, threads) end with `[DONE]` or an event whose
# type says it is done.
RESPONSES_OPENING = frozenset({"response.created", "response.in_progress", "response.queued",
                               "response.output_item.added", "response.content_part.added"})
RESPONSES_CLOSING = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
_DONE_SUFFIXES = (".done", ".completed", ".failed", ".cancelled", ".expired", ".incomplete")


def openai_opens(kind: str | None) -> bool:
    return kind in RESPONSES_OPENING


def openai_closes(kind: str | None) -> bool:
    if kind is None:
        return False
    if kind.startswith("response."):
        return kind in RESPONSES_CLOSING
    return kind == "error" or kind.endswith(_DONE_SUFFIXES)


ANTHROPIC_OPENING = frozenset({"message_start", "content_block_start", "ping"})


def anthropic_opens(kind: str | None) -> bool:
    return kind in ANTHROPIC_OPENING


def anthropic_closes(kind: str | None) -> bool:
    return kind in ("message_stop", "error")


@dataclass(frozen=True)
class Dialect:
    """What the forwarding path writes and reads of a protocol's own, everything else being bytes passed on:
    the keep-alive sent during silence, the error event that ends a stream the relay must cut short (as
    `error(kind, message)`), where the usage is in an event stream and in a JSON answer, and which event
    types open a stream without being the model's first token (`opens`) or end it (`closes`)."""

    keepalive: bytes
    error: Callable[[str, str], bytes]
    sse_usage: Callable[[], UsageReader]
    json_usage: Callable[[Any], dict[str, int] | None]
    opens: Callable[[str | None], bool]
    closes: Callable[[str | None], bool]


OPENAI = Dialect(SSE_KEEPALIVE, openai_error_event, SseUsage, normalized_usage, openai_opens, openai_closes)
# Anthropic's clients expect `ping` events during silence (an SSE comment is within the standard, but
# Anthropic's own stream never sends one, so not every client is known to skip it).
ANTHROPIC = Dialect(ANTHROPIC_PING, anthropic_error_event, AnthropicSseUsage, anthropic_usage, anthropic_opens,
                    anthropic_closes)


# --- the caps: MAX_TOKENS and MAX_CHOICES on forwarded bodies ---------------------------------------------------

def capped_body(path: str, raw: bytes, body: dict[str, Any], config: Config) -> bytes:
    """A forwarded JSON body held to MAX_TOKENS and MAX_CHOICES by its family's row of `shaping.ANSWER_SIZES`
    (a 400 for a token count or choice count that is not a whole number, or too many choices), once per
    request, before its budgets are reserved: the changes are made in `body` too, which the budgets read.
    The same bytes when nothing changes (no re-encoding on the hot path); fields the body lacks appended to
    it as they are (the usual change: MAX_TOKENS sent when the client set no cap); else re-encoded once."""
    size = answer_size(path)
    changes = size_changes(size, body, config) if size is not None else None
    if not changes:
        return raw
    appended = all(name not in body for name in changes)
    body.update(changes)
    if appended and len(body) > len(changes):
        added = b",".join(b'"%s":%d' % (name.encode(), value) for name, value in changes.items())
        return raw.rstrip()[:-1] + b"," + added + b"}"
    return _encoded({**json.loads(raw), **changes})


def _encoded(document: dict[str, Any]) -> bytes:
    # The stdlib's json, as read with it: integers of any size come back exactly as they were sent.
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


# --- sending, with fall-over -----------------------------------------------------------------------------------

@dataclass
class Outgoing:
    """One request to forward: its method, path under the base URL, raw query, the client's headers that may
    go upstream (`forwardable_headers`) and body. `body` is bytes (can be sent again: fall-over allowed) or a
    one-shot iterator (an upload)."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[str, str]]
    body: bytes | Iterator[bytes]
    content_length: int | None
    streaming: bool  # the client asked for a stream: headers within UPSTREAM_TIMEOUT, then the loop's timers
    # The model a JSON body names, for upstreams that know it by another name (UPSTREAMS_FILE's `model_map`).
    model: str | None = None

    @property
    def replayable(self) -> bool:
        return isinstance(self.body, bytes)

    def body_for(self, upstream: ForwardTarget) -> tuple[bytes | Iterator[bytes], int | None]:
        """The body as `upstream` must get it: as sent (already held to the caps: `capped_body`), or with the
        model renamed (JSON bodies only)."""
        if self.model is None or not isinstance(self.body, bytes) or upstream.upstream_model(self.model) == self.model:
            return self.body, self.content_length
        renamed = _encoded({**json.loads(self.body), "model": upstream.upstream_model(self.model)})
        return renamed, len(renamed)


class ForwardTarget(Protocol):
    """An upstream raw requests are forwarded to: `proxy.upstream.Upstream` (OpenAI's protocol, on its SDK's
    pooled client) or `AnthropicUpstream` (its own pooled client)."""

    @property
    def name(self) -> str: ...
    @property
    def root_url(self) -> str: ...
    @property
    def http(self) -> httpx2.Client: ...
    @property
    def redact(self) -> Callable[[str], str]: ...
    def auth_headers(self) -> dict[str, str]: ...
    def upstream_model(self, model: str) -> str: ...


@dataclass
class Opened:
    response: UpstreamResponse
    upstream: ForwardTarget
    fallbacks: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    # The same request sent to the candidates after this one (a replayable body only): the stream falls
    # over to them when this answer fails before anything of it reached the client.
    next_open: Callable[[], Opened] | None = None


def forward(candidates: Sequence[ForwardTarget], outgoing: Outgoing, upstream_timeout: float,
            whole_answer_timeout: float, failures: list[tuple[str, str]] | None = None, skipped: int = 0) -> Opened:
    """Send `outgoing` to the first candidate that answers; on connection errors, timeouts, 5xx and 429 the
    next one gets it (a replayable body only). The last candidate's 5xx/429 is answered as it came.
    `failures` and `skipped` carry on from candidates tried before (a fall-over after the headers)."""
    failures = [] if failures is None else failures
    for attempt, upstream in enumerate(candidates):
        last = attempt == len(candidates) - 1 or not outgoing.replayable
        try:
            response = _send(upstream, outgoing, upstream_timeout, whole_answer_timeout)
        except httpx2.TimeoutException:
            error: RelayError = UpstreamTimeout("the upstream API did not answer in time; try again in a moment")
        except (httpx2.HTTPError, OSError):
            error = UpstreamFailed("the relay could not reach the upstream API; try again later",
                                   kind="upstream_unreachable")
        else:
            status_error = failure_of_status(response)
            if status_error is None or last:
                rest = candidates[attempt + 1:]
                next_open = functools.partial(forward, rest, outgoing, upstream_timeout, whole_answer_timeout,
                                              failures, skipped + attempt + 1)
                return Opened(response, upstream, skipped + attempt, failures,
                              next_open if rest and outgoing.replayable else None)
            response.close()
            error = status_error
        failures.append((upstream.name, error.kind))
        error.upstream_failures = tuple(failures)
        log.warning("upstream %s failed to answer a forwarded request (%s)", upstream.name, error.kind)
        if last or not _worth_falling_over(error):
            raise error
    raise UpstreamFailed("no upstream is configured for this request")


def failure_of_status(response: UpstreamResponse) -> RelayError | None:
    """The error a 5xx or 429 answer stands for (worth falling over for), else None."""
    if response.status_code == 429:
        return RateLimited("the upstream API is rate limiting this relay; retry later", kind="upstream_rate_limited",
                           retry_after=retry_after_seconds(response.headers.get("retry-after", "")))
    if response.status_code >= 500:
        return UpstreamFailed(f"the upstream API failed (HTTP {response.status_code}); try again in a moment")
    return None


def _send(upstream: ForwardTarget, outgoing: Outgoing, upstream_timeout: float, whole_answer_timeout: float
          ) -> UpstreamResponse:
    url = f"{upstream.root_url}/{outgoing.path}"
    if outgoing.query:
        url += "?" + outgoing.query.decode("latin-1")
    # A streaming answer's headers come at once; a whole answer's only when it is done, so its read timeout
    # must cover it (as chat's non-streaming requests do).
    read = upstream_timeout if outgoing.streaming else whole_answer_timeout
    http = upstream.http
    body, content_length = outgoing.body_for(upstream)
    auth = upstream.auth_headers()
    if outgoing.streaming and outgoing.method == "POST" and isinstance(body, bytes):
        # A stream goes by the lane where it can (proxy/upstream_wire.py): same headers, httpx2's errors.
        response = forward_stream(http, url, upstream_request_headers(outgoing.headers, auth, None), body,
                                  upstream_timeout, read)
        if response is not None:
            return response
    request = http.build_request(outgoing.method, url, content=body,
                                 headers=upstream_request_headers(outgoing.headers, auth, content_length),
                                 timeout=httpx2.Timeout(upstream_timeout, read=read))
    return http.send(request, stream=True)


def abort(response: UpstreamResponse) -> None:
    """Close the upstream connection now, from any greenlet, waking a reader blocked on it."""
    network_stream = response.extensions.get("network_stream")
    if not shut_down(network_stream.get_extra_info("socket") if network_stream is not None else None):
        response.close()  # in-process transports close through the response


# --- answering -------------------------------------------------------------------------------------------------

ERROR_BODY_LIMIT = 64 * 1024


def error_body(response: UpstreamResponse, redact: Callable[[str], str]) -> bytes:
    """An upstream error answer, read whole (bounded) and with the configuration's secrets taken out."""
    raw = b""
    try:
        for block in response.iter_bytes():
            raw += block
            if len(raw) > ERROR_BODY_LIMIT:
                break
    except httpx2.HTTPError:
        log.info("upstream error answer broke off")
    finally:
        response.close()
    text = raw[:ERROR_BODY_LIMIT].decode("utf-8", errors="replace")
    redacted = redact(text)
    return raw[:ERROR_BODY_LIMIT] if redacted == text else redacted.encode()


def relay_bytes(response: UpstreamResponse, stats: StreamStats, usage: JsonUsage | None) -> Iterator[bytes]:
    """A non-SSE answer (JSON, audio, an image, a file) as it arrives; the upstream closed in `finally`."""
    try:
        for block in response.iter_bytes():
            if stats.first_token_at is None:
                stats.first_token_at = time.monotonic()
            if usage is not None:
                usage.feed(block)
            yield block
        stats.outcome = "ok"
    except GeneratorExit:
        stats.outcome = "client_gone"
        raise
    except httpx2.HTTPError as exc:
        # The status already went out: the client sees the answer end short.
        stats.outcome = "upstream_disconnected"
        log.info("upstream answer broke off mid-body: %s", type(exc).__name__)
    finally:
        response.close()
        if usage is not None:
            stats.usage = usage.usage()
        _settle_tokens(stats)


def _settle_tokens(stats: StreamStats) -> None:
    stats.ended_at = time.monotonic()
    if stats.usage is not None:
        stats.tokens = stats.usage.get("completion_tokens", 0)


# --- the SSE loop ----------------------------------------------------------------------------------------------

CLIENT_CHECK_SECONDS = 1.0


@dataclass
class SseClock:
    """When a forwarded event stream needs something: a keep-alive after KEEPALIVE_SECONDS without a write,
    or its end when the first token, the next byte (idle) or the whole stream takes too long. The first token
    is the first event that is more than the stream's opening (`response.created`, `message_start`, pings):
    a reasoning model may think in silence after those, as chat's first-token timer allows. No I/O: time is
    an argument, so every rule is tested with a fake clock."""

    timers: StreamTimers
    started: float
    first_token: float | None = None
    last_byte: float = 0.0
    last_write: float = 0.0
    # The status and headers went out: with the first write when what came with them is enough for one,
    # else alone before the loop first waits, whatever the upstream then holds back (as chat's pump).
    announced: bool = False

    def __post_init__(self) -> None:
        self.last_write = self.started

    def received(self, now: float, progress: bool) -> None:
        """Bytes came; `progress`: among them the model's first token (or a later event)."""
        if progress and self.first_token is None:
            self.first_token = now
        self.last_byte = now

    def wrote(self, now: float) -> None:
        self.last_write = now
        self.announced = True

    def expired(self, now: float, drain_deadline: float) -> tuple[str, str] | None:
        """(kind, message) when a timer, or the worker's drain deadline (a graceful stop), ends the stream."""
        if now >= drain_deadline:
            return (SERVER_RESTARTING, RESTART_MESSAGE)
        if now >= self.started + self.timers.max_stream:
            return ("stream_time_limit", f"the answer ran past this relay's limit of {self.timers.max_stream:g} s; "
                                         "it is incomplete")
        if self.first_token is None and now >= self.started + self.timers.first_token:
            return ("upstream_timeout", f"the upstream did not start answering within {self.timers.first_token:g} s")
        if self.first_token is not None and now >= self.last_byte + self.timers.idle:
            return ("upstream_timeout", f"the upstream went silent for {self.timers.idle:g} s mid-answer; "
                                        "the answer is incomplete")
        return None

    def keepalive_due(self, now: float) -> bool:
        return now >= self.last_write + self.timers.keepalive

    def wait(self, now: float) -> float:
        """How long nothing needs doing (at most CLIENT_CHECK_SECONDS: the client is checked that often)."""
        silence_end = (self.started + self.timers.first_token if self.first_token is None
                       else self.last_byte + self.timers.idle)
        due = min(self.last_write + self.timers.keepalive, silence_end, self.started + self.timers.max_stream)
        return max(0.0, min(due - now, CLIENT_CHECK_SECONDS))

    def read_wait(self, now: float, drain_deadline: float) -> float:
        """How long the loop's next read may wait: `wait`, or until the drain deadline; no time at all before
        the first write (that read takes only what came with the head)."""
        return max(0.0, min(self.wait(now), drain_deadline - now)) if self.announced else 0.0


class SseFramer:
    """Whole events out of arbitrary blocks: a keep-alive or an error event is only ever written between
    events, never inside one the upstream is still sending. A long event arriving in many blocks is
    searched for its end only in what is new."""

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._tail = b""  # the pending bytes' last few, where an event end may begin

    def feed(self, block: bytes) -> bytes:
        data = self._tail + block
        end = last_event_end(data, len(data))
        if end == 0:
            self._pending.append(block)
            self._tail = data[-3:]
            return b""
        whole = b"".join([*self._pending, block])
        cut = len(whole) - len(data) + end  # the last event end, in the pending bytes and this block
        rest = whole[cut:]
        self._pending, self._tail = ([rest] if rest else []), rest[-3:]
        return whole[:cut]

    def rest(self) -> bytes:
        rest = b"".join(self._pending)
        self._pending, self._tail = [], b""
        return rest


@dataclass
class EventCheck:
    """What the loop reads of each whole event it passes on: its data must be JSON (or `[DONE]`), or the
    stream is malformed and ends there; whether it is the model's first token; whether the last event ends
    the stream by its protocol, so that a body that stops before it is known to be incomplete."""

    dialect: Dialect
    finished: bool = False
    errored: bool = False  # the stream's last event is the upstream's own error

    def scan(self, events: bytes, stop_at_progress: bool = False) -> tuple[bytes, bool, bool, bytes]:
        """(the events to pass on, any of them is progress, a malformed event came after them, the events
        not looked at yet). `stop_at_progress`: stop after the first event that is progress, so that the first
        token goes out before the many whole events that may have come with it are checked."""
        passed, progress = 0, False
        for match in _EVENT_END.finditer(events):
            event = events[passed:match.end()]
            verdict = self._one(event)
            if verdict is None:
                return events[:passed], progress, True, b""
            progress = progress or verdict
            passed = match.end()
            if progress and stop_at_progress:
                return events[:passed], True, False, events[passed:]
        return events, progress, False, b""

    def _one(self, event: bytes) -> bool | None:
        """None: malformed; else whether the event is progress."""
        data = sse_data(event)
        if data is None:
            return False  # a comment, or an event without data: passed on, changes nothing
        if data.strip() == b"[DONE]":
            self.finished = True
            return False
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        kind = payload.get("type") if isinstance(payload, dict) else None
        kind = kind if isinstance(kind, str) else None
        has_error = isinstance(payload, dict) and "error" in payload and kind is None
        self.errored = has_error or kind in FAILED_EVENTS
        self.finished = has_error or self.dialect.closes(kind)
        return not self.dialect.opens(kind) and not self.errored

    def last_event(self, rest: bytes) -> bytes | None:
        """A final event the body ended without its blank line: passed on when it is whole and ends the
        stream, else None (it is an incomplete event, as SSE readers would drop it)."""
        event = rest.rstrip(b"\r\n") + b"\n\n"
        if not rest.strip() or self._one(event) is None or not self.finished:
            return None
        return event


# Event types by which an upstream says its answer failed (not the model's first token: worth a fall-over).
FAILED_EVENTS = frozenset({"error", "response.failed"})
MALFORMED = "the upstream sent a malformed event; the answer is incomplete"
ENDED_EARLY = "the upstream's answer ended before it was complete; the answer is incomplete"


class Source(Protocol):
    """What the loop reads: upstream blocks (bytes), then StreamEnd or StreamFailure; None after `timeout`."""

    def get(self, timeout: float) -> object: ...
    def close(self) -> None: ...


class ReaderSource:
    """The upstream body read by its own thread (greenlet) into a bounded inbox; `close` stops it. A client
    that takes nothing for a whole stall period (the inbox stays full) has the upstream and, through
    `hang_up`, its own connection closed, which fails the write the loop is blocked on."""

    def __init__(self, response: UpstreamResponse, stall_seconds: float, hang_up: Callable[[], None]) -> None:
        self._response = response
        self._inbox = Inbox(stall_seconds)
        self._hang_up = hang_up
        self._inbox.on_stall = self._on_stall
        self._thread = threading.Thread(target=self._read, daemon=True, name=f"{READER_THREAD_PREFIX}forwarded")
        self._thread.start()

    def _read(self) -> None:
        try:
            for block in self._response.iter_bytes():
                self._inbox.put(block)
            self._inbox.put(StreamEnd())
        except httpx2.TimeoutException:
            self._inbox.put(StreamFailure("upstream_timeout", "the upstream stopped sending; the answer is incomplete"))
        except (httpx2.HTTPError, OSError):
            self._inbox.put(StreamFailure("upstream_disconnected",
                                          "the upstream connection broke mid-answer; the answer is incomplete"))
        finally:
            self._response.close()

    def _on_stall(self) -> None:
        log.info("client stopped reading a forwarded stream for an idle period; ending it")
        abort(self._response)
        self._hang_up()

    def get(self, timeout: float) -> object:
        try:
            return self._inbox.get(timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._inbox.close()
        if self._thread.is_alive():
            abort(self._response)
            self._thread.join(2.0)


class DirectBodySource:
    """The upstream body read by the loop's own greenlet (`proxy/upstream_body.py`): no reader thread, no
    inbox. The loop calls `get` again only once it has written what the last call gave, so a `StallTimer`
    armed between two calls hangs up on a client that took nothing for a whole stall period, as the
    reader's full inbox does for `ReaderSource`."""

    def __init__(self, response: UpstreamResponse, body: DirectBody, stall_seconds: float,
                 hang_up: Callable[[], None]) -> None:
        self._response = response
        self._body = body
        self._hang_up = hang_up
        self._stall = StallTimer(stall_seconds, self._on_stall)

    def get(self, timeout: float) -> object:
        self._stall.disarm()
        item = self._next(timeout)
        self._stall.arm()
        return item

    def _next(self, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while not self._body.ended:
            try:
                data = self._body.read(timeout)  # with no time left: only what came with the head
            except BrokenBody:
                return StreamFailure("upstream_disconnected",
                                     "the upstream connection broke mid-answer; the answer is incomplete")
            if data:
                return data
            timeout = deadline - time.monotonic()  # only framing came: wait on
            if data is None or timeout <= 0:
                return None
        return StreamEnd()

    def _on_stall(self) -> None:
        log.info("client stopped reading a forwarded stream for an idle period; ending it")
        abort(self._response)
        self._hang_up()

    def close(self) -> None:
        self._stall.close()
        if self._body.ended:
            self._body.finish(0.0, 0)  # nothing left to read: the connection goes back to the pool
        else:
            self._body.close()


def body_source(response: UpstreamResponse, stall_seconds: float, hang_up: Callable[[], None],
                backstop_seconds: float) -> Source:
    """The loop's source for an event-stream body: read in the loop's own greenlet when it can be, else by a
    reader thread; where httpx2 reads it, its read timeout becomes `backstop_seconds`."""
    body = DirectBody.take(response)
    if body is not None:
        return DirectBodySource(response, body, stall_seconds, hang_up)
    backstop_read_timeout(response, backstop_seconds)
    return ReaderSource(response, stall_seconds, hang_up)


def never_gone() -> bool:
    return False


HELD_LIMIT = 256 * 1024


class Held:
    """A forwarded stream's events until the model's first token (or its whole answer): held back, so that
    while the client has seen none of them (keep-alives aside) a failing upstream can be replaced by the next
    one (`fall_over`) and the client never sees two beginnings. Then events pass as they come."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.started = False  # something the upstream sent has reached the client
        self.restart()

    def restart(self) -> None:
        """A new upstream's stream: its own framing, checks and usage; what was held is dropped."""
        self.framer, self.check, self.usage = SseFramer(), EventCheck(self.dialect), self.dialect.sse_usage()
        self.unchecked = b""  # whole events that came after the first token in the same read
        self._held: list[bytes] = []
        self._size = 0

    def hold(self, events: bytes) -> None:
        self._held.append(events)

    def take(self, events: bytes, progress: bool) -> bytes:
        """What to write of these events now: nothing before the first token, else all that waited (or all
        of it when an upstream's opening grows past HELD_LIMIT: holding is for a few small events)."""
        self._held.append(events)
        self._size += len(events)
        return self.release() if progress or self.started or self._size > HELD_LIMIT else b""

    def release(self) -> bytes:
        out, self._held, self._size = b"".join(self._held), [], 0
        self.started = self.started or bool(out)
        self.usage.feed(out)
        return out


def relay_sse(source: Source, timers: StreamTimers, stats: StreamStats,
              client_gone: Callable[[], bool] = never_gone, clock: Callable[[], float] = time.monotonic,
              dialect: Dialect = OPENAI, draining: Draining | None = None,
              fall_over: Callable[[str], Source | None] | None = None) -> Iterator[bytes]:
    """An upstream event stream, whole events as they arrive (held back until the first token), the
    dialect's keep-alives during silence. A broken upstream, a malformed event, an upstream error event or a
    body that ends before its protocol's last event, before the first token: `fall_over(kind)` gives the
    next upstream's stream (None: there is none). Those, a timer or the worker's drain deadline (`draining`)
    otherwise end it with the dialect's error event and nothing more. The source is closed in `finally`."""
    times = SseClock(timers, clock())
    held = Held(dialect)
    drain = draining or Draining()
    try:
        while True:
            now = clock()
            # Events that came with the first token are checked (and passed) before anything is read.
            item = b"" if held.unchecked else source.get(times.read_wait(now, drain.deadline))
            if item is None and not times.announced:
                times.wrote(now)
                yield b""  # the status and headers, before the loop waits
                continue
            now = clock()
            events, progress, malformed = _scan(item, held, times, stats, now)
            # Checked after a read, never right after a write: time spent writing to a slow client, while
            # the upstream's bytes wait in the inbox, is no silence of the upstream's.
            stop = times.expired(now, drain.deadline)
            if stop is not None:
                yield from _end(stop, held, stats, dialect)
                return
            out = held.take(events, progress) if events else b""
            if out:
                times.wrote(now)
                yield out
            failure = _failure(item, malformed, held)
            if failure is not None:
                replacement = None if held.started or fall_over is None else fall_over(failure[0])
                if replacement is None:
                    yield from _end(failure, held, stats, dialect)
                    return
                source.close()
                source = replacement
                held.restart()
                continue
            if isinstance(item, StreamEnd):
                yield from _end(None, held, stats, dialect)
                return
            if item is None:
                if times.keepalive_due(now):
                    times.wrote(now)
                    yield dialect.keepalive
                if client_gone():
                    stats.outcome = "client_gone"
                    return
    except GeneratorExit:
        stats.outcome = "client_gone"
        raise
    finally:
        source.close()
        stats.usage = held.usage.usage
        _settle_tokens(stats)


def _scan(item: object, held: Held, times: SseClock, stats: StreamStats, now: float) -> tuple[bytes, bool, bool]:
    """The whole events in what arrived (when it is bytes), whether they are progress, whether one is
    malformed; the timers and the first token's time told."""
    if not isinstance(item, bytes):
        return b"", False, False  # an end or failure comes only once no event is left unchecked
    events, progress, malformed, held.unchecked = held.check.scan(held.unchecked + held.framer.feed(item),
                                                                  stop_at_progress=not held.started)
    times.received(now, progress)
    if progress and stats.first_token_at is None:
        stats.first_token_at = now
    return events, progress, malformed


def _failure(item: object, malformed: bool, held: Held) -> tuple[str, str] | None:
    """Why this upstream's stream failed, if it did: a malformed event, a broken connection, its own error
    event, or a body that ended before its protocol's last event."""
    if malformed:
        return ("upstream_malformed", MALFORMED)
    if isinstance(item, StreamFailure):
        return (item.kind, item.message)
    if not isinstance(item, StreamEnd):
        return None
    last = held.check.last_event(held.framer.rest())
    if last is not None:
        held.hold(last)
    if not held.check.finished:
        return ("upstream_disconnected", ENDED_EARLY)
    return ("upstream_error", "") if held.check.errored else None


def _end(failure: tuple[str, str] | None, held: Held, stats: StreamStats, dialect: Dialect) -> Iterator[bytes]:
    """The stream's last bytes: what was held, then the relay's error event (none for a whole answer, or
    for the upstream's own error event, which is already among them)."""
    out = held.release()
    stats.outcome = "ok" if failure is None else failure[0]
    if out:
        yield out
    if failure is not None and failure[1]:
        yield dialect.error(*failure)


class ReopenedSource:
    """The next upstream's stream, opened by a thread (greenlet) of its own so that the loop keeps its
    keep-alives, timers and client checks while it opens: nothing until it is open, then its blocks; a
    StreamFailure when it cannot be had."""

    def __init__(self, open_next: Callable[[], Source]) -> None:
        self._open_next = open_next
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._source: Source | None = None
        self._failure: StreamFailure | None = None
        self._closed = False
        threading.Thread(target=self._open, daemon=True, name=f"{READER_THREAD_PREFIX}fall-over").start()

    def _open(self) -> None:
        try:
            source = self._open_next()
        except RelayError as error:
            self._failure = StreamFailure(error.kind, str(error.description))
        except Exception:  # a bug: the stream still ends properly
            log.exception("forwarded stream could not fall over")
            self._failure = StreamFailure("upstream_error", "the relay could not reach another upstream")
        else:
            with self._lock:
                if self._closed:
                    source.close()
                else:
                    self._source = source
        finally:
            self._ready.set()

    def get(self, timeout: float) -> object:
        if not self._ready.is_set() and not self._ready.wait(timeout):
            return None
        if self._failure is not None:
            return self._failure
        assert self._source is not None
        return self._source.get(timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            source = self._source
        if source is not None:
            source.close()


def next_upstreams(opened: Opened, stats: StreamStats, read: Callable[[UpstreamResponse], Source]
                   ) -> Callable[[str], Source | None]:
    """The loop's `fall_over`: the same request to the upstreams after the one that failed (the stats name
    the one answering, its fall-overs and every failure), read by `read` once it answers 200 with an event
    stream; None when there is no upstream left to ask."""
    current = opened
    exhausted = False

    def fall_over(kind: str) -> Source | None:
        nonlocal current, exhausted
        if exhausted or current.next_open is None:
            return None
        failed, open_rest = current, current.next_open
        failed.failures.append((failed.upstream.name, kind))
        stats.upstream_failures = failed.failures
        log.warning("upstream %s failed a forwarded stream before its first token (%s); falling over",
                    failed.upstream.name, kind)

        def open_next() -> Source:
            nonlocal current, exhausted
            try:
                current = open_rest()
            except RelayError:
                exhausted = True
                raise
            stats.upstream, stats.fallbacks = current.upstream.name, current.fallbacks
            response = current.response
            if response.status_code != 200 or not response.headers.get("content-type", "").startswith(
                    "text/event-stream"):
                response.close()
                raise failure_of_status(response) or UpstreamFailed(
                    f"the upstream API failed (HTTP {response.status_code}); try again in a moment")
            return read(response)

        return ReopenedSource(open_next)

    return fall_over
