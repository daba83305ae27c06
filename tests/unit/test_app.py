"""The relay in-process: every endpoint through Flask's test client, the real SDK client, SSE parser, pump and
encoders, with the upstream an in-process transport (tests/unit/conftest.py). The real-server versions of
these paths (gunicorn, sockets, timers, client departures) are in tests/test_chat.py and friends."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from flask.testing import FlaskClient

from tests.conftest import ACCESS_KEY, SECOND_ACCESS_KEY, UPSTREAM_KEY
from tests.unit.conftest import HELLO, FakeTransport, answer_events, bearer, chunk_event, relay_app, unit_config

DONE = {"done": True, "error": False, "content": "[DONE]"}


def records(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.split(b"\n") if line.strip()]


def sse_payloads(body: bytes) -> list[str]:
    return [line[len("data: "):] for line in body.decode().split("\n") if line.startswith("data: ")]


# ------------------------------------------------------------------ POST /chat


def test_chat_streams_ndjson_records(client: FlaskClient, transport: FakeTransport) -> None:
    """POST /chat answers one record per content delta, then [DONE] with finish reason and usage."""
    response = client.post("/chat", json=HELLO, headers=bearer())
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/x-ndjson; charset=utf-8"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.data == (
        b'{"done":false,"error":false,"content":"Hel"}\n{"done":false,"error":false,"content":"lo"}\n'
        b'{"done":true,"error":false,"content":"[DONE]","finish_reason":"stop",'
        b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n')


def test_chat_upstream_request_is_shaped(client: FlaskClient, transport: FakeTransport) -> None:
    """The upstream gets the shaped body (default model, stream, usage asked) with its own key, never the caller's."""
    client.post("/chat", json={**HELLO, "temperature": 0.5, "stop": ["x"], "extra": 1}, headers=bearer())
    [seen] = transport.requests
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert ACCESS_KEY not in json.dumps(seen.headers)
    assert seen.body == {"model": "gpt-4o-mini", "messages": HELLO["messages"], "stream": True,
                         "temperature": 0.5, "stop": ["x"], "stream_options": {"include_usage": True}}


def test_chat_reasoning_only_when_asked(client: FlaskClient, transport: FakeTransport) -> None:
    """Reasoning deltas reach a /chat client only with include_reasoning=true."""
    events = [chunk_event({"reasoning_content": "hmm"}), *answer_events(["ok"])]
    transport.reply(blocks=events)
    transport.reply(blocks=events)
    plain = records(client.post("/chat", json=HELLO, headers=bearer()).data)
    assert [r["content"] for r in plain] == ["ok", "[DONE]"]
    with_reasoning = records(client.post("/chat", json={**HELLO, "include_reasoning": True}, headers=bearer()).data)
    assert with_reasoning[0] == {"done": False, "error": False, "content": "", "reasoning": "hmm"}


@pytest.mark.parametrize(("blocks", "code"), [
    ([chunk_event({"content": "a"}), b"data: {not json\n\n"], "upstream_malformed"),
    ([chunk_event({"content": "a"})], "upstream_disconnected"),
    ([chunk_event({"content": "a"}), b'data: {"error": {"message": "overloaded"}}\n\n'], "upstream_error"),
])
def test_chat_failure_mid_stream_is_an_error_record_then_done(client: FlaskClient, transport: FakeTransport,
                                                              blocks: list[bytes], code: str) -> None:
    """A stream that breaks after the first token ends with an error record (its kind) and [DONE], status 200."""
    transport.reply(blocks=blocks)
    response = client.post("/chat", json=HELLO, headers=bearer())
    assert response.status_code == 200
    first, error, done = records(response.data)
    assert first["content"] == "a"
    assert error["error"] is True and error["code"] == code
    assert done == DONE


