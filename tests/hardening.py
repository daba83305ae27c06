"""Helpers shared by the fault, client-fault, fuzz, soak and security tests.

- `STREAM_ENDPOINTS`: every streaming endpoint the relay has, each knowing how to ask for an answer and how
  to read its stream back into one neutral `Outcome` (contents, error records, end markers);
  `FORWARDED_STREAM_ENDPOINTS`: the forwarded streams (`/v1/responses`, Anthropic's `/v1/messages`), which
  need a relay with an Anthropic-protocol upstream (`forwarding_upstreams`).
- `worker_stats` / `assert_settles`: the counters of `GET /debug/stats` (RELAY_DEBUG_STATS=1) before and
  after a fault, so a leaked greenlet, thread, socket or upstream reader fails the test.
- `assert_no_secrets`: no access key or upstream key in a text (logs, bodies, headers).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2
import simple_websocket

from proxy.forwarding import anthropic_stream_error_type
from proxy.relay import UPSTREAM_POOL
from tests.conftest import ACCESS_KEY, SECRETS, UPSTREAM_KEY, RelayProcess
from tests.fake_upstream import FAKE_PREFIX

# Counters that must come back to (or below) their value from before a fault. Outbound sockets are not among
# them: idle upstream connections stay in the pool on purpose; `assert_settles` bounds them separately.
LEAK_COUNTERS = ("greenlets", "threads", "upstream_readers", "client_sockets", "fds_without_outbound")
UPSTREAM_POOL_IDLE_MAX = UPSTREAM_POOL.max_keepalive_connections or 0

# Settings of the relay the hardening tests share (one gunicorn for faults, fuzzing and security): short timers
# so every fault ends within seconds, a small body limit, one CORS origin, and the diagnostics endpoint on.
FAULT_SETTINGS: dict[str, str] = {
    "KEEPALIVE_SECONDS": "0.3",
    "UPSTREAM_TIMEOUT": "1",
    "FIRST_TOKEN_TIMEOUT": "2.5",
    "IDLE_TIMEOUT": "1",
    "MAX_STREAM_SECONDS": "3.5",
    "BODY_TIMEOUT": "2",
    "MAX_BODY_BYTES": "65536",
    "CORS_ORIGINS": "https://app.example.com",
    "RELAY_DEBUG_STATS": "1",
}


def fake_says(behaviour: Mapping[str, Any] | None = None, text: str = "hello") -> str:
    """A user message that tells the fake upstream how to answer this one request."""
    if not behaviour:
        return text
    return FAKE_PREFIX + json.dumps(behaviour)


@dataclass
class Outcome:
    """One answer from a streaming endpoint, read back into what every protocol has in common."""

    status: int
    headers: httpx2.Headers
    raw: bytes
    elapsed: float
    contents: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # {"code", "message"}
    ends: int = 0  # end-of-stream markers ([DONE] records / events)
    keepalives: int = 0
    last_is_end: bool = False

    @property
    def text(self) -> str:
        return "".join(self.contents)


@dataclass(frozen=True)
class StreamEndpoint:
    """A streaming endpoint: how to ask it for an answer to one user message, and how to read it."""

    name: str
    method: str
    path: str
    build: Callable[[str], dict[str, Any]]  # user text -> httpx2 request kwargs (json=..., params=...)
    parse: Callable[[Outcome], None]  # fills contents/errors/ends from outcome.raw
    error_content_type: str  # the content type of its errors before the stream starts
    ok_status: int = 200  # the status of an answer that streams (101 for a WebSocket)
    forwarded: bool = False  # bytes forwarded by proxy/forwarding.py: upstream errors in its body pass on
    code_of: Callable[[str], str] = str  # the relay's error kind as this endpoint's clients see it

    def request(self, relay: RelayProcess, text: str, timeout: float = 20.0,
                headers: Mapping[str, str] | None = None) -> Outcome:
        """Send one request on a fresh connection and read the whole answer."""
        started = time.monotonic()
        all_headers = {"Authorization": f"Bearer {ACCESS_KEY}", **(headers or {})}
        with httpx2.Client(timeout=timeout) as client, client.stream(
            self.method, relay.url + self.path, headers=all_headers, **self.build(text)
        ) as response:
            raw = response.read()
        outcome = Outcome(response.status_code, response.headers, raw, time.monotonic() - started)
        self.parse(outcome)
        return outcome

    def raw_request(self, relay: RelayProcess, text: str) -> bytes:
        """The request's bytes, for tests that drive the socket themselves."""
        request = httpx2.Request(self.method, relay.url + self.path,
                                 headers={"Authorization": f"Bearer {ACCESS_KEY}"}, **self.build(text))
        head = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
        return (head + "\r\n").encode("latin-1") + request.read()

    def __str__(self) -> str:
        return self.name


