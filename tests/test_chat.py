"""POST /chat, the old Node relay's protocol, end to end: client -> gunicorn relay -> fake upstream (real HTTP)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from tests.conftest import ACCESS_KEY, SECOND_ACCESS_KEY, SECRETS, UPSTREAM_KEY, RelayProcess
from tests.fake_upstream import FakeUpstream

HELLO = {"messages": [{"role": "user", "content": "Hello"}]}
DONE = {"done": True, "error": False, "content": "[DONE]"}


def post(relay: RelayProcess, body: Any = HELLO, headers: dict[str, str] | None = None,
         timeout: float = 20) -> httpx2.Response:
    return httpx2.post(f"{relay.url}/chat", json=body, headers=relay.headers() if headers is None else headers,
                       timeout=timeout)


def records(text: str) -> list[dict[str, Any]]:
    """Parse NDJSON the way the old relay's README client does: split lines, skip blank ones."""
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def timed_lines(relay: RelayProcess, body: Any = HELLO) -> list[tuple[float, bytes]]:
    """Each raw line of the response with the seconds since the request was sent."""
    out: list[tuple[float, bytes]] = []
    start = time.monotonic()
    with httpx2.stream("POST", f"{relay.url}/chat", json=body, headers=relay.headers(), timeout=30) as response:
        assert response.status_code == 200
        pending = b""
        for block in response.iter_raw():
            pending += block
            *lines, pending = pending.split(b"\n")
            out += [(time.monotonic() - start, line) for line in lines]
    return out


def assert_error_then_done(text: str, code: str) -> dict[str, Any]:
    recs = records(text)
    assert recs[-1] == DONE
    assert [r for r in recs if r.get("done")] == [DONE], "exactly one [DONE] record, last"
    error = recs[-2]
    assert error["error"] is True and error["done"] is False and error["code"] == code
    assert error["content"], "the error record says what went wrong"
    return error


# --- the record stream ---------------------------------------------------------------------------------------

def test_records_byte_for_byte(relay: RelayProcess, fake: FakeUpstream) -> None:
    """The NDJSON body is exactly the old relay's records, then [DONE] with finish_reason and usage."""
    fake.behave(tokens=["Hello", " world", "!"])
    response = post(relay)
    assert response.status_code == 200
    assert response.content == (
        b'{"done":false,"error":false,"content":"Hello"}\n'
        b'{"done":false,"error":false,"content":" world"}\n'
        b'{"done":false,"error":false,"content":"!"}\n'
        b'{"done":true,"error":false,"content":"[DONE]","finish_reason":"stop",'
        b'"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}\n'
    )


def test_stream_headers(relay: RelayProcess, fake: FakeUpstream) -> None:
    """The stream is NDJSON in UTF-8, never cached, never buffered by nginx."""
    response = post(relay)
    assert response.headers["content-type"] == "application/x-ndjson; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-request-id"]


def test_non_ascii_split_across_network_chunks(relay: RelayProcess, fake: FakeUpstream) -> None:
    """Chinese and emoji arrive intact even when the upstream splits a character's bytes across writes."""
    fake.behave(tokens=["你好", "，世界", " 🌍🎉", " done"], split_utf8=True)
    recs = records(post(relay).text)
    assert "".join(r["content"] for r in recs if not r["done"]) == "你好，世界 🌍🎉 done"


def test_lines_split_across_network_chunks(relay: RelayProcess, fake: FakeUpstream) -> None:
    """SSE lines cut at arbitrary byte offsets by the network are reassembled, not dropped."""
    fake.behave(n_tokens=12, split_lines=True)
    recs = records(post(relay).text)
    assert "".join(r["content"] for r in recs if not r["done"]) == "".join(f" tok{i}" for i in range(12))


def test_each_record_is_flushed_as_it_arrives(relay: RelayProcess, fake: FakeUpstream) -> None:
    """With 500 ms between upstream tokens, the first record reaches the client long before the last exists."""
    fake.behave(tokens=["a", "b", "c", "d"], token_interval=0.5)
    lines = [(at, line) for at, line in timed_lines(relay) if line]
    first_at, last_at = lines[0][0], lines[-1][0]
    # The first record is out well before the upstream writes the last token (1.5 s in), whatever the load.
    assert first_at < 1.0, f"first record after {first_at:.2f}s"
    assert last_at - first_at > 1.3, "records were spread over time, not buffered to the end"