@pytest.mark.parametrize(("reply", "status", "code"), [
    ({"status": 401, "json": {"error": {"message": "bad key sk-abcdefgh123"}}}, 502, "upstream_auth"),
    ({"status": 404, "json": {"error": {"message": "no such model"}}}, 400, "model_not_found"),
    ({"status": 429, "json": {"error": {"message": "slow"}}, "headers": {"retry-after": "7"}}, 429,
     "upstream_rate_limited"),
    ({"status": 429, "json": {"error": {"message": "slow"}}, "headers": {"retry-after": "inf"}}, 429,
     "upstream_rate_limited"),
    ({"status": 400, "json": {"error": {"message": "maximum context length exceeded"}}}, 400, "context_too_long"),
    ({"status": 422, "json": {"error": {"message": "bad field"}}}, 400, "upstream_bad_request"),
    ({"status": 503, "json": {"error": {"message": "down"}}}, 502, "upstream_error"),
    ({"raise_": httpx2.ConnectError}, 502, "upstream_unreachable"),
    ({"raise_": httpx2.ReadTimeout}, 504, "upstream_timeout"),
])
def test_chat_upstream_errors_at_open_map_to_statuses(client: FlaskClient, transport: FakeTransport,
                                                      reply: dict[str, Any], status: int, code: str) -> None:
    """An upstream failure before the stream is a real HTTP status and kind, in /chat's NDJSON shape."""
    transport.reply(**reply)
    response = client.post("/chat", json=HELLO, headers=bearer())
    assert response.status_code == status
    error, done = records(response.data)
    assert error["code"] == code and done == DONE
    assert "sk-abcdefgh123" not in error["content"]
    if status == 429:  # a usable Retry-After is passed on; an unusable one ("inf") is dropped, the 429 kept
        expected = {"7": "7", "inf": None}[reply["headers"]["retry-after"]]
        assert response.headers.get("Retry-After") == expected


@pytest.mark.parametrize(("raw", "words"), [
    (b"", "the request body is empty"),
    (b"{nope", "not valid JSON"),
    (b"[1]", "must be a JSON object"),
    (b'{"messages": []}', "'messages' must be a non-empty array"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', "'temperature' must be between 0 and 2"),
])
def test_chat_bad_bodies_are_400_in_ndjson(client: FlaskClient, transport: FakeTransport, raw: bytes,
                                           words: str) -> None:
    """A bad body is a 400 whose record names the problem; the upstream is never asked."""
    response = client.post("/chat", data=raw, headers={**bearer(), "Content-Type": "application/json"})
    assert response.status_code == 400
    error, done = records(response.data)
    assert words in error["content"] and done == DONE
    assert transport.requests == []


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "}, {"Authorization": f"Basic {ACCESS_KEY}x"},
])
def test_chat_without_a_valid_key_is_401(client: FlaskClient, transport: FakeTransport,
                                         headers: dict[str, str]) -> None:
    """Missing and wrong keys get the same 401 record; the upstream is never asked."""
    response = client.post("/chat", json=HELLO, headers=headers)
    assert response.status_code == 401
    assert records(response.data)[0]["code"] == "unauthorized"
    assert transport.requests == []


@pytest.mark.parametrize("authorization", [f"Bearer {ACCESS_KEY}", ACCESS_KEY, f"bearer  {SECOND_ACCESS_KEY} "])
def test_chat_accepts_both_key_forms(client: FlaskClient, authorization: str) -> None:
    """`Bearer <key>` (any case) and the raw key old clients send are both accepted, for every configured key."""
    assert client.post("/chat", json=HELLO, headers={"Authorization": authorization}).status_code == 200


def test_body_over_limit_is_413(make_client: Callable[..., FlaskClient], transport: FakeTransport) -> None:
    """A body over MAX_BODY_BYTES is a 413 naming the limit, in the endpoint's shape."""
    client = make_client(max_body_bytes=100)
    body = {"messages": [{"role": "user", "content": "x" * 200}]}
    ndjson = client.post("/chat", json=body, headers=bearer())
    assert ndjson.status_code == 413
    assert records(ndjson.data)[0]["code"] == "body_too_large"
    assert "100 bytes" in records(ndjson.data)[0]["content"]
    openai_shape = client.post("/v1/chat/completions", json=body, headers=bearer())
    assert openai_shape.status_code == 413 and openai_shape.json["error"]["code"] == "body_too_large"
    assert transport.requests == []


def test_wrong_method_and_unknown_paths(client: FlaskClient) -> None:
    """405 keeps Allow; unknown paths are 404 in OpenAI's shape under /v1 and the JSON shape elsewhere."""
    wrong = client.put("/chat", headers=bearer())
    assert wrong.status_code == 405 and "POST" in wrong.headers["Allow"]
    assert records(wrong.data)[0]["code"] == "method_not_allowed"
    for path in ("/v1/nothing", "/nothing"):
        missing = client.get(path)
        assert missing.status_code == 404
        assert missing.json["error"]["type"] == "invalid_request_error"
        assert missing.json["error"]["code"] == "not_found"
        assert missing.json["error"]["message"].startswith(f"no such endpoint: {path}; this relay serves ")


