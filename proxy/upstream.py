"""Talking to OpenAI-compatible upstreams.

The SDK does what it is good at (auth, base URL, headers, its pooled HTTP client, error classes), once, at
start-up: each upstream's chat request line and headers are taken from the SDK when first used
(`RequestTemplate`), and every request after that is the client's shaped body, serialized once with orjson,
sent on the SDK's own httpx2 client, or (streamed, under gevent) on the same URL and headers by the request's
own HTTP/1.1 lane (proxy/upstream_wire.py). Failures are turned into the SDK's own exception classes, so the
error mapping (`map_sdk_error`) is the SDK's. Going through `chat.completions.create` instead cost about a
millisecond of CPU per request (its option models, transforms and header merging; docs/benchmarks.md). The
response body's SSE lines are parsed here, once, with orjson: building the SDK's typed objects for every
chunk costs two orders of magnitude more CPU per token.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cached_property
from typing import Any, NamedTuple

import httpcore2
import httpx2
import openai
import orjson

from proxy.errors import BadRequest, RateLimited, RelayError, UpstreamFailed, UpstreamTimeout
from proxy.globs import serves
from proxy.redaction import redact_secret_like
from proxy.upstream_body import DirectBody, backstop_read_timeout, readable_now, shut_down
from proxy.upstream_wire import WireLane

log = logging.getLogger("relay.upstream")

_CONTEXT_TOO_LONG = re.compile(
    r"context.length|maximum context|token limit|too many tokens|context window|prompt is too long", re.I
)
# An upstream's Retry-After is passed on only when sane: longer than a day is nonsense, more than an hour is
# more than any client should be told to wait for a relay that may fall over or recover sooner.
RETRY_AFTER_ABSURD_SECONDS = 86400
RETRY_AFTER_CAP_SECONDS = 3600


class Chunk(NamedTuple):
    """One upstream SSE event, parsed once. `raw` is the JSON exactly as the upstream sent it."""

    raw: bytes
    content: str | None
    reasoning: str | None
    finish_reason: str | None
    usage: dict[str, Any] | None
    progress: bool  # content, reasoning or a tool call: the model is making headway
    usage_only: bool = False  # the usage chunk OpenAI sends last when asked (`choices` empty)
    model: str | None = None  # the model the upstream says answered (for the usage ledger)


class StreamFailure(NamedTuple):
    """The upstream stream broke after it began; `kind` is the machine-readable name."""

    kind: str
    message: str


DRAIN_LIMIT_BYTES = 64 * 1024
MALFORMED = StreamFailure("upstream_malformed", "the upstream sent a malformed chunk; the answer is incomplete")
FALL_OVER_KINDS = frozenset({"upstream_unreachable", "upstream_timeout", "upstream_error", "upstream_rate_limited"})


class StreamEnd(NamedTuple):
    """The upstream finished the stream properly."""


@dataclass(frozen=True)
class Upstream:
    name: str
    client: openai.OpenAI
    models: tuple[str, ...] = ()  # globs; empty means any model
    # The configuration's redaction (proxy/redaction.py), applied to every upstream text a client or log sees.
    redact: Callable[[str], str] = field(default=redact_secret_like, repr=False, compare=False)
    protocols: frozenset[str] = frozenset({"chat", "responses"})  # the client protocols it speaks natively
    model_map: tuple[tuple[str, str], ...] = ()  # (client-facing name, this upstream's own name)

    def serves(self, model: str) -> bool:
        return serves(self.models, self.model_map, model)

    def speaks(self, protocol: str) -> bool:
        return protocol in self.protocols

    def upstream_model(self, model: str) -> str:
        """The name this upstream knows `model` by (UPSTREAMS_FILE's `model_map`), else `model` itself."""
        return self._model_names.get(model, model) if self.model_map else model

    @cached_property
    def _model_names(self) -> dict[str, str]:
        return dict(self.model_map)

    @cached_property
    def chat_request(self) -> RequestTemplate:
        """The chat completions request as the SDK would send it, built once (the first request)."""
        return RequestTemplate.of(self.client, "/chat/completions")

    @cached_property
    def chat_lane(self) -> WireLane | None:
        """The streamed chat request's own HTTP/1.1 lane (proxy/upstream_wire.py), where it can be used."""
        template = self.chat_request
        return WireLane.of(self.client._client, template.url, template.headers,
                           self.client._make_status_error_from_response)

    # What proxy/forwarding.py needs of an upstream it forwards raw requests to (`ForwardTarget`).
    @cached_property
    def root_url(self) -> str:
        return str(self.client.base_url).rstrip("/")

    @property
    def http(self) -> httpx2.Client:
        return self.client._client  # the SDK's pooled client: forwarded requests share its connections

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.client.api_key}"}


