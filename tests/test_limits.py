"""Named keys (KEYS_FILE) and their limits, through the relay under gunicorn; shared limits through a real
redis-server (system package) with two relay instances."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import simple_websocket

from proxy.config import Config, ConfigError
from tests.conftest import ACCESS_KEY, UPSTREAM_KEY, RelayProcess, relay_env, start_relay
from tests.fake_upstream import FakeUpstream
from tests.servers import Redis, find_program, running_redis, wait_until

HELLO = {"messages": [{"role": "user", "content": "Hello"}]}
KEYS = {
    "alice": "alice-key-0c6f1e9a7b2d",
    "bob": "bob-key-5e8d2a4c9f13",
    "carol": "carol-key-7a1b3c5d9e2f",
    "dave": "dave-key-2f4e6a8c0b1d",
    "erin": "erin-key-9d7c5b3a1e0f",
}
KEYS_TOML = f"""
[keys.alice]
key = "{KEYS["alice"]}"

[keys.bob]
key = "{KEYS["bob"]}"
requests_per_minute = 2

[keys.carol]
key = "{KEYS["carol"]}"
max_streams = 1

[keys.dave]
key = "{KEYS["dave"]}"
daily_tokens = 3

[keys.erin]
key = "{KEYS["erin"]}"
models = ["gpt-4o-mini"]
"""


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def chat(relay: RelayProcess, name: str, body: dict[str, Any] = HELLO) -> httpx2.Response:
    return httpx2.post(f"{relay.url}/chat", json=body, headers=bearer(name), timeout=20)


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def assert_refused(response: httpx2.Response, kind: str) -> dict[str, Any]:
    """A 429 in /chat's NDJSON shape: one error record with `kind`, then [DONE]; Retry-After set."""
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    error, done = records(response.text)
    assert error["error"] is True and error["code"] == kind and error["content"]
    assert done == {"done": True, "error": False, "content": "[DONE]"}
    return error


def assert_two_per_minute(sends: list[Callable[[], httpx2.Response]]) -> None:
    """bob's limit of 2 requests a minute, taking turns over `sends`: the third request is refused, and so is
    the next one on every other send. No wall-clock minute can split the count: Flask-Limiter's fixed window
    (limits' memory and Redis storages) starts at the key's first request and ends a minute later."""
    statuses = [sends[index % len(sends)]().status_code for index in range(2)]
    refused = sends[2 % len(sends)]()
    assert statuses == [200, 200], statuses
    error = assert_refused(refused, "rate_limited")
    assert "2 per 1 minute" in error["content"]
    for send in sends:
        assert_refused(send(), "rate_limited")


@pytest.fixture(scope="module")
def keys_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(KEYS_TOML)
    return path


@pytest.fixture(scope="module")
def named(relay_factory: Callable[..., RelayProcess], keys_path: Path) -> RelayProcess:
    """A relay with the keys file above and a global cap of 3 open streams."""
    return relay_factory(KEYS_FILE=str(keys_path), MAX_OPEN_STREAMS="3", KEEPALIVE_SECONDS="0.3")


class OpenStream:
    """A /chat stream held open (the fake upstream is slow) until `close()`."""

    def __init__(self, relay: RelayProcess, headers: dict[str, str]) -> None:
        body = {"messages": [{"role": "user", "content": '#fake {"first_token_delay": 30}'}]}
        self.client = httpx2.Client(timeout=30)
        self.response = self.client.send(
            self.client.build_request("POST", f"{relay.url}/chat", json=body, headers=headers), stream=True
        )
        assert self.response.status_code == 200

    def close(self) -> None:
        self.response.close()
        self.client.close()


def test_named_keys_authenticate_and_logs_show_only_the_name(named: RelayProcess, fake: FakeUpstream) -> None:
    """A key from KEYS_FILE works alongside AUTHORIZATION_KEY's; the access log names it, never shows it."""
    assert chat(named, "alice").status_code == 200
    assert httpx2.post(f"{named.url}/chat", json=HELLO, headers=named.headers(), timeout=20).status_code == 200
    assert wait_until(lambda: "key=alice" in named.log_text() and "key=key1" in named.log_text())
    log = named.log_text()
    assert KEYS["alice"] not in log and ACCESS_KEY not in log and UPSTREAM_KEY not in log


