"""Several upstreams from UPSTREAMS_FILE: start-up validation, routing by model, and fallover before the first
token (never after), end to end with two fake upstreams behind the relay under gunicorn."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.conftest import ACCESS_KEY, ROOT, SECRETS, RelayProcess, free_port, relay_env, start_relay
from tests.fake_upstream import FakeUpstream

FIRST_KEY = "sk-first-upstream-key-0a1b2c3d"
SECOND_KEY = "sk-second-upstream-key-9f8e7d6c"
HELLO = [{"role": "user", "content": "Hello"}]
ANSWER = "Hello from the fake upstream."


def upstreams_toml(first_url: str, second_url: str) -> str:
    return f"""
# Tried in this order for a model both serve.
[[upstreams]]
name = "first"
base_url = "{first_url}"
api_key_env = "FIRST_KEY"
models = ["gpt-4o-mini", "gpt-4o", "only-first"]

[[upstreams]]
name = "second"
base_url = "{second_url}"
api_key_env = "SECOND_KEY"
models = ["gpt-4o*", "deepseek-*", "deepseek-chat"]
"""


@pytest.fixture(scope="module")
def fake2() -> Iterator[FakeUpstream]:
    """A second fake upstream, configured as the FIRST entry of the upstreams file."""
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake2(fake2: FakeUpstream) -> None:
    fake2.reset()


@pytest.fixture(scope="module")
def pair(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream, fake2: FakeUpstream,
         tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    """The relay with upstreams first = fake2, second = fake."""
    path = tmp_path_factory.mktemp("upstreams") / "upstreams.toml"
    path.write_text(upstreams_toml(fake2.base_url, fake.base_url))
    return relay_factory(UPSTREAMS_FILE=str(path), FIRST_KEY=FIRST_KEY, SECOND_KEY=SECOND_KEY,
                         OPENAI_API_KEY="", KEEPALIVE_SECONDS="0.2")


@pytest.fixture(scope="module")
def dead_first(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
               tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    """The relay with a first upstream that refuses connections (nothing listens on its port)."""
    path = tmp_path_factory.mktemp("upstreams") / "upstreams.toml"
    path.write_text(upstreams_toml(f"http://127.0.0.1:{free_port()}/v1", fake.base_url))
    return relay_factory(UPSTREAMS_FILE=str(path), FIRST_KEY=FIRST_KEY, SECOND_KEY=SECOND_KEY,
                         OPENAI_API_KEY="", KEEPALIVE_SECONDS="0.2")


def access_line(relay: RelayProcess, request_id: str) -> str:
    """The access-log line of one request (written when its response is closed)."""
    marker = f"request_id={request_id}"
    deadline = time.monotonic() + 5
    while True:
        line = next((line for line in relay.log_text().splitlines() if marker in line and "relay.access" in line), "")
        if line or time.monotonic() > deadline:
            return line
        time.sleep(0.02)


def ask(relay: RelayProcess, endpoint: str, model: str = "gpt-4o-mini") -> tuple[int, str, str]:
    """One request on `endpoint`; returns (status, the text a client would show, its access-log line).
    The text is the answer, plus ' !error:<code>' where the client was told of an error."""
    request_id = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {ACCESS_KEY}", "X-Request-ID": request_id}
    if endpoint == "chat":
        response = httpx2.post(f"{relay.url}/chat", json={"model": model, "messages": HELLO}, headers=headers,
                               timeout=20)
        records = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        assert records[-1]["content"] == "[DONE]" and records[-1]["done"] is True
        text = "".join(r["content"] if not r["error"] else f" !error:{r['code']}" for r in records[:-1])
    elif endpoint == "sse":
        response = httpx2.get(f"{relay.url}/chat", params={"prompt": "Hello", "model": model}, headers=headers,
                              timeout=20)
        text = _sse_text(response.content)
    else:
        client = openai.OpenAI(base_url=f"{relay.url}/v1", api_key=ACCESS_KEY, max_retries=0, timeout=20,
                               default_headers={"X-Request-ID": request_id})
        with client:
            try:
                if endpoint == "v1-stream":
                    stream = client.chat.completions.create(model=model, messages=HELLO, stream=True)  # type: ignore[arg-type]
                    text = ""
                    try:
                        for chunk in stream:
                            text += chunk.choices[0].delta.content or ""
                    except openai.APIError as exc:
                        text += f" !error:{(exc.body or {}).get('code')}"  # type: ignore[union-attr]
                else:
                    completion = client.chat.completions.create(model=model, messages=HELLO)  # type: ignore[arg-type]
                    text = completion.choices[0].message.content or ""
                status = 200
            except openai.APIStatusError as exc:
                return exc.status_code, f" !error:{exc.code}", access_line(relay, request_id)
        return status, text, access_line(relay, request_id)
    return response.status_code, text, access_line(relay, request_id)


def _sse_text(body: bytes) -> str:
    text = ""
    for event in body.decode().split("\n\n"):
        lines = event.split("\n")
        data = "".join(line[6:] for line in lines if line.startswith("data: "))
        if not data or data == "[DONE]":
            continue
        if "event: error" in lines:
            text += f" !error:{json.loads(data)['error']['code']}"
        else:
            text += json.loads(data)["choices"][0]["delta"].get("content") or ""
    return text


ENDPOINTS = ["chat", "sse", "v1-stream", "v1-whole"]


# --- fallover at open ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_refused_connection_falls_over(dead_first: RelayProcess, fake: FakeUpstream, endpoint: str) -> None:
    """A first upstream refusing connections is invisible: the second answers, the log says so."""
    status, text, line = ask(dead_first, endpoint)
    assert (status, text) == (200, ANSWER)
    assert "upstream=second" in line and "fallbacks=1" in line and "outcome=ok" in line
    assert fake.requests[-1].headers["authorization"] == f"Bearer {SECOND_KEY}"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("behaviour", [{"status": 503}, {"status": 429, "retry_after": "20"}, {"status": 500}],
                         ids=["503", "429", "500"])
def test_upstream_errors_at_open_fall_over(pair: RelayProcess, fake: FakeUpstream, fake2: FakeUpstream,
                                           endpoint: str, behaviour: dict[str, Any]) -> None:
    """A first upstream answering 503, 429 or 500 is invisible: the second answers."""
    fake2.behave(**behaviour)
    status, text, line = ask(pair, endpoint)
    assert (status, text) == (200, ANSWER)
    assert "upstream=second" in line and "fallbacks=1" in line
    assert len(fake2.requests) == 1 and fake2.requests[0].headers["authorization"] == f"Bearer {FIRST_KEY}"


def test_first_upstream_answers_when_healthy(pair: RelayProcess, fake: FakeUpstream, fake2: FakeUpstream) -> None:
    """With both healthy, the first upstream in the file serving the model answers; the second is untouched."""
    status, text, line = ask(pair, "v1-stream")
    assert (status, text) == (200, ANSWER)
    assert "upstream=first" in line and "fallbacks=0" in line
    assert not fake.requests and len(fake2.requests) == 1


def test_models_route_to_the_upstreams_serving_them(pair: RelayProcess, fake: FakeUpstream,
                                                    fake2: FakeUpstream) -> None:
    """A model only the second serves goes straight there; one only the first serves never falls over; one
    no upstream serves is a 400."""
    status, _text, line = ask(pair, "chat", model="deepseek-chat")
    assert status == 200 and "upstream=second" in line and "fallbacks=0" in line and not fake2.requests
    fake2.behave(status=503)
    status, text, _line = ask(pair, "v1-whole", model="only-first")
    assert (status, text) == (502, " !error:upstream_error")
    assert not any(request.json.get("model") == "only-first" for request in fake.requests)
    status, text, _line = ask(pair, "v1-whole", model="claude-3")
    assert (status, text) == (400, " !error:model_not_served")


def test_all_upstreams_failing_is_the_last_error(pair: RelayProcess, fake: FakeUpstream, fake2: FakeUpstream) -> None:
    """When every upstream serving the model fails at open, the client gets the last one's error."""
    fake2.behave(status=503)
    fake.behave(status=429, retry_after="9")
    response = httpx2.post(f"{pair.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO},
                           headers=pair.headers(), timeout=20)
    assert response.status_code == 429 and response.headers["retry-after"] == "9"
    assert response.json()["error"]["code"] == "upstream_rate_limited"


