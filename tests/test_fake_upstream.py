"""Self-tests of the fake OpenAI-compatible upstream, through the real openai SDK and real sockets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.fake_upstream import FakeUpstream

REPO_ROOT = Path(__file__).resolve().parent.parent
USER_HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def client(fake: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0, timeout=5) as sdk:
        yield sdk


def _stream_text(client: openai.OpenAI) -> tuple[str, list[ChatCompletionChunk]]:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=USER_HI,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def _raw_request(port: int, body: dict[str, object]) -> bytes:
    """Send one request over a raw socket and return everything until the server closes or finishes."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + payload)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


def test_streaming_through_sdk_gives_tokens_usage_and_model(
    fake: FakeUpstream, client: openai.OpenAI
) -> None:
    """A streamed answer arrives token by token through the SDK, with the request's model and usage."""
    fake.behave(tokens=["Hello", " world"])
    text, chunks = _stream_text(client)
    assert text == "Hello world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.model == "gpt-4o-mini" for c in chunks)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 2 and usage.total_tokens == usage.prompt_tokens + 2
    # The fake records the stream as it finishes writing, which can be just after the client read its end.
    assert fake.wait_for(lambda: fake.streams_closed)
    assert fake.streams_closed[-1].tokens_sent == 2 and fake.streams_closed[-1].completed
    assert fake.requests[-1].json["stream"] is True
    assert fake.requests[-1].headers["authorization"] == "Bearer sk-test"