@dataclass(frozen=True)
class AnthropicUpstream:
    """An upstream speaking Anthropic's Messages API (`api = "anthropic"` in UPSTREAMS_FILE). The relay only
    forwards raw requests to it, so it needs no SDK: a pooled httpx2 client, the root URL (requests go to
    `<root_url>/v1/messages`) and the key, sent as `x-api-key`."""

    name: str
    root_url: str
    http: httpx2.Client = field(repr=False)
    api_key: str = field(repr=False)
    models: tuple[str, ...] = ()
    redact: Callable[[str], str] = field(default=redact_secret_like, repr=False, compare=False)
    protocols: frozenset[str] = frozenset({"messages"})
    model_map: tuple[tuple[str, str], ...] = ()

    def serves(self, model: str) -> bool:
        return serves(self.models, self.model_map, model)

    def speaks(self, protocol: str) -> bool:
        return protocol in self.protocols

    def upstream_model(self, model: str) -> str:
        return dict(self.model_map).get(model, model)

    def auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key}


class RequestTemplate(NamedTuple):
    """One upstream endpoint's URL and headers, taken from the SDK once: its base URL joined as it joins it,
    its HTTP client's headers overlaid with its own default and auth headers (User-Agent, X-Stainless-*,
    OpenAI-Organization/-Project when set, Authorization), as the SDK's request builder merges them."""

    url: httpx2.URL
    headers: httpx2.Headers

    @classmethod
    def of(cls, client: openai.OpenAI, path: str) -> RequestTemplate:
        headers = httpx2.Headers(client._client.headers)
        sdk = {**client.default_headers, **client.auth_headers, "X-Stainless-Retry-Count": "0"}
        headers.update({name: value for name, value in sdk.items() if isinstance(value, str)})
        return cls(client._prepare_url(path), headers)

    def send(self, upstream: Upstream, body: bytes, timeout: httpx2.Timeout, stream: bool) -> httpx2.Response:
        """POST `body` on the upstream's pooled client; failures raised as the SDK raises them (max_retries 0):
        APITimeoutError, APIConnectionError, or the APIStatusError subclass for an HTTP error status."""
        request = httpx2.Request("POST", self.url, headers=self.headers, content=body,
                                 extensions={"timeout": timeout.as_dict()})
        request.headers["X-Stainless-Read-Timeout"] = str(timeout.read)
        try:
            response = upstream.http.send(request, stream=stream)
        except httpx2.TimeoutException as exc:
            raise openai.APITimeoutError(request=request) from exc
        except (httpx2.HTTPError, OSError) as exc:
            raise openai.APIConnectionError(request=request) from exc
        if not response.is_success:
            try:
                response.read()
            except (httpx2.HTTPError, OSError):
                response.close()
            raise upstream.client._make_status_error_from_response(response)
        return response


