"""The production worker setup holds 1,000 concurrent open streams (issue 2's floor; the benchmark goes further)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ACCESS_KEY, RelayProcess
from tests.fake_upstream import FakeUpstream

# Load and timing tests: run alone, after the parallel run (Makefile `test`).
pytestmark = pytest.mark.serial

STREAMS = 1000
TOKENS = 4
RAMP_SECONDS = 2.0


async def _one_stream(host: str, port: int, opened: list[int]) -> str:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /chat HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n"
                     + f"Authorization: Bearer {ACCESS_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        opened.append(1)
        raw = await reader.read()  # Connection: close, so the body ends at EOF
    finally:
        writer.close()
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    text = b""
    while chunked:  # undo chunked transfer encoding
        size_line, _, rest = chunked.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        text += rest[:size]
        chunked = rest[size + 2:]
    records = [json.loads(line) for line in text.split(b"\n") if line.strip()]
    assert records[-1]["done"] is True
    return "".join(r["content"] for r in records if not r["done"])


def _workers(relay: RelayProcess) -> list[str]:
    return Path(f"/proc/{relay.process.pid}/task/{relay.process.pid}/children").read_text().split()


def _worker_rss_kib(relay: RelayProcess) -> int:
    total = 0
    for child in _workers(relay):
        status = Path(f"/proc/{child}/status").read_text()
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    return total


def _worker_cpu_seconds(relay: RelayProcess) -> float:
    ticks = 0
    for child in _workers(relay):
        fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_two_workers_hold_a_thousand_open_streams(relay_factory: Callable[..., RelayProcess],
                                                  fake: FakeUpstream) -> None:
    """1,000 slow streams open at once on two gevent workers: all complete, every token in order."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * STREAMS:
        pytest.skip(f"needs {4 * STREAMS} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * STREAMS), hard))
    relay = relay_factory(GUNICORN_WORKERS="2", KEEPALIVE_SECONDS="5")
    fake.behave(n_tokens=TOKENS, token_interval=1.5)  # each stream stays open 6 s, past the ramp
    expected = "".join(f" tok{i}" for i in range(TOKENS))
    host, port = relay.url.removeprefix("http://").split(":")
    idle_rss = _worker_rss_kib(relay)
    idle_cpu = _worker_cpu_seconds(relay)

    async def run() -> tuple[list[str], int]:
        opened: list[int] = []
        tasks = []
        for _ in range(STREAMS):  # open them over about 2 s: capacity is streams held, not a connect storm
            tasks.append(asyncio.create_task(_one_stream(host, int(port), opened)))
            await asyncio.sleep(RAMP_SECONDS / STREAMS)
        peak_rss = 0
        while not all(task.done() for task in tasks):
            peak_rss = max(peak_rss, _worker_rss_kib(relay))
            await asyncio.sleep(0.25)
        return [task.result() for task in tasks], peak_rss

    start = time.monotonic()
    texts, peak_rss = asyncio.run(run())
    elapsed = time.monotonic() - start
    relay_cpu = _worker_cpu_seconds(relay) - idle_cpu
    assert texts == [expected] * STREAMS
    per_stream = (peak_rss - idle_rss) / STREAMS
    # Figures only: performance claims come from bench/ (docs/benchmarks.md), not from a timed test.
    print(f"\n{STREAMS} streams in {elapsed:.1f} s; worker RSS {idle_rss} -> {peak_rss} KiB "
          f"({per_stream:.1f} KiB per open stream); relay CPU {relay_cpu:.1f} s")