# --- fallover after the headers, before the first token ----------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["chat", "sse", "v1-stream"])
@pytest.mark.parametrize("behaviour", [
    {"disconnect_after": 0, "headers_delay": 0.5},
    {"reset_after": 0},
    {"malformed_after": 0},
    {"raw_body": 'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'},
    {"reasoning": (), "tokens": [], "raw_body": ": just a comment, then the connection ends\n\n"},
], ids=["disconnect", "reset", "malformed", "error-event", "empty-body"])
def test_failure_after_headers_before_first_token_falls_over(pair: RelayProcess, fake: FakeUpstream,
                                                             fake2: FakeUpstream, endpoint: str,
                                                             behaviour: dict[str, Any]) -> None:
    """An upstream that fails after its headers but before any token is replaced by the next one: the client
    sees the second's answer exactly once, and nothing of the first (no role chunk, no error)."""
    fake2.behave(**behaviour)
    status, text, line = ask(pair, endpoint)
    assert (status, text) == (200, ANSWER)
    assert "upstream=second" in line and "fallbacks=1" in line and "outcome=ok" in line
    assert len(fake2.requests) == 1 and len(fake.requests) == 1


def test_fallover_stream_carries_only_the_second_upstream(pair: RelayProcess, fake2: FakeUpstream) -> None:
    """Byte level: while the first upstream fails the client gets only keep-alives; every chunk it gets is
    the second upstream's (one chunk id, one role chunk)."""
    fake2.behave(disconnect_after=0, headers_delay=0.1, first_token_delay=0.6)
    response = httpx2.post(f"{pair.url}/v1/chat/completions", headers=pair.headers(), timeout=20,
                           json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True})
    chunks = [json.loads(event[6:]) for event in response.text.split("\n\n")
              if event.startswith("data: {")]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert sum(1 for chunk in chunks if chunk["choices"][0]["delta"].get("role")) == 1
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == ANSWER
    assert response.text.endswith("data: [DONE]\n\n")