def test_security_headers_and_request_id(client: FlaskClient) -> None:
    """Every answer (errors too) carries the security headers; a safe X-Request-ID is echoed, an unsafe one replaced."""
    response = client.post("/chat", json=HELLO, headers={**bearer(), "X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    refused = client.post("/chat", json=HELLO, headers={"X-Request-ID": "bad id;x"})
    for answer in (response, refused):
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
    assert refused.headers["X-Request-ID"] != "bad id;x" and len(refused.headers["X-Request-ID"]) == 32


def test_chat_caps_persona_and_default_model(make_client: Callable[..., FlaskClient], transport: FakeTransport) -> None:
    """/chat: allow-listed sampling fields pass, unknown ones are dropped, max_tokens is capped (and sent when the
    client sets none), SYSTEM_PROMPT is prepended unless the client brings its own, DEFAULT_MODEL is used."""
    client = make_client(max_tokens=100, system_prompt="You are a pirate.", default_model="kimi-k2")
    client.post("/chat", json={**HELLO, "temperature": 0.2, "max_tokens": 5000, "stop": ["\n"], "seed": 7,
                               "foo": "bar"}, headers=bearer())
    sent = transport.requests[-1].body
    assert sent["model"] == "kimi-k2"
    assert sent["messages"] == [{"role": "system", "content": "You are a pirate."}, *HELLO["messages"]]
    assert (sent["temperature"], sent["max_tokens"], sent["stop"], sent["seed"]) == (0.2, 100, ["\n"], 7)
    assert "foo" not in sent
    own_system = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    client.post("/chat", json=own_system, headers=bearer())
    assert transport.requests[-1].body["messages"] == own_system["messages"]
    assert transport.requests[-1].body["max_tokens"] == 100


def test_unreachable_upstream_message(client: FlaskClient, transport: FakeTransport) -> None:
    """A refused connection says the relay could not reach the upstream (a real refused port: test_faults.py)."""
    transport.reply(raise_=httpx2.ConnectError)
    error, _ = records(client.post("/chat", json=HELLO, headers=bearer()).data)
    assert error["code"] == "upstream_unreachable" and "could not reach the upstream" in error["content"]


def test_cors_preflight_and_origins(make_client: Callable[..., FlaskClient]) -> None:
    """A preflight from a listed origin is 204 before auth; an unlisted one is 403; answers to listed origins
    carry Allow-Origin with credentials."""
    client = make_client(cors_origins=("https://app.example.com",))
    preflight = client.options("/chat", headers={"Origin": "https://app.example.com"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert client.options("/chat", headers={"Origin": "https://evil.example"}).status_code == 403
    answer = client.post("/chat", json=HELLO, headers={**bearer(), "Origin": "https://app.example.com"})
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"
    other = client.post("/chat", json=HELLO, headers={**bearer(), "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.parametrize(("origins", "allow_origin", "credentials"), [
    (("*",), "*", None),
    ((), None, None),
    (("https://app.example.com",), "https://app.example.com", "true"),
])
def test_cors_answer_headers(make_client: Callable[..., FlaskClient], origins: tuple[str, ...],
                             allow_origin: str | None, credentials: str | None) -> None:
    """CORS_ORIGINS=* answers any origin with `*` and never with credentials; none set allows no origin."""
    client = make_client(cors_origins=origins)
    origin = "https://app.example.com"
    response = client.post("/chat", json=HELLO, headers={**bearer(), "Origin": origin})
    assert response.headers.get("Access-Control-Allow-Origin") == allow_origin
    assert response.headers.get("Access-Control-Allow-Credentials") == credentials


def test_log_content_opt_in(make_client: Callable[..., FlaskClient], transport: FakeTransport,
                            access_lines: list[str]) -> None:
    """Without LOG_CONTENT no conversation text is logged; with LOG_CONTENT=1 the prompt and answer are, never a key."""
    body = {"messages": [{"role": "user", "content": "loggable question"}]}
    for log_content in (False, True):
        response = make_client(log_content=log_content).post("/chat", json=body, headers=bearer())
        assert response.get_data()
        response.close()
    quiet, loud = access_lines
    assert "loggable" not in quiet and "Hello" not in quiet
    assert 'prompt="loggable question"' in loud and "answer=Hello" in loud
    assert ACCESS_KEY not in loud and UPSTREAM_KEY not in loud


def test_access_log_line_names_the_key_never_shows_it(client: FlaskClient, access_lines: list[str]) -> None:
    """One access line per request when the response closes: status, model, key name, tokens, outcome; no key."""
    response = client.post("/chat", json=HELLO, headers=bearer(SECOND_ACCESS_KEY))
    assert response.get_data()
    response.close()
    [line] = access_lines
    for field in ("method=POST", "path=/chat", "status=200", "model=gpt-4o-mini", "key=key2", "tokens=2",
                  "upstream=fake", "outcome=ok"):
        assert field in line
    assert SECOND_ACCESS_KEY not in line and UPSTREAM_KEY not in line


# ------------------------------------------------------------------ POST /v1/chat/completions


def test_v1_stream_forwards_upstream_chunks_byte_for_byte(client: FlaskClient, transport: FakeTransport) -> None:
    """Streamed chunks reach an OpenAI client exactly as the upstream wrote them, then [DONE]."""
    odd = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"\\u00e9"},"custom":[1, 2]}]}\n\n'
    transport.reply(blocks=[odd, *answer_events([])])
    response = client.post("/v1/chat/completions", json={**HELLO, "stream": True}, headers=bearer())
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.data.startswith(odd)
    assert response.data.endswith(b"data: [DONE]\n\n")


