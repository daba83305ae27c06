"""Anthropic's Messages API end to end: the official `anthropic` SDK -> the relay under gunicorn -> the fake
upstream speaking `/v1/messages` (real HTTP), configured as an `api = "anthropic"` upstream in UPSTREAMS_FILE.
Whole and streamed messages, count_tokens, the SDK's error classes, keys both ways, pings, budgets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from proxy.demo import DEMO_MODEL
from tests.conftest import ACCESS_KEY, SECOND_ACCESS_KEY, UPSTREAM_KEY, RelayProcess
from tests.fake_upstream import ANTHROPIC_INPUT_TOKENS, ANTHROPIC_MODELS, FakeUpstream
from tests.servers import wait_until

ANTHROPIC_KEY = "sk-ant-upstream-key-for-tests-5c6d7e8f"
SPARE_KEY = "sk-ant-spare-upstream-key-1a2b3c4d"
MODEL = "claude-sonnet-4-5"
HELLO = [{"role": "user", "content": "Hello"}]
ANSWER = "Hello from the fake upstream."
Sdk = Callable[..., anthropic.Anthropic]


def upstreams_toml(openai_url: str, anthropic_roots: list[str]) -> str:
    """An OpenAI upstream for chat, then the Anthropic-protocol upstreams in order."""
    text = f"""
[[upstreams]]
name = "openai"
base_url = "{openai_url}"
api_key_env = "OPENAI_UPSTREAM_KEY"
models = ["gpt-4o-mini"]
"""
    for number, root in enumerate(anthropic_roots):
        text += f"""
