"""The relay keeps its upstream connections alive between answers (issue 6: profiled hot path)."""

from __future__ import annotations

import json
import time

import httpx2

from tests.conftest import RelayProcess
from tests.fake_upstream import FakeUpstream

HELLO = {"messages": [{"role": "user", "content": "hi"}]}


def _chat(relay: RelayProcess) -> str:
    response = httpx2.post(f"{relay.url}/chat", json=HELLO, headers=relay.headers(), timeout=10)
    assert response.status_code == 200
    return response.text


def test_sequential_answers_reuse_one_upstream_connection(relay: RelayProcess, fake: FakeUpstream) -> None:
    """Finished answers leave their upstream connection in the pool: no new TCP connect per request."""
    fake.behave(tokens=["a", "b"])
    _chat(relay)
    opened = fake.connections_opened
    for _ in range(5):
        _chat(relay)
    assert fake.connections_opened == opened
    # The client has its end before the relay finishes reading the body, so the fake may record the last one later.
    assert fake.wait_for(lambda: len(fake.streams_closed) == 6, timeout=3)
    assert all(s.completed for s in fake.streams_closed)


def test_upstream_body_left_open_after_done_does_not_hold_the_answer(relay: RelayProcess,
                                                                    fake: FakeUpstream) -> None:
    """An upstream that never ends its body after [DONE] costs the client at most half a second, and
    its connection is closed rather than pooled."""
    fake.behave(tokens=["a"], stall_after_done=True)
    started = time.monotonic()
    text = _chat(relay)
    assert time.monotonic() - started < 1.5
    records = [json.loads(line) for line in text.splitlines() if line]
    assert records[0]["content"] == "a" and records[-1]["content"] == "[DONE]" and records[-1]["done"]
    assert fake.wait_for(lambda: len(fake.streams_closed) == 1, timeout=3)
    assert not fake.streams_closed[0].completed
