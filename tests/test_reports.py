"""LOG_FLUSH_SECONDS under real gunicorn: a closed request's access line, metrics and ledger row are written
in a later batch (proxy/reports.py), while what its client's next request needs is settled at once."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx2

from tests.conftest import RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until
from tests.test_metrics import scrape, value

HELLO = {"messages": [{"role": "user", "content": "Hello"}]}


def chat(relay: RelayProcess, request_id: str) -> int:
    headers = relay.headers() | {"X-Request-ID": request_id}
    return httpx2.post(f"{relay.url}/chat", json=HELLO, headers=headers, timeout=20).status_code


def ledger_ids(relay: RelayProcess) -> list[str]:
    path: Path = relay.log_path.parent / "data" / "ledger.db"
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return [row[0] for row in connection.execute("SELECT request_id FROM ledger_requests ORDER BY id")]
    finally:
        connection.close()


def test_by_default_the_line_follows_within_the_flush_time_and_a_scrape_counts_it_at_once(
        relay_factory: Callable[..., RelayProcess], fake: FakeUpstream) -> None:
    """The default (0.1 s): the access line is written soon after the stream; a scrape of the worker that
    served it counts the request at once, without waiting for the batch."""
    relay = relay_factory(LOG_FLUSH_SECONDS=None)  # the production default, not the suite's 0
    fake.behave(tokens=["a", "b"])
    before = value(scrape(relay), "relay_requests_total", route="/chat", status="200", key="key1")
    assert chat(relay, "reports-default-1") == 200
    after = value(scrape(relay), "relay_requests_total", route="/chat", status="200", key="key1")
    assert after - before == 1  # one worker: the scrape wrote its pending records first
    assert wait_until(lambda: "request_id=reports-default-1" in relay.log_text(), timeout=5)


def test_records_wait_for_their_batch_the_stream_slot_does_not_and_a_stop_writes_them(
        relay_factory: Callable[..., RelayProcess], fake: FakeUpstream) -> None:
    """With a long flush time: a key allowed one open stream opens a second one as soon as the first ended
    (the slot is freed by the close step itself); neither access line nor ledger row is written yet; a
    graceful stop (SIGTERM) writes both lines and both rows before the worker exits."""
    relay = relay_factory(fresh=True, LOG_FLUSH_SECONDS="60", MAX_STREAMS_PER_KEY="1")
    fake.behave(tokens=["a", "b"])
    assert [chat(relay, "reports-batch-1"), chat(relay, "reports-batch-2")] == [200, 200]
    assert "reports-batch-" not in relay.log_text()  # 60 s: no batch can have run yet
    assert relay.stop(signal.SIGTERM) == 0
    log = relay.log_text()
    assert "request_id=reports-batch-1" in log and "request_id=reports-batch-2" in log
    assert log.index("request_id=reports-batch-1") < log.index("request_id=reports-batch-2")
    assert ledger_ids(relay)[-2:] == ["reports-batch-1", "reports-batch-2"]
    assert "Traceback" not in log
