"""Anthropic's Messages API over a chat-completions-only upstream, end to end: the official `anthropic` SDK ->
the relay under gunicorn -> the fake upstream, which speaks chat completions only (`protocols = ["chat"]`)
and serves Claude's model name through `model_map`. Whole and streamed messages, a tool round trip, the
SDK's error classes, pings, count_tokens, and what the access log says."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx2
import pytest

from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, RelayProcess
from tests.fake_upstream import TOOL_NAME, FakeUpstream
from tests.servers import wait_until
from tests.test_metrics import samples, value

MODEL = "claude-sonnet-5"
UPSTREAM_MODEL = "fake-model"
HELLO: list[Any] = [{"role": "user", "content": "Hello"}]
ANSWER = "Hello from the fake upstream."
WEATHER_TOOL: dict[str, Any] = {
    "name": TOOL_NAME, "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                     "required": ["city"]}}
Sdk = Callable[..., anthropic.Anthropic]


@pytest.fixture(scope="module")
def relay(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
          tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    """A relay whose only upstream is the fake, declared as speaking chat completions only, with Claude's
    model name mapped to one of the fake's."""
    path = tmp_path_factory.mktemp("bridge-messages") / "upstreams.toml"
    path.write_text(f"""
[[upstreams]]
name = "chat-only"
base_url = "{fake.base_url}"
api_key_env = "OPENAI_UPSTREAM_KEY"
models = ["gpt-4o-mini"]
protocols = ["chat"]
model_map = {{ "{MODEL}" = "{UPSTREAM_MODEL}" }}
""")
    return relay_factory(UPSTREAMS_FILE=str(path), OPENAI_UPSTREAM_KEY=UPSTREAM_KEY, OPENAI_API_KEY="",
                         KEEPALIVE_SECONDS="0.3")


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    """The real anthropic SDK pointed at a relay; closed after the test."""
    clients: list[anthropic.Anthropic] = []

    def make(relay: RelayProcess) -> anthropic.Anthropic:
        client = anthropic.Anthropic(base_url=relay.url, api_key=ACCESS_KEY, max_retries=0, timeout=20)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def bridged_lines(relay: RelayProcess, earlier: int) -> list[str]:
    return [line for line in relay.log_text().splitlines()[earlier:]
            if "path=/v1/messages" in line and "bridge=messages->chat" in line]


