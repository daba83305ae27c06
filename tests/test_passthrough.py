"""The rest of the OpenAI API forwarded end to end: the official openai SDK -> the relay under gunicorn -> the
fake upstream (real HTTP): Responses (streaming and not), embeddings, audio, images, files; headers, models,
fall-over, keep-alives, cancellation, uploads and budgets."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, RelayProcess, Sdk
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until

FIRST_KEY = "sk-first-upstream-key-0a1b2c3d"
SECOND_KEY = "sk-second-upstream-key-9f8e7d6c"




@pytest.fixture(scope="module")
def relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    """Short keep-alives; a small JSON cap and a larger upload cap."""
    return relay_factory(KEEPALIVE_SECONDS="0.3", MAX_BODY_BYTES="20000", MAX_UPLOAD_BYTES="2000000")


def test_responses_whole_and_streamed(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """responses.create answers as the upstream did, whole and as a stream of typed events."""
    client = sdk(relay)
    whole = client.responses.create(model="gpt-4o-mini", input="Hello")
    assert whole.output_text == "Hello from the fake upstream." and whole.usage is not None
    events = list(client.responses.create(model="gpt-4o-mini", input="Hello", stream=True))
    assert events[0].type == "response.created"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello from the fake upstream."
    assert events[-1].type == "response.completed" and events[-1].response.usage.total_tokens == 30
    assert fake.requests[-1].path == "/v1/responses" and fake.requests[-1].json["stream"] is True


def test_embeddings_images_and_speech(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """JSON answers and binary audio come back as the upstream sent them."""
    client = sdk(relay)
    embedded = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [item.embedding for item in embedded.data] == [[0.5, -0.25, 0.125]] * 2
    assert embedded.usage.total_tokens == 8
    image = client.images.generate(model="gpt-image-1", prompt="a cat")
    assert image.data is not None and image.data[0].b64_json == "aW1hZ2U="
    speech = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="hi")
    assert speech.content == b"ID3\x04fake-mp3" + bytes(range(256)) * 4
    assert speech.response.headers["content-type"] == "audio/mpeg"


def test_transcription_upload_larger_than_the_json_cap(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """A multipart upload over MAX_BODY_BYTES streams through within MAX_UPLOAD_BYTES; past it, 413."""
    client = sdk(relay)
    audio = b"RIFF" + bytes(range(256)) * 2000  # 512 KB, 25 times MAX_BODY_BYTES
    text = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", io.BytesIO(audio)))
    assert text.text == f"heard {len(audio)} bytes with whisper-1"
    assert fake.requests[-1].body.count(audio) == 1
    with pytest.raises(openai.APIStatusError) as refused:
        client.audio.transcriptions.create(model="whisper-1", file=("big.wav", io.BytesIO(b"x" * 2_100_000)))
    assert refused.value.status_code == 413 and refused.value.code == "body_too_large"


def test_chunked_upload_is_capped_while_it_streams(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A chunked upload (no Content-Length) streams through; one that grows past MAX_UPLOAD_BYTES is cut off
    with 413 and the upstream never gets a whole request."""
    def form(size: int) -> Iterator[bytes]:
        yield b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(size // 10_000):
            yield b"x" * 10_000
        yield b"\r\n--B--\r\n"

    headers = {**relay.headers(), "Content-Type": "multipart/form-data; boundary=B"}
    small = httpx2.post(f"{relay.url}/v1/audio/transcriptions", content=form(300_000), headers=headers, timeout=20)
    assert small.status_code == 200 and small.json()["text"] == "heard 300000 bytes with whisper-1"
    assert fake.requests[-1].headers["transfer-encoding"] == "chunked"
    big = httpx2.post(f"{relay.url}/v1/audio/transcriptions", content=form(2_500_000), headers=headers, timeout=20)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert len(fake.requests) == 1


def test_files_round_trip(relay: RelayProcess, fake: FakeUpstream, sdk: Sdk) -> None:
    """files.create, list, retrieve, content and delete all reach the upstream and come back."""
    client = sdk(relay)
    created = client.files.create(file=("data.jsonl", io.BytesIO(b'{"a": 1}\n')), purpose="assistants")
    assert created.bytes == 9 and created.filename == "data.jsonl"
    assert created.id in [item.id for item in client.files.list()]
    assert client.files.retrieve(created.id).filename == "data.jsonl"
    assert client.files.content(created.id).content == b'{"a": 1}\n'
    assert client.files.delete(created.id).deleted is True


def test_upstream_sees_only_allowed_headers(relay: RelayProcess, fake: FakeUpstream) -> None:
    """Exactly the allow-listed headers reach the upstream, with the upstream key; the answer's headers come back."""
    response = httpx2.post(f"{relay.url}/v1/embeddings?trace=1", content=b'{"model":"m","input":"a"}', headers={
        "Authorization": f"Bearer {ACCESS_KEY}", "Content-Type": "application/json", "Cookie": "session=1",
        "X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9", "Forwarded": "for=203.0.113.9",
        "Via": "1.1 cdn", "CF-Connecting-IP": "203.0.113.9", "CF-IPCountry": "CN", "OpenAI-Organization": "org-1",
        "X-Stainless-OS": "Linux", "OpenAI-Beta": "assistants=v2", "Idempotency-Key": "abc",
        "Accept-Encoding": "gzip", "TE": "trailers", "User-Agent": "client-tool/1.0"}, timeout=20)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert response.headers["openai-processing-ms"] == "7" and response.headers["x-upstream-request-id"]
    seen = fake.requests[-1]
    assert seen.path == "/v1/embeddings?trace=1"
    assert set(seen.headers) == {"host", "user-agent", "accept", "connection", "content-type", "content-length",
                                 "authorization", "accept-encoding", "openai-beta", "idempotency-key"}
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen.headers["accept-encoding"] == "identity" and "client-tool" not in seen.headers["user-agent"]


def test_model_not_allowed_never_reaches_the_upstream(relay_factory: Callable[..., RelayProcess],
                                                       fake: FakeUpstream, sdk: Sdk) -> None:
    """A model outside ALLOWED_MODELS is 400 model_not_allowed in OpenAI's shape, JSON or form field."""
    client = sdk(relay_factory(ALLOWED_MODELS="gpt-4o*"))
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="o3", input="Hello")
    assert refused.value.code == "model_not_allowed"
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", io.BytesIO(b"RIFF")))
    assert fake.requests == []