def test_both_failing_after_headers_ends_with_an_error(pair: RelayProcess, fake: FakeUpstream,
                                                       fake2: FakeUpstream) -> None:
    """When the second upstream fails too, the client gets one error and the proper end, nothing more."""
    fake2.behave(disconnect_after=0)
    fake.behave(disconnect_after=0)
    status, text, line = ask(pair, "chat")
    assert (status, text) == (200, " !error:upstream_disconnected")
    assert "upstream=second" in line and "fallbacks=1" in line


def test_client_leaving_during_fallover_closes_the_next_upstream(pair: RelayProcess, fake: FakeUpstream,
                                                                fake2: FakeUpstream) -> None:
    """A client that leaves while the relay is still opening the next upstream leaves nothing behind: that
    upstream's stream is closed as soon as it opens, unread."""
    fake2.behave(disconnect_after=0)
    fake.behave(headers_delay=1.5, n_tokens=50, token_interval=0.1)
    with httpx2.stream("POST", f"{pair.url}/chat", json={"messages": HELLO}, headers=pair.headers(),
                       timeout=20) as response:
        assert response.status_code == 200
        assert fake.wait_for(lambda: len(fake.requests) == 1, timeout=5), "the fall-over began"
    assert fake.wait_for(lambda: fake.streams_closed, timeout=6)
    assert fake.streams_closed[0].completed is False and fake.streams_closed[0].tokens_sent < 50