def test_requests_per_minute_per_key(named: RelayProcess, fake: FakeUpstream) -> None:
    """A key's requests_per_minute is enforced with 429, Retry-After and /chat's error shape; others are unaffected."""
    assert_two_per_minute([lambda: chat(named, "bob")])
    assert chat(named, "alice").status_code == 200
    assert wait_until(lambda: any("status=429" in line and "key=bob" in line
                                  for line in named.log_text().splitlines())), "a refusal is logged under the key name"


def test_concurrent_streams_per_key(named: RelayProcess, fake: FakeUpstream) -> None:
    """A key's max_streams counts open streams; the slot comes back when the stream ends."""
    first = OpenStream(named, bearer("carol"))
    try:
        assert_refused(chat(named, "carol"), "too_many_streams")
    finally:
        first.close()
    wait_for_free_slot(named, bearer("carol"))


def wait_for_free_slot(relay: RelayProcess, headers: dict[str, str]) -> None:
    """The relay notices a departed client within a second or two and gives its slot back."""
    deadline = time.monotonic() + 5
    while httpx2.post(f"{relay.url}/chat", json=HELLO, headers=headers, timeout=20).status_code == 429:
        assert time.monotonic() < deadline, "the slot of a closed stream was never given back"
        time.sleep(0.2)


def test_global_cap_on_open_streams(named: RelayProcess, fake: FakeUpstream) -> None:
    """MAX_OPEN_STREAMS caps open streams across all keys."""
    streams = [OpenStream(named, bearer(name)) for name in ("alice", "alice", "erin")]
    try:
        error = assert_refused(
            httpx2.post(f"{named.url}/chat", json=HELLO, headers=named.headers(), timeout=20), "too_many_streams"
        )
        assert "this relay's limit of 3" in error["content"]
    finally:
        for stream in streams:
            stream.close()
    wait_for_free_slot(named, named.headers())


def test_page_and_static_files_take_no_stream_slot(named: RelayProcess, fake: FakeUpstream) -> None:
    """Issue 12 point 2's attack under gunicorn: twenty requests for icon.svg and the page with a 1-stream key
    (and with others) lock nobody out: that key streams, every relay-wide slot is free, and each file request
    has its access line."""
    for name in ("carol", "alice"):
        for _ in range(10):
            for path in ("/static/web/icon.svg", "/"):
                assert httpx2.get(f"{named.url}{path}", headers=bearer(name), timeout=20).status_code == 200
    assert chat(named, "carol").status_code == 200
    streams = [OpenStream(named, bearer(name)) for name in ("carol", "alice", "erin")]  # MAX_OPEN_STREAMS=3
    for stream in streams:
        stream.close()
    wait_for_free_slot(named, named.headers())
    assert wait_until(lambda: named.log_text().count("path=/static/web/icon.svg status=200") >= 20)


def test_daily_token_budget_counts_reported_usage(named: RelayProcess, fake: FakeUpstream) -> None:
    """daily_tokens counts the usage the upstream reports; once spent, 429 until 00:00 UTC."""
    fake.behave(tokens=["one", " two", " three"])
    ok = chat(named, "dave")
    assert ok.status_code == 200
    assert records(ok.text)[-1]["usage"]["total_tokens"] >= 3
    # The tokens are counted when the response closes, a moment after the client has its last byte.
    assert wait_until(lambda: chat(named, "dave").status_code == 429), "the budget was never used up"
    refused = chat(named, "dave")
    error = assert_refused(refused, "token_budget_exhausted")
    assert "3 tokens" in error["content"]
    assert int(refused.headers["retry-after"]) <= 86400


def test_per_key_model_list(named: RelayProcess, fake: FakeUpstream) -> None:
    """A key's own `models` list refuses other models with 403, in /chat's shape."""
    assert chat(named, "erin", {**HELLO, "model": "gpt-4o-mini"}).status_code == 200
    refused = chat(named, "erin", {**HELLO, "model": "gpt-4o"})
    assert refused.status_code == 403
    assert records(refused.text)[0]["code"] == "model_not_allowed"


