"""Helpers shared by the fault, client-fault, fuzz, soak and security tests.

- `STREAM_ENDPOINTS`: every streaming endpoint the relay has, each knowing how to ask for an answer and how
  to read its stream back into one neutral `Outcome` (contents, error records, end markers).
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

from proxy.relay import UPSTREAM_POOL
from tests.conftest import ACCESS_KEY, SECRETS, RelayProcess
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
    for secret in SECRETS:
        assert secret not in haystack, f"a key leaked into {where}"


def healthy_answer(endpoint: StreamEndpoint, relay: RelayProcess) -> Outcome:
    """A plain request right after a fault: it must stream the fake's default answer completely."""
    outcome = endpoint.request(relay, "are you still there?")
    assert outcome.status == endpoint.ok_status, outcome.raw[:500]
    assert outcome.text == "Hello from the fake upstream.", outcome.raw[:500]
    assert outcome.errors == [] and outcome.ends == 1 and outcome.last_is_end
    return outcome