# --- never after the first token ----------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["chat", "sse", "v1-stream"])
def test_no_fallover_after_the_first_token(pair: RelayProcess, fake: FakeUpstream, fake2: FakeUpstream,
                                           endpoint: str) -> None:
    """Once a token has been sent, a failing upstream ends the answer with an error; the next upstream is
    never asked, so the client never sees text twice."""
    fake2.behave(disconnect_after=2)
    status, text, line = ask(pair, endpoint)
    assert (status, text) == (200, "Hello from !error:upstream_disconnected")
    assert "upstream=first" in line and "fallbacks=0" in line
    assert not fake.requests


def test_reasoning_counts_as_the_first_token(pair: RelayProcess, fake: FakeUpstream, fake2: FakeUpstream) -> None:
    """A reasoning delta commits the stream too (the /v1 client has seen it): no fallover after it."""
    thinking = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": {"content": None, "reasoning_content": "Hmm"}}]}
    fake2.behave(raw_body=f"data: {json.dumps(thinking)}\n\n")  # then the body ends without [DONE]
    status, text, _line = ask(pair, "v1-stream")
    assert (status, text) == (200, " !error:upstream_disconnected")
    assert not fake.requests


# --- the models list and the keys -------------------------------------------------------------------------------

def test_models_list_covers_the_upstreams(pair: RelayProcess) -> None:
    """GET /v1/models lists the exact model names of every upstream once, with the upstream serving it."""
    response = httpx2.get(f"{pair.url}/v1/models", headers=pair.headers())
    listed = [(model["id"], model["owned_by"]) for model in response.json()["data"]]
    assert listed == [("gpt-4o-mini", "first"), ("gpt-4o", "first"), ("only-first", "first"),
                      ("deepseek-chat", "second")]


def test_upstream_keys_never_logged(pair: RelayProcess, fake: FakeUpstream, fake2: FakeUpstream) -> None:
    """The start-up line names the upstreams; neither the access keys nor any upstream key from the file
    appears in the relay's log."""
    fake2.behave(status=401, error_message=f"Incorrect API key provided: {FIRST_KEY}")
    ask(pair, "chat")
    log = pair.log_text()
    assert f"first {fake2.base_url}, second {fake.base_url}" in log
    for secret in (*SECRETS, FIRST_KEY, SECOND_KEY):
        assert secret not in log


# --- start-up validation ------------------------------------------------------------------------------------------

def config_error(tmp_path: Path, toml: str, **env: str) -> str:
    from proxy.config import Config, ConfigError

    path = tmp_path / "upstreams.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"AUTHORIZATION_KEY": ACCESS_KEY, "UPSTREAMS_FILE": str(path), "K": "sk-x", **env})
    message = str(caught.value)
    assert str(path) in message and "sk-x" not in message
    return message


ENTRY = 'name = "kimi"\nbase_url = "https://api.moonshot.cn/v1"\napi_key_env = "K"\nmodels = ["kimi-*"]\n'


@pytest.mark.parametrize(("toml", "words"), [
    ("[[upstreams]\nname=", "not valid TOML"),
    ("", "expected one or more [[upstreams]] tables"),
    ("upstreams = 3", "expected one or more [[upstreams]] tables"),
    ("[server]\nport = 1\n", "unknown top-level key(s) server"),
    ("[[upstreams]]\n" + ENTRY.replace('name = "kimi"\n', ""), "upstream #1: 'name' must be a non-empty string"),
    ("[[upstreams]]\n" + ENTRY.replace("https://api.moonshot.cn/v1", "api.moonshot.cn"),
     "upstream #1 ('kimi'): 'base_url' must be an http(s) URL"),
    ("[[upstreams]]\n" + ENTRY.replace('"K"', '"MISSING_KEY"'),
     "upstream #1 ('kimi'): MISSING_KEY (named by 'api_key_env') is missing or empty"),
    ("[[upstreams]]\n" + ENTRY.replace('api_key_env = "K"', 'api_key = "sk-x"'),
     "upstream #1 ('kimi'): unknown field(s) api_key"),
    ("[[upstreams]]\n" + ENTRY.replace('["kimi-*"]', "[]"), "upstream #1 ('kimi'): 'models' must be a non-empty"),
    ("[[upstreams]]\n" + ENTRY + "[[upstreams]]\n" + ENTRY, "upstream #2: the name 'kimi' is used twice"),
], ids=["bad-toml", "empty", "not-tables", "unknown-top-level", "no-name", "bad-url", "key-env-missing",
        "key-inline", "no-models", "duplicate-name"])