def test_v1_body_passes_upstream_unchanged(make_client: Callable[..., FlaskClient], transport: FakeTransport) -> None:
    """Unknown fields pass through; the relay applies only its own rules (SYSTEM_PROMPT, MAX_TOKENS)."""
    client = make_client(system_prompt="Be brief.", max_tokens=50)
    body = {**HELLO, "stream": True, "max_tokens": 500, "tools": [{"type": "function"}], "new_param": {"a": 1}}
    client.post("/v1/chat/completions", json=body, headers=bearer())
    sent = transport.requests[0].body
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (sent["max_tokens"], sent["tools"], sent["new_param"]) == (50, [{"type": "function"}], {"a": 1})
    # The one addition: usage, which budgets count; the client gets the answer without it.
    assert sent["stream_options"] == {"include_usage": True}


def test_v1_non_streaming_answer_is_the_upstream_json(client: FlaskClient, transport: FakeTransport,
                                                      access_lines: list[str]) -> None:
    """stream=false gets the upstream's JSON as sent; its usage is logged."""
    answer = {"id": "c", "object": "chat.completion", "model": "gpt-4o-mini",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    transport.reply(json=answer)
    response = client.post("/v1/chat/completions", json=HELLO, headers=bearer())
    assert response.status_code == 200 and response.json == answer
    assert "stream" not in transport.requests[0].body
    response.close()
    assert "tokens=1" in access_lines[-1] and "outcome=ok" in access_lines[-1]


@pytest.mark.parametrize("reply", [{"json": {"error": {"message": "no"}}}, {"json": [1, 2]}])
def test_v1_non_streaming_unreadable_answer_is_502(client: FlaskClient, transport: FakeTransport,
                                                   reply: dict[str, Any]) -> None:
    """A 200 whose body is an error object or not an object is a 502 in OpenAI's shape."""
    transport.reply(**reply)
    response = client.post("/v1/chat/completions", json=HELLO, headers=bearer())
    assert response.status_code == 502 and response.json["error"]["code"] == "upstream_error"


def test_v1_failure_mid_stream_is_an_error_event_then_done(client: FlaskClient, transport: FakeTransport) -> None:
    """A broken stream ends with an unnamed OpenAI error event (what the SDKs raise), then [DONE]."""
    transport.reply(blocks=[chunk_event({"content": "a"}), b"data: [oops\n\n"])
    response = client.post("/v1/chat/completions", json={**HELLO, "stream": True}, headers=bearer())
    payloads = sse_payloads(response.data)
    assert json.loads(payloads[-2])["error"]["code"] == "upstream_malformed"
    assert payloads[-1] == "[DONE]"
    assert b"event: error" not in response.data


@pytest.mark.parametrize(("body", "words"), [
    ({}, "'messages' is required"),
    ({"messages": [{"content": "x"}]}, "'messages[0]' must be an object with a string 'role'"),
    ({**HELLO, "stream": "yes"}, "'stream' must be true or false"),
    ({**HELLO, "stream_options": []}, "'stream_options' must be an object"),
    ({**HELLO, "model": ""}, "'model' must be a non-empty string"),
])
def test_v1_malformed_requests_are_400_in_openai_shape(client: FlaskClient, transport: FakeTransport,
                                                       body: dict[str, Any], words: str) -> None:
    """The fields the relay reads are checked; errors are OpenAI-shaped and the upstream is never asked."""
    response = client.post("/v1/chat/completions", json=body, headers=bearer())
    assert response.status_code == 400
    assert response.json["error"]["type"] == "invalid_request_error" and words in response.json["error"]["message"]
    assert transport.requests == []


def test_v1_wrong_key_is_401_in_openai_shape(client: FlaskClient) -> None:
    """A wrong key is OpenAI's authentication_error, which the SDKs raise as AuthenticationError."""
    response = client.post("/v1/chat/completions", json=HELLO, headers=bearer("nope"))
    assert response.status_code == 401
    assert response.json["error"]["type"] == "authentication_error"


def test_v1_models_lists_default_and_exact_allowed_names(make_client: Callable[..., FlaskClient]) -> None:
    """GET /v1/models lists the default model and the allow-list's exact names (globs cannot be listed)."""
    client = make_client(default_model="gpt-4o-mini", allowed_models=("gpt-4o-mini", "gpt-4o*", "kimi-k2"))
    response = client.get("/v1/models", headers=bearer())
    assert response.status_code == 200
    assert [model["id"] for model in response.json["data"]] == ["gpt-4o-mini", "kimi-k2"]
    assert response.json["data"][0]["owned_by"] == "fake"
    assert client.get("/v1/models").status_code == 401


def test_model_outside_the_allow_list_is_400(make_client: Callable[..., FlaskClient], transport: FakeTransport) -> None:
    """ALLOWED_MODELS (globs) lets matching models through and refuses others on every endpoint before any
    upstream call, kind model_not_allowed."""
    client = make_client(allowed_models=("gpt-4o*", "kimi-*"))
    assert client.post("/chat", json={**HELLO, "model": "kimi-k2"}, headers=bearer()).status_code == 200
    assert [seen.body["model"] for seen in transport.requests] == ["kimi-k2"]
    transport.requests.clear()
    chat = client.post("/chat", json={**HELLO, "model": "o1"}, headers=bearer())
    v1 = client.post("/v1/chat/completions", json={**HELLO, "model": "o1"}, headers=bearer())
    sse = client.get(f"/chat?prompt=hi&model=o1&key={ACCESS_KEY}")
    assert (chat.status_code, v1.status_code, sse.status_code) == (400, 400, 400)
    assert records(chat.data)[0]["code"] == v1.json["error"]["code"] == "model_not_allowed"
    assert "'o1'" in records(chat.data)[0]["content"]
    assert transport.requests == []


# ------------------------------------------------------------------ GET /chat (EventSource)


def test_sse_route_streams_chunks_with_event_ids(client: FlaskClient, transport: FakeTransport) -> None:
    """GET /chat answers the upstream's chunks, each with `id: <request id>`, then [DONE]; the key may be a query
    parameter."""
    response = client.get(f"/chat?prompt=hi&key={ACCESS_KEY}", headers={"X-Request-ID": "req-1"})
    assert response.status_code == 200
    assert response.data.count(b"id: req-1\ndata: ") == 3  # the usage-only chunk is the relay's, not the page's
    assert b'"usage"' not in response.data
    assert sse_payloads(response.data)[-1] == "[DONE]"
    assert transport.requests[0].body["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("query", "headers", "status", "code"), [
    ("prompt=hi", {}, 401, "unauthorized"),
    (f"prompt=%20&key={ACCESS_KEY}", {}, 400, "invalid_prompt"),
    (f"prompt=hi&key={ACCESS_KEY}", {"Last-Event-ID": "x"}, 204, None),
])
def test_sse_route_refusals(client: FlaskClient, transport: FakeTransport, query: str, headers: dict[str, str],
                            status: int, code: str | None) -> None:
    """Errors before the stream keep their status with a named error event; a reconnect gets 204; no upstream call."""
    response = client.get(f"/chat?{query}", headers=headers)
    assert response.status_code == status
    if code is not None:
        assert response.data.startswith(b"event: error\ndata: ")
        assert json.loads(sse_payloads(response.data)[0])["error"]["code"] == code
    assert transport.requests == []


