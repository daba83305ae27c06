"""The fast layer's fixtures: the relay in-process (`create_app(Config(...))` under Flask's test client) with
its upstream replaced by an in-process HTTP transport, built as proxy/demo.py builds the demo model, so
requests go through the real SDK client, SSE parser, pump and encoders with no server and no socket."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

from proxy import create_app
from proxy.config import Config
from proxy.upstream import Upstream
from tests.conftest import ACCESS_KEY, SECOND_ACCESS_KEY, UPSTREAM_KEY

MODEL = "gpt-4o-mini"
HELLO = {"messages": [{"role": "user", "content": "Hello"}]}


def chunk_event(delta: dict[str, Any], finish_reason: str | None = None, model: str = MODEL,
                **extra: Any) -> bytes:
    """One upstream SSE event in OpenAI's streaming shape."""
    chunk = {"id": "chatcmpl-unit", "object": "chat.completion.chunk", "created": 0, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def answer_events(tokens: list[str], usage: dict[str, int] | None = None) -> list[bytes]:
    """A whole streamed answer: one event per token, the finish reason, the usage chunk, [DONE]."""
    events = [chunk_event({"content": token}) for token in tokens]
    events.append(chunk_event({}, "stop"))
    if usage is not None:
        events.append(b"data: " + orjson.dumps({"id": "chatcmpl-unit", "object": "chat.completion.chunk",
                                                 "created": 0, "model": MODEL, "choices": [],
                                                 "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


class ScriptedBody(httpx2.SyncByteStream):
    """A response body that yields the scripted blocks, and remembers being closed."""

    def __init__(self, blocks: list[bytes]) -> None:
        self.blocks = blocks
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        for block in self.blocks:
            if self.closed.is_set():
                return
            yield block

    def close(self) -> None:
        self.closed.set()


@dataclass
class Reply:
    """What the fake upstream answers next: `blocks` as an SSE body, or `json` with `status`, or `raise_`."""

    status: int = 200
    blocks: list[bytes] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raise_: type[Exception] | None = None


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeTransport(httpx2.BaseTransport):
    """An in-process upstream: records every request, answers from `replies` (queued) or `default`; its
    `GET /models` (recorded apart, in `model_requests`) answers `models`, an empty list unless set."""

    def __init__(self) -> None:
        self.requests: list[SeenRequest] = []
        self.model_requests: list[SeenRequest] = []
        self.models = Reply(json={"object": "list", "data": []})
        self.replies: list[Reply] = []
        self.bodies: list[ScriptedBody] = []
        self.default = Reply(blocks=answer_events(["Hel", "lo"], usage={"prompt_tokens": 1,
                                                                       "completion_tokens": 2,
                                                                       "total_tokens": 3}))

    def reply(self, **fields: Any) -> None:
        """Queue the answer to the next request."""
        self.replies.append(Reply(**fields))

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        raw = request.read()
        seen = SeenRequest(request.method, request.url.path, dict(request.headers), orjson.loads(raw) if raw else {})
        if request.method == "GET" and request.url.path.endswith("/models"):
            self.model_requests.append(seen)
            reply = self.models
        else:
            self.requests.append(seen)
            reply = self.replies.pop(0) if self.replies else self.default
        if reply.raise_ is not None:
            raise reply.raise_("scripted failure", request=request)  # type: ignore[call-arg]
        if reply.blocks is not None:
            body = ScriptedBody(list(reply.blocks))
            self.bodies.append(body)
            return httpx2.Response(reply.status, headers={"content-type": "text/event-stream", **reply.headers},
                                   stream=body, request=request)
        return httpx2.Response(reply.status, json=reply.json, headers=reply.headers, request=request)


def fake_upstream(transport: FakeTransport, name: str = "fake", models: tuple[str, ...] = ()) -> Upstream:
    client = openai.OpenAI(api_key=UPSTREAM_KEY, base_url="http://upstream.invalid/v1", max_retries=0,
                           http_client=httpx2.Client(transport=transport))
    return Upstream(name, client, models)


def unit_config(**overrides: Any) -> Config:
    """The relay's configuration for in-process tests: both test keys, short timers."""
    settings: dict[str, Any] = {"authorization_keys": (ACCESS_KEY, SECOND_ACCESS_KEY),
                                "openai_api_key": UPSTREAM_KEY, "keepalive_seconds": 0.05}
    settings.update(overrides)
    return Config(**settings)


def relay_app(config: Config, transport: FakeTransport) -> Flask:
    """`create_app(config)` with its upstream replaced by `transport` (the rest of the relay as built)."""
    app = create_app(config)
    relay = app.extensions["relay"]
    app.extensions["relay"] = dataclasses.replace(relay, upstreams=(fake_upstream(transport),))
    return app


@pytest.fixture
def transport() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
def make_client(transport: FakeTransport) -> Callable[..., FlaskClient]:
    """A test client of a relay with the given Config overrides, upstream `transport`."""

    def make(**overrides: Any) -> FlaskClient:
        return relay_app(unit_config(**overrides), transport).test_client()

    return make


@pytest.fixture
def client(make_client: Callable[..., FlaskClient]) -> FlaskClient:
    """A test client of the relay with default settings."""
    return make_client()


def bearer(key: str = ACCESS_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    """The access-log lines written while the test runs (the relay's loggers do not propagate to caplog)."""
    handler = Lines()
    logger = logging.getLogger("relay.access")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
