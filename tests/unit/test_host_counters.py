"""proxy/host_counters.py with real SQLite files in tmp_path: the same admission rules as memory (and Redis:
tests/test_budgets.py), reservations that hold across processes, counters that expire by their period, no
file I/O for keys without budgets, and a fallback to memory (logged once) when the file cannot be used."""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy import host_counters, limits
from proxy.budgets import Hold, spend_counter, utc_day
from proxy.host_counters import HostCounters, host_file
from proxy.keys import KeyPolicy
from proxy.limits import HOST, MEMORY, Counters, MemoryCounters, RequestLimits
from proxy.usage import TokenUsage
from tests.unit.conftest import unit_config

RULES = [
    (0, 0, 10, 10, True, True),
    (0, 0, 10.5, 10, True, False),
    (4, 5, 1, 10, True, True),
    (4, 5, 1.5, 10, True, False),
    (9, 0, 100, 10, False, True),
    (4, 6, 1, 10, False, False),
    (10, 0, 1, 10, False, False),
]


@pytest.mark.parametrize(("spent", "held", "amount", "limit", "strict", "admitted"), RULES)
def test_host_file_follows_the_memory_rules(tmp_path: Path, spent: float, held: float, amount: float, limit: float,
                                            strict: bool, admitted: bool) -> None:
    """Case by case, the file admits and refuses as MemoryCounters does, all or nothing across budgets."""
    outcomes = []
    for store in (MemoryCounters(), HostCounters(tmp_path / "limits.db")):
        store.settle((), [("c", spent, 100)], now=0.0)
        assert store.reserve([Hold("k", "c", held, 1e9, True, 100)], now=0.0) == 0
        refused = store.reserve([Hold("k", "other", 1, 1e9, True, 100), Hold("k", "c", amount, limit, strict, 100)],
                                now=0.0)
        outcomes.append((refused, store.amounts(["c", "other"], now=0.0)))
    assert outcomes[0] == outcomes[1]
    refused, found = outcomes[1]
    assert (refused == 0) is admitted and refused in (0, 2)
    assert found == [(spent, pytest.approx(held + (amount if admitted else 0))), (0.0, 1.0 if admitted else 0.0)]


def test_settling_gives_back_and_counters_expire_with_their_period(tmp_path: Path) -> None:
    """Settling gives the hold back and adds the spend in one go; past its TTL a counter reads as zero and
    the next write deletes its row."""
    store = HostCounters(tmp_path / "limits.db")
    assert store.reserve([Hold("d", "day", 3, 10, True, 100)], now=0.0) == 0
    store.settle([("day", 3)], [("day", 1.25, 100)], now=1.0)
    assert store.amounts(["day"], now=1.0) == [(1.25, 0.0)]
    assert store.amounts(["day"], now=101.0) == [(0.0, 0.0)]
    assert store.reserve([Hold("d", "day", 10, 10, True, 100)], now=200.0) == 0, "a new period starts empty"
    with sqlite3.connect(tmp_path / "limits.db") as db:
        assert db.execute("SELECT name, spent, held FROM counters").fetchall() == [("day", 0.0, 10.0)]


def test_last_use_never_goes_back(tmp_path: Path) -> None:
    """touch keeps the latest time; an unknown key was never used."""
    store = HostCounters(tmp_path / "limits.db")
    store.touch("a", 2000.0, 10**10)
    store.touch("a", 1000.0, 10**10)
    assert (store.last_use("a"), store.last_use("b")) == (2000.0, None)


def _reserve_many(path: str, start: threading.Barrier | None, attempts: int, results: multiprocessing.Queue[int]
                  ) -> None:
    store = HostCounters(Path(path))
    if start is not None:
        start.wait()
    granted = sum(store.reserve([Hold("m", "spend:a:d", 1.0, 60.0, True, 100)]) == 0 for _ in range(attempts))
    results.put(granted)


