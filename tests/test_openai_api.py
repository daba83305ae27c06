"""The OpenAI-compatible API end to end: the real openai SDK -> gunicorn relay -> fake upstream (real HTTP)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest

from tests.conftest import ACCESS_KEY, SECRETS, RelayProcess, Sdk
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until

HELLO = [{"role": "user", "content": "Hello"}]




def raw_events(relay: RelayProcess, body: dict[str, Any]) -> tuple[httpx2.Response, bytes]:
    response = httpx2.post(f"{relay.url}/v1/chat/completions", json=body, headers=relay.headers(), timeout=20)
    return response, response.content


def data_payloads(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order (every event here is a single data line)."""
    return [event[len(b"data: "):] for event in body.split(b"\n\n") if event.startswith(b"data: ")]


# --- streaming -------------------------------------------------------------------------------------------------

def test_streamed_chunks_are_forwarded_byte_for_byte(relay: RelayProcess, fake: FakeUpstream) -> None:
    """Every upstream chunk (reasoning, content, tool call, finish, usage, odd spacing, unknown fields,
    escaped unicode) reaches the client exactly as the upstream wrote it, then data: [DONE]."""
    chunks = [
        b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
        b'"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}]}',
        b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
        b'"delta":{"content":null,"reasoning_content":"Let me think \\u4f60\\u597d"},"finish_reason":null}]}',
        b'{ "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, '
        b'"delta": {"content": "Hi \xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\x91\x8b"}, "finish_reason": null}], '
        b'"x_vendor_field": {"kept": true}}',
        b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":'
        b'{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather",'
        b'"arguments":"{\\"city\\":"}}]},"finish_reason":null}]}',
        b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":'
        b'{"tool_calls":[{"index":0,"function":{"arguments":"\\"Paris\\"}"}}]},"finish_reason":null}]}',
        b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
        b'"delta":{},"finish_reason":"tool_calls"}]}',
        b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":9,"total_tokens":12}}',
    ]
    fake.behave(raw_body=b"".join(b"data: " + chunk + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n")
    response, body = raw_events(relay, {"model": "gpt-4o-mini", "messages": HELLO, "stream": True,
                                        "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert body == b"".join(b"data: " + chunk + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def test_usage_the_relay_asked_for_is_taken_out_byte_for_byte(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A client that did not ask for usage gets the chunks as the upstream writes them for such a client: no
    usage-only chunk, no `"usage":null` in each chunk, though the relay asked the upstream for usage."""
    unasked = [
        b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
        b'"delta":{"content":"Hi \\",\\"usage\\":null"},"finish_reason":null}]}',
        b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
        b'"delta":{},"finish_reason":"stop"}]}',
    ]
    asked = [chunk[:-1] + b',"usage":null}' for chunk in unasked] + [
        b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}']
    fake.behave(raw_body=b"".join(b"data: " + chunk + b"\n\n" for chunk in asked) + b"data: [DONE]\n\n")
    response, body = raw_events(relay, {"model": "gpt-4o-mini", "messages": HELLO, "stream": True})
    assert response.status_code == 200
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
    assert body == b"".join(b"data: " + chunk + b"\n\n" for chunk in unasked) + b"data: [DONE]\n\n"


def test_token_budget_counts_usage_the_client_did_not_ask_for(relay_factory: Callable[..., RelayProcess],
                                                             fake: FakeUpstream) -> None:
    """A long prompt streamed without stream_options is charged its prompt tokens, as the upstream bills it:
    a 40-token budget is used up by one 60-word prompt, not by the 6 content deltas."""
    relay = relay_factory(DAILY_TOKEN_BUDGET="40")
    long_prompt = [{"role": "user", "content": " ".join(["word"] * 60)}]
    first, _ = raw_events(relay, {"model": "gpt-4o-mini", "messages": long_prompt, "stream": True})
    assert first.status_code == 200
    assert wait_until(lambda: raw_events(relay, {"model": "gpt-4o-mini", "messages": HELLO,
                                                 "stream": True})[0].status_code == 429, timeout=5)


def test_sdk_streams_content_with_usage_when_asked(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """The SDK streams the answer and gets the usage chunk when it sets stream_options.include_usage."""
    stream = sdk(relay).chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True,
                                                stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "Hello from the fake upstream."
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}


def test_usage_is_not_forced_on_clients_that_did_not_ask(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """Without stream_options the relay asks the upstream for usage (for the budgets) but the client gets no
    choices-less chunk and no usage field, as from the upstream directly."""
    chunks = list(sdk(relay).chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None and "usage" not in chunk.model_dump(exclude_unset=True) for chunk in chunks)
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}


def test_sdk_streams_reasoning_content(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """reasoning_content deltas (DeepSeek R1, Kimi thinking) reach SDK users before the content."""
    fake.behave(reasoning=["Think", "ing..."], tokens=["Done"])
    chunks = list(sdk(relay).chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    reasoning = [getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks]
    assert [r for r in reasoning if r] == ["Think", "ing..."]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Done"


def test_sdk_streams_tool_calls(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """Tool-call deltas arrive intact: the SDK user can assemble the call and sees finish_reason tool_calls."""
    fake.behave(tool_call=True)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    chunks = list(sdk(relay).chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True,
                                                     tools=tools))
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    arguments = "".join(call.function.arguments or "" for call in calls if call.function)
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert fake.requests[-1].json["tools"] == tools


def test_keepalive_comments_during_silence(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """While the model is silent the stream carries ': keep-alive' comments, which the SDK skips."""
    fake.behave(first_token_delay=1.0, tokens=["late"])
    _response, body = raw_events(relay, {"model": "gpt-4o-mini", "messages": HELLO, "stream": True})
    first_data = body.index(b"data: ")
    assert body[:first_data].count(b": keep-alive\n\n") >= 2
    assert body.endswith(b"data: [DONE]\n\n")
    fake.behave(first_token_delay=1.0, tokens=["late"])
    chunks = list(sdk(relay).chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "late"


def test_failure_mid_stream_is_an_error_event_then_done(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """An upstream cut mid-answer becomes an OpenAI error event then [DONE]; the SDK raises APIError."""
    fake.behave(disconnect_after=2)
    _response, body = raw_events(relay, {"model": "gpt-4o-mini", "messages": HELLO, "stream": True})
    payloads = data_payloads(body)
    assert payloads[-1] == b"[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "upstream_disconnected" and error["message"] and error["type"]
    fake.behave(disconnect_after=2)
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="incomplete"):
        for chunk in sdk(relay).chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True):
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "Hello from"


@pytest.mark.parametrize(("behaviour", "code", "text"), [
    ({"malformed_after": 2}, "upstream_malformed", "Hello from"),
    ({"raw_body": "<html><body>502 Bad Gateway</body></html>"}, "upstream_disconnected", ""),
    ({"raw_body": 'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'}, "upstream_error", ""),
    ({"reset_after": 1}, "upstream_disconnected", "Hello"),
], ids=["malformed-chunk", "html-in-200-stream", "error-event", "reset"])
def test_broken_upstream_streams_end_properly(relay: RelayProcess, fake: FakeUpstream, behaviour: dict[str, Any],
                                              code: str, text: str) -> None:
    """Garbage, HTML instead of SSE, an in-stream error or a reset: the client gets what arrived intact, one
    OpenAI error event it can show, then data: [DONE]."""
    fake.behave(**behaviour)
    response, body = raw_events(relay, {"model": "gpt-4o-mini", "messages": HELLO, "stream": True})
    assert response.status_code == 200
    payloads = data_payloads(body)
    assert payloads[-1] == b"[DONE]" and payloads.count(b"[DONE]") == 1
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == code and error["message"]
    chunks = [json.loads(payload) for payload in payloads[:-2]]
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == text


def test_client_leaving_closes_the_upstream(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A /v1 client that goes away mid-stream gets its upstream request closed within 2 seconds."""
    fake.behave(n_tokens=200, token_interval=0.1)
    with httpx2.stream("POST", f"{relay.url}/v1/chat/completions", headers=relay.headers(), timeout=20,
                       json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True}) as response:
        for line in response.iter_lines():
            if '"content":" tok2"' in line:
                break
        left_at = time.monotonic()
    assert fake.wait_for(lambda: fake.streams_closed, timeout=5)
    closed = fake.streams_closed[0]
    assert closed.completed is False and closed.at - left_at < 2.0


# --- non-streaming -----------------------------------------------------------------------------------------------

def test_non_streaming_answer_is_the_upstream_json(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """stream false: the SDK gets the upstream's completion, reasoning_content and usage included."""
    fake.behave(reasoning=["Hmm"], tokens=["Forty", "-two"])
    completion = sdk(relay).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    message = completion.choices[0].message
    assert message.content == "Forty-two"
    assert getattr(message, "reasoning_content", None) == "Hmm"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    assert fake.requests[-1].json.get("stream") is None, "a body without 'stream' reaches the upstream as sent"


def test_non_streaming_tool_call(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """A whole tool-call answer reaches the SDK intact."""
    fake.behave(tool_call=True)
    completion = sdk(relay).chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=False)
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert completion.choices[0].finish_reason == "tool_calls"


# --- the request body ---------------------------------------------------------------------------------------------

def test_body_passes_upstream_unchanged(relay: RelayProcess, fake: FakeUpstream) -> None:
    """Everything the client sends (unknown parameters, reasoning_content on an assistant turn, tools,
    content parts) reaches the upstream unchanged."""
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
            {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4, easy."},
            {"role": "user", "content": "And 3+3?", "name": "kid"},
        ],
        "stream": True,
        "temperature": 0.2,
        "logprobs": False,
        "parallel_tool_calls": True,
        "a_parameter_from_next_year": {"nested": [1, 2, {"deep": None}]},
        "tools": [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}],
    }
    response, _body = raw_events(relay, body)
    assert response.status_code == 200
    # The one addition: the relay asks for usage, which budgets count (the client gets the answer without it).
    assert fake.requests[-1].json == {**body, "stream_options": {"include_usage": True}}


def test_relay_rules_applied(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream, sdk: Sdk) -> None:
    """Only the relay's rules change the body: SYSTEM_PROMPT (when no system message), MAX_TOKENS cap,
    the default model when none is given; the allow-list refuses other models."""
    relay = relay_factory(SYSTEM_PROMPT="You are terse.", MAX_TOKENS="50", ALLOWED_MODELS="gpt-4o*")
    response, _ = raw_events(relay, {"messages": HELLO, "max_tokens": 500, "stream": True, "seed": 7})
    assert response.status_code == 200
    sent = fake.requests[-1].json
    assert sent == {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "You are terse."}, *HELLO],
                    "max_tokens": 50, "stream": True, "seed": 7, "stream_options": {"include_usage": True}}
    own_system = [{"role": "system", "content": "Be kind."}, *HELLO]
    sdk(relay).chat.completions.create(model="gpt-4o", messages=own_system, max_completion_tokens=20)
    assert fake.requests[-1].json["messages"] == own_system
    assert fake.requests[-1].json["max_completion_tokens"] == 20
    with pytest.raises(openai.BadRequestError, match="not allowed") as caught:
        sdk(relay).chat.completions.create(model="claude-3", messages=HELLO)
    assert caught.value.code == "model_not_allowed"