def test_bad_upstreams_file_refuses_to_start(tmp_path: Path, toml: str, words: str) -> None:
    """Every mistake in the upstreams file stops start-up with a message naming the file and the entry,
    never showing a key."""
    assert words in config_error(tmp_path, toml, DEFAULT_MODEL="kimi-k2")


def test_missing_file_and_unserved_default_model(tmp_path: Path) -> None:
    """A file that cannot be read, or a DEFAULT_MODEL no upstream serves, also stops start-up."""
    from proxy.config import Config, ConfigError

    with pytest.raises(ConfigError, match="UPSTREAMS_FILE: cannot read"):
        Config.from_env({"AUTHORIZATION_KEY": ACCESS_KEY, "UPSTREAMS_FILE": str(tmp_path / "nope.toml")})
    assert "DEFAULT_MODEL: 'gpt-4o-mini' is not served" in config_error(
        tmp_path, "[[upstreams]]\n" + ENTRY, DEFAULT_MODEL="gpt-4o-mini")


def test_valid_file_needs_no_openai_key(tmp_path: Path) -> None:
    """With an upstreams file, OPENAI_API_KEY is not required and the specs keep their keys out of repr."""
    from proxy.config import Config

    path = tmp_path / "upstreams.toml"
    path.write_text("[[upstreams]]\n" + ENTRY)
    config = Config.from_env({"AUTHORIZATION_KEY": ACCESS_KEY, "UPSTREAMS_FILE": str(path), "K": "sk-secret-1",
                              "DEFAULT_MODEL": "kimi-k2"})
    assert [(spec.name, spec.models, spec.api_key) for spec in config.upstreams] == [
        ("kimi", ("kimi-*",), "sk-secret-1")]
    assert "sk-secret-1" not in repr(config.upstreams)


def test_gunicorn_refuses_a_bad_file_in_one_line(tmp_path: Path, fake: FakeUpstream) -> None:
    """Under gunicorn, a broken upstreams file stops the relay before any worker starts, naming the file."""
    path = tmp_path / "upstreams.toml"
    path.write_text("[[upstreams]]\n" + ENTRY.replace('"K"', '"NOT_SET"'))
    relay = start_relay(tmp_path, relay_env(fake.base_url, UPSTREAMS_FILE=str(path)), wait=False)
    assert relay.process.wait(20) != 0
    assert f"relay: refusing to start: UPSTREAMS_FILE {path}: upstream #1 ('kimi')" in relay.log_text()


def test_shipped_example_file_is_valid_and_is_the_readme_one() -> None:
    """deploy/upstreams.example.toml passes start-up validation and is the file the README shows."""
    from proxy.config import Config

    example = ROOT / "deploy" / "upstreams.example.toml"
    env = {name: f"sk-{name.lower()}" for name in
           ("MOONSHOT_API_KEY", "MOONSHOT_INTL_API_KEY", "DEEPSEEK_API_KEY", "OPENAI_API_KEY")}
    config = Config.from_env({"AUTHORIZATION_KEY": ACCESS_KEY, "UPSTREAMS_FILE": str(example),
                              "DEFAULT_MODEL": "deepseek-chat", **env})
    assert [(spec.name, spec.api) for spec in config.upstreams] == [
        ("kimi", "openai"), ("kimi-intl", "openai"), ("deepseek", "openai"), ("openai", "openai"),
        ("kimi-anthropic", "anthropic"), ("deepseek-anthropic", "anthropic")]
    assert f"```toml\n{example.read_text()}```" in (ROOT / "README.md").read_text()