def test_keepalive_blank_lines_during_slow_first_token(relay_factory: Callable[..., RelayProcess],
                                                       fake: FakeUpstream) -> None:
    """While the model is silent, blank lines go out every KEEPALIVE_SECONDS; old clients skip them."""
    relay = relay_factory(KEEPALIVE_SECONDS="0.25", UPSTREAM_TIMEOUT="0.5")
    fake.behave(tokens=["late"], first_token_delay=1.3)
    lines = timed_lines(relay)
    blanks_before_first = [at for at, line in lines if not line and at < 1.3]
    assert len(blanks_before_first) >= 3, lines
    assert next(json.loads(line) for _, line in lines if line)["content"] == "late"


def test_reasoning_counts_as_progress_and_upstream_timeout_only_covers_headers(
        relay_factory: Callable[..., RelayProcess], fake: FakeUpstream) -> None:
    """A model that thinks longer than UPSTREAM_TIMEOUT and FIRST_TOKEN_TIMEOUT is not cut while it reasons."""
    relay = relay_factory(UPSTREAM_TIMEOUT="0.5", FIRST_TOKEN_TIMEOUT="0.8", IDLE_TIMEOUT="0.8",
                          KEEPALIVE_SECONDS="0.3")
    fake.behave(reasoning=["Let", " me", " think", " hard"], token_interval=0.4, tokens=["Answer"])
    recs = records(post(relay, {**HELLO, "include_reasoning": True}).text)
    assert [r.get("reasoning") for r in recs if "reasoning" in r] == ["Let", " me", " think", " hard"]
    assert all(r["content"] == "" for r in recs if "reasoning" in r)
    assert [r["content"] for r in recs if not r["done"] and "reasoning" not in r] == ["Answer"]
    assert recs[-1]["done"] is True


def test_reasoning_left_out_by_default(relay: RelayProcess, fake: FakeUpstream) -> None:
    """Without include_reasoning, old clients see only content records."""
    fake.behave(reasoning=["hmm"], tokens=["Yes"])
    recs = records(post(relay).text)
    assert [r["content"] for r in recs] == ["Yes", "[DONE]"]
    assert not any("reasoning" in r for r in recs)


# --- timers ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "behaviour", "code", "bound"), [
    ({"FIRST_TOKEN_TIMEOUT": "0.6"}, {"first_token_delay": 30}, "upstream_timeout", 3.0),
    ({"IDLE_TIMEOUT": "0.6"}, {"tokens": ["a", "b"], "token_interval": 30}, "upstream_timeout", 3.0),
    ({"MAX_STREAM_SECONDS": "1"}, {"n_tokens": 100, "token_interval": 0.1}, "stream_time_limit", 3.5),
], ids=["first-token", "idle", "max-stream"])
def test_stream_timers_end_the_stream_properly(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
                                               settings: dict[str, str], behaviour: dict[str, Any], code: str,
                                               bound: float) -> None:
    """Each timer ends a stuck answer with an error record and [DONE] in bounded time, and closes the upstream."""
    relay = relay_factory(KEEPALIVE_SECONDS="0.3", **settings)
    fake.behave(**behaviour)
    start = time.monotonic()
    response = post(relay)
    assert time.monotonic() - start < bound
    assert response.status_code == 200
    assert_error_then_done(response.text, code)
    assert fake.wait_for(lambda: len(fake.streams_closed) == 1, timeout=2)


# --- cancellation ------------------------------------------------------------------------------------------

def _leave_mid_stream(relay: RelayProcess, read_records: int) -> float:
    """Send a request on a raw socket, read some records, then hang up; return when we hung up."""
    body = json.dumps(HELLO).encode()
    host, port = relay.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /chat HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
                     + f"Authorization: {ACCESS_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b'"content"') < read_records:
            received += sock.recv(65536)
        return time.monotonic()


