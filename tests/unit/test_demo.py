"""Demo mode answers every endpoint family the relay serves: a stand-in answer in the family's own shape
where a stand-in can give one, else a 404 in OpenAI's shape saying that demo mode does not serve it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from proxy import create_app
from proxy.config import Config
from proxy.routes.passthrough import FAMILIES
from tests.conftest import ACCESS_KEY
from tests.unit.conftest import bearer

MODEL = "gpt-4o-mini"
QUESTION = [{"role": "user", "content": "ping"}]

# Families of the forwarded API the stand-in answers: (method, path, body).
ANSWERED: dict[str, tuple[str, str, dict[str, Any]]] = {
    "responses": ("POST", "/v1/responses", {"model": MODEL, "input": "ping"}),
    "completions": ("POST", "/v1/completions", {"model": MODEL, "prompt": "ping"}),
    "embeddings": ("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "ping"}),
    "moderations": ("POST", "/v1/moderations", {"model": "omni-moderation-latest", "input": ["a", "b"]}),
}
# Families it has no stand-in for (they need a real model or stored objects): a request in each.
NOT_SERVED: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "conversations": ("POST", "/v1/conversations", {}),
    "audio": ("POST", "/v1/audio/speech", {"model": "tts-1", "input": "ping", "voice": "alloy"}),
    "images": ("POST", "/v1/images/generations", {"model": "gpt-image-1", "prompt": "a cat"}),
    "files": ("GET", "/v1/files", None),
    "uploads": ("POST", "/v1/uploads", {"filename": "a.jsonl", "purpose": "batch", "bytes": 1,
                                        "mime_type": "text/jsonl"}),
    "batches": ("GET", "/v1/batches", None),
    "vector_stores": ("GET", "/v1/vector_stores", None),
    "fine_tuning": ("GET", "/v1/fine_tuning/jobs", None),
    "assistants": ("GET", "/v1/assistants", None),
    "threads": ("POST", "/v1/threads", {}),
    "containers": ("GET", "/v1/containers", None),
    "evals": ("GET", "/v1/evals", None),
    "videos": ("GET", "/v1/videos", None),
    "realtime": ("POST", "/v1/realtime/client_secrets", {}),
}


@pytest.fixture
def demo() -> FlaskClient:
    return create_app(Config(authorization_keys=(ACCESS_KEY,), openai_api_key="", demo=True)).test_client()


def test_every_forwarded_family_is_decided() -> None:
    """A family added to the forwarded API must be given a stand-in answer or listed as not served."""
    assert sorted([*ANSWERED, *NOT_SERVED]) == sorted(FAMILIES)


def demo_text(text: str) -> bool:
    return "Demo mode" in text and "ping" in text


def test_chat_completions_whole_and_messages_whole(demo: FlaskClient) -> None:
    """Non-streaming chat completions and Anthropic messages get the stand-in answer with usage."""
    chat = demo.post("/v1/chat/completions", headers=bearer(), json={"model": MODEL, "messages": QUESTION})
    assert chat.status_code == 200, chat.text
    assert demo_text(chat.json["choices"][0]["message"]["content"]) and chat.json["usage"]["total_tokens"] > 0
    message = demo.post("/v1/messages", headers=bearer(), json={"model": MODEL, "max_tokens": 50,
                                                                "messages": QUESTION})
    assert message.status_code == 200, message.text
    assert demo_text(message.json["content"][0]["text"]) and message.json["usage"]["output_tokens"] > 0
    counted = demo.post("/v1/messages/count_tokens", headers=bearer(), json={"model": MODEL, "messages": QUESTION})
    assert counted.json == {"input_tokens": 1}


@pytest.mark.parametrize("family", sorted(ANSWERED))
def test_answered_families_get_a_stand_in_answer(demo: FlaskClient, family: str) -> None:
    """Responses, completions, embeddings and moderations answer 200 in their own shape."""
    method, path, body = ANSWERED[family]
    response = demo.open(path, method=method, headers=bearer(), json=body)
    assert response.status_code == 200, response.text
    answer = response.json
    if family == "responses":
        assert demo_text(answer["output"][0]["content"][0]["text"]) and answer["status"] == "completed"
    elif family == "completions":
        assert answer["object"] == "text_completion" and demo_text(answer["choices"][0]["text"])
        assert answer["usage"]["completion_tokens"] > 0
    elif family == "embeddings":
        assert len(answer["data"]) == 1 and len(answer["data"][0]["embedding"]) > 0
    else:
        assert [result["flagged"] for result in answer["results"]] == [False, False]


def test_streamed_completions_end_with_usage_and_done(demo: FlaskClient) -> None:
    """Streamed legacy completions: a text chunk per word, the finish, the usage chunk when asked, [DONE]."""
    response = demo.post("/v1/completions", headers=bearer(), json={
        "model": MODEL, "prompt": "ping", "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(item) for item in data[:-1]]
    assert demo_text("".join(event["choices"][0]["text"] for event in events if event["choices"]))
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("family", sorted(NOT_SERVED))
def test_other_families_say_demo_mode_does_not_serve_them(demo: FlaskClient, family: str) -> None:
    """Every other family answers 404 in OpenAI's shape naming demo mode and the request, never a 5xx."""
    method, path, body = NOT_SERVED[family]
    response = demo.open(path, method=method, headers=bearer(), json=body)
    assert response.status_code == 404, response.text
    error = response.json["error"]
    assert error["message"].startswith("Demo mode: ") and f"{method} {path}" in error["message"]
    assert error["code"] == "not_found" and "OPENAI_API_KEY" in error["message"]


def test_a_stored_response_is_not_found_in_demo_mode(demo: FlaskClient) -> None:
    """The stand-in stores nothing: looking up its response id says so instead of failing."""
    response = demo.get("/v1/responses/resp_demo", headers=bearer())
    assert response.status_code == 404 and "stores nothing" in response.json["error"]["message"]
