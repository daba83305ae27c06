"""Demo mode: a clearly labelled local stand-in model, so a newcomer without an upstream key sees it work.

It is an in-process transport for the SDK's HTTP client, so demo requests go through exactly the same
SDK, SSE parsing and pump as real ones.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from typing import Any

import orjson

from proxy.standin import SSE_END, Timed, sse_chunk, stand_in_anthropic, stand_in_upstream
from proxy.upstream import AnthropicUpstream, Upstream

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


def demo_response_answer(body: dict[str, Any]) -> dict[str, Any] | Iterator[Timed]:
    """The Responses API (`POST /v1/responses`): the same stand-in answer, whole or as Responses events."""
    model, prompt = str(body.get("model")), _input_text(body.get("input"))
    words = demo_words(prompt)
    if body.get("stream") is not True:
        return _response(model, prompt, words, "completed", "".join(words))
    return _response_events(model, prompt, words)


def _response_events(model: str, prompt: str, words: list[str]) -> Iterator[Timed]:
    """The event sequence the official SDKs read: created, the output item and its text part, a delta per
    word, the done events, completed (whose usage the relay's token budgets count)."""
    item = {"type": "message", "id": "msg_demo", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    text = "".join(words)
    done_part = {**part, "text": text}
    done_item = {**item, "status": "completed", "content": [done_part]}
    where = {"item_id": "msg_demo", "output_index": 0, "content_index": 0}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": _response(model, prompt, [], "in_progress", None)}),
        ("response.output_item.added", {"output_index": 0, "item": item}),
        ("response.content_part.added", {**where, "part": part}),
        *(("response.output_text.delta", {**where, "delta": word}) for word in words),
        ("response.output_text.done", {**where, "text": text}),
        ("response.content_part.done", {**where, "part": done_part}),
        ("response.output_item.done", {"output_index": 0, "item": done_item}),
        ("response.completed", {"response": _response(model, prompt, words, "completed", text)}),
    ]
    for number, (kind, fields) in enumerate(events):
        wait = WORD_INTERVAL_SECONDS if kind == "response.output_text.delta" else 0.0
        payload = orjson.dumps({"type": kind, "sequence_number": number, **fields})
        yield wait, b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"


def _response(model: str, prompt: str, words: list[str], status: str, text: str | None) -> dict[str, Any]:
    usage = demo_usage(prompt, words)
    output = [] if text is None else [{"type": "message", "id": "msg_demo", "status": "completed",
                                       "role": "assistant",
                                       "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return {"id": "resp_demo", "object": "response", "created_at": int(time.time()), "status": status,
            "model": model, "output": output,
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                      "total_tokens": usage["total_tokens"]} if text is not None else None}


def _input_text(given: Any) -> str:
    """The last user text of a Responses `input`: a string, or message items with text content."""
    if isinstance(given, str):
        return given
    for item in reversed(given if isinstance(given, list) else []):
        content = item.get("content") if isinstance(item, dict) and item.get("role", "user") == "user" else None
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def demo_message_answer(body: dict[str, Any]) -> dict[str, Any] | Iterator[Timed]:
    """Anthropic's Messages API (`POST /v1/messages`): the same stand-in answer, whole or as the event
    sequence Claude Code and the SDKs read."""
    model, prompt = str(body.get("model")), _input_text(body.get("messages"))
    words = demo_words(prompt)
    if body.get("stream") is not True:
        text = {"type": "text", "text": "".join(words)}
        return {**_message(model, prompt, "end_turn", len(words)), "content": [text]}
    return _message_events(model, prompt, words)


def _message(model: str, prompt: str, stop_reason: str | None, output_tokens: int) -> dict[str, Any]:
    return {"id": "msg_demo", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": len(prompt.split()), "output_tokens": output_tokens}}


def _message_events(model: str, prompt: str, words: list[str]) -> Iterator[Timed]:
    """message_start, a text block opened, a `text_delta` per word, the block closed, message_delta with the
    stop reason and the output tokens (the relay's budgets count them), message_stop."""
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": _message(model, prompt, None, 1)},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
          for word in words),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": len(words)}},
        {"type": "message_stop"},
    ]
    for event in events:
        wait = WORD_INTERVAL_SECONDS if event["type"] == "content_block_delta" else 0.0
        yield wait, b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def demo_count_tokens(body: dict[str, Any]) -> dict[str, Any]:
    """`POST /v1/messages/count_tokens`: a word counts as a token, as in the demo's usage."""
    system = body.get("system")
    text = " ".join([system if isinstance(system, str) else "",
                     *(_input_text([message]) for message in body.get("messages") or [])])
    return {"input_tokens": len(text.split())}