@pytest.mark.parametrize(("body", "words"), [
    ({"model": "gpt-4o-mini"}, "'messages' is required"),
    ({"messages": []}, "'messages' is required"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
    ({"messages": HELLO, "stream": "yes"}, "'stream' must be true or false"),
    ({"messages": HELLO, "stream_options": "usage"}, "'stream_options' must be an object"),
    ({"messages": HELLO, "stream": True, "stream_options": {"include_usage": 1}}, "include_usage"),
    ({"messages": HELLO, "model": 42}, "'model' must be a non-empty string"),
], ids=["no-messages", "empty-messages", "message-not-object", "no-role", "stream-not-bool",
        "stream-options-not-object", "include-usage-not-bool", "model-not-string"])
def test_malformed_requests_are_400_in_openai_shape(relay: RelayProcess, fake: FakeUpstream,
                                                    body: dict[str, Any], words: str) -> None:
    """Each malformed field the relay reads gets a 400 in the OpenAI error shape saying what is wrong."""
    response, _ = raw_events(relay, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error" and error["code"]
    assert not fake.requests


def test_body_not_json_is_400(relay: RelayProcess) -> None:
    """A body that is not JSON is a BadRequestError for the SDK, never a 500."""
    response = httpx2.post(f"{relay.url}/v1/chat/completions", content=b"{nope", headers=relay.headers())
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


# --- errors as SDK exception classes --------------------------------------------------------------------------------

def test_wrong_key_raises_authentication_error(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """A wrong access key is a 401 the SDK raises as AuthenticationError; the raw form is accepted too."""
    with pytest.raises(openai.AuthenticationError):
        sdk(relay, key="not-a-key").chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    raw = httpx2.post(f"{relay.url}/v1/chat/completions", json={"messages": HELLO},
                      headers={"Authorization": ACCESS_KEY})
    assert raw.status_code == 200


@pytest.mark.parametrize(("behaviour", "exception", "status", "code"), [
    ({"status": 429, "retry_after": "7"}, openai.RateLimitError, 429, "upstream_rate_limited"),
    ({"status": 400, "error_message": "This model's maximum context length is 8192 tokens"},
     openai.BadRequestError, 400, "context_too_long"),
    ({"status": 404, "error_message": "The model does not exist"}, openai.BadRequestError, 400, "model_not_found"),
    ({"status": 401, "error_message": "Incorrect API key provided: sk-upstr****4d2e"},
     openai.InternalServerError, 502, "upstream_auth"),
    ({"status": 503}, openai.InternalServerError, 502, "upstream_error"),
    ({"status": 502, "error_raw_body": "<html><body>Bad gateway</body></html>"},
     openai.InternalServerError, 502, "upstream_error"),
], ids=["429", "context-too-long", "unknown-model", "upstream-key-rejected", "503", "html-error-page"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_upstream_errors_raise_the_sdk_exception_classes(relay: RelayProcess, fake: FakeUpstream,
                                                         behaviour: dict[str, Any], exception: type[Exception],
                                                         status: int, code: str, stream: bool, sdk: Sdk) -> None:
    """Upstream failures before the first token map to the core's statuses, which the SDK raises as its
    usual exception classes, with a message that never carries a key."""
    fake.behave(**behaviour)
    with pytest.raises(exception) as caught:
        result = sdk(relay).chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=stream)
        if stream:
            list(result)
    error = caught.value
    assert isinstance(error, openai.APIStatusError)
    assert error.status_code == status and error.code == code
    assert not any(secret in error.message for secret in SECRETS)
    if status == 429:
        assert error.response.headers["retry-after"] == "7"


def test_upstream_timeout_is_504(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream, sdk: Sdk) -> None:
    """An upstream that never answers is a 504 (InternalServerError for the SDK) after UPSTREAM_TIMEOUT."""
    relay = relay_factory(UPSTREAM_TIMEOUT="0.5")
    fake.behave(never_answer=True)
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(relay).chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
    assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"


def test_unknown_v1_path_is_404_in_openai_shape(relay: RelayProcess, sdk: Sdk) -> None:
    """An endpoint the relay does not have (embeddings are forwarded now: tests/test_passthrough.py) is
    NotFoundError for the SDK, not an HTML page."""
    with pytest.raises(openai.NotFoundError):
        sdk(relay).post("/no-such-endpoint", body={"model": "text-embedding-3-small", "input": "hi"}, cast_to=object)


# --- models -----------------------------------------------------------------------------------------------------------

def test_models_lists_the_served_models(relay_factory: Callable[..., RelayProcess], sdk: Sdk) -> None:
    """GET /v1/models lists the default model and the allow-list's exact names in the OpenAI list shape."""
    relay = relay_factory(ALLOWED_MODELS="gpt-4o-mini,gpt-4o,o3-*", DEFAULT_MODEL="gpt-4o-mini")
    listed = sdk(relay).models.list()
    assert [model.id for model in listed.data] == ["gpt-4o-mini", "gpt-4o"]
    assert all(model.object == "model" for model in listed.data)
    response = httpx2.get(f"{relay.url}/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


# --- per-key rules (KEYS_FILE) -------------------------------------------------------------------------------------

KEYED = "sk-relay-keyed-client-6a5b4c3d"


@pytest.fixture(scope="module")
def keyed_relay(relay_factory: Callable[..., RelayProcess], tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    """A relay whose KEYS_FILE key 'limited' may use gpt-4o-mini only, three requests a minute."""
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(f'[keys.limited]\nkey = "{KEYED}"\nmodels = ["gpt-4o-mini"]\nrequests_per_minute = 3\n')
    return relay_factory(KEYS_FILE=str(path), ALLOWED_MODELS="gpt-4o-mini,gpt-4o")


def test_key_rules_hold_on_v1_and_get_chat(keyed_relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """A key's own model list narrows /v1/models and refuses other models on /v1 and GET /chat (403
    PermissionDeniedError), and its per-minute limit answers 429 RateLimitError with Retry-After."""
    client = sdk(keyed_relay, key=KEYED)
    assert [model.id for model in client.models.list().data] == ["gpt-4o-mini"]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    refused = httpx2.get(f"{keyed_relay.url}/chat", params={"prompt": "Hi", "model": "gpt-4o", "key": KEYED})
    assert refused.status_code == 403 and b"event: error" in refused.content
    assert not [seen for seen in fake.requests if seen.path.endswith("/chat/completions")]
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert int(caught.value.response.headers["retry-after"]) > 0
    assert [model.id for model in sdk(keyed_relay).models.list().data] == ["gpt-4o-mini", "gpt-4o"]


# --- the upstreams' own model lists --------------------------------------------------------------------------------

def test_sdk_lists_and_retrieves_the_upstreams_models(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
                                                      sdk: Sdk) -> None:
    """models.list() is DEFAULT_MODEL then the upstream's own GET /models list (its fields kept, owned_by the
    relay's upstream), asked once and then cached; models.retrieve() answers an id with a '/' and raises
    NotFoundError (model_not_found) for one not listed."""
    fake.behave(models=["meta-llama/Llama-3-8B", "gpt-4o", "gpt-4o-mini"])
    relay = relay_factory(fresh=True, MODELS_CACHE_SECONDS="3600")
    client = sdk(relay)
    listed = client.models.list()
    assert [model.id for model in listed.data] == ["gpt-4o-mini", "meta-llama/Llama-3-8B", "gpt-4o"]
    assert {model.owned_by for model in listed.data} == {"default"}
    assert all(model.created > 0 and model.object == "model" for model in listed.data)
    retrieved = client.models.retrieve("meta-llama/Llama-3-8B")
    assert (retrieved.id, retrieved.owned_by) == ("meta-llama/Llama-3-8B", "default")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"
    assert [seen.path for seen in fake.requests] == ["/v1/models"]


@pytest.mark.parametrize("failure", [{"models_status": 500}, {"models_delay": 5.0}], ids=["500", "too-slow"])
def test_an_upstream_that_fails_to_list_leaves_the_configured_models(
        relay_factory: Callable[..., RelayProcess], fake: FakeUpstream, sdk: Sdk, failure: dict[str, Any]) -> None:
    """An upstream answering GET /models with 500, or too slowly, neither breaks nor long delays the list: the
    configured exact names are listed (and retrievable) within about UPSTREAM_TIMEOUT, and chat still works."""
    fake.behave(**failure)
    relay = relay_factory(fresh=True, UPSTREAM_TIMEOUT="0.5", ALLOWED_MODELS="gpt-4o-mini,kimi-k2,o3-*")
    client = sdk(relay)
    started = time.monotonic()
    assert [model.id for model in client.models.list().data] == ["gpt-4o-mini", "kimi-k2"]
    assert time.monotonic() - started < 3
    assert client.models.retrieve("kimi-k2").owned_by == "default"
    assert [model.id for model in client.models.list().data] == ["gpt-4o-mini", "kimi-k2"]
    assert [seen.path for seen in fake.requests] == ["/v1/models"]  # backed off, not asked on every request
    fake.behave()
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert answer.choices[0].message.content


def test_browser_preflight_of_the_openai_js_sdk(relay: RelayProcess) -> None:
    """Under gunicorn, the preflight the OpenAI JS SDK's browser request causes is allowed for a listed origin
    (its x-stainless-* headers echoed) and refused (403) for an unlisted one."""
    asked = "authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-retry-count,x-stainless-timeout"
    headers = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked}
    allowed = httpx2.options(f"{relay.url}/v1/chat/completions",
                             headers={**headers, "Origin": "https://app.example.com"}, timeout=10)
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-headers"] == asked.replace(",", ", ")
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    refused = httpx2.options(f"{relay.url}/v1/chat/completions",
                             headers={**headers, "Origin": "https://evil.example"}, timeout=10)
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
