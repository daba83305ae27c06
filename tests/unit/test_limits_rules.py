"""proxy/limits.py's counting rules, in-process: leases, token days, the fall-back to memory when Redis fails."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis

from proxy import limits
from proxy.budgets import seconds_to_utc_midnight, utc_day
from proxy.limits import Counters, Lease, MemoryCounters
from proxy.usage import TokenUsage


def test_memory_leases() -> None:
    """A lease takes a slot in every bucket; a full bucket is named; release and expiry give slots back."""
    memory = MemoryCounters()
    assert memory.acquire([("alice", 1), ("*", 2)], "l1", expires=100.0, now=0.0) is None
    assert memory.acquire([("alice", 1), ("*", 2)], "l2", expires=100.0, now=0.0) == "alice"
    assert memory.acquire([("bob", 1), ("*", 2)], "l3", expires=100.0, now=0.0) is None
    assert memory.acquire([("carol", 1), ("*", 2)], "l4", expires=100.0, now=0.0) == "*"
    memory.release(["alice", "*"], "l1")
    assert memory.acquire([("alice", 1), ("*", 2)], "l5", expires=50.0, now=1.0) is None
    assert memory.acquire([("alice", 1)], "l6", expires=200.0, now=50.0) is None, "an expired lease is dropped"


def test_memory_counters_add_up_and_expire() -> None:
    """Spent amounts add up per counter and are forgotten when their time to live ends (as Redis's EXPIRE).
    (Changed with reservations: memory counters expire by time like Redis's instead of by day name.)"""
    memory = MemoryCounters()
    memory.settle((), [("tokens:a:2026-01-01", 3, 100)], now=0.0)
    memory.settle((), [("tokens:a:2026-01-01", 4, 100)], now=50.0)
    assert memory.amounts(["tokens:a:2026-01-01"], now=60.0) == [(7.0, 0.0)]
    assert memory.amounts(["tokens:a:2026-01-01"], now=150.0) == [(0.0, 0.0)]


@pytest.mark.parametrize(("usage", "deltas", "used"), [
    ({"total_tokens": 9, "prompt_tokens": 1, "completion_tokens": 1}, 2, 9),
    ({"prompt_tokens": 4, "completion_tokens": 5}, 2, 9),
    ({"prompt_tokens": 4}, 2, 2),
    ({"total_tokens": "9"}, 2, 2),
    (None, 3, 3),
    ({}, 0, 0),
])
def test_tokens_used(usage: dict[str, object] | None, deltas: int, used: int) -> None:
    """The upstream's total, else prompt + completion, else the number of content deltas."""
    assert TokenUsage.of_answer(usage, deltas).total == used


@pytest.mark.parametrize(("now", "seconds"), [
    (datetime(2026, 3, 1, 23, 59, 59, 500000, tzinfo=UTC), 1),
    (datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC), 86400),
    (datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC), 43200),
])
def test_budget_renews_at_utc_midnight(now: datetime, seconds: int) -> None:
    """The token budget's Retry-After counts to the next 00:00 UTC, at least one second."""
    assert seconds_to_utc_midnight(now) == seconds
    assert utc_day(now) == "2026-03-01"


class FailingRedis:
    """A Redis store that fails until `up` is set, counting the calls that reached it."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0

    def amounts(self, counters: list[str]) -> list[tuple[float, float]]:
        self.calls += 1
        if not self.up:
            raise redis.ConnectionError("down")
        return [(42.0, 0.0) for _ in counters]

    def release(self, buckets: object, lease_id: str) -> None:
        raise redis.ConnectionError("down")


def test_redis_failure_falls_back_to_memory_then_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """With Redis failing, counters use memory and leave Redis alone for REDIS_RETRY_SECONDS, then use it again."""
    clock = [500.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: clock[0])
    counters = Counters(None)
    store = FailingRedis()
    counters.redis = store  # type: ignore[assignment]
    counters.memory.settle((), [("tokens:a:d", 5, 100)])
    assert counters.tokens("a", "d") == 5 and store.calls == 1
    assert counters.tokens("a", "d") == 5 and store.calls == 1, "Redis is not asked while it is marked down"
    clock[0] += limits.REDIS_RETRY_SECONDS
    store.up = True
    assert counters.tokens("a", "d") == 42 and store.calls == 2
    counters.release(Lease("l", ("a",), in_redis=True))  # a failed release is swallowed (the lease expires)
    assert counters.tokens("a", "d") == 5


def test_memory_only_counters_acquire_and_release() -> None:
    """Without Redis, Counters leases in memory and reports the full bucket by name."""
    counters = Counters("memory://")
    assert counters.redis is None
    lease = counters.acquire([("k", 1)], max_seconds=10)
    assert isinstance(lease, Lease) and not lease.in_redis
    assert counters.acquire([("k", 1)], max_seconds=10) == "k"
    counters.release(lease)
    assert isinstance(counters.acquire([("k", 1)], max_seconds=10), Lease)
