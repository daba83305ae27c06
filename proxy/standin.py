"""In-process stand-in upstreams: an HTTP transport for the SDK's client that answers from Python code.

Demo mode (`proxy/demo.py`) and the stream doctor (`proxy/routes/doctor.py`) answer through one, so their
answers travel exactly as a real upstream's do: the same SDK, SSE parsing, pump and encoders.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import httpx2
import openai
import orjson

from proxy.encoders import SSE_DONE
from proxy.upstream import AnthropicUpstream, Upstream

# One timed piece of an answer: seconds to wait before it, and its bytes (or what makes them when it is due).
Timed = tuple[float, "bytes | Callable[[], bytes]"]
# What a stand-in answers to a chat completion request body: a whole JSON answer or timed SSE pieces.
Answer = Callable[[dict[str, Any]], "dict[str, Any] | Iterable[Timed]"]


class TimedStream(httpx2.SyncByteStream):
    """A response body written piece by piece on a schedule; closing it (the client left) stops it at once."""

    def __init__(self, pieces: Iterable[Timed]) -> None:
        self.pieces = pieces
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        for wait, data in self.pieces:
            if wait and self.closed.wait(wait):
                return
            yield data() if callable(data) else data

    def close(self) -> None:
        self.closed.set()


def sse_chunk(model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
              completion_id: str = "chatcmpl-standin", usage: dict[str, int] | None = None) -> bytes:
    """One `chat.completion.chunk` as an SSE event; no `delta`: the usage-only chunk (empty `choices`)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    chunk: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


# The OpenAI stream's last event: the same bytes the relay's own SSE encoder ends with, defined there once.
SSE_END = SSE_DONE


class StandInTransport(httpx2.BaseTransport):
    """POST .../chat/completions goes to `answer`, any other POST path ending in a key of `more` to that
    answer; GET .../models is `listing` (by default an empty list: a stand-in serves whatever it is asked,
    and the relay lists its configured names); anything else is a 404 in OpenAI's shape whose message is
    `missing` with `{method}` and `{path}` filled in."""

    def __init__(self, answer: Answer, more: Mapping[str, Answer] | None = None,
                 listing: Mapping[str, Any] | None = None, missing: str = "not found") -> None:
        self.answers = {"/chat/completions": answer, **(more or {})}
        self.listing = listing or {"object": "list", "data": []}
        self.missing = missing

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "GET" and request.url.path.endswith("/models"):
            return httpx2.Response(200, json=self.listing)
        answer = next((answer for suffix, answer in self.answers.items() if request.url.path.endswith(suffix)),
                      None)
        if request.method != "POST" or answer is None:
            message = self.missing.format(method=request.method, path=request.url.path)
            return httpx2.Response(404, json={"error": {"message": message, "type": "invalid_request_error",
                                                        "code": "not_found"}})
        answered = answer(orjson.loads(request.read()))
        if isinstance(answered, dict):
            return httpx2.Response(200, json=answered)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=TimedStream(answered))


def stand_in_anthropic(name: str, answers: Mapping[str, Answer], listing: Mapping[str, Any]) -> AnthropicUpstream:
    """An Anthropic-protocol upstream answered in-process: POST paths ending in a key of `answers` (such as
    `/v1/messages`), GET `/v1/models` with `listing`. It serves every model, as the demo's chat model does."""
    first, *_ = answers.values()
    transport = StandInTransport(first, answers, listing)
    return AnthropicUpstream(name, f"http://{name}.invalid", httpx2.Client(transport=transport), api_key=name)


def stand_in_upstream(name: str, answer: Answer, models: tuple[str, ...] = ("*",),
                      more: Mapping[str, Answer] | None = None, listing: Mapping[str, Any] | None = None,
                      missing: str = "not found") -> Upstream:
    transport = StandInTransport(answer, more, listing, missing)
    client = openai.OpenAI(api_key=name, base_url=f"http://{name}.invalid/v1", max_retries=0,
                           http_client=httpx2.Client(transport=transport))
    return Upstream(name, client, models)
