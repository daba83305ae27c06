"""Demo mode: a clearly labelled local stand-in model, so a newcomer without an upstream key sees it work.

It is an in-process transport for the SDK's HTTP client, so demo requests go through exactly the same
SDK, SSE parsing and pump as real ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

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


def demo_words(prompt: str) -> list[str]:
    """The stand-in answer, one streamed piece per word (each after the first with its leading space)."""
    words = DEMO_ANSWER.format(prompt=prompt[:200]).split(" ")
    return [word if index == 0 else " " + word for index, word in enumerate(words)]


def demo_usage(prompt: str, words: list[str]) -> dict[str, int]:
    """Token counts in the upstream's shape; a word counts as a token (there is no real tokenizer here)."""
    prompt_tokens, completion_tokens = len(prompt.split()), len(words)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class DemoAnswer(httpx2.SyncByteStream):
    """A streamed chat completion in OpenAI's SSE shape, with the usage chunk when it was asked for."""

    def __init__(self, model: str, prompt: str, include_usage: bool) -> None:
        self.model = model
        self.prompt = prompt
        self.words = demo_words(prompt)
        self.include_usage = include_usage
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        base = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model}
        for text in self.words:
            if self.closed.wait(WORD_INTERVAL_SECONDS):
                return
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield b"data: " + orjson.dumps(last) + b"\n\n"
        if self.include_usage:
            usage = {**base, "choices": [], "usage": demo_usage(self.prompt, self.words)}
            yield b"data: " + orjson.dumps(usage) + b"\n\n"
        yield b"data: [DONE]\n\n"

    def close(self) -> None:
        self.closed.set()


def demo_completion(model: str, prompt: str) -> dict[str, Any]:
    """A whole (non-streaming) chat completion in OpenAI's shape."""
    words = demo_words(prompt)
    return {
        "id": "chatcmpl-demo", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                     "finish_reason": "stop"}],
        "usage": demo_usage(prompt, words),
    }


class DemoTransport(httpx2.BaseTransport):
    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST" and request.url.path.endswith("/chat/completions"):
            body = orjson.loads(request.read())
            model = str(body.get("model"))
            prompt = str(next((m.get("content") for m in reversed(body.get("messages", []))
                               if isinstance(m, dict) and m.get("role") == "user"), ""))
            if body.get("stream") is not True:
                return httpx2.Response(200, json=demo_completion(model, prompt))
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                                   stream=DemoAnswer(model, prompt, include_usage))
        return httpx2.Response(404, json={"error": {"message": "not found", "type": "invalid_request_error"}})


def demo_upstream() -> Upstream:
    client = openai.OpenAI(api_key="demo", base_url="http://demo.invalid/v1", max_retries=0,
                           http_client=httpx2.Client(transport=DemoTransport()))
    return Upstream("demo", client)