def test_fall_over_to_second_upstream_on_5xx(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
                                             tmp_path: Path, sdk: Sdk) -> None:
    """A 500 from the first upstream serving the model sends the request to the next one."""
    with FakeUpstream() as first:
        first.behave(status=500)
        path = tmp_path / "upstreams.toml"
        path.write_text("".join(f'[[upstreams]]\nname = "{name}"\nbase_url = "{url}"\napi_key_env = "{env}"\n'
                                'models = ["gpt-4o*"]\n\n'
                                for name, url, env in (("first", first.base_url, "FIRST_KEY"),
                                                       ("second", fake.base_url, "SECOND_KEY"))))
        relay = relay_factory(fresh=True, UPSTREAMS_FILE=str(path), FIRST_KEY=FIRST_KEY, SECOND_KEY=SECOND_KEY,
                              OPENAI_API_KEY="")
        answer = sdk(relay).responses.create(model="gpt-4o-mini", input="Hello")
        assert answer.output_text == "Hello from the fake upstream."
        assert [r.path for r in first.requests] == ["/v1/responses"]
        assert fake.requests[-1].headers["authorization"] == f"Bearer {SECOND_KEY}"


def test_silent_responses_stream_gets_keepalives(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A Responses stream silent for longer than KEEPALIVE_SECONDS gets `: keep-alive` comments between events;
    before the first token, response.created waits with it (held back for a fall-over) and keep-alives go out."""
    fake.behave(first_token_delay=1.2)
    with httpx2.stream("POST", f"{relay.url}/v1/responses", headers=relay.headers(), timeout=20,
                       json={"model": "gpt-4o-mini", "input": "Hello", "stream": True}) as response:
        body = response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    assert body.startswith(b": keep-alive\n\n: keep-alive\n\n")
    assert body.replace(b": keep-alive\n\n", b"").startswith(b"event: response.created")
    assert body.endswith(b"\n\n") and b"event: response.completed" in body


def test_client_leaving_closes_the_upstream(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A client that leaves mid-stream cancels the upstream request at once."""
    fake.behave(n_tokens=200, token_interval=0.05)
    with httpx2.stream("POST", f"{relay.url}/v1/responses", headers=relay.headers(), timeout=20,
                       json={"model": "gpt-4o-mini", "input": "Hello", "stream": True}) as response:
        for line in response.iter_lines():
            if "output_text.delta" in line:
                break
    assert fake.wait_for(lambda: len(fake.streams_closed) == 1, timeout=5)
    closed = fake.streams_closed[0]
    assert not closed.completed and closed.tokens_sent < 100


def test_budget_is_charged_from_responses_stream_usage(relay_factory: Callable[..., RelayProcess],
                                                       fake: FakeUpstream, sdk: Sdk) -> None:
    """The `response.completed` usage (30 tokens) is charged: a 30-token budget is used up by one stream."""
    relay = relay_factory(DAILY_TOKEN_BUDGET="30")
    client = sdk(relay, key=ACCESS_KEY)
    list(client.responses.create(model="gpt-4o-mini", input="Hello", stream=True))
    assert wait_until(lambda: httpx2.post(f"{relay.url}/v1/embeddings", headers=relay.headers(), timeout=10,
                                          json={"model": "m", "input": "a"}).status_code == 429)
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(model="gpt-4o-mini", input="Hello")
    assert refused.value.code == "token_budget_exhausted"
