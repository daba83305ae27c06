"""proxy/shaping.py: what a client may send, the words it gets back when it breaks a rule, and the upstream body."""

from __future__ import annotations

import io
from typing import Any

import pytest
from flask import Request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from proxy.config import Config
from proxy.errors import BadRequest
from proxy.shaping import parse_json_object, read_body, read_limited, shape_chat_request, shape_openai_request
from tests.unit.conftest import unit_config

USER = {"role": "user", "content": "Hi"}
CONFIG = unit_config()


def refusal(call: Any, *args: Any) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        call(*args)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(("raw", "kind", "words"), [
    (b"", "invalid_request", "the request body is empty"),
    (b"  \n", "invalid_request", "the request body is empty"),
    (b"{", "invalid_json", "the request body is not valid JSON (unexpected end of data"),
    (b"[]", "invalid_request", "the request body must be a JSON object"),
    (b'"messages"', "invalid_request", "the request body must be a JSON object"),
])
def test_parse_json_object_refusals(raw: bytes, kind: str, words: str) -> None:
    """An empty, unparsable or non-object body is a 400 of its own kind, with short words."""
    error = refusal(parse_json_object, raw)
    assert error.kind == kind and str(error.description).startswith(words)


class _Input(io.BytesIO):
    """A server's `wsgi.input`: counts the reads asked of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int | None] = []

    def read(self, size: int | None = -1) -> bytes:
        self.sizes.append(size)
        return super().read(size)


def incoming(sent: bytes, content_length: int | None) -> tuple[Request, _Input]:
    stream = _Input(sent)
    environ = {"REQUEST_METHOD": "POST", "wsgi.input": stream, "SERVER_NAME": "relay", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http", "wsgi.input_terminated": True}  # as gunicorn says
    if content_length is not None:
        environ["CONTENT_LENGTH"] = str(content_length)
    return Request(environ), stream


def test_a_body_with_its_length_is_read_in_one_read_of_exactly_that_length() -> None:
    """The usual request (Content-Length within MAX_BODY_BYTES): one read of the server's input, never past
    the body (a kept-alive connection's next request may follow it)."""
    request, stream = incoming(b'{"a":1}GET / HTTP/1.1', 7)
    assert read_body(request, 100) == b'{"a":1}' and stream.sizes == [7]


def test_a_body_shorter_than_its_length_is_a_400() -> None:
    """A client that hangs up before the length it announced gets werkzeug's 400 for a departed client."""
    request, _ = incoming(b'{"a"', 7)
    with pytest.raises(ClientDisconnected):
        read_body(request, 100)


@pytest.mark.parametrize(("sent", "content_length"), [(b"x" * 11, 11), (b"x" * 11, None)],
                         ids=["length-over-the-limit", "no-length"])
def test_over_the_limit_or_without_a_length_is_werkzeugs_limited_stream(sent: bytes, content_length: int | None
                                                                         ) -> None:
    """A Content-Length over MAX_BODY_BYTES, or none (a chunked body), goes through werkzeug's limited
    stream, which answers 413 for what is too large."""
    request, _ = incoming(sent, content_length)
    request.max_content_length = 10
    with pytest.raises(RequestEntityTooLarge):
        read_body(request, 10)


def test_read_body_reads_once_more_at_the_limit() -> None:
    """A body that fills the limit is read once more, so werkzeug's limited stream can raise its 413."""
    reads: list[int] = []

    class Stream(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            reads.append(-1 if size is None else size)
            return super().read(size)

    assert read_limited(Stream(b"12345"), 5) == b"12345" and reads == [-1, 1]
    reads.clear()
    assert read_limited(Stream(b"1234"), 5) == b"1234" and reads == [-1]


@pytest.mark.parametrize(("body", "words"), [
    ({}, "'messages' is required"),
    ({"messages": "Hi"}, "'messages' must be a non-empty array"),
    ({"messages": []}, "'messages' must be a non-empty array"),
    ({"messages": ["Hi"]}, "'messages[0]' must be an object with 'role' and 'content'"),
    ({"messages": [USER, {"role": "robot", "content": "x"}]}, "'messages[1].role' must be one of"),
    ({"messages": [{"role": 1, "content": "x"}]}, "'messages[0].role' must be one of"),
    ({"messages": [{"role": "user"}]}, "'messages[0].content' must be a string or an array"),
    ({"messages": [{"role": "user", "content": 5}]}, "'messages[0].content' must be a string or an array"),
    ({"messages": [{"role": "assistant", "content": None}]}, "'messages[0].content' must be a string"),
    ({"messages": [USER], "model": ""}, "'model' must be a non-empty string"),
    ({"messages": [USER], "model": 4}, "'model' must be a non-empty string"),
    ({"messages": [USER], "temperature": "hot"}, "'temperature' must be a number"),
    ({"messages": [USER], "temperature": True}, "'temperature' must be a number"),
    ({"messages": [USER], "temperature": 2.5}, "'temperature' must be between 0 and 2"),
    ({"messages": [USER], "top_p": -0.1}, "'top_p' must be between 0 and 1"),
    ({"messages": [USER], "presence_penalty": 3}, "'presence_penalty' must be between -2 and 2"),
    ({"messages": [USER], "frequency_penalty": -2.5}, "'frequency_penalty' must be between -2 and 2"),
    ({"messages": [USER], "max_tokens": 0}, "'max_tokens' must be at least 1"),
    ({"messages": [USER], "max_tokens": 1.5}, "'max_tokens' must be a whole number"),
    ({"messages": [USER], "max_tokens": "10"}, "'max_tokens' must be a whole number"),
    ({"messages": [USER], "max_completion_tokens": False}, "'max_completion_tokens' must be a whole number"),
    ({"messages": [USER], "seed": -1}, "'seed' must be at least 0"),
    ({"messages": [USER], "stop": 3}, "'stop' must be a string or an array of up to 4 strings"),
    ({"messages": [USER], "stop": ["a", "b", "c", "d", "e"]}, "'stop' must be a string or an array of up to 4"),
    ({"messages": [USER], "stop": ["a", 1]}, "'stop' must be a string or an array of up to 4 strings"),
    ({"messages": [USER], "include_reasoning": "yes"}, "'include_reasoning' must be true or false"),
])
def test_chat_request_refusals(body: dict[str, Any], words: str) -> None:
    """Every rule of a POST /chat body names the field and what is wrong with it."""
    error = refusal(shape_chat_request, body, CONFIG)
    assert str(error.description).startswith(words), error.description


def test_chat_request_shape() -> None:
    """The upstream body: the model, messages, known sampling fields, usage asked; other fields dropped."""
    body = {"messages": [USER], "model": "m", "temperature": 0, "top_p": 1, "max_tokens": 256.0, "seed": 0,
            "stop": "END", "response_format": {"type": "json_object"}, "user": "u1", "tools": [1], "n": 3,
            "temperature_extra": 1, "include_reasoning": True}
    shaped = shape_chat_request(body, CONFIG)
    assert shaped.model == "m" and shaped.include_reasoning is True
    assert shaped.upstream_body == {
        "model": "m", "messages": [USER], "temperature": 0, "top_p": 1, "max_tokens": 256, "seed": 0,
        "stop": "END", "response_format": {"type": "json_object"}, "user": "u1",
        "stream_options": {"include_usage": True},
    }
    assert isinstance(shaped.upstream_body["max_tokens"], int)


def test_chat_request_nulls_and_tool_turns_pass() -> None:
    """null optional fields are ignored; an assistant tool-call turn may have no content; content parts pass."""
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
                {"role": "tool", "content": "42", "tool_call_id": "c"},
                {"role": "user", "content": [{"type": "text", "text": "and?"}]}]
    shaped = shape_chat_request({"messages": messages, "temperature": None, "stop": None, "model": None}, CONFIG)
    assert shaped.upstream_body["messages"] == messages
    assert shaped.model == CONFIG.default_model and "temperature" not in shaped.upstream_body


@pytest.mark.parametrize(("settings", "body", "expected"), [
    ({"max_tokens": 100}, {}, {"max_tokens": 100}),
    ({"max_tokens": 100}, {"max_tokens": 500}, {"max_tokens": 100}),
    ({"max_tokens": 100}, {"max_tokens": 50}, {"max_tokens": 50}),
    ({"max_tokens": 100}, {"max_completion_tokens": 500}, {"max_completion_tokens": 100}),
    ({}, {"max_tokens": 500}, {"max_tokens": 500}),
])
def test_max_tokens_cap(settings: dict[str, Any], body: dict[str, Any], expected: dict[str, int]) -> None:
    """MAX_TOKENS caps what the client asks for, and is sent when the client asks for nothing."""
    for shape in (shape_chat_request, shape_openai_request):
        upstream = shape({"messages": [USER], **body}, unit_config(**settings)).upstream_body
        capped = {name: upstream[name] for name in ("max_tokens", "max_completion_tokens") if name in upstream}
        assert capped == expected


@pytest.mark.parametrize(("messages", "prepended"), [
    ([USER], True),
    ([{"role": "system", "content": "mine"}, USER], False),
    ([{"role": "developer", "content": "mine"}, USER], False),
])
def test_system_prompt_only_when_the_conversation_has_none(messages: list[dict[str, Any]], prepended: bool) -> None:
    """SYSTEM_PROMPT is prepended unless the client brings a system (or developer) message of its own."""
    config = unit_config(system_prompt="Be brief.")
    for shape in (shape_chat_request, shape_openai_request):
        sent = shape({"messages": messages}, config).upstream_body["messages"]
        assert sent == ([{"role": "system", "content": "Be brief."}, *messages] if prepended else messages)


@pytest.mark.parametrize(("allowed", "model", "ok"), [
    (("gpt-4o*",), "gpt-4o", True), (("gpt-4o*",), "o1", False), ((), "o1", True),
])
def test_allow_list(allowed: tuple[str, ...], model: str, ok: bool) -> None:
    """ALLOWED_MODELS refuses other models naming the allowed ones, kind model_not_allowed."""
    config = unit_config(allowed_models=allowed)
    if ok:
        assert shape_openai_request({"messages": [USER], "model": model}, config).model == model
        return
    error = refusal(shape_openai_request, {"messages": [USER], "model": model}, config)
    assert error.kind == "model_not_allowed" and str(error.description).endswith("(allowed: gpt-4o*)")


@pytest.mark.parametrize(("body", "kind", "words"), [
    ({}, "invalid_messages", "'messages' is required"),
    ({"messages": []}, "invalid_messages", "'messages' is required"),
    ({"messages": [USER, "x"]}, "invalid_messages", "'messages[1]' must be an object with a string 'role'"),
    ({"messages": [USER], "stream": 1}, "invalid_request", "'stream' must be true or false"),
    ({"messages": [USER], "stream_options": "usage"}, "invalid_request", "'stream_options' must be an object"),
    ({"messages": [USER], "stream_options": {"include_usage": 1}}, "invalid_request",
     "'stream_options.include_usage' must be true or false"),
    ({"messages": [USER], "model": " "}, "invalid_request", "'model' must be a non-empty string"),
])
def test_openai_request_refusals(body: dict[str, Any], kind: str, words: str) -> None:
    """POST /v1/chat/completions checks only the fields the relay reads, each with its own words."""
    error = refusal(shape_openai_request, body, CONFIG)
    assert error.kind == kind and str(error.description).startswith(words)


def test_openai_request_passes_everything_else() -> None:
    """Unknown fields and roles pass upstream untouched; stream null means false."""
    body = {"messages": [{"role": "critic", "content": 5}], "stream": None, "tools": [{"x": 1}], "n": 2}
    shaped = shape_openai_request(body, CONFIG)
    assert shaped.stream is False
    assert shaped.upstream_body == {**body, "model": CONFIG.default_model}


CAPPED = Config(authorization_keys=("k" * 20,), openai_api_key="x", max_tokens=256)
ONE_MESSAGE = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(("fields", "expected"), [
    ({"max_tokens": 10, "max_completion_tokens": 100000.0}, {"max_tokens": 10, "max_completion_tokens": 256}),
    ({"max_completion_tokens": 100000}, {"max_completion_tokens": 256}),
    ({"max_tokens": 300.0}, {"max_tokens": 256}),
    ({}, {"max_tokens": 256}),
])
def test_every_token_field_is_capped_on_v1(fields: dict, expected: dict) -> None:
    """MAX_TOKENS holds on /v1 whichever token field carries the large value, floats included."""
    body = shape_openai_request({"messages": ONE_MESSAGE, **fields}, CAPPED).upstream_body
    assert {name: body[name] for name in ("max_tokens", "max_completion_tokens") if name in body} == expected


@pytest.mark.parametrize("fields", [{"max_completion_tokens": "100000"}, {"max_tokens": 12.5},
                                    {"max_tokens": True}, {"n": 64}, {"n": "2"}])
def test_token_fields_and_n_that_would_dodge_the_cap_are_refused(fields: dict) -> None:
    """A string, fraction or boolean token count, or `n` above the choices cap, is a 400 naming the field."""
    with pytest.raises(BadRequest) as caught:
        shape_openai_request({"messages": ONE_MESSAGE, **fields}, CAPPED)
    assert next(iter(fields)) in str(caught.value.description)


def test_n_is_free_without_caps_and_held_by_max_choices() -> None:
    """Without MAX_TOKENS `n` is the upstream's business; MAX_CHOICES sets its own cap."""
    free = Config(authorization_keys=("k" * 20,), openai_api_key="x")
    assert shape_openai_request({"messages": ONE_MESSAGE, "n": 64}, free).upstream_body["n"] == 64
    four = Config(authorization_keys=("k" * 20,), openai_api_key="x", max_tokens=256, max_choices=4)
    assert shape_openai_request({"messages": ONE_MESSAGE, "n": 4}, four).upstream_body["n"] == 4
    with pytest.raises(BadRequest, match="at most 4"):
        shape_openai_request({"messages": ONE_MESSAGE, "n": 5}, four)