def test_wire_format_matches_openai_byte_for_byte(fake: FakeUpstream) -> None:
    """The SSE wire format: headers, compact JSON events, usage:null only with include_usage, [DONE]."""
    fake.behave(tokens=["A"])
    raw = _raw_request(
        fake.port,
        {"model": "m", "messages": USER_HI, "stream": True, "stream_options": {"include_usage": True}},
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: text/event-stream; charset=utf-8" in head
    assert b"transfer-encoding: chunked" in head and b"x-request-id: req_" in head
    events = [line.rstrip(b"\n") for line in body.split(b"\r\n") if line.startswith(b"data: ")]
    decoded = [json.loads(e[6:]) for e in events[:-1]]
    assert events[-1] == b"data: [DONE]"
    assert decoded[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert decoded[1]["choices"][0] == {
        "index": 0,
        "delta": {"content": "A"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert decoded[1]["object"] == "chat.completion.chunk" and decoded[1]["system_fingerprint"] == "fp_fake"
    assert all(d["usage"] is None for d in decoded[:-1]) and decoded[-1]["choices"] == []
    assert b'", "' not in body and b'": ' not in body  # compact separators
    no_usage = _raw_request(fake.port, {"model": "m", "messages": USER_HI, "stream": True})
    assert b'"usage"' not in no_usage


def test_non_streaming_gives_joined_completion(fake: FakeUpstream, client: openai.OpenAI) -> None:
    """A non-streaming request gets one chat.completion with the joined content and usage."""
    fake.behave(tokens=["Hi", " there"], reasoning=["think"])
    answer = client.chat.completions.create(model="gpt-4o", messages=USER_HI)
    assert answer.choices[0].message.content == "Hi there"
    assert getattr(answer.choices[0].message, "reasoning_content", None) == "think"
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    assert answer.model == "gpt-4o" and answer.object == "chat.completion"


def test_error_status_raises_matching_sdk_exception(fake: FakeUpstream, client: openai.OpenAI) -> None:
    """An error status maps to the SDK's exception class, with the message and Retry-After visible."""
    fake.behave(status=429, error_message="slow down", error_code="rate_limit_exceeded", retry_after="7")
    with pytest.raises(openai.RateLimitError) as caught:
        _stream_text(client)
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded" and "slow down" in caught.value.message
    fake.behave(status=401, error_message="bad key")
    with pytest.raises(openai.AuthenticationError):
        _stream_text(client)
    fake.behave(status=502, error_raw_body="<html>bad gateway</html>")
    with pytest.raises(openai.InternalServerError) as raw_caught:
        _stream_text(client)
    assert raw_caught.value.response.headers["content-type"].startswith("text/html")


def test_split_utf8_arrives_intact(fake: FakeUpstream, client: openai.OpenAI) -> None:
    """Events cut inside a multi-byte UTF-8 character still decode to the original text."""
    fake.behave(tokens=["你", "好", "🌍"], split_utf8=True)
    text, _ = _stream_text(client)
    assert text == "你好🌍"
    fake.behave(tokens=["你好", "🌍", " ok"], split_lines=True)
    assert _stream_text(client)[0] == "你好🌍 ok"


def test_client_closing_mid_stream_is_recorded_promptly(fake: FakeUpstream, client: openai.OpenAI) -> None:
    """A client that hangs up mid-stream is noticed within 0.5 s and recorded as incomplete."""
    fake.behave(n_tokens=100, token_interval=0.05)
    stream = client.chat.completions.create(model="m", messages=USER_HI, stream=True)
    for index, _chunk in enumerate(stream):
        if index == 3:
            break
    stream.close()
    closed_at = time.monotonic()
    assert fake.wait_for(lambda: fake.streams_closed, timeout=2)
    record = fake.streams_closed[0]
    assert not record.completed and 2 <= record.tokens_sent < 100
    assert record.at - closed_at < 0.5
    assert fake.wait_for(lambda: fake.open_connections == 0, timeout=1)


def test_keep_alive_reuses_one_connection(fake: FakeUpstream, client: openai.OpenAI) -> None:
    """Two requests from one SDK client travel over one kept-alive TCP connection."""
    for _ in range(2):
        client.chat.completions.create(model="m", messages=USER_HI)
    assert len(fake.requests) == 2
    assert fake.connections_opened == 1 and fake.open_connections == 1


def test_disconnect_and_malformed_and_override(fake: FakeUpstream, client: openai.OpenAI) -> None:
    """disconnect_after cuts the stream without [DONE]; a #fake message overrides one request only."""
    fake.behave(n_tokens=10, disconnect_after=3)
    with pytest.raises(openai.APIConnectionError):
        _stream_text(client)
    assert fake.wait_for(lambda: len(fake.streams_closed) == 1)
    assert fake.streams_closed[0].tokens_sent == 3 and not fake.streams_closed[0].completed
    fake.behave(tokens=["a", "b"], malformed_after=1)
    raw = _raw_request(fake.port, {"model": "m", "messages": USER_HI, "stream": True})
    assert b"data: {this is not json\n\n" in raw and raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    fake.reset()
    override: list[ChatCompletionMessageParam] = [{"role": "user", "content": '#fake {"tokens": ["x", "y"]}'}]
    answer = client.chat.completions.create(model="m", messages=override)
    assert answer.choices[0].message.content == "xy"
    assert client.chat.completions.create(model="m", messages=USER_HI).choices[0].message.content == (
        "Hello from the fake upstream."
    )


def test_blocking_behaviours_end_when_client_leaves(fake: FakeUpstream) -> None:
    """never_answer and stall_after_headers hold the request until the client closes, then record it."""
    for field in ("never_answer", "stall_after_headers"):
        fake.reset()
        fake.behave(**{field: True})
        sdk = openai.OpenAI(base_url=fake.base_url, api_key="k", max_retries=0, timeout=0.3)
        with sdk, pytest.raises(openai.APITimeoutError):
            _stream_text(sdk)
        assert fake.wait_for(lambda: len(fake.streams_closed) == 1, timeout=1)
        assert fake.open_connections == 0


def test_models_and_tool_call(fake: FakeUpstream, client: openai.OpenAI) -> None:
    """GET /v1/models lists models; tool_call streams a function call ending in finish_reason tool_calls."""
    assert "gpt-4o-mini" in [m.id for m in client.models.list()]
    fake.behave(tool_call=True)
    _, chunks = _stream_text(client)
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    functions = [call[0].function for call in calls if call[0].function is not None]
    arguments = "".join(function.arguments or "" for function in functions)
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    assert functions[0].name == "get_weather"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_command_line_prints_ready_and_stops_on_sigterm() -> None:
    """`python -m tests.fake_upstream --port 0` prints READY with its URL, serves, and exits on SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_upstream", "--port", "0", "--tokens", "3"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("READY http://127.0.0.1:") and line.endswith("/v1")
        with openai.OpenAI(base_url=line.split()[1], api_key="k", max_retries=0, timeout=5) as sdk:
            answer = sdk.chat.completions.create(model="m", messages=USER_HI)
        assert answer.choices[0].message.content == " tok0 tok1 tok2"
        process.terminate()
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
