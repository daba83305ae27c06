"""The pump's own reading of an upstream body (proxy/upstream_body.py) against the fake upstream's real HTTP:
a timed-out wait loses nothing, a clean end puts the connection back in the pool, a broken one does not."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from proxy import upstream_body
from proxy.upstream import Candidates, SseParser, Upstream, UpstreamStream, with_cheap_idle_check
from proxy.upstream_body import BrokenBody, DirectBody
from tests.fake_upstream import FakeUpstream


@pytest.fixture
def upstream(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> Iterator[Upstream]:
    # The relay reads bodies itself only under gevent; a plain socket with a timeout behaves the same here.
    monkeypatch.setattr(upstream_body, "gevent_sockets", lambda: True)
    client = openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)
    with_cheap_idle_check(client._client)
    yield Upstream("fake", client)
    client.close()


def open_body(upstream: Upstream) -> tuple[UpstreamStream, DirectBody]:
    stream = Candidates([upstream], {"model": "gpt-4o-mini", "messages": []}, 5, 30).open_stream()
    body = stream.direct_body()
    assert body is not None, "a chunked body on httpx2's own pool should be read directly"
    return stream, body


def read_all(body: DirectBody, timeout: float = 5) -> tuple[bytes, int]:
    """The whole payload, and how many reads timed out on the way."""
    payload, timeouts, deadline = b"", 0, time.monotonic() + timeout
    while not body.ended and time.monotonic() < deadline:
        data = body.read(0.05)
        if data is None:
            timeouts += 1
        else:
            payload += data
    return payload, timeouts


def test_silence_between_tokens_times_out_and_loses_nothing(upstream: Upstream, fake: FakeUpstream) -> None:
    """A read that waits past its timeout returns None and the body goes on intact: the pump's one greenlet
    can wake for its timers during upstream silence."""
    fake.behave(tokens=["a", "b", "c"], token_interval=0.2)
    _, body = open_body(upstream)
    payload, timeouts = read_all(body)
    assert timeouts >= 3
    chunks, end = SseParser(upstream.redact).feed(payload)
    assert [chunk.content for chunk in chunks if chunk.content] == ["a", "b", "c"]
    assert end is not None
    body.finish(0.5, 64 * 1024)


def test_a_clean_end_returns_the_connection_to_the_pool(upstream: Upstream, fake: FakeUpstream) -> None:
    """Bodies read here to their end leave the connection reusable: one TCP connection for many answers."""
    fake.behave(tokens=["a", "b"])
    opened = fake.connections_opened
    for _ in range(4):
        _, body = open_body(upstream)
        read_all(body)
        body.finish(0.5, 64 * 1024)
    assert fake.connections_opened == opened + 1
    assert upstream_body.open_bodies() == 0


def test_a_body_closed_early_closes_its_connection(upstream: Upstream, fake: FakeUpstream) -> None:
    """A body given up mid-answer (a client gone, a timer) closes the connection: the upstream sees it at once
    and the pool never hands out a connection in the middle of a body."""
    fake.behave(tokens=["a"] * 50, token_interval=0.05)
    opened = fake.connections_opened
    _, body = open_body(upstream)
    assert body.read(1) is not None
    body.close()
    assert fake.wait_for(lambda: len(fake.streams_closed) == 1, timeout=3)
    assert not fake.streams_closed[-1].completed
    fake.behave(tokens=["b"])
    _, body = open_body(upstream)
    read_all(body)
    body.finish(0.5, 64 * 1024)
    assert fake.connections_opened == opened + 2


def test_a_connection_dropped_mid_body_is_a_broken_body(upstream: Upstream, fake: FakeUpstream) -> None:
    """An upstream that hangs up mid-body makes the read raise BrokenBody (the stream's
    upstream_disconnected), not an empty answer."""
    fake.behave(tokens=["a", "b", "c", "d"], disconnect_after=2, token_interval=0.05)
    _, body = open_body(upstream)
    with pytest.raises(BrokenBody):
        read_all(body)
    body.close()
