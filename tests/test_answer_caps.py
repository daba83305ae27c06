"""MAX_TOKENS and MAX_CHOICES on forwarded bodies end to end: the official openai and anthropic SDKs -> the relay
under gunicorn -> the fake upstream (real HTTP), speaking Responses natively and Anthropic's Messages API as an
`api = "anthropic"` upstream. What the upstream receives is the capped body; what cannot be capped is refused
in the client's protocol before the upstream is asked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, RelayProcess, Sdk
from tests.fake_upstream import FakeUpstream
from tests.test_anthropic import ANTHROPIC_KEY, HELLO, MODEL, root_of, upstreams_toml

MAX_TOKENS = 64


@pytest.fixture(scope="module")
def relay(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
          tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    """MAX_TOKENS set (so MAX_CHOICES is 1); the fake serves gpt-4o-mini (chat, Responses) and claude-*."""
    path: Path = tmp_path_factory.mktemp("caps") / "upstreams.toml"
    path.write_text(upstreams_toml(fake.base_url, [root_of(fake)]))
    return relay_factory(UPSTREAMS_FILE=str(path), OPENAI_UPSTREAM_KEY=UPSTREAM_KEY, ANTHROPIC_KEY=ANTHROPIC_KEY,
                         OPENAI_API_KEY="", MAX_TOKENS=str(MAX_TOKENS))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("asked", "sent"), [(100_000, MAX_TOKENS), (None, MAX_TOKENS), (20, 20)])
def test_responses_upstream_gets_the_capped_body(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk,
                                                 stream: bool, asked: int | None, sent: int) -> None:
    """POST /v1/responses to a native upstream: max_output_tokens over MAX_TOKENS arrives capped, a missing
    one arrives as MAX_TOKENS, a smaller one as sent; the answer comes back as usual."""
    options = {} if asked is None else {"max_output_tokens": asked}
    answer = sdk(relay).responses.create(model="gpt-4o-mini", input="Hello", stream=stream, **options)
    if stream:
        assert list(answer)[-1].type == "response.completed"  # type: ignore[union-attr]
    else:
        assert answer.output_text == "Hello from the fake upstream."  # type: ignore[union-attr]
    seen = fake.requests[-1]
    assert seen.path == "/v1/responses" and seen.json["max_output_tokens"] == sent
    assert seen.json["input"] == "Hello" and seen.json["model"] == "gpt-4o-mini"


@pytest.mark.parametrize(("asked", "sent"), [(100_000, MAX_TOKENS), (30, 30)])
def test_messages_upstream_gets_the_capped_body(relay: RelayProcess, fake: FakeUpstream, asked: int,
                                                sent: int) -> None:
    """POST /v1/messages to an Anthropic-protocol upstream: max_tokens held to MAX_TOKENS, whole and streamed."""
    client = anthropic.Anthropic(base_url=relay.url, api_key=ACCESS_KEY, max_retries=0, timeout=20)
    with client:
        message = client.messages.create(model=MODEL, max_tokens=asked, messages=HELLO)  # type: ignore[arg-type]
        assert message.content[0].text == "Hello from the fake upstream."  # type: ignore[union-attr]
        assert fake.requests[-1].path == "/v1/messages" and fake.requests[-1].json["max_tokens"] == sent
        with client.messages.stream(model=MODEL, max_tokens=asked, messages=HELLO) as events:  # type: ignore[arg-type]
            assert events.get_final_text() == "Hello from the fake upstream."
        assert fake.requests[-1].json["max_tokens"] == sent and fake.requests[-1].json["stream"] is True


def test_what_cannot_be_capped_is_refused_in_the_clients_protocol(relay: RelayProcess, fake: FakeUpstream,
                                                                   sdk: Sdk) -> None:
    """A string token count (OpenAI and Anthropic shapes, each SDK's BadRequestError) and legacy completions'
    n/best_of over MAX_CHOICES: 400 before the upstream is asked."""
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(relay).responses.create(model="gpt-4o-mini", input="Hello",
                                    extra_body={"max_output_tokens": "100000"})
    assert caught.value.code == "invalid_request"
    assert "'max_output_tokens' must be a whole number" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(relay).completions.create(model="gpt-4o-mini", prompt="x", max_tokens=10, n=64, best_of=64)
    assert caught.value.code == "too_many_choices"
    with (anthropic.Anthropic(base_url=relay.url, api_key=ACCESS_KEY, max_retries=0, timeout=20) as client,
          pytest.raises(anthropic.BadRequestError) as refused):
        client.messages.create(model=MODEL, max_tokens="100000", messages=HELLO)  # type: ignore[arg-type]
    assert "'max_tokens' must be a whole number" in refused.value.message
    raw = httpx2.post(f"{relay.url}/v1/messages", json={"model": MODEL, "max_tokens": 1e5 + 0.5, "messages": HELLO},
                      headers={"x-api-key": ACCESS_KEY}, timeout=20)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert fake.requests == []
