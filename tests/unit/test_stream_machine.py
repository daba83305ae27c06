"""The stream machine's decisions, with a fake clock and stand-in streams: no sockets, no threads, no waiting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from proxy.encoders import NDJSON_DONE, SSE_KEEPALIVE, NdjsonEncoder, SseEncoder
from proxy.errors import SSE_DONE, UpstreamFailed
from proxy.shutdown import RESTART_MESSAGE, Draining
from proxy.stream_machine import (
    CLIENT_CHECK_SECONDS,
    CLIENT_GONE,
    NOTHING,
    OPEN,
    TICK,
    Action,
    Batch,
    End,
    Failure,
    Reopened,
    StreamMachine,
    StreamTimers,
)
from proxy.upstream import Chunk, parse_chunk

TIMERS = StreamTimers(keepalive=5.0, first_token=30.0, idle=20.0, max_stream=300.0)
DISCONNECTED = Failure("upstream_disconnected", "the upstream connection broke mid-answer; the answer is incomplete")


@dataclass
class Name:
    name: str


@dataclass
class FakeStream:
    """Stands in for UpstreamStream: what the machine reads of it, and nothing else."""

    name: str
    fallbacks: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    others_left: int = 0

    @property
    def upstream(self) -> Name:
        return Name(self.name)

    def can_fall_over(self) -> bool:
        return self.others_left > 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def at(self, seconds: float) -> float:
        self.now = seconds
        return self.now


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None
          ) -> Chunk:
    """A chunk as the reader parses it from the upstream's JSON."""
    obj: dict[str, Any] = {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if usage is not None:
        obj["usage"] = usage
    parsed = parse_chunk(orjson.dumps(obj))
    assert isinstance(parsed, Chunk)
    return parsed


def content(text: str) -> Chunk:
    return chunk({"content": text})


ROLE = chunk({"role": "assistant"})


def machine(stream: FakeStream | None = None, encoder: Any = None, draining: Draining | None = None,
            keep_content: bool = False) -> StreamMachine:
    return StreamMachine(stream or FakeStream("a"), encoder or NdjsonEncoder(), TIMERS, 0.0, draining,
                         keep_content=keep_content)


def ndjson_error(code: str, message: str) -> bytes:
    return NdjsonEncoder().error(code, message)


def test_keepalive_cadence_during_silence() -> None:
    """Silence gets a keep-alive every KEEPALIVE seconds and a client check at every tick; output resets the cadence."""
    m, clock = machine(encoder=SseEncoder()), FakeClock()
    assert m.start() == b""
    assert m.poll(clock.at(0)).wait == CLIENT_CHECK_SECONDS
    assert m.feed(TICK, clock.at(1)) == Action(check_client=True)
    assert m.poll(clock.at(4.5)).wait == pytest.approx(0.5)  # the keep-alive is due before the next client check
    assert m.feed(TICK, clock.at(5)) == Action(write=SSE_KEEPALIVE, check_client=True)
    assert m.feed(TICK, clock.at(9)) == Action(check_client=True)
    assert m.feed(TICK, clock.at(10)).write == SSE_KEEPALIVE
    assert m.feed(Batch([content("hi")]), clock.at(12)).write.startswith(b"data: ")
    assert m.feed(TICK, clock.at(15)) == Action(check_client=True)  # output at 12 moved the next keep-alive to 17
    assert m.feed(TICK, clock.at(17)).write == SSE_KEEPALIVE


def test_first_token_timeout() -> None:
    """No progress within FIRST_TOKEN_TIMEOUT of the open ends the stream as upstream_timeout, with an error record."""
    m = machine()
    assert m.feed(TICK, 29.9).outcome is None
    action = m.feed(TICK, 30.0)
    message = "the model did not start answering within 30 s; try again or pick another model"
    assert action.write == ndjson_error("upstream_timeout", message) + NDJSON_DONE
    assert action.outcome is not None and action.outcome.kind == "upstream_timeout"
    assert action.outcome.upstream_failures == [("a", "upstream_timeout")]
    assert action.outcome.first_token_at is None and action.outcome.ended_at == 30.0


def test_idle_timeout_after_progress() -> None:
    """Once progress started, IDLE_TIMEOUT of silence (counted from the last progress) ends the stream."""
    m = machine()
    m.feed(Batch([content("a")]), 10.0)
    m.feed(Batch([chunk()]), 25.0)  # a chunk without progress does not reset the idle timer
    assert m.feed(TICK, 29.9).outcome is None
    action = m.feed(TICK, 30.0)
    message = "the upstream went silent for 20 s mid-answer; the answer is incomplete"
    assert action.write == ndjson_error("upstream_timeout", message) + NDJSON_DONE
    assert action.outcome is not None and action.outcome.kind == "upstream_timeout"
    assert action.outcome.first_token_at == 10.0


def test_whole_stream_cap() -> None:
    """A stream still going after MAX_STREAM_SECONDS ends with stream_time_limit at the next quiet moment."""
    m = machine()
    for second in range(10, 300, 10):
        assert m.feed(Batch([content("x")]), float(second)).write
    assert m.feed(TICK, 299.9).outcome is None  # steady output: neither the idle nor the first-token timer fires
    action = m.feed(TICK, 300.0)
    message = "the answer ran past this relay's limit of 300 s; it is incomplete"
    assert action.write == ndjson_error("stream_time_limit", message) + NDJSON_DONE
    assert action.outcome is not None and action.outcome.kind == "stream_time_limit"
    assert action.outcome.tokens == 29


def test_drain_deadline() -> None:
    """Past the server's drain deadline, poll ends the stream with server_restarting, then the protocol's end."""
    draining = Draining()
    m = machine(draining=draining)
    m.feed(Batch([content("a")]), 1.0)
    assert m.poll(2.0).outcome is None  # no restart under way
    draining.deadline = 10.0
    assert m.poll(9.9).outcome is None
    action = m.poll(10.0)
    assert action.write == ndjson_error("server_restarting", RESTART_MESSAGE) + NDJSON_DONE
    assert action.outcome is not None and action.outcome.kind == "server_restarting"


def test_hold_back_then_release_at_first_progress() -> None:
    """Encoder output before the first progress is held back, then sent with the first progress in one write."""
    m = machine(encoder=SseEncoder())
    assert m.feed(Batch([ROLE]), 1.0) == NOTHING
    assert m.feed(TICK, 5.0).write == SSE_KEEPALIVE  # the client sees only keep-alives meanwhile
    action = m.feed(Batch([content("Hi")]), 6.0)
    assert action.write == b"data: " + ROLE.raw + b"\n\n" + b"data: " + content("Hi").raw + b"\n\n"
    assert m.feed(Batch([content("!")]), 7.0).write == b"data: " + content("!").raw + b"\n\n"


def test_fall_over_before_first_progress_drops_held_output() -> None:
    """A failure before the first progress asks for a fall-over; the held chunk, finish_reason and usage are dropped."""
    first = FakeStream("a", others_left=1)
    m = machine(first, SseEncoder())
    m.feed(Batch([ROLE, chunk(finish="length", usage={"total_tokens": 7})]), 1.0)
    action = m.feed(DISCONNECTED, 2.0)
    assert action == Action(fall_over=True)
    second = FakeStream("b", fallbacks=1, failures=first.failures)
    assert m.feed(Reopened(second), 3.0) == NOTHING
    second_role = chunk({"role": "assistant", "content": ""})
    written = m.feed(Batch([second_role, content("Hi")]), 4.0).write
    assert written == b"data: " + second_role.raw + b"\n\n" + b"data: " + content("Hi").raw + b"\n\n"
    assert ROLE.raw not in written  # the first upstream's chunk is never sent
    end = m.feed(End(), 5.0)
    assert end.write == SSE_DONE
    assert end.outcome is not None
    assert (end.outcome.kind, end.outcome.upstream, end.outcome.fallbacks) == ("ok", "b", 1)
    assert end.outcome.upstream_failures == [("a", "upstream_disconnected")]
    assert end.outcome.finish_reason is None and end.outcome.usage is None


def test_first_token_timer_restarts_with_the_next_upstream() -> None:
    """After a fall-over the first-token timeout counts from when the next upstream was opened."""
    first = FakeStream("a", others_left=1)
    m = machine(first)
    assert m.feed(DISCONNECTED, 20.0).fall_over
    assert m.feed(TICK, 25.0).write == b"\n"  # keep-alives continue while the next upstream opens
    m.feed(Reopened(FakeStream("b", fallbacks=1, failures=first.failures)), 26.0)
    assert m.feed(TICK, 55.0).outcome is None
    action = m.feed(TICK, 56.0)
    assert action.outcome is not None and action.outcome.kind == "upstream_timeout"
    assert action.outcome.upstream_failures == [("a", "upstream_disconnected"), ("b", "upstream_timeout")]


def test_failed_fall_over_ends_with_its_error() -> None:
    """A fall-over that finds no upstream (RelayError) ends the stream with that error, then the end."""
    m = machine(FakeStream("a", others_left=1))
    m.feed(Batch([chunk(finish="stop")]), 1.0)
    assert m.feed(DISCONNECTED, 2.0).fall_over
    action = m.feed(Reopened(UpstreamFailed("the upstream API failed (HTTP 503); try again in a moment")), 3.0)
    error = ndjson_error("upstream_error", "the upstream API failed (HTTP 503); try again in a moment")
    assert action.write == error + NDJSON_DONE  # the dropped finish_reason does not reach the end record
    assert action.outcome is not None and (action.outcome.kind, action.outcome.upstream) == ("upstream_error", "a")


def test_no_fall_over_after_progress() -> None:
    """Once the client has seen progress a failure is final: error record and end, no fall-over."""
    m = machine(FakeStream("a", others_left=1))
    assert m.feed(Batch([content("Hel")]), 1.0).write
    action = m.feed(DISCONNECTED, 2.0)
    assert not action.fall_over
    assert action.write == ndjson_error(DISCONNECTED.kind, DISCONNECTED.message) + NDJSON_DONE
    assert action.outcome is not None and action.outcome.kind == "upstream_disconnected"


@pytest.mark.parametrize(("kind", "others_left"), [("upstream_disconnected", 0), ("upstream_auth", 1)])
def test_no_fall_over_without_another_upstream_or_for_other_kinds(kind: str, others_left: int) -> None:
    """With no upstream left, or a kind not worth falling over for, the held bytes go out before the error."""
    m = machine(FakeStream("a", others_left=others_left), SseEncoder())
    m.feed(Batch([ROLE]), 1.0)
    action = m.feed(Failure(kind, "broken"), 2.0)
    assert not action.fall_over
    assert action.write == b"data: " + ROLE.raw + b"\n\n" + SseEncoder().error(kind, "broken") + SSE_DONE
    assert action.outcome is not None and action.outcome.upstream_failures == [("a", kind)]


def test_end_record_has_finish_reason_and_usage() -> None:
    """End writes the end record with the last finish_reason and usage seen, and the outcome is ok."""
    m = machine()
    written = m.feed(Batch([content("Hi"), chunk(finish="stop")]), 1.0).write
    assert written == b'{"done":false,"error":false,"content":"Hi"}\n'
    m.feed(Batch([chunk(usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})]), 2.0)
    action = m.feed(End(), 3.0)
    assert orjson.loads(action.write) == {"done": True, "error": False, "content": "[DONE]", "finish_reason": "stop",
                                          "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    assert action.outcome is not None
    assert (action.outcome.kind, action.outcome.finish_reason, action.outcome.ended_at) == ("ok", "stop", 3.0)


def test_reasoning_only_progress_counts_as_progress() -> None:
    """A reasoning delta is progress (idle timer, no fall-over), though NDJSON without reasoning shows nothing."""
    m = machine(FakeStream("a", others_left=1))
    assert m.feed(Batch([chunk({"reasoning_content": "thinking"})]), 2.0) == NOTHING  # nothing to show, not held
    assert m.outcome.first_token_at == 2.0
    assert m.feed(TICK, 21.9).outcome is None  # the idle timer (20 s), not the first-token one (30 s)
    action = m.feed(DISCONNECTED, 22.0)
    assert not action.fall_over and action.outcome is not None and action.outcome.kind == "upstream_disconnected"


def test_tokens_counted_and_content_kept() -> None:
    """Every content delta counts as a token (reasoning does not); the text is kept only when asked."""
    m = machine(keep_content=True)
    m.feed(Batch([content("a"), chunk({"reasoning": "hmm"}), content("b")]), 1.0)
    m.feed(Batch([content("c")]), 2.0)
    assert (m.outcome.kind, m.outcome.tokens, m.outcome.content) == (OPEN, 3, ["a", "b", "c"])
    assert machine().outcome.content == []


def test_client_gone_ends_without_bytes() -> None:
    """A tick asks for a client check; a departed client ends the stream with nothing more written."""
    m = machine()
    assert m.feed(TICK, 1.0).check_client
    action = m.feed(CLIENT_GONE, 1.0)
    assert action.write == b"" and action.outcome is not None and action.outcome.kind == "client_gone"
    with pytest.raises(RuntimeError):
        m.feed(TICK, 2.0)