def test_client_leaving_mid_stream_closes_the_upstream(relay: RelayProcess, fake: FakeUpstream) -> None:
    """When the client goes away between tokens, the upstream sees its connection closed within 2 s."""
    fake.behave(n_tokens=500, token_interval=0.1)
    left_at = _leave_mid_stream(relay, read_records=3)
    assert fake.wait_for(lambda: fake.streams_closed, timeout=5)
    closed = fake.streams_closed[0]
    assert not closed.completed
    assert closed.at - left_at < 2.0
    assert closed.tokens_sent < 100


def test_client_leaving_while_model_is_silent_closes_the_upstream(relay: RelayProcess, fake: FakeUpstream) -> None:
    """A client that leaves during a long silence (thinking model) is noticed without waiting for a token."""
    fake.behave(tokens=["a"], token_interval=60, first_token_delay=0)
    left_at = _leave_mid_stream(relay, read_records=1)
    assert fake.wait_for(lambda: fake.streams_closed, timeout=5)
    assert fake.streams_closed[0].at - left_at < 2.0


# --- failures after the stream began -------------------------------------------------------------------------

@pytest.mark.parametrize(("behaviour", "code"), [
    ({"n_tokens": 5, "disconnect_after": 2}, "upstream_disconnected"),
    ({"n_tokens": 5, "malformed_after": 2}, "upstream_malformed"),
    ({"raw_body": 'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'}, "upstream_error"),
], ids=["disconnect", "malformed-line", "error-inside-200"])
def test_upstream_failure_mid_stream_ends_with_error_then_done(relay: RelayProcess, fake: FakeUpstream,
                                                               behaviour: dict[str, Any], code: str) -> None:
    """An upstream that breaks mid-answer gives the client an error record and the proper end, never a hang."""
    fake.behave(**behaviour)
    response = post(relay)
    assert response.status_code == 200
    assert_error_then_done(response.text, code)
    assert post(relay).status_code == 200, "the relay is healthy for the next request"


# --- failures before the stream began ----------------------------------------------------------------------

@pytest.mark.parametrize(("behaviour", "status", "code", "words"), [
    ({"status": 401, "error_message": f"Incorrect API key provided: {UPSTREAM_KEY}"}, 502, "upstream_auth",
     "upstream rejected this server's API key"),
    ({"status": 403, "error_message": "forbidden"}, 502, "upstream_auth", "upstream rejected this server's API key"),
    ({"status": 404, "error_message": "The model does not exist"}, 400, "model_not_found", "gpt-4o-mini"),
    ({"status": 429, "error_message": "Rate limit reached", "retry_after": "7"}, 429, "upstream_rate_limited",
     "rate limiting"),
    ({"status": 400, "error_message": "This model's maximum context length is 8192 tokens",
      "error_code": "context_length_exceeded"}, 400, "context_too_long", "too long for model 'gpt-4o-mini'"),
    ({"status": 400, "error_message": "Invalid request: Your request exceeded model token limit: 8192"}, 400,
     "context_too_long", "too long"),
    ({"status": 500, "error_message": "boom"}, 502, "upstream_error", "HTTP 500"),
    ({"status": 503, "error_content_type": "text/html", "error_raw_body": "<html>bad gateway</html>"}, 502,
     "upstream_error", "HTTP 503"),
    ({"headers_delay": 5}, 504, "upstream_timeout", "did not answer in time"),
], ids=["401", "403", "404", "429", "context-openai", "context-kimi", "500", "503-html", "timeout"])
def test_upstream_errors_before_first_token_map_to_statuses(
        relay_factory: Callable[..., RelayProcess], fake: FakeUpstream, behaviour: dict[str, Any], status: int,
        code: str, words: str) -> None:
    """Each upstream failure gets a real status and a message a person can act on, in NDJSON, never the key."""
    relay = relay_factory(UPSTREAM_TIMEOUT="1")
    fake.behave(**behaviour)
    response = post(relay)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/x-ndjson")
    error = assert_error_then_done(response.text, code)
    assert words in error["content"]
    assert UPSTREAM_KEY not in response.text
    if status == 429:
        assert response.headers["retry-after"] == "7"


# Refused connections at the upstream: tests/test_faults.py (every endpoint); the allow-list, MAX_TOKENS,
# SYSTEM_PROMPT, CORS_ORIGINS=* and LOG_CONTENT=1 are settings of the app alone: tests/unit/test_app.py.

# --- access ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [ACCESS_KEY, f"Bearer {ACCESS_KEY}", f"bearer  {SECOND_ACCESS_KEY}"],
                         ids=["raw", "bearer", "second-key"])