def test_keys_file_reloads_without_restart(relay_factory: Callable[..., RelayProcess], tmp_path: Path,
                                           fake: FakeUpstream) -> None:
    """Adding and removing a key in KEYS_FILE takes effect within seconds; a broken edit keeps the old keys."""
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.alice]\nkey = "{KEYS["alice"]}"\n')
    relay = relay_factory(fresh=True, KEYS_FILE=str(path))
    assert chat(relay, "alice").status_code == 200
    assert chat(relay, "bob").status_code == 401

    replacement = tmp_path / "keys.new"
    replacement.write_text(f'[keys.bob]\nkey = "{KEYS["bob"]}"\n')
    os.replace(replacement, path)  # how config tools swap files in
    deadline = time.monotonic() + 5
    while chat(relay, "bob").status_code != 200:
        assert time.monotonic() < deadline, "the added key was never accepted"
        time.sleep(0.3)
    assert chat(relay, "alice").status_code == 401
    assert relay.process.poll() is None

    path.write_text('[keys.bob]\nkey = "unterminated\n')
    assert wait_until(lambda: chat(relay, "bob").status_code == 200 and "keys file not reloaded" in relay.log_text())
    assert chat(relay, "bob").status_code == 200


@pytest.mark.parametrize(("setting", "value"), [
    ("RATE_LIMIT_PER_MINUTE", "lots"),
    ("MAX_STREAMS_PER_KEY", "0"),
    ("TRUSTED_PROXIES", "127.0.0.1,nginx"),
    ("LOG_FORMAT", "xml"),
    ("RATE_LIMIT_STORAGE_URI", "memcached://:s3cret-password@10.0.0.5"),
    ("KEYS_FILE", "/nonexistent/keys.toml"),
])
def test_bad_limit_settings_name_the_variable(setting: str, value: str) -> None:
    """A malformed limits/proxy/log setting stops start-up naming it; a storage URL's password is never shown."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"AUTHORIZATION_KEY": ACCESS_KEY, "OPENAI_API_KEY": UPSTREAM_KEY, setting: value})
    assert str(caught.value).startswith(setting)
    assert "s3cret-password" not in str(caught.value) and ACCESS_KEY not in str(caught.value)


def test_keys_file_alone_is_enough(keys_path: Path) -> None:
    """With KEYS_FILE, AUTHORIZATION_KEY may be empty; names come from the file, limits parse as written."""
    config = Config.from_env({"KEYS_FILE": str(keys_path), "OPENAI_API_KEY": UPSTREAM_KEY})
    assert [policy.name for policy in config.keyring.policies] == ["alice", "bob", "carol", "dave", "erin"]
    bob = config.keyring.identify(KEYS["bob"])
    assert bob is not None and bob.requests_per_minute == 2 and bob.max_streams is None
    assert config.keyring.identify("bob") is None
    assert KEYS["bob"] not in repr(bob) and KEYS["bob"] not in repr(config)


def test_start_up_says_when_memory_limits_are_per_worker(relay_factory: Callable[..., RelayProcess],
                                                         keys_path: Path) -> None:
    """With limits, in-memory counting and several workers, the start-up log says rates and stream slots are
    per worker, and budgets shared by the workers in DATA_DIR/limits.db."""
    relay = relay_factory(KEYS_FILE=str(keys_path), GUNICORN_WORKERS="2")
    assert "stream slots count in each of the 2 worker processes" in relay.log_text()
    assert "budgets are shared by the workers in DATA_DIR/limits.db" in relay.log_text()
    assert "RATE_LIMIT_STORAGE_URI=redis://" in relay.log_text()


def test_unusable_keys_file_refuses_start(tmp_path: Path, fake: FakeUpstream) -> None:
    """A keys file that does not parse stops start-up with one line naming KEYS_FILE, no key shown."""
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.alice]\nkey = "{KEYS["alice"]}"\nrequests_per_minute = "ten"\n')
    relay = start_relay(tmp_path, relay_env(fake.base_url, KEYS_FILE=str(path)), wait=False)
    assert relay.process.wait(20) != 0
    log = relay.log_text()
    assert "KEYS_FILE" in log and "requests_per_minute" in log
    assert KEYS["alice"] not in log


# ---------------------------------------------------------------- Redis


needs_redis = pytest.mark.skipif(find_program("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    with running_redis(tmp_path / "redis") as redis:
        yield redis


def redis_relays(tmp_path: Path, fake: FakeUpstream, redis: Redis, keys_path: Path) -> list[RelayProcess]:
    return [
        start_relay(tmp_path / f"relay{index}", relay_env(
            fake.base_url, KEYS_FILE=str(keys_path), RATE_LIMIT_STORAGE_URI=redis.url, KEEPALIVE_SECONDS="0.3",
        ))
        for index in range(2)
    ]


@needs_redis
def test_two_instances_share_limits_through_redis(tmp_path: Path, fake: FakeUpstream, redis_server: Redis,
                                                  keys_path: Path) -> None:
    """Two relay instances on one Redis share a key's per-minute count and its open-stream slots."""
    first, second = redis_relays(tmp_path, fake, redis_server, keys_path)
    try:
        assert_two_per_minute([lambda: chat(first, "bob"), lambda: chat(second, "bob")])

        stream = OpenStream(first, bearer("carol"))
        try:
            assert_refused(chat(second, "carol"), "too_many_streams")
        finally:
            stream.close()
    finally:
        first.stop()
        second.stop()