def parse_ndjson(outcome: Outcome) -> None:
    """`POST /chat`: one JSON record per line; blank lines are keep-alives."""
    lines = outcome.raw.split(b"\n")
    assert lines[-1] == b"", f"the stream does not end with a newline: {outcome.raw[-200:]!r}"
    last = None
    for line in lines[:-1]:
        if not line:
            outcome.keepalives += 1
            continue
        record = json.loads(line)
        assert {"done", "error", "content"} <= set(record), record
        last = record
        if record["done"]:
            outcome.ends += 1
        elif record["error"]:
            outcome.errors.append({"code": record.get("code"), "message": record["content"]})
        else:
            outcome.contents.append(record["content"])
    outcome.last_is_end = last is not None and last["done"] is True


def parse_sse(outcome: Outcome) -> None:
    """`/v1/chat/completions` and `GET /chat`: SSE events of OpenAI chunks ending in `data: [DONE]`; errors
    as an `{"error": {...}}` event (named `error` on `GET /chat`). Before the stream, /v1 answers errors as
    one OpenAI JSON error object, which counts as a complete answer."""
    if outcome.headers.get("content-type", "").startswith("application/json"):
        error = json.loads(outcome.raw)["error"]
        outcome.errors.append({"code": error.get("code"), "message": error["message"]})
        outcome.ends = 1
        outcome.last_is_end = True
        return
    text = outcome.raw.decode("utf-8")
    assert text.endswith("\n\n"), f"the stream does not end with a complete event: {text[-200:]!r}"
    last_data = None
    for event in text[:-2].split("\n\n"):
        data_lines = [line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:")]
        if not data_lines:
            assert all(line.startswith(":") for line in event.split("\n")), event
            outcome.keepalives += 1
            continue
        data = "\n".join(data_lines)
        last_data = data
        if data == "[DONE]":
            outcome.ends += 1
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            outcome.errors.append({"code": chunk["error"].get("code"), "message": chunk["error"]["message"]})
            continue
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                outcome.contents.append(content)
    outcome.last_is_end = last_data == "[DONE]"


def _chat_body(text: str) -> dict[str, Any]:
    return {"json": {"messages": [{"role": "user", "content": text}]}}


def _openai_body(text: str) -> dict[str, Any]:
    return {"json": {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": text}]}}


def _event_source_query(text: str) -> dict[str, Any]:
    return {"params": {"prompt": text}}


STREAM_ENDPOINTS: tuple[StreamEndpoint, ...] = (
    StreamEndpoint("POST /chat", "POST", "/chat", _chat_body, parse_ndjson, "application/x-ndjson"),
    StreamEndpoint("POST /v1/chat/completions", "POST", "/v1/chat/completions", _openai_body, parse_sse,
                   "application/json"),
    StreamEndpoint("GET /chat", "GET", "/chat", _event_source_query, parse_sse, "text/event-stream"),
)


def relay_address(relay: RelayProcess) -> tuple[str, int]:
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


class WebSocketEndpoint(StreamEndpoint):
    """`/ws`: one connection per request here; every outcome, errors included, comes inside the answer's
    frame (`isStreaming` ... `done`), so there is no error status before the stream."""

    def request(self, relay: RelayProcess, text: str, timeout: float = 20.0,
                headers: Mapping[str, str] | None = None) -> Outcome:
        started = time.monotonic()
        url = relay.url.replace("http://", "ws://", 1) + "/ws"
        key = (headers or {}).get("Authorization", f"Bearer {ACCESS_KEY}")
        ws = simple_websocket.Client.connect(url, headers={"Authorization": key})
        records: list[bytes] = []
        try:
            ws.send(json.dumps({"content": text}))
            while True:
                raw = ws.receive(timeout=timeout)
                if raw is None:
                    break
                records.append(raw.encode() if isinstance(raw, str) else raw)
                if json.loads(raw).get("done"):
                    break
        except simple_websocket.ConnectionClosed:
            pass
        finally:
            ws.close()
        outcome = Outcome(101, httpx2.Headers(), b"\n".join(records) + b"\n", time.monotonic() - started)
        self.parse(outcome)
        return outcome


def parse_websocket(outcome: Outcome) -> None:
    """`/ws` records: `{"reply":"","isStreaming":true}`, `{"reply":delta}`..., errors as
    `{"reply":message,"error":true,"code":kind}`, then `{"reply":"","done":true}`."""
    last = None
    for line in outcome.raw.split(b"\n")[:-1]:
        record = json.loads(line)
        last = record
        if record.get("done"):
            outcome.ends += 1
        elif record.get("error"):
            outcome.errors.append({"code": record.get("code"), "message": record["reply"]})
        elif not record.get("isStreaming") and record.get("reply"):
            outcome.contents.append(record["reply"])
    outcome.last_is_end = last is not None and last.get("done") is True


WEBSOCKET_ENDPOINT = WebSocketEndpoint("WS /ws", "GET", "/ws", _chat_body, parse_websocket, "", ok_status=101)
# The fault matrix runs on every streaming endpoint; tests that drive HTTP sockets use STREAM_ENDPOINTS.
ALL_STREAM_ENDPOINTS = (*STREAM_ENDPOINTS, WEBSOCKET_ENDPOINT)


def _sse_events(outcome: Outcome) -> list[tuple[str | None, str | None]]:
    """(event name, data) of each event of a complete event stream; comments count as keep-alives."""
    text = outcome.raw.decode("utf-8")
    assert text.endswith("\n\n"), f"the stream does not end with a complete event: {text[-200:]!r}"
    events: list[tuple[str | None, str | None]] = []
    for event in text[:-2].split("\n\n"):
        lines = event.split("\n")
        data = [line[5:].lstrip(" ") for line in lines if line.startswith("data:")]
        names = [line[6:].strip() for line in lines if line.startswith("event:")]
        if not data and all(line.startswith(":") for line in lines):
            outcome.keepalives += 1
            continue
        events.append((names[0] if names else None, "\n".join(data) if data else None))
    return events


def _json_error(outcome: Outcome) -> bool:
    """An error answered before the stream (OpenAI's or Anthropic's JSON error body) counts as a whole
    answer with one error record; True when the answer was one."""
    if not outcome.headers.get("content-type", "").startswith("application/json"):
        return False
    error = json.loads(outcome.raw)["error"]
    outcome.errors.append({"code": error.get("code") or error.get("type"), "message": error["message"]})
    outcome.ends, outcome.last_is_end = 1, True
    return True


RESPONSES_ENDS = ("response.completed", "response.failed", "response.incomplete", "error")


def parse_responses(outcome: Outcome) -> None:
    """`POST /v1/responses` streams: named Responses events, text in `response.output_text.delta`, ending in
    `response.completed` (or failed/incomplete) or an `error` event (the upstream's, or the relay's own,
    which also carries an `error` object); keep-alives are SSE comments."""
    if _json_error(outcome):
        return
    last = None
    for _name, data in _sse_events(outcome):
        payload: dict[str, Any] = json.loads(data) if data is not None else {}
        kind = payload.get("type")
        last = kind if kind is not None or "error" not in payload else "error"
        if last == "response.output_text.delta":
            outcome.contents.append(payload["delta"])
        elif last == "error":
            error: dict[str, Any] = payload["error"] if isinstance(payload.get("error"), dict) else payload
            outcome.errors.append({"code": error.get("code"), "message": error["message"]})
        if last in RESPONSES_ENDS:
            outcome.ends += 1
    outcome.last_is_end = last in RESPONSES_ENDS


def parse_messages(outcome: Outcome) -> None:
    """Anthropic's `POST /v1/messages` streams: text in `content_block_delta` text deltas, ending in
    `message_stop` or an `error` event; keep-alives are `ping` events (and SSE comments, if any)."""
    if _json_error(outcome):
        return
    last = None
    for _name, data in _sse_events(outcome):
        payload: dict[str, Any] = json.loads(data) if data is not None else {}
        last = payload.get("type") or ("error" if "error" in payload else None)
        if last == "ping":
            outcome.keepalives += 1
        elif last == "content_block_delta" and payload["delta"].get("type") == "text_delta":
            outcome.contents.append(payload["delta"]["text"])
        elif last == "error":
            error = payload["error"]
            outcome.errors.append({"code": error.get("code") or error.get("type"), "message": error["message"]})
        if last in ("message_stop", "error"):
            outcome.ends += 1
    outcome.last_is_end = last in ("message_stop", "error")


ANTHROPIC_MODEL = "claude-sonnet-4-5"
ANTHROPIC_UPSTREAM_KEY = "sk-ant-upstream-key-for-hardening-9e8d7c"


def _responses_body(text: str) -> dict[str, Any]:
    return {"json": {"model": "gpt-4o-mini", "stream": True, "input": text}}


def _messages_body(text: str) -> dict[str, Any]:
    return {"json": {"model": ANTHROPIC_MODEL, "max_tokens": 256, "stream": True,
                     "messages": [{"role": "user", "content": text}]}}


FORWARDED_STREAM_ENDPOINTS: tuple[StreamEndpoint, ...] = (
    StreamEndpoint("POST /v1/responses", "POST", "/v1/responses", _responses_body, parse_responses,
                   "application/json", forwarded=True),
    StreamEndpoint("POST /v1/messages", "POST", "/v1/messages", _messages_body, parse_messages,
                   "application/json", forwarded=True, code_of=anthropic_stream_error_type),
)


def forwarding_upstreams(openai_urls: Iterable[str], anthropic_roots: Iterable[str]) -> str:
    """An UPSTREAMS_FILE: OpenAI-protocol upstreams (serving gpt-*), then Anthropic-protocol ones (claude-*),
    each list in the order given; keys from OPENAI_UPSTREAM_KEY and ANTHROPIC_UPSTREAM_KEY."""
    text = ""
    for number, url in enumerate(openai_urls):
        text += (f'[[upstreams]]\nname = "openai-{number}"\nbase_url = "{url}"\n'
                 'api_key_env = "OPENAI_UPSTREAM_KEY"\nmodels = ["gpt-*"]\n\n')
    for number, root in enumerate(anthropic_roots):
        text += (f'[[upstreams]]\nname = "anthropic-{number}"\napi = "anthropic"\nbase_url = "{root}"\n'
                 'api_key_env = "ANTHROPIC_UPSTREAM_KEY"\nmodels = ["claude-*"]\n\n')
    return text


def forwarding_settings(upstreams_file: str) -> dict[str, str]:
    """The relay settings that go with `forwarding_upstreams`' file (keys named, no OPENAI_API_KEY)."""
    return {"UPSTREAMS_FILE": upstreams_file, "OPENAI_UPSTREAM_KEY": UPSTREAM_KEY,
            "ANTHROPIC_UPSTREAM_KEY": ANTHROPIC_UPSTREAM_KEY, "OPENAI_API_KEY": ""}


def worker_stats(relay: RelayProcess) -> dict[str, int]:
    """The gunicorn worker's counters from `GET /debug/stats`, on a connection of its own."""
    response = httpx2.get(f"{relay.url}/debug/stats", headers={"Authorization": f"Bearer {ACCESS_KEY}"},
                          timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def assert_settles(relay: RelayProcess, before: Mapping[str, int], timeout: float = 6.0,
                   counters: Iterable[str] = LEAK_COUNTERS, pooled: int = 1) -> dict[str, int]:
    """Wait until every counter is back to at most its value in `before`, and at most `pooled` more idle
    upstream connections than before are kept; fail naming the counters that are not."""
    deadline = time.monotonic() + timeout
    while True:
        now = worker_stats(relay)
        over = {name: (before[name], now[name]) for name in counters if now[name] > before[name]}
        if now["outbound_sockets"] > min(before["outbound_sockets"] + pooled, UPSTREAM_POOL_IDLE_MAX):
            over["outbound_sockets"] = (before["outbound_sockets"], now["outbound_sockets"])
        if not over:
            return now
        if time.monotonic() >= deadline:
            raise AssertionError(f"resources left behind (before, after): {over}; all now: {now}")
        time.sleep(0.1)


def assert_no_secrets(text: str | bytes, where: str) -> None:
    """None of the test keys (access keys, upstream key) appears in `text`."""
    haystack = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    for secret in (*SECRETS, ANTHROPIC_UPSTREAM_KEY):
        assert secret not in haystack, f"a key leaked into {where}"


def healthy_answer(endpoint: StreamEndpoint, relay: RelayProcess) -> Outcome:
    """A plain request right after a fault: it must stream the fake's default answer completely."""
    outcome = endpoint.request(relay, "are you still there?")
    assert outcome.status == endpoint.ok_status, outcome.raw[:500]
    assert outcome.text == "Hello from the fake upstream.", outcome.raw[:500]
    assert outcome.errors == [] and outcome.ends == 1 and outcome.last_is_end
    return outcome
