"""Demo mode: a clearly labelled local stand-in model, so a newcomer without an upstream key sees it work.

It is an in-process transport for the SDK's HTTP client, so demo requests go through exactly the same
SDK, SSE parsing and pump as real ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from proxy.standin import SSE_END, Timed, sse_chunk, stand_in_upstream
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


def demo_answer(body: dict[str, Any]) -> dict[str, Any] | Iterator[Timed]:
    """The stand-in's answer to a chat completion request: whole, or streamed a word at a time."""
    model = str(body.get("model"))
    prompt = str(next((m.get("content") for m in reversed(body.get("messages", []))
                       if isinstance(m, dict) and m.get("role") == "user"), ""))
    if body.get("stream") is not True:
        return demo_completion(model, prompt)
    options = body.get("stream_options")
    return streamed_words(model, prompt, isinstance(options, dict) and options.get("include_usage") is True)


def streamed_words(model: str, prompt: str, include_usage: bool) -> Iterator[Timed]:
    """OpenAI's streaming chunks, one word each, then the finish, the usage chunk when asked for, [DONE]."""
    words = demo_words(prompt)
    for text in words:
        yield WORD_INTERVAL_SECONDS, sse_chunk(model, {"content": text}, completion_id="chatcmpl-demo")
    yield 0.0, sse_chunk(model, {}, "stop", completion_id="chatcmpl-demo")
    if include_usage:
        yield 0.0, sse_chunk(model, None, completion_id="chatcmpl-demo", usage=demo_usage(prompt, words))
    yield 0.0, SSE_END


def demo_completion(model: str, prompt: str) -> dict[str, Any]:
    """A whole (non-streaming) chat completion in OpenAI's shape."""
    words = demo_words(prompt)
    return {
        "id": "chatcmpl-demo", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                     "finish_reason": "stop"}],
        "usage": demo_usage(prompt, words),
    }


def demo_upstream() -> Upstream:
    return stand_in_upstream("demo", demo_answer, models=())
