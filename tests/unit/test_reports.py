"""proxy/reports.py: a closed request's records, written at once or in a later batch, each once, in order."""

from __future__ import annotations

import logging

import gevent
import pytest

from proxy.reports import Reports

DELAY = 0.05


def test_without_a_delay_each_record_is_written_as_it_is_submitted() -> None:
    """LOG_FLUSH_SECONDS=0 (and every server but gevent): the close step writes its records itself."""
    written: list[int] = []
    reports = Reports(0.0)
    reports.submit(lambda: written.append(1))
    assert written == [1]


def test_with_a_delay_records_wait_then_go_together_in_order() -> None:
    """Nothing is written at submission; one batch writes every record submitted meanwhile, in order."""
    written: list[int] = []
    reports = Reports(DELAY)
    for number in range(5):
        reports.submit(lambda number=number: written.append(number))  # type: ignore[misc]
    assert written == []
    gevent.sleep(DELAY * 4)
    assert written == [0, 1, 2, 3, 4]


def test_a_record_submitted_while_a_batch_is_written_is_written_too() -> None:
    """A request closing during the batch (the batch lets other greenlets run between records) is not lost."""
    written: list[str] = []
    reports = Reports(DELAY)

    def first() -> None:
        written.append("first")
        reports.submit(lambda: written.append("late"))

    reports.submit(first)
    gevent.sleep(DELAY * 4)
    assert written == ["first", "late"]


def test_flush_writes_what_is_pending_now_and_only_once() -> None:
    """A scrape of /metrics and the worker's stop write the pending records at once; the batch then has
    nothing left to write."""
    written: list[int] = []
    reports = Reports(DELAY)
    reports.submit(lambda: written.append(1))
    reports.flush()
    assert written == [1]
    gevent.sleep(DELAY * 4)
    assert written == [1]


def test_a_failing_record_is_logged_and_the_others_are_written(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in one request's records loses neither the other requests' records nor the batch."""
    written: list[int] = []
    reports = Reports(DELAY)

    def broken() -> None:
        raise RuntimeError("boom")

    reports.submit(broken)
    reports.submit(lambda: written.append(2))
    with caplog.at_level(logging.ERROR, logger="relay.reports"):
        gevent.sleep(DELAY * 4)
    assert written == [2]
    assert "could not write a finished request's records" in caplog.text


def test_only_gevent_defers() -> None:
    """Without gevent's hub (flask run, threads) nothing would run the batch: records are written at once."""
    written: list[int] = []
    Reports.for_server(DELAY).submit(lambda: written.append(1))
    assert written == [1]  # the unit tests do not monkey-patch
