"""Turning what a client sent into what the upstream gets: validation, model policy, caps, persona.

Every rule a client can break raises `BadRequest` naming the field and what is wrong with it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import orjson
from flask import Request
from werkzeug.exceptions import ClientDisconnected

from proxy.bridge.messages_request import MESSAGE_ROLES
from proxy.config import Config
from proxy.errors import BadRequest
from proxy.globs import model_allowed

# The one list of message roles: what /chat accepts, what its errors list, and openapi.yaml's enum.
ROLES = ("system", "user", "assistant", "tool", "function", "developer")
_ROLE_SET = frozenset(ROLES)
_ROLE_LIST = f"{', '.join(ROLES[:-1])} or {ROLES[-1]}"

# The request-body rules are small rule objects in tables rather than pydantic models: this runs on every
# request, and a pydantic model of the /chat body alone took about as long as all of today's shaping (3.5 us
# against 4.9 us for a typical body), on top of which the upstream must still get the client's values exactly
# as sent (pydantic turns 1 into 1.0 and rebuilds every message) and each rule keeps its own wording and
# order. Each rule also states its JSON Schema; tests/unit/test_validation.py holds openapi.yaml to them.


@dataclass(frozen=True)
class Number:
    """A finite JSON number within [low, high], forwarded as sent."""

    low: float
    high: float

    def check(self, name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BadRequest(f"'{name}' must be a number")
        if not self.low <= value <= self.high:
            raise BadRequest(f"'{name}' must be between {self.low:g} and {self.high:g}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": ["number", "null"], "minimum": self.low, "maximum": self.high}


@dataclass(frozen=True)
class WholeNumber:
    """A whole number of at least `minimum`; 256.0 is the whole number 256 (JSON has one number type, and
    JSON Schema agrees), forwarded as 256."""

    minimum: int

    def check(self, name: str, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"'{name}' must be a whole number")
        if value < self.minimum:
            raise BadRequest(f"'{name}' must be at least {self.minimum}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": ["integer", "null"], "minimum": self.minimum}


@dataclass(frozen=True)
class StopSequences:
    """A string or an array of up to `most` strings."""

    most: int

    def check(self, name: str, value: Any) -> str | list[str]:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and len(value) <= self.most and all(isinstance(item, str) for item in value):
            return value
        raise BadRequest(f"'{name}' must be a string or an array of up to {self.most} strings")

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": self.most, "items": {"type": "string"}},
                          {"type": "null"}]}


@dataclass(frozen=True)
class AsSent:
    """Not checked by the relay: the upstream judges it."""

    def check(self, name: str, value: Any) -> Any:
        return value

    def schema(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Flag:
    """true or false; with `nullable`, null (or absence) means false."""

    nullable: bool

    def check(self, name: str, value: Any) -> bool:
        if value is None and self.nullable:
            return False
        if not isinstance(value, bool):
            raise BadRequest(f"'{name}' must be true or false")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": ["boolean", "null"] if self.nullable else "boolean"}


@dataclass(frozen=True)
class StreamOptions:
    """null, or an object whose `include_usage` (when present) is true or false; passed upstream as sent."""

    def check(self, name: str, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, dict):
            raise BadRequest(f"'{name}' must be an object like {{\"include_usage\": true}}")
        if not isinstance(value.get("include_usage", False), bool):
            raise BadRequest(f"'{name}.include_usage' must be true or false")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}}


Rule = Number | WholeNumber | StopSequences | AsSent

# The sampling fields `/chat` passes upstream, in the order they are checked and sent; anything else a /chat
# client sends is ignored (documented). null means absent.
CHAT_FIELDS: dict[str, Rule] = {
    "temperature": Number(0.0, 2.0),
    "top_p": Number(0.0, 1.0),
    "presence_penalty": Number(-2.0, 2.0),
    "frequency_penalty": Number(-2.0, 2.0),
    "max_tokens": WholeNumber(1),
    "max_completion_tokens": WholeNumber(1),
    "seed": WholeNumber(0),
    "stop": StopSequences(4),
    "response_format": AsSent(),
    "user": AsSent(),
}
INCLUDE_REASONING = Flag(nullable=False)  # read by the relay, not sent upstream
STREAM = Flag(nullable=True)  # /v1/chat/completions reads these two and passes them on
STREAM_OPTIONS = StreamOptions()
MODEL_SCHEMA: dict[str, Any] = {"type": ["string", "null"], "pattern": "\\S"}
# Anthropic's Messages API (routes/anthropic.py): the relay reads only the body's `model` (forwarding.model_of),
# which must be there; the rest goes upstream as sent.
MESSAGES_MODEL_SCHEMA: dict[str, Any] = {"type": "string", "pattern": "\\S"}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    upstream_body: dict[str, Any]
    include_reasoning: bool


def read_body(incoming: Request, limit: int) -> bytes:
    """The whole request body, at most `limit` bytes (MAX_BODY_BYTES: 413 beyond it)."""
    length = incoming.content_length
    if length is not None and length <= limit:
        # The usual case, a Content-Length within the limit: one read of exactly that many bytes from the
        # server's input (under BODY_TIMEOUT, proxy/deadline.py), without werkzeug's stream layers.
        data: bytes = incoming.environ["wsgi.input"].read(length)
        if len(data) < length:
            raise ClientDisconnected("the request body ended before the length its Content-Length gave")
        return data
    return read_limited(incoming.stream, limit)


def read_limited(stream: IO[bytes], limit: int) -> bytes:
    """A body through werkzeug's limited stream, which refuses a Content-Length over MAX_BODY_BYTES (413)
    but stops quietly at it when the body came chunked (no Content-Length); reading once more makes it raise
    the 413 the client must get."""
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
    for name, rule in CHAT_FIELDS.items():
        value = body.get(name)
        if value is not None:
            upstream[name] = rule.check(name, value)
    include_reasoning = INCLUDE_REASONING.check("include_reasoning", body.get("include_reasoning", False))
    cap_max_tokens(upstream, config)
    ask_for_usage(upstream)  # the done record carries it
    return ChatRequest(model, upstream, include_reasoning)


@dataclass(frozen=True)
class OpenAIRequest:
    model: str
    upstream_body: dict[str, Any]
    stream: bool
    # The relay asked the upstream for usage the client did not ask for (budgets count what is billed):
    # the answer must then come back without it, as the client would have seen it.
    hide_usage: bool = False


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
    stream = STREAM.check("stream", body.get("stream"))
    STREAM_OPTIONS.check("stream_options", body.get("stream_options"))
    model = choose_model(body.get("model"), config)
    upstream = {**body, "model": model, "messages": with_system_prompt(messages, config)}
    cap_max_tokens(upstream, config)
    hide_usage = stream and ask_for_usage(upstream)
    return OpenAIRequest(model, upstream, stream, hide_usage)


def ask_for_usage(upstream: dict[str, Any]) -> bool:
    """Make a streaming upstream request report its usage, which token budgets and metrics count; whether
    the client had not asked for it itself (its answer must then come back without it)."""
    options = upstream.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    upstream["stream_options"] = {**(options or {}), "include_usage": True}
    return True


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
        if not isinstance(role, str) or role not in _ROLE_SET:
            raise BadRequest(f"'{where}.role' must be one of {_ROLE_LIST}")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            continue
        if not isinstance(content, str | list):
            raise BadRequest(f"'{where}.content' must be a string or an array of content parts")
    return messages


def request_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schemas of the bodies these rules accept, as openapi.yaml's components must state them
    (without their descriptions)."""
    content = {"oneOf": [{"type": "string"}, {"type": "array"}]}
    return {
        "ChatMessage": {"type": "object", "required": ["role", "content"],
                        "properties": {"role": {"type": "string", "enum": list(ROLES)}, "content": content}},
        "OpenAIMessage": {"type": "object", "required": ["role"], "properties": {"role": {"type": "string"}}},
        "ChatRequest": {"type": "object", "required": ["messages"], "properties": {
            "messages": _messages_schema("ChatMessage"), "model": MODEL_SCHEMA,
            **{name: rule.schema() for name, rule in CHAT_FIELDS.items()},
            "include_reasoning": INCLUDE_REASONING.schema()}},
        "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": {
            "messages": _messages_schema("OpenAIMessage"), "model": MODEL_SCHEMA,
            "stream": STREAM.schema(), "stream_options": STREAM_OPTIONS.schema()}},
        # Forwarded as sent to Anthropic-protocol upstreams; translated (proxy/bridge/messages_request.py,
        # whose refusals these are) for chat-completions ones: a role other than user/assistant, content
        # that is neither a string nor an array of blocks.
        "MessagesRequest": {"type": "object", "required": ["model", "messages"], "properties": {
            "model": MESSAGES_MODEL_SCHEMA,
            "messages": {"type": "array", "items": {"$ref": "#/components/schemas/AnthropicMessage"}}}},
        "AnthropicMessage": {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string", "enum": list(MESSAGE_ROLES)},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
                "$ref": "#/components/schemas/AnthropicTextBlock"}}]}}},
        "AnthropicTextBlock": {"type": "object", "required": ["type", "text"], "properties": {
            "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}},
    }


def _messages_schema(item: str) -> dict[str, Any]:
    return {"type": "array", "minItems": 1, "items": {"$ref": f"#/components/schemas/{item}"}}


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


@dataclass(frozen=True)
class AnswerSize:
    """Where one family of requests says how large its answer may be: `tokens`, the token-budget fields (each
    one present read as a whole number and held to MAX_TOKENS, so a large value in one cannot slip past the
    cap beside a small value in another); `insert`, the field sent with MAX_TOKENS when the client set none
    (an upstream's own default may be unbounded); `choices`, the fields that multiply the answer (each read as
    a whole number; above MAX_CHOICES, refused)."""

    tokens: tuple[str, ...]
    insert: str
    choices: tuple[str, ...] = ()


CHAT_SIZE = AnswerSize(("max_tokens", "max_completion_tokens"), "max_tokens", ("n",))
# The one table of answer sizes: every request family whose body sets one, by the path the relay sends it to
# under the upstream's base URL (`*`: any one segment). Chat's own views and both bridges shape chat bodies
# (`cap_max_tokens`); the forwarded families are held where their body is prepared for the upstream
# (`forwarding.capped_body`). Legacy completions' `best_of` makes that many answers upstream, billed, to
# return `n` of them.
ANSWER_SIZES: dict[str, AnswerSize] = {
    "chat/completions": CHAT_SIZE,
    "completions": AnswerSize(("max_tokens",), "max_tokens", ("n", "best_of")),
    "responses": AnswerSize(("max_output_tokens",), "max_output_tokens"),
    "v1/messages": AnswerSize(("max_tokens",), "max_tokens"),  # Anthropic's (routes/anthropic.py)
    "threads/runs": AnswerSize(("max_completion_tokens",), "max_completion_tokens"),  # Assistants' runs
    "threads/*/runs": AnswerSize(("max_completion_tokens",), "max_completion_tokens"),
}
_SIZE_PATTERNS = tuple((tuple(path.split("/")), size) for path, size in ANSWER_SIZES.items())
# What the budgets read (proxy/budgets.py output_cap): every field of the table, each once.
TOKEN_FIELDS = tuple(dict.fromkeys(name for size in ANSWER_SIZES.values() for name in size.tokens))
CHOICE_FIELDS = tuple(dict.fromkeys(name for size in ANSWER_SIZES.values() for name in size.choices))
TOKEN_COUNT = WholeNumber(1)
CHOICES = WholeNumber(1)


@functools.lru_cache(maxsize=256)  # asked twice for every forwarded request, of a few paths
def answer_size(path: str) -> AnswerSize | None:
    """The table's row for a path the relay forwards to (empty segments ignored: an upstream may fold
    `//` or a trailing `/`), or None for a family whose body sets no answer size."""
    segments = tuple(part for part in path.split("/") if part)
    for pattern, size in _SIZE_PATTERNS:
        if len(pattern) == len(segments) and all(p in ("*", s) for p, s in zip(pattern, segments, strict=True)):
            return size
    return None


def size_changes(size: AnswerSize, body: Mapping[str, Any], config: Config) -> dict[str, Any]:
    """The fields of `body` the caps change, with their new values (empty: the body goes as sent). Every
    token field present is read as a whole number (100000.0 is 100000; "100000" is refused with a 400) and
    held to MAX_TOKENS; with none present, `size.insert` is sent with MAX_TOKENS; every choice count is read
    as a whole number, and one above the choices cap is refused (`too_many_choices`). A whole number sent
    as a float is sent as an integer, which the budgets read."""
    changes: dict[str, Any] = {}
    present = False
    for name in size.tokens:
        value = body.get(name)
        if value is None:
            continue
        present = True
        count = TOKEN_COUNT.check(name, value)
        if config.max_tokens is not None:
            count = min(count, config.max_tokens)
        if type(value) is not int or count != value:
            changes[name] = count
    if config.max_tokens is not None and not present:
        changes[size.insert] = config.max_tokens
    cap = config.choices_cap
    for name in size.choices:
        value = body.get(name)
        if value is None:
            continue
        choices = CHOICES.check(name, value)
        if cap is not None and choices > cap:
            raise BadRequest(f"'{name}' may be at most {cap} on this relay (MAX_CHOICES)", kind="too_many_choices")
        if type(value) is not int:
            changes[name] = choices
    return changes


def cap_max_tokens(body: dict[str, Any], config: Config) -> None:
    """Hold a chat body to the caps (`CHAT_SIZE`: every token-budget field to MAX_TOKENS, `max_tokens` sent
    when the client set none, `n` to the choices cap), in place."""
    body.update(size_changes(CHAT_SIZE, body, config))


def _short(exc: Exception) -> str:
    return str(exc).split(":")[0][:80]
