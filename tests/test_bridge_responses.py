"""The Responses API served from a chat-completions-only upstream, end to end: the official openai SDK ->
the relay under gunicorn -> the fake upstream declared `protocols = ["chat"]`, with a `model_map` name.
Function tool round trips whole and streamed (`responses.create`, `responses.stream`), the SDK's exception
classes, keep-alives, cancellation, mid-stream failure, budgets from the translated usage, the access log."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import openai
import pydantic
import pytest

from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, RelayProcess, Sdk
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until

MODEL = "gpt-5-codex"  # what the client asks for; the upstream entry maps it to its own name
UPSTREAM_MODEL = "gpt-4o-mini"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                          "required": ["city", "unit"], "additionalProperties": False}, "strict": True}
ARGUMENTS = '{"city":"Paris","unit":"celsius"}'
ANSWER = "Hello from the fake upstream."


def chat_only_upstreams(tmp_path: Path, base_url: str) -> str:
    path = tmp_path / "upstreams.toml"
    path.write_text(f'[[upstreams]]\nname = "chat-only"\nbase_url = "{base_url}"\napi_key_env = "CHAT_KEY"\n'
                    f'models = ["gpt-4o*"]\nprotocols = ["chat"]\nmodel_map = {{ "{MODEL}" = "{UPSTREAM_MODEL}" }}\n')
    return str(path)


@pytest.fixture(scope="module")
def upstreams_file(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> str:
    return chat_only_upstreams(tmp_path_factory.mktemp("bridge"), fake.base_url)


@pytest.fixture(scope="module")
def relay(relay_factory: Callable[..., RelayProcess], upstreams_file: str) -> RelayProcess:
    """The relay whose only upstream speaks chat completions; short keep-alives."""
    return relay_factory(UPSTREAMS_FILE=upstreams_file, CHAT_KEY=UPSTREAM_KEY, OPENAI_API_KEY="",
                         KEEPALIVE_SECONDS="0.3")


def chat_requests(fake: FakeUpstream) -> list[dict[str, Any]]:
    """What the fake was asked; it must only ever be asked for chat completions."""
    assert {r.path for r in fake.requests} <= {"/v1/chat/completions"}, [r.path for r in fake.requests]
    return [r.json for r in fake.requests]


def follow_up(first: openai.types.responses.Response) -> list[Any]:
    """The second turn's input: the question, the model's function call, and the tool's output."""
    call = first.output[0]
    assert call.type == "function_call"
    return [{"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}]


def test_create_with_a_function_tool_round_trip(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """responses.create: the function call comes back as a function_call item; sending its output back gets
    the answer; the upstream saw chat requests under its own model name, with the tool turn as tool_calls
    and a tool message."""
    fake.behave(tool_call_once=True)
    client = sdk(relay)
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER])  # type: ignore[list-item]
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == ARGUMENTS
    assert first.status == "completed" and first.usage is not None and first.usage.output_tokens == 8
    second = client.responses.create(model=MODEL, input=follow_up(first), tools=[WEATHER])  # type: ignore[list-item]
    assert second.output_text == ANSWER and second.id.startswith("resp_")
    asked = chat_requests(fake)
    assert [body["model"] for body in asked] == [UPSTREAM_MODEL, UPSTREAM_MODEL]
    assert asked[0]["tools"][0]["function"]["name"] == "get_weather"
    assert asked[1]["messages"][1]["tool_calls"][0]["function"]["arguments"] == ARGUMENTS
    assert asked[1]["messages"][2] == {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"}


def test_stream_with_a_function_tool_round_trip(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """responses.stream: the SDK's stream helper accumulates the function call from the argument deltas and
    returns the final response; the second turn streams the text; usage arrives in response.completed."""
    fake.behave(tool_call_once=True)
    client = sdk(relay)
    with client.responses.stream(model=MODEL, input="Weather in Paris?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        events = list(stream)
        first = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds.count("response.function_call_arguments.delta") == 8 and kinds[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert first.output[0].type == "function_call" and first.output[0].arguments == ARGUMENTS
    with client.responses.stream(model=MODEL, input=follow_up(first), tools=[WEATHER]) as stream:  # type: ignore[list-item]
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == ANSWER and final.output_text == ANSWER
    assert final.usage is not None and final.usage.total_tokens == final.usage.input_tokens + 6
    assert all(body["stream"] is True for body in chat_requests(fake))


class City(pydantic.BaseModel):
    city: str


def test_structured_output(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """responses.parse with a pydantic text_format: the JSON schema goes upstream as response_format and the
    SDK parses the answer into the model."""
    fake.behave(tokens=['{"city":', '"Paris"}'])
    parsed = sdk(relay).responses.parse(model=MODEL, input="Which city?", text_format=City)
    assert parsed.output_parsed == City(city="Paris")
    sent = chat_requests(fake)[0]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "City"
    assert sent["json_schema"]["schema"]["properties"] == {"city": {"title": "City", "type": "string"}}


def test_reasoning_becomes_a_reasoning_item(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """An upstream's reasoning_content deltas arrive as a reasoning item before the message."""
    fake.behave(reasoning=["Let me ", "think."])
    events = list(sdk(relay).responses.create(model=MODEL, input="Hi", stream=True))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning == "Let me think."
    final = events[-1]
    assert final.type == "response.completed"
    assert [item.type for item in final.response.output] == ["reasoning", "message"]


@pytest.mark.parametrize(("behaviour", "error", "code"), [
    ({"status": 429}, openai.RateLimitError, "upstream_rate_limited"),
    ({"status": 400, "error_message": "bad tool schema"}, openai.BadRequestError, "upstream_bad_request"),
    ({"status": 400, "error_message": "This model's maximum context length is 8192 tokens"},
     openai.BadRequestError, "context_too_long"),
    ({"status": 404, "error_message": "The model does not exist"}, openai.NotFoundError, "model_not_found"),
    ({"status": 422}, openai.UnprocessableEntityError, "upstream_bad_request"),
    ({"status": 500}, openai.InternalServerError, "upstream_error"),
    ({"status": 401}, openai.InternalServerError, "upstream_auth"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_are_the_sdk_s_exception_classes(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk,
                                                         behaviour: dict[str, Any], error: type[Exception],
                                                         code: str, stream: bool) -> None:
    """An upstream refusal before the answer is the status for which the SDK raises the class it raises for
    the same trouble at OpenAI (the relay's refused key: 502), in OpenAI's error shape."""
    fake.behave(**behaviour)
    with pytest.raises(error) as raised:
        sdk(relay).responses.create(model=MODEL, input="Hi", stream=stream)
    assert getattr(raised.value, "code", None) == code


@pytest.mark.parametrize(("call", "error", "words"), [
    (lambda c: c.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}],
                                  tool_choice={"type": "web_search"}), openai.BadRequestError, "web_search"),
    (lambda c: c.responses.create(model=MODEL, input="Hi", previous_response_id="resp_1"), openai.BadRequestError,
     "previous_response_id"),
    (lambda c: c.responses.retrieve("resp_bridged_0a1b2c"), openai.NotFoundError, "not stored"),
    (lambda c: c.responses.create(model="llama-3", input="Hi"), openai.BadRequestError, "not served"),
], ids=["forced-built-in", "previous-response", "retrieve", "unserved-model"])
def test_refusals_are_the_sdk_s_exception_classes(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk,
                                                  call: Callable[[openai.OpenAI], Any], error: type[Exception],
                                                  words: str) -> None:
    """What the bridge cannot do is refused before reaching the upstream, with a message naming it."""
    with pytest.raises(error) as raised:
        call(sdk(relay))
    assert words in str(raised.value) and fake.requests == []


def test_mid_stream_failure_is_response_failed(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """An upstream that breaks after the first tokens: the stream ends with response.failed, not a hang or a
    fake completion."""
    fake.behave(disconnect_after=2)
    events = list(sdk(relay).responses.create(model=MODEL, input="Hi", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None and "incomplete" in events[-1].response.error.message


def test_keepalives_and_the_access_log(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A silent start gets `: keep-alive` comments after response.created; the access line says the request
    was bridged, which built-in tool was left out, the tokens and the upstream."""
    fake.behave(first_token_delay=1.2)
    with httpx2.stream("POST", f"{relay.url}/v1/responses", headers=relay.headers(), timeout=20, json={
            "model": MODEL, "input": "Hello", "stream": True, "tools": [WEATHER, {"type": "web_search"}]}) as response:
        body = response.read()
    blocks = body.split(b"\n\n")
    assert blocks[0].startswith(b"event: response.created") and blocks[1].startswith(b"event: response.in_progress")
    assert blocks[2:4] == [b": keep-alive", b": keep-alive"]
    assert body.rstrip().splitlines()[-2] == b"event: response.completed"

    def logged() -> list[str]:
        return [line for line in relay.log_text().splitlines() if "path=/v1/responses" in line and
                "dropped_tools=web_search" in line]
    assert wait_until(logged), relay.log_text()
    line = logged()[-1]
    assert "bridge=responses->chat" in line and "outcome=ok" in line and "upstream=chat-only" in line
    assert f"model={MODEL}" in line and "tokens=6" in line


def test_client_leaving_cancels_the_upstream(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A client that leaves mid-stream closes the upstream chat stream at once."""
    fake.behave(n_tokens=200, token_interval=0.05)
    with httpx2.stream("POST", f"{relay.url}/v1/responses", headers=relay.headers(), timeout=20,
                       json={"model": MODEL, "input": "Hello", "stream": True}) as response:
        for line in response.iter_lines():
            if "output_text.delta" in line:
                break
    assert fake.wait_for(lambda: len(fake.streams_closed) == 1, timeout=5)
    assert not fake.streams_closed[0].completed and fake.streams_closed[0].tokens_sent < 100


def test_budget_is_charged_from_the_translated_usage(relay_factory: Callable[..., RelayProcess],
                                                     upstreams_file: str, fake: FakeUpstream, sdk: Sdk) -> None:
    """The chat usage behind a bridged stream is charged: a budget it uses up refuses the next request."""
    relay = relay_factory(UPSTREAMS_FILE=upstreams_file, CHAT_KEY=UPSTREAM_KEY, OPENAI_API_KEY="",
                          DAILY_TOKEN_BUDGET="7")
    client = sdk(relay, key=ACCESS_KEY)
    events = list(client.responses.create(model=MODEL, input="Hello", stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.usage.total_tokens == 7
    assert wait_until(lambda: httpx2.post(f"{relay.url}/v1/embeddings", headers=relay.headers(), timeout=10,
                                          json={"model": "m", "input": "a"}).status_code == 429)
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(model=MODEL, input="Hello")
    assert refused.value.code == "token_budget_exhausted"