def test_accepted_key_forms(relay: RelayProcess, fake: FakeUpstream, authorization: str) -> None:
    """Old clients' raw `Authorization: <key>` and `Bearer <key>` both work, for every configured key."""
    assert post(relay, headers={"Authorization": authorization}).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "wrong"}, {"Authorization": "Bearer"},
                                     {"Authorization": f"Bearer {ACCESS_KEY}x"},
                                     {"Authorization": ACCESS_KEY[:-1]}],
                         ids=["missing", "wrong", "empty-bearer", "longer", "prefix"])
def test_missing_and_wrong_keys_get_the_same_401(relay: RelayProcess, fake: FakeUpstream,
                                                 headers: dict[str, str]) -> None:
    """Every refused key gets the identical answer, which tells nothing about the keys that exist."""
    response = post(relay, headers=headers)
    assert response.status_code == 401
    reference = post(relay, headers={})
    assert response.content == reference.content
    assert fake.requests == [], "no upstream call without a valid key"


# --- bad requests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "field"), [
    (b"not json", "not valid JSON"),
    (b"", "empty"),
    (b"[1, 2]", "JSON object"),
    (b"{}", "'messages' is required"),
    (b'{"messages": []}', "'messages' must be a non-empty array"),
    (b'{"messages": "hi"}', "'messages' must be a non-empty array"),
    (b'{"messages": [1]}', "'messages[0]'"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "'messages[0].role'"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "'messages[0].content'"),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": 3}', "'model'"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "'temperature'"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', "'temperature' must be between"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "'max_tokens'"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "'max_tokens' must be at least 1"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": [1]}', "'stop'"),
    (b'{"messages": [{"role": "user", "content": "x"}], "include_reasoning": "yes"}', "'include_reasoning'"),
])
def test_bad_bodies_get_400_naming_the_problem(relay: RelayProcess, fake: FakeUpstream, raw: bytes,
                                               field: str) -> None:
    """Malformed bodies get 400 and an NDJSON error record that says which field is wrong and why."""
    response = httpx2.post(f"{relay.url}/chat", content=raw, headers=relay.headers(), timeout=10)
    assert response.status_code == 400
    assert field in assert_error_then_done(response.text, records(response.text)[0]["code"])["content"]
    assert fake.requests == []


def test_body_over_limit_with_content_length_is_413(relay_factory: Callable[..., RelayProcess]) -> None:
    """A body over MAX_BODY_BYTES is refused with 413 from its Content-Length, without reading it all."""
    relay = relay_factory(MAX_BODY_BYTES="2000")
    body = {"messages": [{"role": "user", "content": "x" * 5000}]}
    response = post(relay, body)
    assert response.status_code == 413
    assert_error_then_done(response.text, "body_too_large")


def test_chunked_body_over_limit_is_413(relay_factory: Callable[..., RelayProcess]) -> None:
    """A chunked body with no Content-Length is cut off at MAX_BODY_BYTES too."""
    relay = relay_factory(MAX_BODY_BYTES="2000")

    def body() -> Any:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}]}'

    response = httpx2.post(f"{relay.url}/chat", content=body(), headers=relay.headers(), timeout=10)
    assert response.status_code == 413
    assert_error_then_done(response.text, "body_too_large")


def test_wrong_method_and_unknown_path(relay: RelayProcess) -> None:
    """405 for a wrong method on /chat (NDJSON, with Allow), 404 as JSON for an unknown path, never HTML."""
    response = httpx2.put(f"{relay.url}/chat", headers=relay.headers(), timeout=5)
    assert response.status_code == 405
    assert "POST" in response.headers["allow"]
    assert_error_then_done(response.text, "method_not_allowed")
    missing = httpx2.get(f"{relay.url}/no/such/page", timeout=5)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert "<html" not in missing.text.lower()


# --- request shaping ---------------------------------------------------------------------------------------