[[upstreams]]
name = "anthropic-{number}"
api = "anthropic"
base_url = "{root}"
api_key_env = "{"ANTHROPIC_KEY" if number == len(anthropic_roots) - 1 else "SPARE_KEY"}"
models = ["claude-*", "kimi-k2-*"]
"""
    return text


def root_of(fake: FakeUpstream) -> str:
    return f"http://{fake.host}:{fake.port}"


@pytest.fixture(scope="module")
def make_relay(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
               tmp_path_factory: pytest.TempPathFactory) -> Callable[..., RelayProcess]:
    """A relay whose only Anthropic upstream is the fake; extra settings as keyword arguments."""
    path = tmp_path_factory.mktemp("anthropic") / "upstreams.toml"
    path.write_text(upstreams_toml(fake.base_url, [root_of(fake)]))

    def make(**overrides: str) -> RelayProcess:
        return relay_factory(UPSTREAMS_FILE=str(path), OPENAI_UPSTREAM_KEY=UPSTREAM_KEY, ANTHROPIC_KEY=ANTHROPIC_KEY,
                             OPENAI_API_KEY="", KEEPALIVE_SECONDS="0.3", **overrides)

    return make


@pytest.fixture(scope="module")
def relay(make_relay: Callable[..., RelayProcess]) -> RelayProcess:
    return make_relay()


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    """The real anthropic SDK pointed at a relay (the way ANTHROPIC_BASE_URL does); closed after the test."""
    clients: list[anthropic.Anthropic] = []

    def make(relay: RelayProcess, key: str | None = ACCESS_KEY, **options: object) -> anthropic.Anthropic:
        client = anthropic.Anthropic(base_url=relay.url, api_key=key, max_retries=0, timeout=20,
                                     **options)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_messages_create(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """A whole message comes back with its usage; the upstream got the upstream key as x-api-key."""
    message = sdk(relay).messages.create(model=MODEL, max_tokens=100, messages=HELLO)  # type: ignore[arg-type]
    assert message.content[0].text == ANSWER  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (ANTHROPIC_INPUT_TOKENS, 6)
    seen = fake.requests[-1]
    assert seen.path == "/v1/messages" and seen.json["model"] == MODEL
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY and "authorization" not in seen.headers
    assert seen.headers["anthropic-version"]  # the SDK's own, passed through
    assert not any(ACCESS_KEY in value for value in seen.headers.values())


def test_messages_stream_text_and_usage(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """messages.stream yields the text and the final usage, from the real event sequence."""
    with sdk(relay).messages.stream(model=MODEL, max_tokens=100, messages=HELLO) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == ANSWER
    assert (final.usage.input_tokens, final.usage.output_tokens) == (ANTHROPIC_INPUT_TOKENS, 6)
    assert fake.requests[-1].json["stream"] is True


def test_beta_query_and_headers_pass_through(relay: RelayProcess, fake: FakeUpstream) -> None:
    """`?beta=true`, anthropic-version and anthropic-beta reach the upstream as Claude Code sends them;
    a request without anthropic-version gets 2023-06-01."""
    response = httpx2.post(f"{relay.url}/v1/messages?beta=true", timeout=20,
                           headers={"x-api-key": ACCESS_KEY, "anthropic-version": "2023-01-01",
                                    "anthropic-beta": "interleaved-thinking-2025-05-14"},
                           json={"model": MODEL, "max_tokens": 10, "messages": HELLO})
    assert response.status_code == 200 and response.json()["type"] == "message"
    seen = fake.requests[-1]
    assert seen.path == "/v1/messages?beta=true"
    assert seen.headers["anthropic-version"] == "2023-01-01"
    assert seen.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    bare = httpx2.post(f"{relay.url}/v1/messages", headers={"x-api-key": ACCESS_KEY}, timeout=20,
                       json={"model": MODEL, "max_tokens": 10, "messages": HELLO})
    assert bare.status_code == 200 and fake.requests[-1].headers["anthropic-version"] == "2023-06-01"


def test_count_tokens(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """messages.count_tokens is forwarded to <base_url>/v1/messages/count_tokens."""
    counted = sdk(relay).messages.count_tokens(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert counted.input_tokens == ANTHROPIC_INPUT_TOKENS + 1
    assert fake.requests[-1].path == "/v1/messages/count_tokens"


def test_keys_as_x_api_key_or_bearer(relay: RelayProcess, sdk: Sdk) -> None:
    """The access key works as x-api-key (ANTHROPIC_API_KEY) and as a Bearer token (ANTHROPIC_AUTH_TOKEN)."""
    as_header = sdk(relay, key=None, default_headers={"X-Api-Key": ACCESS_KEY})
    assert as_header.messages.create(model=MODEL, max_tokens=10, messages=HELLO).type == "message"  # type: ignore[arg-type]
    as_token = sdk(relay, key=None, auth_token=ACCESS_KEY)
    assert as_token.messages.create(model=MODEL, max_tokens=10, messages=HELLO).type == "message"  # type: ignore[arg-type]


def test_two_different_keys_are_refused(relay: RelayProcess, fake: FakeUpstream) -> None:
    """x-api-key and Authorization naming different (both valid) keys is a 401; naming the same one is fine."""
    body = {"model": MODEL, "max_tokens": 10, "messages": HELLO}
    refused = httpx2.post(f"{relay.url}/v1/messages", json=body, timeout=20,
                          headers={"x-api-key": ACCESS_KEY, "Authorization": f"Bearer {SECOND_ACCESS_KEY}"})
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert "different keys" in refused.json()["error"]["message"]
    same = httpx2.post(f"{relay.url}/v1/messages", json=body, timeout=20,
                       headers={"x-api-key": ACCESS_KEY, "Authorization": f"Bearer {ACCESS_KEY}"})
    assert same.status_code == 200
    assert len(fake.requests) == 1


def test_wrong_key_is_authentication_error(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """A wrong access key is the SDK's AuthenticationError; the upstream is never asked."""
    with pytest.raises(anthropic.AuthenticationError) as refused:
        sdk(relay, key="wrong-key").messages.create(model=MODEL, max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert not fake.requests


def test_refused_models(make_relay: Callable[..., RelayProcess], fake: FakeUpstream, sdk: Sdk) -> None:
    """A model no Anthropic upstream serves is a NotFoundError naming it; one outside ALLOWED_MODELS a
    BadRequestError; neither reaches the upstream."""
    client = sdk(make_relay(ALLOWED_MODELS="claude-*,gpt-4o-mini,other-*"))
    with pytest.raises(anthropic.NotFoundError) as unserved:
        client.messages.create(model="other-model", max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
    assert "other-model" in unserved.value.message
    assert unserved.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="kimi-k2-0905", max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert not fake.requests


@pytest.mark.parametrize(("status", "error_class"), [(429, anthropic.RateLimitError),
                                                     (529, anthropic.OverloadedError),
                                                     (500, anthropic.InternalServerError)])
def test_upstream_errors_pass_through(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk, status: int,
                                      error_class: type[anthropic.APIStatusError]) -> None:
    """The upstream's 429 (with Retry-After), 529 and 500 reach the SDK as it sent them, its key redacted."""
    fake.behave(status=status, retry_after="7", error_message=f"busy; key {ANTHROPIC_KEY} rejected")
    with pytest.raises(error_class) as failed:
        sdk(relay).messages.create(model=MODEL, max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
    assert failed.value.status_code == status
    assert failed.value.response.headers["retry-after"] == "7"
    assert failed.value.body["type"] == "error"  # type: ignore[index]
    assert ANTHROPIC_KEY not in failed.value.response.text


def test_upstream_refusing_the_relay_key_is_502(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """An upstream 401 is the operator's key, not the caller's: a 502 api_error, not AuthenticationError."""
    fake.behave(status=401)
    with pytest.raises(anthropic.APIStatusError) as failed:
        sdk(relay).messages.create(model=MODEL, max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
    assert failed.value.status_code == 502
    assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_pings_during_a_silence(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """A stream silent for longer than KEEPALIVE_SECONDS gets Anthropic ping events, which the SDK reads."""
    fake.behave(first_token_delay=1.2)
    with httpx2.stream("POST", f"{relay.url}/v1/messages", headers={"x-api-key": ACCESS_KEY}, timeout=20,
                       json={"model": MODEL, "max_tokens": 10, "messages": HELLO, "stream": True}) as response:
        body = response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    assert body.count(b'event: ping\ndata: {"type": "ping"}\n\n') >= 2  # the relay's, besides the upstream's one
    assert b": keep-alive" not in body and body.endswith(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
    with sdk(relay).messages.stream(model=MODEL, max_tokens=10, messages=HELLO) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == ANSWER


def test_upstream_break_mid_stream_is_an_error_event(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """An upstream that breaks off mid-stream ends the answer with an Anthropic error event the SDK raises."""
    fake.behave(disconnect_after=2)
    with httpx2.stream("POST", f"{relay.url}/v1/messages", headers={"x-api-key": ACCESS_KEY}, timeout=20,
                       json={"model": MODEL, "max_tokens": 10, "messages": HELLO, "stream": True}) as response:
        body = response.read()
    assert body.endswith(b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":'
                         b'"the upstream connection broke mid-answer; the answer is incomplete"}}\n\n')
    with pytest.raises(anthropic.APIStatusError), \
            sdk(relay).messages.stream(model=MODEL, max_tokens=10, messages=HELLO) as stream:  # type: ignore[arg-type]
        "".join(stream.text_stream)


def test_budget_charged_from_stream_usage(make_relay: Callable[..., RelayProcess], sdk: Sdk) -> None:
    """A stream's message_delta output tokens (6) are charged: a 6-token budget is used up by one stream,
    and the next request is the SDK's RateLimitError."""
    relay = make_relay(DAILY_TOKEN_BUDGET="6")
    client = sdk(relay)
    with client.messages.stream(model=MODEL, max_tokens=10, messages=HELLO) as stream:  # type: ignore[arg-type]
        "".join(stream.text_stream)
    body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    assert wait_until(lambda: httpx2.post(f"{relay.url}/v1/messages/count_tokens", json=body, timeout=10,
                                          headers={"x-api-key": ACCESS_KEY}).status_code == 429)
    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(model=MODEL, max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert refused.value.response.headers.get("retry-after")


def test_falls_over_to_the_next_anthropic_upstream(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
                                                   sdk: Sdk, tmp_path: Path) -> None:
    """A first Anthropic upstream answering 529 is invisible: the next one serving the model answers."""
    with FakeUpstream() as first:
        first.behave(status=529)
        path = tmp_path / "upstreams.toml"
        path.write_text(upstreams_toml(fake.base_url, [root_of(first), root_of(fake)]))
        relay = relay_factory(fresh=True, UPSTREAMS_FILE=str(path), OPENAI_UPSTREAM_KEY=UPSTREAM_KEY,
                              ANTHROPIC_KEY=ANTHROPIC_KEY, SPARE_KEY=SPARE_KEY, OPENAI_API_KEY="")
        message = sdk(relay).messages.create(model=MODEL, max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
        assert message.content[0].text == ANSWER  # type: ignore[union-attr]
        assert first.requests[0].headers["x-api-key"] == SPARE_KEY
        assert fake.requests[-1].headers["x-api-key"] == ANTHROPIC_KEY


def test_base_url_probes_and_chat_still_work(relay: RelayProcess, fake: FakeUpstream) -> None:
    """HEAD / and GET / answer (clients probe the base URL); chat still goes to the OpenAI upstream."""
    assert httpx2.head(f"{relay.url}/", timeout=10).status_code == 200
    assert httpx2.get(f"{relay.url}/", timeout=10).status_code == 200
    response = httpx2.post(f"{relay.url}/v1/chat/completions", headers=relay.headers(), timeout=20,
                           json={"model": "gpt-4o-mini", "messages": HELLO})
    assert response.status_code == 200
    assert fake.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


# --- model lists, both SDKs ------------------------------------------------------------------------------------

def test_model_lists_hold_the_anthropic_upstreams_models(relay: RelayProcess, sdk: Sdk) -> None:
    """GET /v1/models lists the Anthropic-protocol upstream's own models (asked in its protocol, its globs
    applied) after the OpenAI upstream's, in file order: in OpenAI's shape for the openai SDK, in Anthropic's
    (display names, pages) for the anthropic SDK, which sends anthropic-version."""
    expected = ["gpt-4o-mini", *ANTHROPIC_MODELS]
    with openai.OpenAI(base_url=f"{relay.url}/v1", api_key=ACCESS_KEY, max_retries=0) as client:
        listed = client.models.list()
        assert [model.id for model in listed] == expected
        assert client.models.retrieve("claude-sonnet-4-5").owned_by == "anthropic-0"
    claude = sdk(relay)
    assert [model.id for model in claude.models.list(limit=2)] == expected  # the SDK follows the pages
    first = claude.models.list(limit=2)
    assert first.has_more and [model.id for model in first.data] == expected[:2]
    model = claude.models.retrieve("claude-sonnet-4-5")
    assert model.display_name == "Fake claude-sonnet-4-5" and model.type == "model"
    assert model.created_at.year == 2025


# --- demo mode ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    """The demo: no upstream key, the stand-in model answers."""
    return relay_factory(RELAY_DEMO="1", OPENAI_API_KEY="", KEEPALIVE_SECONDS="0.3")


def test_demo_answers_anthropic_clients(demo_relay: RelayProcess, sdk: Sdk) -> None:
    """In demo mode the anthropic SDK gets a whole message, a stream with the real event sequence (text
    deltas, end_turn, usage), a token count and the demo model in the model list."""
    claude = sdk(demo_relay)
    prompt = [{"role": "user", "content": "Hello demo"}]
    message = claude.messages.create(model=MODEL, max_tokens=100, messages=prompt)  # type: ignore[arg-type]
    text = message.content[0].text  # type: ignore[union-attr]
    assert "Demo mode" in text and "Hello demo" in text
    assert message.stop_reason == "end_turn" and message.usage.input_tokens == 2
    with claude.messages.stream(model=MODEL, max_tokens=100, messages=prompt) as stream:  # type: ignore[arg-type]
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("text") > 10 and "content_block_stop" in kinds and "message_delta" in kinds
    assert final.content[0].text == text and final.stop_reason == "end_turn"  # type: ignore[union-attr]
    assert final.usage.output_tokens == len(text.split(" "))
    count = claude.messages.count_tokens(model=MODEL, messages=prompt)  # type: ignore[arg-type]
    assert count.input_tokens == 2
    assert DEMO_MODEL in [model.id for model in claude.models.list()]
