"""Restarts under real gunicorn: SIGTERM ends open streams properly, a SIGHUP reload keeps them running; for
chat's streams and for the forwarded ones (`/v1/responses`, Anthropic's `/v1/messages`) alike."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from tests.conftest import RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.hardening import (
    FORWARDED_STREAM_ENDPOINTS,
    Outcome,
    StreamEndpoint,
    fake_says,
    forwarding_settings,
    forwarding_upstreams,
)


def fake_directive(**behaviour: Any) -> dict[str, Any]:
    """A /chat body whose last user message tells the fake upstream how to answer this one request."""
    return {"messages": [{"role": "user", "content": "#fake " + json.dumps(behaviour)}]}


class StreamInBackground:
    """Reads one /chat stream on a thread, recording each record and when it arrived."""

    def __init__(self, relay: RelayProcess, body: dict[str, Any]) -> None:
        self.records: list[tuple[float, dict[str, Any]]] = []
        self.error: BaseException | None = None
        self.first_record = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(relay, body), daemon=True)
        self._thread.start()

    def _read(self, relay: RelayProcess, body: dict[str, Any]) -> None:
        try:
            with httpx2.stream("POST", f"{relay.url}/chat", json=body, headers=relay.headers(),
                               timeout=60) as response:
                for line in response.iter_lines():
                    if line.strip():
                        self.records.append((time.monotonic(), json.loads(line)))
                        self.first_record.set()
        except BaseException as exc:  # reported to the test, which fails on it
            self.error = exc
            self.first_record.set()

    def result(self, timeout: float = 30) -> list[dict[str, Any]]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream never ended"
        assert self.error is None, f"the stream was cut: {self.error!r}"
        return [record for _, record in self.records]


def test_sigterm_ends_open_streams_with_an_error_record_then_done(
        relay_factory: Callable[..., RelayProcess], fake: FakeUpstream) -> None:
    """On SIGTERM a stream that fits the grace period finishes; a longer one ends with an error and [DONE]."""
    relay = relay_factory(fresh=True, GUNICORN_GRACEFUL_TIMEOUT="5")
    long = StreamInBackground(relay, fake_directive(n_tokens=300, token_interval=0.1))
    short = StreamInBackground(relay, fake_directive(n_tokens=10, token_interval=0.1))
    assert long.first_record.wait(10) and short.first_record.wait(10)
    stopped_at = time.monotonic()
    relay.process.send_signal(signal.SIGTERM)

    short_records = short.result()
    assert "".join(r["content"] for r in short_records[:-1]) == "".join(f" tok{i}" for i in range(10))
    assert short_records[-1]["done"] is True and not any(r["error"] for r in short_records)

    long_records = long.result()
    assert long_records[-1] == {"done": True, "error": False, "content": "[DONE]"}
    assert long_records[-2]["error"] is True and long_records[-2]["code"] == "server_restarting"
    assert "restarting" in long_records[-2]["content"]
    assert 5 < len(long_records) < 300
    ended_at = long.records[-1][0]
    assert ended_at - stopped_at < 5, "ended before gunicorn's graceful timeout would have cut it"
    assert relay.process.wait(15) == 0
    assert fake.wait_for(lambda: len(fake.streams_closed) == 2, timeout=5), "upstream requests closed too"


def test_reload_never_drops_a_stream_in_flight(relay_factory: Callable[..., RelayProcess],
                                               fake: FakeUpstream) -> None:
    """SIGHUP starts new workers; streams on the old ones run to their natural end, new requests are served."""
    relay = relay_factory(fresh=True, GUNICORN_GRACEFUL_TIMEOUT="20")
    streams = [StreamInBackground(relay, fake_directive(n_tokens=25, token_interval=0.1)) for _ in range(3)]
    assert all(stream.first_record.wait(10) for stream in streams)
    relay.process.send_signal(signal.SIGHUP)
    expected = "".join(f" tok{i}" for i in range(25))
    for stream in streams:
        records = stream.result()
        assert "".join(r["content"] for r in records[:-1]) == expected
        assert records[-1]["done"] is True and not any(r["error"] for r in records)
    after = httpx2.post(f"{relay.url}/chat", json=fake_directive(n_tokens=2), headers=relay.headers(), timeout=20)
    assert after.status_code == 200 and after.text.count('" tok') == 2
    assert relay.process.poll() is None, "the master kept running through the reload"
    assert "Worker graceful timeout" not in relay.log_text()


# --- forwarded streams (/v1/responses, Anthropic's /v1/messages) ------------------------------------------------

class ForwardedInBackground:
    """Reads one forwarded stream on a thread; `first_bytes` is set once the answer has begun."""

    def __init__(self, relay: RelayProcess, endpoint: StreamEndpoint, behaviour: dict[str, Any]) -> None:
        self.endpoint = endpoint
        self.raw = b""
        self.error: BaseException | None = None
        self.first_bytes = threading.Event()
        self._outcome: Outcome | None = None
        self._thread = threading.Thread(target=self._read, args=(relay, behaviour), daemon=True)
        self._thread.start()

    def _read(self, relay: RelayProcess, behaviour: dict[str, Any]) -> None:
        started = time.monotonic()
        try:
            with httpx2.stream(self.endpoint.method, relay.url + self.endpoint.path, headers=relay.headers(),
                               timeout=60, **self.endpoint.build(fake_says(behaviour))) as response:
                for block in response.iter_bytes():
                    self.raw += block
                    self.first_bytes.set()
            self._outcome = Outcome(response.status_code, response.headers, self.raw, time.monotonic() - started)
            self.endpoint.parse(self._outcome)
        except BaseException as exc:  # reported to the test, which fails on it
            self.error = exc
            self.first_bytes.set()

    def result(self, timeout: float = 30) -> Outcome:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self.endpoint}: the stream never ended"
        assert self.error is None and self._outcome is not None, f"{self.endpoint}: cut: {self.error!r}"
        return self._outcome


@pytest.fixture(scope="module")
def forwarding_file(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("restarts") / "upstreams.toml"
    path.write_text(forwarding_upstreams([fake.base_url], [f"http://{fake.host}:{fake.port}"]))
    return str(path)


def test_sigterm_lets_forwarded_streams_finish_or_end_them_properly(
        relay_factory: Callable[..., RelayProcess], forwarding_file: str) -> None:
    """On SIGTERM a forwarded stream that fits the grace period finishes whole; a longer one ends, before
    gunicorn would cut it, with its protocol's error event saying the relay is restarting."""
    relay = relay_factory(fresh=True, GUNICORN_GRACEFUL_TIMEOUT="5", **forwarding_settings(forwarding_file))
    long = [ForwardedInBackground(relay, e, {"n_tokens": 300, "token_interval": 0.1})
            for e in FORWARDED_STREAM_ENDPOINTS]
    short = [ForwardedInBackground(relay, e, {"n_tokens": 10, "token_interval": 0.1})
             for e in FORWARDED_STREAM_ENDPOINTS]
    assert all(stream.first_bytes.wait(10) for stream in long + short)
    stopped_at = time.monotonic()
    relay.process.send_signal(signal.SIGTERM)
    for stream in short:
        outcome = stream.result()
        assert outcome.text == "".join(f" tok{i}" for i in range(10)) and outcome.errors == []
        assert outcome.ends == 1 and outcome.last_is_end
    for stream in long:
        outcome = stream.result()
        assert time.monotonic() - stopped_at < 5, "ended before gunicorn's graceful timeout would have cut it"
        assert [error["code"] for error in outcome.errors] == [stream.endpoint.code_of("server_restarting")]
        assert "restarting" in outcome.errors[0]["message"]
        assert outcome.ends == 1 and outcome.last_is_end and 5 < len(outcome.contents) < 300
    assert relay.process.wait(15) == 0


def test_reload_never_drops_a_forwarded_stream(relay_factory: Callable[..., RelayProcess],
                                               forwarding_file: str) -> None:
    """SIGHUP: forwarded streams on the old worker run to their natural end; the new worker serves them."""
    relay = relay_factory(fresh=True, GUNICORN_GRACEFUL_TIMEOUT="20", **forwarding_settings(forwarding_file))
    streams = [ForwardedInBackground(relay, e, {"n_tokens": 25, "token_interval": 0.1})
               for e in FORWARDED_STREAM_ENDPOINTS]
    assert all(stream.first_bytes.wait(10) for stream in streams)
    relay.process.send_signal(signal.SIGHUP)
    for stream in streams:
        outcome = stream.result()
        assert outcome.text == "".join(f" tok{i}" for i in range(25)) and outcome.errors == []
        assert outcome.ends == 1 and outcome.last_is_end
    for endpoint in FORWARDED_STREAM_ENDPOINTS:
        assert endpoint.request(relay, fake_says({"n_tokens": 2})).text == " tok0 tok1"
    assert relay.process.poll() is None, "the master kept running through the reload"
    assert "Worker graceful timeout" not in relay.log_text()