def test_content_parts_and_tool_messages_pass_upstream_as_is(relay: RelayProcess, fake: FakeUpstream) -> None:
    """Arrays of content parts, tool messages and reasoning_content on assistant turns reach the upstream intact."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "reasoning_content": "thinking...",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    assert post(relay, {"messages": messages}).status_code == 200
    assert fake.requests[-1].json["messages"] == messages


# --- CORS --------------------------------------------------------------------------------------------------

def test_preflight_from_listed_origin_is_answered_before_auth(relay: RelayProcess) -> None:
    """A listed origin's preflight (no key, as browsers send it) gets the credentialed CORS answer."""
    response = httpx2.options(f"{relay.url}/chat", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"}, timeout=5)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"
    assert response.headers["access-control-allow-credentials"] == "true"
    allowed = response.headers["access-control-allow-headers"].lower()  # header names are case-insensitive
    assert "authorization" in allowed and "content-type" in allowed


def test_unlisted_origin_gets_no_cors_headers(relay: RelayProcess, fake: FakeUpstream) -> None:
    """An origin not in CORS_ORIGINS is never reflected: its preflight fails and responses carry no CORS."""
    preflight = httpx2.options(f"{relay.url}/chat", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}, timeout=5)
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers
    response = post(relay, headers={**relay.headers(), "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    listed = post(relay, headers={**relay.headers(), "Origin": "https://app.example.com"})
    assert listed.headers["access-control-allow-origin"] == "https://app.example.com"


def test_no_cors_by_default(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream) -> None:
    """With no CORS_ORIGINS, no origin is allowed."""
    relay = relay_factory()
    response = post(relay, headers={**relay.headers(), "Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in response.headers


# --- operations --------------------------------------------------------------------------------------------

def test_healthz_is_open_and_says_nothing_secret(relay: RelayProcess) -> None:
    """GET /healthz needs no key and reveals no configuration."""
    response = httpx2.get(f"{relay.url}/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "demo": False}


def test_access_log_line_and_no_key_anywhere(relay: RelayProcess, fake: FakeUpstream) -> None:
    """One access-log line per request with status, timing, model, tokens; no key and no content in any line."""
    fake.behave(tokens=["secret", " answer"])
    response = post(relay, {"messages": [{"role": "user", "content": "my private question"}]},
                    headers={"Authorization": ACCESS_KEY, "X-Request-ID": "support-ticket-42"})
    assert response.headers["x-request-id"] == "support-ticket-42"
    post(relay, headers={"Authorization": "Bearer " + UPSTREAM_KEY})  # someone tries the upstream key
    assert relay.process.poll() is None
    deadline = time.monotonic() + 3
    while "support-ticket-42" not in relay.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = relay.log_text()
    line = next(line for line in log.splitlines() if "request_id=support-ticket-42" in line)
    for field in ("method=POST", "path=/chat", "status=200", "model=gpt-4o-mini", "tokens=2", "key=key1",
                  "client=127.0.0.1", "ttft_ms=", "duration_ms=", "outcome=ok"):
        assert field in line
    for secret in SECRETS:
        assert secret not in log
    assert "my private question" not in log and "secret answer" not in log
    assert "…" + ACCESS_KEY[-4:] in log, "the start-up line may show a key's last 4 characters"


@pytest.mark.serial  # 150 client threads in this process: alone, not beside other test files
def test_many_concurrent_streams_on_one_worker(relay_factory: Callable[..., RelayProcess],
                                               fake: FakeUpstream) -> None:
    """One gevent worker holds 150 slow streams at once, each complete and in order (the thousands are in
    test_capacity.py; here the clients are threads sharing the test process with the fake upstream)."""
    import concurrent.futures

    relay = relay_factory()
    fake.behave(n_tokens=4, token_interval=0.5)
    expected = "".join(f" tok{i}" for i in range(4))

    def one() -> str:
        recs = records(post(relay, timeout=30).text)
        return "".join(r["content"] for r in recs if not r["done"])

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(150) as pool:
        results = list(pool.map(lambda _: one(), range(150)))
    broken = [(index, text) for index, text in enumerate(results) if text != expected]
    warnings = [line for line in relay.log_text().splitlines() if " WARNING " in line or " ERROR " in line]
    assert not broken, f"{len(broken)} streams broken, e.g. {broken[:3]}; relay warnings: {warnings[-10:]}"
    # One after another they would take 150 x 2 s; concurrently a few seconds (more on a loaded machine).
    assert time.monotonic() - start < 60, "streams ran concurrently, not one after another"
