"""Turning what a client sent into what the upstream gets: validation, model policy, caps, persona.

Every rule a client can break raises `BadRequest` naming the field and what is wrong with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import IO, Any

import orjson

from proxy.config import Config
from proxy.errors import BadRequest
from proxy.upstream import model_allowed

ROLES = frozenset({"system", "user", "assistant", "tool", "function", "developer"})

# Sampling fields `/chat` passes upstream; anything else a /chat client sends is ignored (documented).
NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
INTEGER_FIELDS = ("max_tokens", "max_completion_tokens", "seed")
PASSTHROUGH_FIELDS = ("response_format", "user")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    upstream_body: dict[str, Any]
    include_reasoning: bool


def read_body(stream: IO[bytes], limit: int) -> bytes:
    """The whole request body. werkzeug's stream stops quietly at MAX_BODY_BYTES when the body came chunked
    (no Content-Length); reading once more makes it raise the 413 the client must get."""
    data = stream.read()
    if len(data) >= limit:
        stream.read(1)
    return data


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object with a 'messages' array")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON ({_short(exc)})", kind="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object with a 'messages' array")
    return body


def shape_chat_request(body: dict[str, Any], config: Config) -> ChatRequest:
    """Validate a `POST /chat` body and build the upstream request from it."""
    messages = validate_messages(body.get("messages"))
    model = choose_model(body.get("model"), config)
    upstream: dict[str, Any] = {"model": model, "messages": with_system_prompt(messages, config)}
    for name, (low, high) in NUMBER_RANGES.items():
        if name in body and body[name] is not None:
            upstream[name] = _number(body[name], name, low, high)
    for name in INTEGER_FIELDS:
        if name in body and body[name] is not None:
            upstream[name] = _integer(body[name], name, minimum=0 if name == "seed" else 1)
    if body.get("stop") is not None:
        upstream["stop"] = _stop(body["stop"])
    for name in PASSTHROUGH_FIELDS:
        if body.get(name) is not None:
            upstream[name] = body[name]
    include_reasoning = body.get("include_reasoning", False)
    if not isinstance(include_reasoning, bool):
        raise BadRequest("'include_reasoning' must be true or false")
    cap_max_tokens(upstream, config)
    upstream["stream_options"] = {"include_usage": True}
    return ChatRequest(model, upstream, include_reasoning)


@dataclass(frozen=True)
class OpenAIRequest:
    model: str
    upstream_body: dict[str, Any]
    stream: bool


def shape_openai_request(body: dict[str, Any], config: Config) -> OpenAIRequest:
    """Validate the fields of a `POST /v1/chat/completions` body the relay itself reads (messages, model,
    stream, stream_options) and apply the relay's rules (model allow-list, MAX_TOKENS, SYSTEM_PROMPT).
    Everything else passes upstream untouched, so new API parameters work without a relay release."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required: a non-empty array of message objects", kind="invalid_messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"'messages[{index}]' must be an object with a string 'role'",
                             kind="invalid_messages")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object like {\"include_usage\": true}")
        if not isinstance(options.get("include_usage", False), bool):
            raise BadRequest("'stream_options.include_usage' must be true or false")
    model = choose_model(body.get("model"), config)
    upstream = {**body, "model": model, "messages": with_system_prompt(messages, config)}
    cap_max_tokens(upstream, config)
    return OpenAIRequest(model, upstream, stream)


def validate_messages(messages: Any) -> list[Any]:
    if messages is None:
        raise BadRequest("'messages' is required: a non-empty array of {role, content} objects")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of {role, content} objects")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"'{where}' must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(f"'{where}.role' must be one of system, user, assistant or tool")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            continue
        if not isinstance(content, str | list):
            raise BadRequest(f"'{where}.content' must be a string or an array of content parts")
    return messages


def choose_model(model: Any, config: Config) -> str:
    """The requested model (or the default), checked against `ALLOWED_MODELS`."""
    if model is None:
        return config.default_model
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("'model' must be a non-empty string")
    if not model_allowed(config.allowed_models, model):
        allowed = ", ".join(config.allowed_models)
        raise BadRequest(f"model '{model[:100]}' is not allowed on this relay (allowed: {allowed})",
                         kind="model_not_allowed")
    return model


def with_system_prompt(messages: list[Any], config: Config) -> list[Any]:
    """Prepend `SYSTEM_PROMPT` when the conversation brings no system message of its own."""
    if not config.system_prompt or any(m.get("role") in ("system", "developer") for m in messages):
        return messages
    return [{"role": "system", "content": config.system_prompt}, *messages]


def cap_max_tokens(body: dict[str, Any], config: Config) -> None:
    """Hold `max_tokens` (and `max_completion_tokens`) to `MAX_TOKENS` when it is set."""
    if config.max_tokens is None:
        return
    capped = False
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            body[name] = min(value, config.max_tokens)
            capped = True
    if not capped:
        body["max_tokens"] = config.max_tokens


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"'{name}' must be a number")
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low:g} and {high:g}")
    return value


def _integer(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 256.0 is the whole number 256 (as JSON Schema says)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be a whole number")
    if value < minimum:
        raise BadRequest(f"'{name}' must be at least {minimum}")
    return value


def _stop(value: Any) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(item, str) for item in value):
        return value
    raise BadRequest("'stop' must be a string or an array of up to 4 strings")


def _short(exc: Exception) -> str:
    return str(exc).split(":")[0][:80]