def test_two_processes_reserving_at_once_never_pass_the_limit(tmp_path: Path) -> None:
    """Two processes race 100 reservations each against one file and a limit of 60: exactly 60 are granted."""
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    path = str(tmp_path / "limits.db")
    workers = [context.Process(target=_reserve_many, args=(path, start, 100, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    granted = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sum(granted) == 60
    assert HostCounters(Path(path)).amounts(["spend:a:d"]) == [(0.0, 60.0)]


def test_read_only_store_creates_nothing(tmp_path: Path) -> None:
    """`keys list`'s store: a missing file reads as empty and is not created; writing is refused."""
    store = HostCounters(tmp_path / "data" / "limits.db", read_only=True)
    assert store.amounts(["x"]) == [(0.0, 0.0)] and store.last_use("a") is None
    with pytest.raises(sqlite3.Error):
        store.settle((), [("x", 1, 100)])
    assert not (tmp_path / "data").exists()


def test_unwritable_data_dir_falls_back_to_memory_once_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    """DATA_DIR that cannot be made: budgets count in memory, one warning, no error reaches the request."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    counters = Counters(None, blocker / "data" / "limits.db")
    with caplog.at_level(logging.WARNING, logger="relay.limits"):
        assert counters.reserve([Hold("m", "c", 1, 10, True, 100)]) == (0, MEMORY)
        assert counters.reserve([Hold("m", "c", 1, 10, True, 100)]) == (0, MEMORY)
        counters.settle(MEMORY, [("c", 1)], [("c", 0.5, 100)])
        counters.touch("a", 5.0)
    assert counters.amounts(["c"]) == [(0.5, 1.0)] and counters.last_use("a") == 5.0
    warnings = [record for record in caplog.records if "budget counters file unusable" in record.getMessage()]
    assert len(warnings) == 1


def test_file_locked_beyond_the_busy_timeout_falls_back_to_memory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A file another process keeps locked: after the (bounded) busy timeout, memory; used again once the
    retry interval has passed and the lock is gone."""
    monkeypatch.setattr(host_counters, "BUSY_TIMEOUT_SECONDS", 0.05)
    clock = [100.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: clock[0])
    path = tmp_path / "limits.db"
    counters = Counters(None, path)
    assert counters.reserve([Hold("m", "c", 1, 10, True, 100)]) == (0, HOST)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert counters.reserve([Hold("m", "c", 1, 10, True, 100)]) == (0, MEMORY)
        counters.settle(HOST, [("c", 1)], ())  # given back to the locked file: kept there (errs on refusing)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert counters.reserve([Hold("m", "c", 1, 10, True, 100)])[1] == MEMORY, "left alone until the retry"
    clock[0] += limits.HOST_RETRY_SECONDS
    assert counters.reserve([Hold("m", "c", 1, 10, True, 100)]) == (0, HOST)
    assert counters.amounts(["c"]) == [(0.0, 2.0)]


def test_keys_without_budgets_never_touch_the_file(tmp_path: Path) -> None:
    """No holds, no I/O: checking, reserving and charging a key without budgets creates no file (its last use,
    written once a minute, is the only write); a key with a budget reserves in the file."""
    config = unit_config(data_dir=tmp_path / "data", max_open_streams=5)
    request_limits = RequestLimits(config)
    assert host_file(config) == tmp_path / "data" / "limits.db"
    free = KeyPolicy("free", "free-key-0123456789")
    request_limits.check_budget(free)
    assert request_limits.reserve(free, "gpt-4o-mini", {"messages": []}) is not None
    request_limits.charge(free, TokenUsage(3, 4, 7, True), None, "gpt-4o-mini")
    assert not (tmp_path / "data").exists()
    budgeted = KeyPolicy("spender", "spender-key-0123456789", daily_tokens=1000)
    reservation = request_limits.reserve(budgeted, "gpt-4o-mini", {"messages": [], "max_tokens": 10})
    assert reservation is not None and reservation.store == HOST
    request_limits.charge(budgeted, TokenUsage(3, 4, 7, True), reservation)
    assert HostCounters(tmp_path / "data" / "limits.db").amounts([f"tokens:spender:{utc_day()}"]) == [(7.0, 0.0)]
    assert spend_counter("free", utc_day()) not in str(sqlite3.connect(tmp_path / "data" / "limits.db").execute(
        "SELECT name FROM counters").fetchall())


def test_under_gevent_calls_run_in_the_threadpool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With threading patched (a gevent worker), SQLite runs in gevent's threadpool, not the calling thread."""
    from gevent import monkey

    monkeypatch.setattr(monkey, "is_module_patched", lambda name: name == "threading")
    store = HostCounters(tmp_path / "limits.db")
    callers: list[int] = []
    original = store._amounts

    def spy(counters: list[str], now: float) -> list[tuple[float, float]]:
        callers.append(threading.get_ident())
        return original(counters, now)

    monkeypatch.setattr(store, "_amounts", spy)
    assert store.amounts(["x"]) == [(0.0, 0.0)]
    assert callers and callers[0] != threading.get_ident()


class DownRedis:
    """A configured Redis that does not answer."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: object, **kwargs: object) -> None:
            raise redis.ConnectionError("down")

        return fail


def test_redis_down_falls_back_to_the_host_file(tmp_path: Path) -> None:
    """While Redis is down, budgets go to the host's file (shared by the workers), not to process memory;
    stream slots go to memory as before."""
    counters = Counters(None, tmp_path / "limits.db")
    counters.redis = DownRedis()  # type: ignore[assignment]
    assert counters.reserve([Hold("m", "c", 2, 10, True, 100)]) == (0, HOST)
    counters.settle(HOST, [("c", 2)], [("c", 1.5, 100)])
    assert HostCounters(tmp_path / "limits.db").amounts(["c"]) == [(1.5, 0.0)]
    lease = counters.acquire([("k", 1)], max_seconds=10)
    assert isinstance(lease, limits.Lease) and not lease.in_redis
