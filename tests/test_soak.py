"""Soak: mixed traffic at steady concurrency against the production gunicorn setup (two gevent workers).

Short and long streams on every streaming endpoint, upstream failures, cancellations, bad requests and wrong
keys, for SOAK_SECONDS (`make test`: 12) at SOAK_CONCURRENCY clients (`make test`: 12). Every successful
stream must arrive complete and in order, every failure as its proper error, no worker may restart, and
the workers' memory and descriptors must end where they were after warm-up.
The long run is `make soak` (5 minutes, 48 clients).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest

from tests.conftest import ACCESS_KEY, RelayProcess
from tests.hardening import FAULT_SETTINGS, STREAM_ENDPOINTS, StreamEndpoint, assert_no_secrets, fake_says

# Load and timing tests: run alone, after the parallel run (Makefile `test`).
pytestmark = pytest.mark.serial

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "12"))
SOAK_CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "12"))
SOAK_SETTINGS = {**FAULT_SETTINGS, "GUNICORN_WORKERS": "2", "MAX_STREAM_SECONDS": "30", "IDLE_TIMEOUT": "5",
                 "UPSTREAM_TIMEOUT": "10", "FIRST_TOKEN_TIMEOUT": "10"}
MEMORY_GROWTH_LIMIT_MIB = 40


def tokens(count: int) -> list[str]:
    return [f" tok{i}" for i in range(count)]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    kinds: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    streamed_tokens: int = 0

    def ok(self, kind: str, streamed: int = 0) -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.streamed_tokens += streamed

    def fail(self, kind: str, detail: str) -> None:
        with self.lock:
            self.failures.append(f"{kind}: {detail}")


def one_request(relay: RelayProcess, rng: random.Random, tally: Tally) -> None:
    """One request of a random kind on a random streaming endpoint, checked in full."""
    endpoint: StreamEndpoint = rng.choice(STREAM_ENDPOINTS)
    kind = rng.choices(["short", "long", "broken", "upstream_500", "cancel", "bad_request", "wrong_key"],
                       weights=[40, 15, 10, 8, 12, 10, 5])[0]
    label = f"{kind} {endpoint.name}"
    try:
        if kind == "short":
            outcome = endpoint.request(relay, fake_says({"n_tokens": 8, "token_interval": 0.01}))
            expect(outcome.status == 200 and outcome.contents == tokens(8) and not outcome.errors
                   and outcome.ends == 1 and outcome.last_is_end, outcome.raw[-300:])
            tally.ok(label, 8)
        elif kind == "long":
            outcome = endpoint.request(relay, fake_says({"n_tokens": 40, "token_interval": 0.05}))
            expect(outcome.status == 200 and outcome.contents == tokens(40) and not outcome.errors
                   and outcome.ends == 1 and outcome.last_is_end, outcome.raw[-300:])
            tally.ok(label, 40)
        elif kind == "broken":
            outcome = endpoint.request(relay, fake_says({"n_tokens": 10, "disconnect_after": 3}))
            expect(outcome.status == 200 and outcome.contents == tokens(3)
                   and [e["code"] for e in outcome.errors] == ["upstream_disconnected"] and outcome.last_is_end,
                   outcome.raw[-300:])
            tally.ok(label, 3)
        elif kind == "upstream_500":
            outcome = endpoint.request(relay, fake_says({"status": 500}))
            expect(outcome.status == 502 and outcome.errors and outcome.last_is_end, outcome.raw[-300:])
            tally.ok(label)
        elif kind == "cancel":
            cancel_midway(relay, endpoint, rng)
            tally.ok(label)
        elif kind == "bad_request":
            response = httpx2.post(relay.url + "/chat", content=b'{"messages": [', timeout=20,
                                   headers={"Authorization": f"Bearer {ACCESS_KEY}"})
            expect(response.status_code == 400 and b"invalid_json" in response.content, response.text[:300])
            tally.ok("bad_request")
        else:
            outcome = endpoint.request(relay, "hello", headers={"Authorization": "Bearer not-a-key"})
            expect(outcome.status == 401 and outcome.last_is_end, outcome.raw[-300:])
            tally.ok(label)
    except (AssertionError, httpx2.HTTPError, ValueError) as error:
        tally.fail(label, f"{type(error).__name__}: {error}"[:500])


def expect(condition: object, detail: object) -> None:
    if not condition:
        raise AssertionError(repr(detail))


def cancel_midway(relay: RelayProcess, endpoint: StreamEndpoint, rng: random.Random) -> None:
    """Read a few records of a slow answer, then hang up."""
    wanted = rng.randint(1, 5)
    request = endpoint.build(fake_says({"n_tokens": 50, "token_interval": 0.05}))
    with httpx2.Client(timeout=20) as client, client.stream(
        endpoint.method, relay.url + endpoint.path, headers={"Authorization": f"Bearer {ACCESS_KEY}"}, **request
    ) as response:
        seen = b""
        for block in response.iter_bytes():
            seen += block
            if seen.count(b"tok") >= wanted:
                return
    raise AssertionError(f"the stream ended before {wanted} tokens: {seen[-200:]!r}")


def worker_pids(relay: RelayProcess) -> list[int]:
    pid = relay.process.pid
    return sorted(int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def worker_resources(relay: RelayProcess) -> dict[int, tuple[int, int]]:
    """Per worker: (RSS in KiB, open descriptors other than sockets to the upstream pool)."""
    found = {}
    for pid in worker_pids(relay):
        status = Path(f"/proc/{pid}/status").read_text()
        rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        found[pid] = (rss, fds)
    return found


def run_traffic(relay: RelayProcess, seconds: float, concurrency: int, tally: Tally, seed: int) -> None:
    deadline = time.monotonic() + seconds

    def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        while time.monotonic() < deadline:
            one_request(relay, rng, tally)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)


@pytest.mark.slow
def test_soak_mixed_traffic(relay_factory: Callable[..., RelayProcess]) -> None:
    """SOAK_SECONDS of mixed traffic: nothing lost or out of order, no restarts, memory and fds flat."""
    relay = relay_factory(**SOAK_SETTINGS)
    warm = Tally()
    run_traffic(relay, min(8.0, SOAK_SECONDS / 4), SOAK_CONCURRENCY, warm, seed=1)  # fills pools, caches
    assert not warm.failures, warm.failures[:5]
    time.sleep(1.5)
    pids = worker_pids(relay)
    before = worker_resources(relay)
    log_lines_before = relay.log_text().count("\n")

    tally = Tally()
    started = time.monotonic()
    run_traffic(relay, SOAK_SECONDS, SOAK_CONCURRENCY, tally, seed=2)
    elapsed = time.monotonic() - started
    time.sleep(2.0)  # cancelled streams close their upstreams within 2 s

    after = worker_resources(relay)
    total = sum(tally.kinds.values())
    print(f"\nsoak: {elapsed:.0f} s, {SOAK_CONCURRENCY} clients, {total} requests, {len(tally.failures)} failures, "
          f"{tally.streamed_tokens} tokens checked in order; by kind: {dict(sorted(tally.kinds.items()))}")
    print(f"soak: workers (RSS KiB, fds) before {before}, after {after}")
    assert not tally.failures, tally.failures[:10]
    assert total > SOAK_SECONDS * 2, "too little traffic to mean anything"
    assert worker_pids(relay) == pids, "a worker restarted"
    new_log = "\n".join(relay.log_text().splitlines()[log_lines_before:])
    for bad in ("WORKER TIMEOUT", "Booting worker", "Traceback", "[ERROR]", "[CRITICAL]"):
        assert bad not in new_log, bad
    assert_no_secrets(relay.log_text(), "the soak's log")
    for pid in pids:
        grown_mib = (after[pid][0] - before[pid][0]) / 1024
        assert grown_mib < MEMORY_GROWTH_LIMIT_MIB, f"worker {pid} grew {grown_mib:.0f} MiB"
        # Idle upstream connections stay pooled by design: allow one per client at most.
        assert after[pid][1] <= before[pid][1] + SOAK_CONCURRENCY, f"worker {pid} fds {before[pid]} -> {after[pid]}"
