"""Demo mode: a clearly labelled local stand-in model, so a newcomer without an upstream key sees it work.

It is an in-process transport for the SDK's HTTP client, so demo requests go through exactly the same
SDK, SSE parsing and pump as real ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx2
import openai
import orjson

from proxy.upstream import Upstream

DEMO_MODEL = "relay-demo"
WORD_INTERVAL_SECONDS = 0.03
DEMO_ANSWER = (
    "**Demo mode**: this answer comes from the relay's local stand-in model, not a real AI. "
    "Set `OPENAI_API_KEY` (and `OPENAI_BASE_URL` for Kimi, DeepSeek, Ollama...) in `.env` to chat for real.\n\n"
    "You wrote: {prompt}\n\n"
    "```python\nprint(\"streamed word by word through the relay\")\n```\n"
)


class DemoAnswer(httpx2.SyncByteStream):
    def __init__(self, model: str, prompt: str) -> None:
        self.model = model
        self.words = DEMO_ANSWER.format(prompt=prompt[:200]).split(" ")
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        base = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model}
        for index, word in enumerate(self.words):
            if self.closed.wait(WORD_INTERVAL_SECONDS):
                return
            text = word if index == 0 else " " + word
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n"

    def close(self) -> None:
        self.closed.set()


class DemoTransport(httpx2.BaseTransport):
    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST" and request.url.path.endswith("/chat/completions"):
            body = orjson.loads(request.read())
            prompt = next((m.get("content") for m in reversed(body.get("messages", []))
                           if isinstance(m, dict) and m.get("role") == "user"), "")
            return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                                   stream=DemoAnswer(str(body.get("model")), str(prompt)))
        return httpx2.Response(404, json={"error": {"message": "not found", "type": "invalid_request_error"}})


def demo_upstream() -> Upstream:
    client = openai.OpenAI(api_key="demo", base_url="http://demo.invalid/v1", max_retries=0,
                           http_client=httpx2.Client(transport=DemoTransport()))
    return Upstream("demo", client)
