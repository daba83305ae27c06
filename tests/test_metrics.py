"""GET /metrics (Prometheus text, summed over gunicorn's workers) and LOG_FORMAT=json access logs, through
the relay under real gunicorn."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SECRETS, RelayProcess, free_port
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until

HELLO = {"messages": [{"role": "user", "content": "Hello"}]}
METRICS_KEY = "metrics-key-for-tests-8b1f"
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Scrape:
    """Every sample of a scrape, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scrape: Scrape, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(relay: RelayProcess, headers: dict[str, str] | None = None) -> Scrape:
    response = httpx2.get(f"{relay.url}/metrics", headers=headers or {}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert not any(secret in response.text for secret in SECRETS)
    return samples(response.text)


@pytest.fixture(scope="module")
def two_workers(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    return relay_factory(GUNICORN_WORKERS="2", KEEPALIVE_SECONDS="0.3", LOG_FORMAT="json")


def test_metrics_add_up_across_workers(two_workers: RelayProcess, fake: FakeUpstream) -> None:
    """Requests, tokens, time to first token and duration are counted once each, whichever of the two
    workers served the request or answers the scrape."""
    before = scrape(two_workers)
    fake.behave(tokens=["a", "b", "c"])
    for _ in range(8):  # a new connection each: gunicorn spreads them over both workers
        response = httpx2.post(f"{two_workers.url}/chat", json=HELLO, headers=two_workers.headers(), timeout=20)
        assert response.status_code == 200
    # Recorded when each response closes, a moment after the client has its last byte.
    assert wait_until(lambda: value(scrape(two_workers), "relay_stream_duration_seconds_count", route="/chat")
                      - value(before, "relay_stream_duration_seconds_count", route="/chat") >= 8)
    for _ in range(4):  # every scrape, whichever worker answers it, sees the same sums
        after = scrape(two_workers)
        assert value(after, "relay_requests_total", route="/chat", status="200", key="key1") - value(
            before, "relay_requests_total", route="/chat", status="200", key="key1") == 8
        assert value(after, "relay_tokens_total", key="key1", kind="completion") - value(
            before, "relay_tokens_total", key="key1", kind="completion") == 8 * 3
        for histogram in ("relay_time_to_first_token_seconds_count", "relay_stream_duration_seconds_count"):
            assert value(after, histogram, route="/chat") - value(before, histogram, route="/chat") == 8


def test_open_streams_gauge(two_workers: RelayProcess, fake: FakeUpstream) -> None:
    """relay_open_streams counts a stream while it is open and drops when it ends."""
    body = {"messages": [{"role": "user", "content": '#fake {"first_token_delay": 30}'}]}
    with httpx2.Client(timeout=30) as client:
        response = client.send(client.build_request("POST", f"{two_workers.url}/chat", json=body,
                                                    headers=two_workers.headers()), stream=True)
        assert response.status_code == 200
        assert value(scrape(two_workers), "relay_open_streams") == 1
        response.close()
    deadline = time.monotonic() + 5
    while value(scrape(two_workers), "relay_open_streams") != 0:
        assert time.monotonic() < deadline, "the gauge never came back to 0"
        time.sleep(0.2)


def test_upstream_errors_by_kind_and_upstream(two_workers: RelayProcess, fake: FakeUpstream) -> None:
    """An upstream failing before the first token and one breaking mid-stream are both counted by kind."""
    before = scrape(two_workers)
    fake.behave(status=500)
    assert httpx2.post(f"{two_workers.url}/chat", json=HELLO, headers=two_workers.headers(),
                       timeout=20).status_code == 502
    fake.behave(n_tokens=5, disconnect_after=2)
    assert httpx2.post(f"{two_workers.url}/chat", json=HELLO, headers=two_workers.headers(),
                       timeout=20).status_code == 200
    assert wait_until(lambda: value(scrape(two_workers), "relay_upstream_errors_total", kind="upstream_disconnected",
                                    upstream="default")
                      > value(before, "relay_upstream_errors_total", kind="upstream_disconnected", upstream="default"))
    after = scrape(two_workers)
    for kind in ("upstream_error", "upstream_disconnected"):
        assert value(after, "relay_upstream_errors_total", kind=kind, upstream="default") - value(
            before, "relay_upstream_errors_total", kind=kind, upstream="default") == 1, kind
    assert value(after, "relay_requests_total", route="/chat", status="502", key="key1") >= 1


def test_fallbacks_and_the_failures_behind_them(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    """A first upstream refusing connections counts as its own upstream error, and the fall-over to the
    second counts under the second, even though the client got a normal answer."""
    path = tmp_path_factory.mktemp("upstreams") / "upstreams.toml"
    path.write_text(f"""
[[upstreams]]
name = "first"
base_url = "http://127.0.0.1:{free_port()}/v1"
api_key_env = "FIRST_KEY"
models = ["*"]

[[upstreams]]
name = "second"
base_url = "{fake.base_url}"
api_key_env = "SECOND_KEY"
models = ["*"]
""")
    relay = relay_factory(UPSTREAMS_FILE=str(path), FIRST_KEY="sk-first-for-tests-0a1b2c",
                          SECOND_KEY="sk-second-for-tests-3d4e5f", OPENAI_API_KEY="")
    assert httpx2.post(f"{relay.url}/chat", json=HELLO, headers=relay.headers(), timeout=20).status_code == 200
    assert wait_until(lambda: value(scrape(relay), "relay_fallbacks_total", upstream="second") >= 1)
    after = scrape(relay)
    assert value(after, "relay_fallbacks_total", upstream="second") == 1
    assert value(after, "relay_upstream_errors_total", kind="upstream_unreachable", upstream="first") == 1
    assert value(after, "relay_requests_total", route="/chat", status="200", key="key1") == 1


def test_json_access_log(two_workers: RelayProcess, fake: FakeUpstream) -> None:
    """LOG_FORMAT=json writes each access line as one JSON object with the key's name, never a key."""
    httpx2.post(f"{two_workers.url}/chat", json=HELLO, headers={**two_workers.headers(), "X-Request-ID": "json-1"},
                timeout=20)
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in two_workers.log_text().splitlines()
                 if line.startswith("{") and '"json-1"' in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (entry,) = lines
    assert entry["logger"] == "relay.access" and entry["status"] == 200 and entry["key"] == "key1"
    assert isinstance(entry["duration_ms"], float) and entry["outcome"] == "ok" and entry["tokens"] > 0
    assert not any(secret in two_workers.log_text() for secret in SECRETS)


def test_metrics_only_from_this_host_without_a_key(two_workers: RelayProcess) -> None:
    """Without METRICS_KEY, /metrics answers a direct loopback peer but not a request a proxy forwarded."""
    assert httpx2.get(f"{two_workers.url}/metrics", timeout=10).status_code == 200
    forwarded = httpx2.get(f"{two_workers.url}/metrics", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
    assert forwarded.status_code == 403
    assert forwarded.json()["error"]["code"] == "metrics_forbidden"


def test_metrics_key(relay_factory: Callable[..., RelayProcess]) -> None:
    """With METRICS_KEY set, /metrics needs 'Authorization: Bearer <METRICS_KEY>', even from loopback."""
    relay = relay_factory(METRICS_KEY=METRICS_KEY)
    assert httpx2.get(f"{relay.url}/metrics", timeout=10).status_code == 401
    assert httpx2.get(f"{relay.url}/metrics", headers=relay.headers(), timeout=10).status_code == 401
    scrape(relay, {"Authorization": f"Bearer {METRICS_KEY}"})
    assert METRICS_KEY not in relay.log_text()