def test_messages_create(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """A whole message from a chat completion: the text, end_turn, the upstream's usage; the upstream got a
    chat request under its own model name with the upstream key; the access log says it was bridged."""
    earlier = len(relay.log_text().splitlines())
    message = sdk(relay).messages.create(model=MODEL, max_tokens=100, system="Be brief.", messages=HELLO)
    assert message.content[0].type == "text" and message.content[0].text == ANSWER
    assert message.model == MODEL and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 6)  # the fake counts words
    seen = fake.requests[-1]
    assert seen.path == "/v1/chat/completions" and seen.json["model"] == UPSTREAM_MODEL
    assert seen.json["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert wait_until(lambda: bridged_lines(relay, earlier))
    assert "status=200" in bridged_lines(relay, earlier)[0] and "tokens=6" in bridged_lines(relay, earlier)[0]


def test_messages_stream_with_a_tool_round_trip(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """messages.stream: the model asks for a tool (its arguments streamed in pieces), the SDK sees a
    tool_use block with the parsed input and stop_reason tool_use; the tool_result goes back, and the
    second turn streams the final text, with usage, as Anthropic's event sequence."""
    fake.behave(tool_call_once=True, tokens=("It is", " sunny", " in Paris."))
    client = sdk(relay)
    conversation: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    with client.messages.stream(model=MODEL, max_tokens=100, messages=conversation, tools=[WEATHER_TOOL]) as stream:
        kinds = [event.type for event in stream]
        asked = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "input_json" in kinds
    assert asked.stop_reason == "tool_use"
    [call] = [block for block in asked.content if block.type == "tool_use"]
    assert (call.name, call.input) == (TOOL_NAME, {"city": "Paris", "unit": "celsius"})
    assert fake.requests[-1].json["tools"][0]["function"]["name"] == TOOL_NAME

    conversation += [{"role": "assistant", "content": asked.content},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}]}]
    with client.messages.stream(model=MODEL, max_tokens=100, messages=conversation, tools=[WEATHER_TOOL]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "It is sunny in Paris." and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3
    sent = fake.requests[-1].json["messages"]
    assert sent[-2]["tool_calls"][0]["id"] == call.id and sent[-2]["role"] == "assistant"
    assert sent[-1] == {"role": "tool", "tool_call_id": call.id, "content": "18 C"}


@pytest.mark.parametrize(("behaviour", "error_class", "status"), [
    ({"status": 429, "retry_after": "7"}, anthropic.RateLimitError, 429),
    ({"status": 500}, anthropic.InternalServerError, 502),
    ({"status": 529}, anthropic.OverloadedError, 529),
    ({"status": 400, "error_message": "This model's maximum context length is 8192 tokens"},
     anthropic.BadRequestError, 400),
    ({"status": 404, "error_message": "The model does not exist"}, anthropic.NotFoundError, 404),
    ({"status": 400, "error_message": f"bad 'stop' field; key {UPSTREAM_KEY}"}, anthropic.BadRequestError, 400),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_are_the_sdks_classes(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk,
                                             behaviour: dict[str, Any], error_class: type[anthropic.APIStatusError],
                                             status: int, stream: bool) -> None:
    """The chat upstream's 429 (with its Retry-After), 500, 529, context-too-long 400, 404 and other 400 (its
    message passed on without the key in it) raise the class Anthropic's own answer would, streamed or not,
    in Anthropic's error shape."""
    fake.behave(**behaviour)
    client = sdk(relay)
    with pytest.raises(error_class) as failed:
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=10, messages=HELLO) as events:
                events.until_done()
        else:
            client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)
    assert failed.value.status_code == status
    assert failed.value.body["type"] == "error"  # type: ignore[index]
    assert UPSTREAM_KEY not in failed.value.response.text
    if status == 429:
        assert failed.value.response.headers["retry-after"] == "7"


def test_the_relays_own_key_check_is_authentication_error(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A wrong access key is refused by the relay before any bridge: AuthenticationError, no upstream asked."""
    client = anthropic.Anthropic(base_url=relay.url, api_key="wrong-key", max_retries=0, timeout=20)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)
    client.close()
    assert not fake.requests


def test_a_break_mid_stream_is_an_error_event(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """An upstream that disconnects after the first tokens: the SDK raises from the stream's error event."""
    fake.behave(disconnect_after=2)
    with pytest.raises(anthropic.APIStatusError) as failed, \
            sdk(relay).messages.stream(model=MODEL, max_tokens=10, messages=HELLO) as stream:
        stream.until_done()
    assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_pings_during_a_silence(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A slow first token: `ping` events keep the connection alive, after message_start; the answer follows."""
    fake.behave(first_token_delay=1.0)
    with httpx2.stream("POST", f"{relay.url}/v1/messages", headers={"x-api-key": ACCESS_KEY}, timeout=20,
                       json={"model": MODEL, "max_tokens": 10, "messages": HELLO, "stream": True}) as response:
        body = response.read().decode()
    names = [line.removeprefix("event: ") for line in body.splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start" and "ping" in names[1:names.index("content_block_start")]
    assert names[-2:] == ["message_delta", "message_stop"]


def test_count_tokens_is_an_estimate(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """count_tokens on a bridged model: an estimate, without asking the upstream."""
    counted = sdk(relay).messages.count_tokens(model=MODEL, messages=HELLO)
    assert counted.input_tokens > 0 and not fake.requests


def test_client_leaving_closes_the_upstream(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A Messages client that goes away mid-stream gets its chat upstream request closed within 2 seconds."""
    fake.behave(n_tokens=200, token_interval=0.1)
    with httpx2.stream("POST", f"{relay.url}/v1/messages", headers={"x-api-key": ACCESS_KEY}, timeout=20,
                       json={"model": MODEL, "max_tokens": 500, "messages": HELLO, "stream": True}) as response:
        for line in response.iter_lines():
            if '"text":" tok2"' in line:
                break
        left_at = time.monotonic()
    assert fake.wait_for(lambda: fake.streams_closed, timeout=5)
    closed = fake.streams_closed[0]
    assert closed.completed is False and closed.at - left_at < 2.0


def test_usage_reaches_the_metrics(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """The chat upstream's usage of a bridged stream is counted for the key, as for any other request."""
    before = samples(httpx2.get(f"{relay.url}/metrics", timeout=10).text)
    fake.behave(tokens=("a", "b", "c"))
    with sdk(relay).messages.stream(model=MODEL, max_tokens=10, messages=HELLO) as stream:
        stream.until_done()

    def counted(kind: str) -> float:
        after = samples(httpx2.get(f"{relay.url}/metrics", timeout=10).text)
        return value(after, "relay_tokens_total", key="key1", kind=kind) - value(
            before, "relay_tokens_total", key="key1", kind=kind)
    assert wait_until(lambda: counted("completion") == 3)
    assert counted("prompt") == 1