@needs_redis
def test_redis_restart_does_not_take_the_relay_down(tmp_path: Path, fake: FakeUpstream, redis_server: Redis,
                                                    keys_path: Path) -> None:
    """With Redis gone the relay keeps answering promptly (limits per process); when Redis is back it is used again."""
    first, second = redis_relays(tmp_path, fake, redis_server, keys_path)
    try:
        assert chat(first, "alice").status_code == 200
        redis_server.stop()
        started = time.monotonic()
        for relay in (first, second, first):
            response = chat(relay, "alice")
            assert response.status_code == 200
            assert records(response.text)[-1]["content"] == "[DONE]"
        assert time.monotonic() - started < 6, "requests waited on a dead Redis"
        # Limits still hold while Redis is down, counted in each process.
        assert_two_per_minute([lambda: chat(first, "bob")])
        stream = OpenStream(first, bearer("carol"))
        try:
            assert_refused(chat(first, "carol"), "too_many_streams")
        finally:
            stream.close()
        assert "rate limit storage unreachable" in first.log_text().lower()

        redis_server.start()
        # Past the retry interval (proxy/limits.py's REDIS_RETRY_SECONDS, 5 s; its logic is tested in-process in
        # tests/unit/test_limits_rules.py) the next counter call (dave's token budget) finds Redis again.
        assert wait_until(lambda: chat(first, "dave").status_code in (200, 429)
                          and "rate limit storage reachable again" in first.log_text(), timeout=15, interval=0.25)
        threads = [threading.Thread(target=chat, args=(relay, "alice")) for relay in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # The counters are back in Redis: an open stream on one instance blocks the other.
        stream = OpenStream(first, bearer("carol"))
        try:
            assert_refused(chat(second, "carol"), "too_many_streams")
        finally:
            stream.close()
        assert first.process.poll() is None and second.process.poll() is None
    finally:
        first.stop()
        second.stop()


# ---------------------------------------------------------------- WebSocket messages, shared through Redis


def ws_answer(ws: simple_websocket.Client, content: str) -> dict[str, Any] | None:
    """Send one /ws message; the error record of its answer, or None when it was answered."""
    ws.send(json.dumps({"content": content}))
    answer: list[dict[str, Any]] = []
    while not answer or not answer[-1].get("done"):
        raw = ws.receive(timeout=10)
        assert raw is not None, f"no record within 10 s; got {answer}"
        answer.append(json.loads(raw))
    return next((record for record in answer if record.get("error")), None)


@needs_redis
def test_websocket_messages_share_the_redis_counts_with_http(tmp_path: Path, fake: FakeUpstream,
                                                             redis_server: Redis, keys_path: Path) -> None:
    """Over Redis a /ws message on one instance and HTTP requests on the other use one per-minute count, and an
    open socket holds its key's stream slot for every instance."""
    first, second = redis_relays(tmp_path, fake, redis_server, keys_path)
    ws_base = first.url.replace("http://", "ws://", 1)
    try:
        bob = simple_websocket.Client.connect(f"{ws_base}/ws?key={KEYS['bob']}")  # the handshake: 1 of 2
        try:
            assert ws_answer(bob, "hello") is None  # 2 of 2
            assert_refused(chat(second, "bob"), "rate_limited")
            refused = ws_answer(bob, "again")
            assert refused is not None and refused["code"] == "rate_limited"
        finally:
            bob.close()
        carol = simple_websocket.Client.connect(f"{ws_base}/ws?key={KEYS['carol']}")
        try:
            assert_refused(chat(second, "carol"), "too_many_streams")
        finally:
            carol.close()
    finally:
        first.stop()
        second.stop()