def test_sse_route_head_never_asks_the_model(client: FlaskClient, transport: FakeTransport) -> None:
    """HEAD /chat checks key and prompt and answers the headers only."""
    response = client.head(f"/chat?prompt=hi&key={ACCESS_KEY}")
    assert response.status_code == 200 and response.data == b""
    assert transport.requests == []


def test_sse_route_redacts_the_key_and_prompt_in_the_log(client: FlaskClient, access_lines: list[str]) -> None:
    """The access log shows `key=[redacted]` and the prompt's length, never the key or the prompt."""
    response = client.get(f"/chat?prompt=secret+words&key={ACCESS_KEY}")
    assert response.get_data()
    response.close()
    assert ACCESS_KEY not in access_lines[-1] and "secret" not in access_lines[-1]
    assert "key=%5Bredacted%5D" in access_lines[-1] and "prompt=%5B12+chars%5D" in access_lines[-1]


# ------------------------------------------------------------------ limits, in-process


def test_stream_slots_and_token_budget(make_client: Callable[..., FlaskClient], transport: FakeTransport) -> None:
    """MAX_STREAMS_PER_KEY holds a slot while a response is open; DAILY_TOKEN_BUDGET counts reported usage."""
    client = make_client(max_streams_per_key=1, daily_token_budget=3)
    held = client.post("/chat", json=HELLO, headers=bearer(), buffered=False)
    assert held.status_code == 200
    refused = client.post("/chat", json=HELLO, headers=bearer())
    assert refused.status_code == 429 and records(refused.data)[0]["code"] == "too_many_streams"
    assert int(refused.headers["Retry-After"]) >= 1
    held.get_data()
    held.close()  # slot back; usage (3 tokens) counted
    spent = client.post("/chat", json=HELLO, headers=bearer())
    assert spent.status_code == 429 and records(spent.data)[0]["code"] == "token_budget_exhausted"
    assert client.post("/chat", json=HELLO, headers=bearer(SECOND_ACCESS_KEY)).status_code == 200


