"""Restarts under real gunicorn: SIGTERM ends open streams properly, a SIGHUP reload keeps them running."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2

from tests.conftest import RelayProcess
from tests.fake_upstream import FakeUpstream


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