class _CheapIdleCheck(httpcore2.NetworkStream):
    """A pooled upstream connection whose "is it still usable" check is one poll(0) system call. httpcore
    checks every idle pooled connection at each request's start and end; through gevent's cooperative poll
    that took watchers and a hub switch per connection, so it grew with the pool (15% of a worker's CPU at
    200 concurrent streams: docs/benchmarks.md). poll(0) never blocks, so the native one is safe here."""

    def __init__(self, stream: httpcore2.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        return _CheapIdleCheck(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info != "is_readable":
            return self._stream.get_extra_info(info)
        sock = self._stream.get_extra_info("socket")
        descriptor = sock.fileno() if sock is not None else -1
        if descriptor < 0:
            return True  # gone: as httpcore treats it, readable (its next read returns the end)
        return readable_now(descriptor)


class CheapIdleCheckBackend(httpcore2.SyncBackend):
    """httpcore's own TCP backend, its streams wrapped in `_CheapIdleCheck`."""

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore2.NetworkStream:
        return _CheapIdleCheck(super().connect_tcp(host, port, timeout, local_address, socket_options))


def with_cheap_idle_check(client: httpx2.Client) -> httpx2.Client:
    """`client` with `CheapIdleCheckBackend` under its own direct transport's pool. The client is built as
    usual first (not handed a transport), so HTTP(S)_PROXY and NO_PROXY still apply; proxied upstreams keep
    httpcore's backend."""
    transport = client._transport
    pool = getattr(transport, "_pool", None)
    if isinstance(transport, httpx2.HTTPTransport) and type(pool) is httpcore2.ConnectionPool:
        pool._network_backend = CheapIdleCheckBackend()
    return client


class UpstreamStream:
    """An open streaming response from one upstream: read it with `read_into`, end it with `abort`."""

    def __init__(self, upstream: Upstream, response: httpx2.Response | DirectBody, fallbacks: int,
                 candidates: Candidates | None = None) -> None:
        self.upstream = upstream
        self.fallbacks = fallbacks
        # The upstream's streamed HTTP response; its body only, when it came by the upstream's own lane.
        self._response = response
        self._aborted = False
        self._candidates = candidates

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(upstream, kind) of this request's upstream failures so far (shared with its candidates)."""
        return self._candidates.failures if self._candidates is not None else []

    def can_fall_over(self) -> bool:
        """Whether another upstream serving this model is left to try."""
        return self._candidates is not None and self._candidates.remaining() > 0

    def fall_over(self) -> UpstreamStream:
        """Open the stream on the next upstream serving this model (blocking); RelayError when none answers.
        Only for a stream that failed before anything of it reached the client."""
        assert self._candidates is not None
        return self._candidates.open_stream()

    def close(self) -> None:
        """Release a stream that will not be read."""
        self._response.close()

    def read_into(self, put: Callable[[object], None]) -> None:
        """Read the SSE body, `put` lists of Chunks, then one StreamEnd or StreamFailure. Closes in finally."""
        assert not isinstance(self._response, DirectBody), "a lane's body is read by the pump (DirectSource)"
        try:
            blocks = self._response.iter_bytes()
            outcome = self._parse(blocks, put)
            put(outcome)  # before draining: an upstream that never ends its body must not hold the answer
            if isinstance(outcome, StreamEnd):
                self._drain(blocks)
        except httpx2.TimeoutException:
            put(StreamFailure("upstream_timeout", "the upstream stopped sending; the answer is incomplete"))
        except (httpx2.HTTPError, OSError) as exc:
            if self._aborted:
                return
            log.info("upstream %s stream broke: %s", self.upstream.name, type(exc).__name__)
            put(StreamFailure("upstream_disconnected",
                              "the upstream connection broke mid-answer; the answer is incomplete"))
        finally:
            self._response.close()

    def _drain(self, blocks: Iterator[bytes]) -> None:
        """Read the body to its end (after [DONE] only the chunked terminator is left) so that the
        connection goes back to the pool instead of being closed: a new TCP (and TLS) handshake for
        every request costs more than the whole relay. The pump aborts a drain that takes too long."""
        drained = 0
        for block in blocks:
            drained += len(block)
            if drained > DRAIN_LIMIT_BYTES or self._aborted:
                break

    def _parse(self, blocks: Iterator[bytes], put: Callable[[object], None]) -> StreamEnd | StreamFailure:
        parser = SseParser(self.upstream.redact)
        for block in blocks:
            if self._aborted:
                return StreamEnd()
            chunks, end = parser.feed(block)
            if chunks:
                put(chunks)
            if end is not None:
                return end
        return parser.at_eof()

    def direct_body(self) -> DirectBody | None:
        """The body for the pump's own greenlet to read (`proxy/upstream_body.py`), when it can."""
        if isinstance(self._response, DirectBody):
            return self._response
        return DirectBody.take(self._response)

    def abort(self) -> None:
        """Close the upstream connection now, from any thread, waking a reader blocked on it."""
        self._aborted = True
        if isinstance(self._response, DirectBody):
            self._response.abort()
            return
        network_stream = self._response.extensions.get("network_stream")
        if not shut_down(network_stream.get_extra_info("socket") if network_stream is not None else None):
            self._response.close()  # in-process transports (demo mode) close through the response


class SseParser:
    """An SSE body's chat chunks, parsed as blocks of bytes arrive (split anywhere): `feed` each block, and
    `at_eof` when the body ended without `[DONE]`."""

    __slots__ = ("_data_lines", "_finished", "_pending", "_redact")

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        self._pending = b""
        self._data_lines: list[bytes] = []
        self._finished = False  # a finish reason was seen

    def feed(self, block: bytes, stop_at_progress: bool = False
             ) -> tuple[list[Chunk], StreamEnd | StreamFailure | None]:
        """The chunks completed by `block`, and the stream's end if it came (nothing after it counts).
        `stop_at_progress`: stop after the first chunk that makes progress and keep the lines after it for the
        next call (`holds_lines`), so a first token that came with many others goes out before they are parsed."""
        pending = self._pending + block
        lines = pending.split(b"\n")
        self._pending = lines.pop()
        chunks: list[Chunk] = []
        data_lines = self._data_lines
        for index, line in enumerate(lines):
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.startswith(b"data:"):
                data_lines.append(line[6:] if line[5:6] == b" " else line[5:])
                continue
            if line or not data_lines:
                continue  # comments, event:/id:/retry: fields, stray blank lines
            data = data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)
            data_lines.clear()
            if data == b"[DONE]":
                return chunks, StreamEnd()
            parsed = parse_chunk(data, self._redact)
            if isinstance(parsed, StreamFailure):
                return chunks, parsed
            chunks.append(parsed)
            self._finished = self._finished or parsed.finish_reason is not None
            if stop_at_progress and parsed.progress and index + 1 < len(lines):
                self._pending = b"\n".join(lines[index + 1:]) + b"\n" + self._pending
                return chunks, None
        return chunks, None

    @property
    def holds_lines(self) -> bool:
        """Whole lines fed but not parsed yet (`feed` stopped at the first progress)."""
        return b"\n" in self._pending

    def at_eof(self) -> StreamEnd | StreamFailure:
        if self._finished:
            return StreamEnd()  # some servers omit [DONE] after the finish reason
        return StreamFailure("upstream_disconnected", "the upstream ended the answer early; it is incomplete")


def parse_chunk(data: bytes, redact: Callable[[str], str] = redact_secret_like) -> Chunk | StreamFailure:
    """Parse one SSE data payload into a Chunk, or a StreamFailure for garbage and in-stream errors (their
    upstream text passed through `redact`)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return MALFORMED
    if not isinstance(obj, dict):
        return MALFORMED
    if "error" in obj and not obj.get("choices"):
        return StreamFailure("upstream_error", f"the upstream reported an error: {_upstream_message(obj, redact)}")
    content = reasoning = finish = None
    progress = False
    choices = obj.get("choices")
    if choices and isinstance(choices, list) and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if not isinstance(content, str):
                content = None
            if not isinstance(reasoning, str):
                reasoning = None
            progress = bool(content or reasoning or delta.get("tool_calls"))
        finish = choice.get("finish_reason")
    usage = obj.get("usage")
    usage = usage if isinstance(usage, dict) else None
    model = obj.get("model")
    return Chunk(data, content, reasoning, finish if isinstance(finish, str) else None, usage, progress,
                 usage is not None and not choices, model if isinstance(model, str) and model else None)


class Candidates:
    """The upstreams serving one request's model, tried in order: at open time on connection errors,
    timeouts, 5xx and 429, and (through `UpstreamStream.fall_over`) when a stream fails before its first
    token. `remaining()` tells how many are left; each is tried at most once per request."""

    def __init__(self, upstreams: Iterable[Upstream], body: dict[str, Any], upstream_timeout: float,
                 body_read_timeout: float) -> None:
        self.model = str(body["model"])
        self.body = body
        self.upstream_timeout = upstream_timeout
        self.body_read_timeout = body_read_timeout
        self._candidates = [upstream for upstream in upstreams if upstream.serves(self.model)]
        if not self._candidates:
            raise BadRequest(f"model '{self.model}' is not served by this relay", kind="model_not_served")
        self._next = 0
        self.failures: list[tuple[str, str]] = []  # (upstream, kind) of every attempt that failed

    def remaining(self) -> int:
        return len(self._candidates) - self._next

    def _attempts(self) -> Iterator[tuple[int, Upstream]]:
        while self._next < len(self._candidates):
            attempt = self._next
            self._next += 1
            yield attempt, self._candidates[attempt]

    def open_stream(self) -> UpstreamStream:
        """Open a streaming chat completion on the next upstream that answers; RelayError when none does."""
        last_error: RelayError | None = None
        for attempt, upstream in self._attempts():
            try:
                response = _request(upstream, self.body, self.upstream_timeout)
            except openai.APIError as exc:
                last_error = self._failed(upstream, map_sdk_error(exc, self.model, upstream.redact))
                continue
            if isinstance(response, httpx2.Response):  # (a lane's body times its reads itself)
                backstop_read_timeout(response, self.body_read_timeout)
            return UpstreamStream(upstream, response, fallbacks=attempt, candidates=self)
        raise last_error or UpstreamFailed("no upstream serving this model is left to try")

    def complete(self, whole_answer_timeout: float) -> Completion:
        """A non-streaming chat completion from the next upstream that answers: its JSON bytes as sent."""
        last_error: RelayError | None = None
        for attempt, upstream in self._attempts():
            try:
                raw = _request_whole(upstream, self.body, self.upstream_timeout, whole_answer_timeout)
            except openai.APIError as exc:
                last_error = self._failed(upstream, map_sdk_error(exc, self.model, upstream.redact))
                continue
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                data = None
            if not isinstance(data, dict) or ("error" in data and not data.get("choices")):
                last_error = self._failed(upstream, UpstreamFailed(
                    "the upstream API answered with something the relay cannot read"))
                continue
            return Completion(upstream, raw, data, attempt)
        raise last_error or UpstreamFailed("no upstream serving this model is left to try")

    def _failed(self, upstream: Upstream, error: RelayError) -> RelayError:
        log.warning("upstream %s failed to open (%s)", upstream.name, error.kind)
        self.failures.append((upstream.name, error.kind))
        error.upstream_failures = tuple(self.failures)
        if not _worth_falling_over(error):
            raise error
        return error


class Completion(NamedTuple):
    """A whole (non-streaming) answer: the upstream's JSON bytes as sent, and parsed."""

    upstream: Upstream
    raw: bytes
    data: dict[str, Any]
    fallbacks: int


def open_stream(upstreams: Iterable[Upstream], body: dict[str, Any], upstream_timeout: float,
                body_read_timeout: float) -> UpstreamStream:
    """Open a streaming chat completion on the first upstream serving the model, falling over to the
    next one on connection errors, timeouts, 5xx and 429. Raises a RelayError when none answers."""
    return Candidates(upstreams, body, upstream_timeout, body_read_timeout).open_stream()


def complete(upstreams: Iterable[Upstream], body: dict[str, Any], upstream_timeout: float,
             whole_answer_timeout: float) -> Completion:
    """A non-streaming chat completion, with the same model routing, fallover and error mapping."""
    return Candidates(upstreams, body, upstream_timeout, whole_answer_timeout).complete(whole_answer_timeout)


def _request(upstream: Upstream, body: dict[str, Any], timeout: float) -> httpx2.Response | DirectBody:
    # The client's shaped body goes upstream as it is, the model renamed as this upstream knows it.
    model = upstream.upstream_model(body["model"])
    content = orjson.dumps({**body, "model": model, "stream": True})
    lane = upstream.chat_lane
    if lane is not None:
        return lane.send(content, timeout)
    return upstream.chat_request.send(upstream, content, httpx2.Timeout(timeout), stream=True)


def _request_whole(upstream: Upstream, body: dict[str, Any], timeout: float, whole_answer_timeout: float
                   ) -> bytes:
    # The upstream sends its headers only once the whole answer exists: the read timeout must cover it.
    # `stream` (false or absent) stays as the client sent it.
    model = upstream.upstream_model(body["model"])
    content = orjson.dumps({**body, "model": model})
    response = upstream.chat_request.send(upstream, content, httpx2.Timeout(whole_answer_timeout, connect=timeout),
                                          stream=False)
    return response.content


def _worth_falling_over(error: RelayError) -> bool:
    return error.kind in FALL_OVER_KINDS


def map_sdk_error(exc: openai.APIError, model: str, redact: Callable[[str], str] = redact_secret_like
                  ) -> RelayError:
    """A failure before the first token, in words a person can act on; the upstream's own text only after
    `redact` (the configuration's secrets out)."""
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamTimeout("the upstream API did not answer in time; try again in a moment")
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamFailed("the relay could not reach the upstream API; try again later",
                              kind="upstream_unreachable")
    if not isinstance(exc, openai.APIStatusError):
        return UpstreamFailed("the upstream API answered with something the relay cannot read")
    error = _status_error(exc, model, redact)
    error.upstream_status = exc.status_code  # for a bridge that must tell 529 from 500 (proxy/bridge/)
    return error


def _status_error(exc: openai.APIStatusError, model: str, redact: Callable[[str], str]) -> RelayError:
    status = exc.status_code
    detail = _upstream_message(exc.body, redact)
    if status in (401, 403):
        return UpstreamFailed("upstream rejected this server's API key; the operator must check it",
                              kind="upstream_auth")
    if status == 404:
        return BadRequest(f"the upstream does not know model '{model}'", kind="model_not_found")
    if status == 429:
        return RateLimited("the upstream API is rate limiting this relay; retry later",
                           kind="upstream_rate_limited", retry_after=_retry_after(exc.response))
    if status in (400, 413, 422) and _CONTEXT_TOO_LONG.search(detail):
        return BadRequest(f"the conversation is too long for model '{model}'; shorten it or start a new chat",
                          kind="context_too_long")
    if status in (400, 422):
        return BadRequest(f"the upstream refused the request: {detail}", kind="upstream_bad_request")
    return UpstreamFailed(f"the upstream API failed (HTTP {status}); try again in a moment")


def _upstream_message(body: object, redact: Callable[[str], str]) -> str:
    message: object = body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message", inner) if isinstance(inner, dict) else inner
    text = message if isinstance(message, str) else "no details"
    # Redacted before it is cut: a key straddling the cut would otherwise survive as a prefix.
    text = redact(text.strip())[:300] or "no details"
    return text


def _retry_after(response: httpx2.Response) -> int | None:
    return retry_after_seconds(response.headers.get("retry-after", ""))


def retry_after_seconds(value: str, now: datetime | None = None) -> int | None:
    """Seconds to wait from a Retry-After value (RFC 9110: delta-seconds or an HTTP-date), at least 1 and at
    most RETRY_AFTER_CAP_SECONDS; None for a malformed, negative or absurd (over a day) value."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        # Digits only, so no float() overflow ('1e999') and no sign; a huge count is absurd before int().
        seconds = int(value) if len(value) <= 6 else RETRY_AFTER_ABSURD_SECONDS + 1
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322; HTTP-dates are always GMT
            when = when.replace(tzinfo=UTC)
        seconds = int((when - (now or datetime.now(UTC))).total_seconds() + 0.999)
    if seconds > RETRY_AFTER_ABSURD_SECONDS:
        return None
    return min(max(1, seconds), RETRY_AFTER_CAP_SECONDS)