def test_requests_per_minute(make_client: Callable[..., FlaskClient]) -> None:
    """RATE_LIMIT_PER_MINUTE refuses the key's third request with 429 and Retry-After; other keys go on. (The
    window starts at the key's first request, so no minute boundary can split the count.)"""
    client = make_client(rate_limit_per_minute=2)
    statuses = [client.post("/chat", json=HELLO, headers=bearer()).status_code for _ in range(2)]
    refused = client.post("/chat", json=HELLO, headers=bearer())
    assert statuses == [200, 200] and refused.status_code == 429
    assert "2 per 1 minute" in records(refused.data)[0]["content"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 61  # Flask-Limiter rounds the window's end up a second
    assert client.post("/chat", json=HELLO, headers=bearer(SECOND_ACCESS_KEY)).status_code == 200


# ------------------------------------------------------------------ the chat page's bundle missing


def test_without_the_bundle_the_page_names_the_fix_and_the_api_works(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, transport: FakeTransport) -> None:
    """A relay whose chat page was never built answers `/` with 503 saying what to run, and everything else
    (health, POST /chat, /v1) as usual."""
    import proxy.web

    (tmp_path / "dist").mkdir()  # static/ without a built dist/app.js
    built = proxy.web.create_web_blueprint
    monkeypatch.setattr(proxy.web, "create_web_blueprint", lambda: built(tmp_path))
    client = relay_app(unit_config(), transport).test_client()
    page = client.get("/")
    assert page.status_code == 503 and "make install" in page.text and "npm" in page.text
    assert client.get("/healthz").json == {"status": "ok", "demo": False}
    chat = client.post("/chat", json=HELLO, headers=bearer())
    assert chat.status_code == 200 and records(chat.data)[-1]["done"] is True
    completion = client.post("/v1/chat/completions", json={**HELLO, "stream": True}, headers=bearer())
    assert completion.status_code == 200 and sse_payloads(completion.data)[-1] == "[DONE]"