def demo_text_completion(body: dict[str, Any]) -> dict[str, Any] | Iterator[Timed]:
    """The legacy completions API (`POST /v1/completions`): the stand-in answer as `text_completion`
    objects, whole or a word per event, then the usage chunk when asked for, and [DONE]."""
    model, prompt = str(body.get("model")), _prompt_text(body.get("prompt"))
    words = demo_words(prompt)
    if body.get("stream") is not True:
        return {**_text_completion(model, "".join(words), "stop"), "usage": demo_usage(prompt, words)}
    options = body.get("stream_options")
    return _text_completion_events(model, prompt, words, isinstance(options, dict) and options.get("include_usage"))


def _text_completion_events(model: str, prompt: str, words: list[str], include_usage: object) -> Iterator[Timed]:
    for text in words:
        yield WORD_INTERVAL_SECONDS, b"data: " + orjson.dumps(_text_completion(model, text, None)) + b"\n\n"
    yield 0.0, b"data: " + orjson.dumps(_text_completion(model, "", "stop")) + b"\n\n"
    if include_usage is True:
        usage = {**_text_completion(model, "", None), "choices": [], "usage": demo_usage(prompt, words)}
        yield 0.0, b"data: " + orjson.dumps(usage) + b"\n\n"
    yield 0.0, SSE_END


def _text_completion(model: str, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"id": "cmpl-demo", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def _prompt_text(given: Any) -> str:
    """A completions `prompt`: a string or a list of strings (token-id prompts have no text to echo)."""
    if isinstance(given, str):
        return given
    return " ".join(part for part in given if isinstance(part, str)) if isinstance(given, list) else ""


# OpenAI's moderation categories (omni-moderation); the stand-in flags nothing.
MODERATION_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                         "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
                         "sexual/minors", "violence", "violence/graphic")


def demo_moderation(body: dict[str, Any]) -> dict[str, Any]:
    """`POST /v1/moderations`: one result per input, nothing flagged (the stand-in judges nothing)."""
    given = body.get("input")
    inputs = given if isinstance(given, list) else [given]
    result = {"flagged": False, "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
              "category_scores": dict.fromkeys(MODERATION_CATEGORIES, 0.0),
              "category_applied_input_types": {name: ["text"] for name in MODERATION_CATEGORIES}}
    return {"id": "modr-demo", "model": str(body.get("model") or "omni-moderation-latest"),
            "results": [result for _ in inputs]}


EMBEDDING_SIZE = 8


def demo_embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """Deterministic vectors (the same text, the same vector), unit length, for `POST /v1/embeddings`."""
    given = body.get("input")
    texts = [given] if isinstance(given, str) else [str(text) for text in given] if isinstance(given, list) else []
    data = [{"object": "embedding", "index": index, "embedding": _vector(text)} for index, text in enumerate(texts)]
    tokens = sum(len(text.split()) for text in texts)
    return {"object": "list", "data": data, "model": str(body.get("model")),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [byte - 127.5 for byte in digest[:EMBEDDING_SIZE]]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [round(value / norm, 6) for value in raw]


# Anthropic's `GET /v1/models` shape, which the demo's Anthropic stand-in answers (the relay lists it).
DEMO_ANTHROPIC_MODELS = {"data": [{"type": "model", "id": DEMO_MODEL, "display_name": "Relay demo (stand-in)",
                                   "created_at": "2025-01-01T00:00:00Z"}],
                         "has_more": False, "first_id": DEMO_MODEL, "last_id": DEMO_MODEL}


def demo_anthropic_upstream() -> AnthropicUpstream:
    return stand_in_anthropic("demo-anthropic", {"/v1/messages": demo_message_answer,
                                                 "/v1/messages/count_tokens": demo_count_tokens},
                              DEMO_ANTHROPIC_MODELS)


# What a request the stand-in has no answer for gets (a 404 in OpenAI's shape): what it does serve, and how
# to reach the real API. It stores nothing, so stored objects (files, batches, responses by id) are here too.
DEMO_NOT_SERVED = ("Demo mode: the relay's local stand-in model does not serve {method} {path}. It answers chat "
                   "completions, responses, completions, embeddings and moderations (and Anthropic's messages) "
                   "and stores nothing. Set OPENAI_API_KEY (and OPENAI_BASE_URL) in .env to use the real API.")


def demo_upstream() -> Upstream:
    listing = {"object": "list", "data": [{"id": DEMO_MODEL, "object": "model", "created": 0, "owned_by": "demo"}]}
    return stand_in_upstream("demo", demo_answer, models=(), listing=listing, missing=DEMO_NOT_SERVED,
                             more={"/responses": demo_response_answer, "/embeddings": demo_embeddings,
                                   "/v1/completions": demo_text_completion, "/moderations": demo_moderation})
