"""The limits a WebSocket message goes through, in-process: the shared request count, budget, slot renewal and
the capped message queue, without servers (the real-server attacks are in tests/test_websocket.py)."""

from __future__ import annotations

import time

import pytest
from flask import Flask

from proxy import create_app
from proxy.config import Config
from proxy.errors import RateLimited
from proxy.keys import KeyPolicy
from proxy.limits import Counters, RequestLimits
from proxy.relay import Relay
from proxy.routes.websocket import QUEUED_MESSAGES, Inbox
from proxy.usage import TokenUsage

KEY = "ws-limits-test-key-0123456789"
UNREACHABLE = "http://127.0.0.1:9/v1"  # refused at once: a /chat request is counted, then gets 502
HELLO = {"messages": [{"role": "user", "content": "hi"}]}


def make_app(**settings: object) -> Flask:
    config = Config(authorization_keys=(KEY,), openai_api_key="sk-test", openai_base_url=UNREACHABLE,
                    **settings)  # type: ignore[arg-type]
    return create_app(config)


def limits_of(app: Flask) -> RequestLimits:
    relay: Relay = app.extensions["relay"]
    return relay.limits


def default_policy(app: Flask) -> KeyPolicy:
    relay: Relay = app.extensions["relay"]
    policy = relay.config.keyring.identify(KEY)
    assert policy is not None
    return policy


def test_messages_and_http_requests_share_one_per_minute_count() -> None:
    """Two HTTP requests and one message use up 3/minute: the next message and the next request are refused."""
    app = make_app(rate_limit_per_minute=3)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {KEY}"}
    assert client.post("/chat", json=HELLO, headers=headers).status_code != 429
    assert client.post("/chat", json=HELLO, headers=headers).status_code != 429
    limits, policy = limits_of(app), default_policy(app)
    with app.app_context():
        limits.admit_message(policy)
        with pytest.raises(RateLimited) as refused:
            limits.admit_message(policy)
    assert refused.value.kind == "rate_limited" and "3 per 1 minute" in str(refused.value.description)
    assert refused.value.retry_after is not None and 1 <= refused.value.retry_after <= 60
    assert client.post("/chat", json=HELLO, headers=headers).status_code == 429


def test_per_day_limit_of_the_key_entry_applies_to_messages() -> None:
    """A key's own requests_per_day is what admit_message counts against, not only the relay-wide default."""
    app = make_app(rate_limit_per_minute=100)
    limits = limits_of(app)
    tight = KeyPolicy("tight", "tight-key-0123456789", requests_per_day=2)
    with app.app_context():
        limits.admit_message(tight)
        limits.admit_message(tight)
        with pytest.raises(RateLimited, match="2 per 1 day"):
            limits.admit_message(tight)


def test_budget_is_checked_before_and_charged_after_each_answer() -> None:
    """charge() counts an answer's tokens at once; the next admit_message sees the spent budget."""
    app = make_app(daily_token_budget=10)
    limits, policy = limits_of(app), default_policy(app)
    limits.admit_message(policy)
    limits.charge(policy, TokenUsage(4, 6, 10, True))
    with pytest.raises(RateLimited) as refused:
        limits.admit_message(policy)
    assert refused.value.kind == "token_budget_exhausted"
    assert refused.value.retry_after is not None and refused.value.retry_after <= 86400


def test_no_budget_no_charge_and_no_limits_no_cost() -> None:
    """Without any limit configured, admitting and charging a message does nothing and refuses nothing."""
    app = make_app()
    limits, policy = limits_of(app), default_policy(app)
    for _ in range(50):
        limits.admit_message(policy)
    limits.charge(policy, TokenUsage(0, 1000, 1000, True))
    assert limits.counters.tokens(policy.name, "2000-01-01") == 0


def test_renewing_a_slot_keeps_it_and_applies_a_lowered_cap() -> None:
    """A renewed lease keeps its id and its one slot; under a lowered max_streams the surplus renewals are
    refused with too_many_streams and hold nothing afterwards."""
    app = make_app(max_streams_per_key=3)
    limits = limits_of(app)
    three = KeyPolicy("k", "k-key-0123456789", max_streams=3)
    leases = [limits.renew_stream(three, None) for _ in range(3)]
    assert all(lease is not None for lease in leases)
    renewed = limits.renew_stream(three, leases[0])
    assert renewed is not None and leases[0] is not None and renewed.lease_id == leases[0].lease_id
    with pytest.raises(RateLimited):
        limits.renew_stream(three, None)  # still three held: the renewal did not take a second slot
    one = KeyPolicy("k", "k-key-0123456789", max_streams=1)
    with pytest.raises(RateLimited) as refused:
        limits.renew_stream(one, renewed)
    assert refused.value.kind == "too_many_streams"
    with pytest.raises(RateLimited):
        limits.renew_stream(one, leases[1])
    assert limits.renew_stream(one, leases[2]) is not None  # the last one left fits the new cap
    with pytest.raises(RateLimited):
        limits.renew_stream(one, None)


def test_renewal_moves_the_lease_expiry_forward() -> None:
    """A lease renewed before it expires is still held past its first expiry (a long-lived socket's slot)."""
    counters = Counters(None)
    lease = counters.acquire([("k", 1)], max_seconds=-59.8)  # expires 0.2 s from now (the margin is 60 s)
    assert not isinstance(lease, str)
    renewed = counters.acquire([("k", 1)], max_seconds=0.0, renewing=lease)  # now 60 s from now
    assert not isinstance(renewed, str)
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # the first expiry passes; the renewed lease still holds the slot
        time.sleep(0.05)
    assert counters.acquire([("k", 1)], max_seconds=0.0) == "k"


def test_inbox_caps_queued_messages_by_count_and_size() -> None:
    """The queue refuses (drops and flags) the message that would pass the character or message cap."""
    by_size = Inbox(max_chars=10)
    by_size.append("12345")
    by_size.append(b"12345")
    assert not by_size.overflowed and by_size.queued_chars == 10
    by_size.append("x")
    assert by_size.overflowed and len(by_size) == 2
    assert by_size.pop(0) == "12345" and by_size.queued_chars == 5
    by_size.append("y")  # once overflowed, nothing more is queued: the connection is being closed
    assert len(by_size) == 1

    by_count = Inbox(max_chars=10**6)
    for index in range(QUEUED_MESSAGES):
        by_count.append(str(index))
    assert not by_count.overflowed
    by_count.append("one too many")
    assert by_count.overflowed and len(by_count) == QUEUED_MESSAGES
