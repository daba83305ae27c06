"""The pump's decisions about one client stream, as a plain object with no I/O.

`proxy/pump.py` owns the threads, the sockets and the queue between them. It feeds a `StreamMachine` what
happened (`Batch`, `End`, `Failure`, `Reopened`, `Tick`, `ClientGone`) together with the time it happened,
and carries out the `Action` it gets back: write bytes, start a fall-over, check the client, and stop once an
action carries the final `Outcome`. Time is always an argument, so every timer and every fall-over rule can
be tested with a fake clock and stand-in streams, without sockets or waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from proxy.config import Config
from proxy.encoders import Encoder
from proxy.errors import RelayError
from proxy.shutdown import RESTART_MESSAGE, SERVER_RESTARTING, Draining
from proxy.upstream import Chunk, StreamEnd, StreamFailure

# The pump's logger: the fall-over warning is the pump's, whichever module decides it.
log = logging.getLogger("relay.pump")

CLIENT_CHECK_SECONDS = 1.0  # how often a silent stream checks whether its client is still there
# Stream failures before the first token after which the next upstream serving the model may take over.
FALL_OVER_STREAM_KINDS = frozenset({"upstream_disconnected", "upstream_timeout", "upstream_error",
                                    "upstream_malformed"})
OPEN = "open"  # the outcome of a stream that has not ended (yet)


@dataclass(frozen=True)
class StreamTimers:
    keepalive: float
    first_token: float
    idle: float
    max_stream: float

    @classmethod
    def from_config(cls, config: Config) -> StreamTimers:
        return cls(config.keepalive_seconds, config.first_token_timeout, config.idle_timeout,
                   config.max_stream_seconds)


class UpstreamName(Protocol):
    @property
    def name(self) -> str: ...


class StreamSource(Protocol):
    """What the machine reads of an upstream stream: `UpstreamStream`, or a stand-in in tests."""

    @property
    def upstream(self) -> UpstreamName: ...
    @property
    def fallbacks(self) -> int: ...
    @property
    def failures(self) -> list[tuple[str, str]]: ...
    def can_fall_over(self) -> bool: ...


class Batch(NamedTuple):
    """Chunks the reader handed over (one or more network reads' worth)."""

    chunks: Sequence[Chunk]


# The reader's own end-of-stream values are the machine's events as they are: no copy per stream.
End = StreamEnd
Failure = StreamFailure


class Reopened(NamedTuple):
    """What a fall-over came back with: the next upstream's stream, or why none answered."""

    result: StreamSource | RelayError


class Tick(NamedTuple):
    """Time passed with nothing arriving (the pump's wait ran out)."""


class ClientGone(NamedTuple):
    """The client hung up (the pump checked because an action asked it to)."""


Event = Batch | StreamEnd | StreamFailure | Reopened | Tick | ClientGone
TICK = Tick()
CLIENT_GONE = ClientGone()


@dataclass(frozen=True)
class Outcome:
    """What the access log, the metrics and the token budgets want to know about one stream."""

    kind: str  # "ok", an error code, "client_gone", or OPEN while the stream runs
    upstream: str
    fallbacks: int
    # (upstream, kind) of every upstream failure in this request, fallen over or not; for the metrics.
    upstream_failures: list[tuple[str, str]]
    first_token_at: float | None
    ended_at: float | None
    tokens: int
    finish_reason: str | None
    usage: dict[str, Any] | None
    content: list[str]  # the answer's text deltas, kept only when asked to (LOG_CONTENT)
    model: str | None = None  # the model the upstream's chunks named (the usage ledger's answered_model)


class Action(NamedTuple):
    """What the pump does after feeding the machine, in this order: if `check_client`, ask whether the
    client is still there (and feed `ClientGone` instead of writing if not); write `write`; start a
    fall-over if `fall_over`; stop if `outcome` is set. `wait` (from `poll`) is how long the pump may wait
    for the next event before feeding a `Tick`."""

    write: bytes = b""
    wait: float = 0.0
    fall_over: bool = False
    check_client: bool = False
    outcome: Outcome | None = None


NOTHING = Action()


class StreamMachine:
    """One stream's timers, hold-back, fall-over rule and accounting.

    Until the upstream makes its first progress (content, reasoning or a tool call), what the encoder makes
    of its chunks is held back: if that upstream fails meanwhile with a kind worth falling over for and
    another upstream is left, the held bytes are dropped and the next upstream takes over, so the client
    never sees anything twice. After the first progress no fall-over ever happens."""

    def __init__(self, stream: StreamSource, encoder: Encoder, timers: StreamTimers, now: float,
                 draining: Draining | None = None, keep_content: bool = False) -> None:
        self._encoder = encoder
        self._timers = timers
        self._draining = draining
        self._keep_content = keep_content
        self._stream = stream
        # The request's shared list (its Candidates also record failed opens in it), so a fall-over's
        # failures and this stream's land in one list, in the order they happened.
        self._failures = stream.failures
        self._waiting_since = now  # when the current upstream was opened: its first-token timer starts here
        self._last_progress = now
        self._next_keepalive = now + timers.keepalive
        self._give_up_at = now + timers.max_stream
        self._held: list[bytes] = []  # encoder output before the first progress
        self._first_token_at: float | None = None
        self._tokens = 0
        self._content: list[str] = []
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._model: str | None = None
        self._outcome: Outcome | None = None

    @property
    def outcome(self) -> Outcome:
        """The final outcome once the stream ended; before that, what is known so far (kind OPEN)."""
        return self._outcome or self._snapshot(OPEN, None)

    def start(self) -> bytes:
        """The first bytes of the response (the pump sends the headers with them, or with the first write
        when they are empty)."""
        return self._encoder.start()

    def poll(self, now: float) -> Action:
        """Before each wait: end the stream once the server's drain deadline has passed; otherwise say how
        long the pump may wait (the next keep-alive, silence deadline, stream cap or client check)."""
        self._check_open()
        if self._draining is not None and now >= self._draining.deadline:
            return self._finish(SERVER_RESTARTING, now, self._release_held()
                                + self._encoder.error(SERVER_RESTARTING, RESTART_MESSAGE) + self._end())
        wake = min(self._next_keepalive, self._silence_deadline(), self._give_up_at, now + CLIENT_CHECK_SECONDS)
        return Action(wait=max(0.0, wake - now))

    def feed(self, event: Event, now: float) -> Action:
        """Take one event that happened at `now`; the returned action says what to do about it."""
        self._check_open()
        if isinstance(event, Batch):
            return self._on_batch(event.chunks, now)
        if isinstance(event, Tick):
            return self._on_tick(now)
        if isinstance(event, StreamFailure):
            return self._on_failure(event, now)
        if isinstance(event, Reopened):
            return self._on_reopened(event.result, now)
        if isinstance(event, StreamEnd):
            return self._finish("ok", now, self._release_held() + self._end())
        if isinstance(event, ClientGone):
            return self._finish("client_gone", now, b"")
        raise TypeError(f"not a stream event: {event!r}")

    def _on_batch(self, chunks: Sequence[Chunk], now: float) -> Action:
        if self._record(chunks, now):
            self._last_progress = now
        out = self._encoder.chunks(chunks)
        if self._first_token_at is None:
            if out:
                self._held.append(out)
            return NOTHING
        if self._held:
            out = self._release_held() + out
        if not out:
            return NOTHING
        self._next_keepalive = now + self._timers.keepalive
        return Action(write=out)

    def _on_tick(self, now: float) -> Action:
        # Unlike a failure's or the drain's end, a timer's end does not send bytes held back before the first
        # progress (a role or usage chunk): kept as the pump has always done it, so clients see no change.
        if now >= self._give_up_at:
            message = f"the answer ran past this relay's limit of {self._timers.max_stream:g} s; it is incomplete"
            return self._finish("stream_time_limit", now,
                                self._encoder.error("stream_time_limit", message) + self._end())
        if now >= self._silence_deadline():
            self._failures.append((self._stream.upstream.name, "upstream_timeout"))
            return self._finish("upstream_timeout", now,
                                self._encoder.error("upstream_timeout", self._silence_message()) + self._end())
        if now < self._next_keepalive:
            return Action(check_client=True)
        self._next_keepalive = now + self._timers.keepalive
        return Action(write=self._encoder.keepalive(), check_client=True)

    def _on_failure(self, failure: StreamFailure, now: float) -> Action:
        self._failures.append((self._stream.upstream.name, failure.kind))
        if (self._first_token_at is None and failure.kind in FALL_OVER_STREAM_KINDS
                and self._stream.can_fall_over()):
            log.warning("upstream %s failed before the first token (%s); falling over",
                        self._stream.upstream.name, failure.kind)
            self._held.clear()  # the client never saw them; the next upstream starts its answer afresh
            self._finish_reason = self._usage = self._model = None
            return Action(fall_over=True)
        return self._finish(failure.kind, now, self._release_held()
                            + self._encoder.error(failure.kind, failure.message) + self._end())

    def _on_reopened(self, result: StreamSource | RelayError, now: float) -> Action:
        if isinstance(result, RelayError):
            return self._finish(result.kind, now,
                                self._encoder.error(result.kind, str(result.description)) + self._end())
        self._stream = result
        self._failures = result.failures
        self._waiting_since = now
        return NOTHING

    def _record(self, chunks: Sequence[Chunk], now: float) -> bool:
        """Account for a batch of chunks; True when the model made progress."""
        progress = False
        for chunk in chunks:
            if chunk.progress:
                progress = True
            if chunk.content:
                self._tokens += 1
                if self._keep_content:
                    self._content.append(chunk.content)
            if chunk.finish_reason is not None:
                self._finish_reason = chunk.finish_reason
            if chunk.usage is not None:
                self._usage = chunk.usage
            if chunk.model is not None:
                self._model = chunk.model
        if progress and self._first_token_at is None:
            self._first_token_at = now
        return progress

    def _silence_deadline(self) -> float:
        if self._first_token_at is None:
            return self._waiting_since + self._timers.first_token
        return self._last_progress + self._timers.idle

    def _silence_message(self) -> str:
        if self._first_token_at is None:
            return (f"the model did not start answering within {self._timers.first_token:g} s; "
                    "try again or pick another model")
        return f"the upstream went silent for {self._timers.idle:g} s mid-answer; the answer is incomplete"

    def _release_held(self) -> bytes:
        held = b"".join(self._held)
        self._held.clear()
        return held

    def _end(self) -> bytes:
        return self._encoder.end(self._finish_reason, self._usage)

    def _finish(self, kind: str, now: float, write: bytes) -> Action:
        self._outcome = self._snapshot(kind, now)
        return Action(write=write, outcome=self._outcome)

    def _snapshot(self, kind: str, ended_at: float | None) -> Outcome:
        return Outcome(kind=kind, upstream=self._stream.upstream.name, fallbacks=self._stream.fallbacks,
                       upstream_failures=self._failures, first_token_at=self._first_token_at, ended_at=ended_at,
                       tokens=self._tokens, finish_reason=self._finish_reason, usage=self._usage,
                       content=self._content, model=self._model)

    def _check_open(self) -> None:
        if self._outcome is not None:
            raise RuntimeError(f"the stream already ended ({self._outcome.kind}); nothing more can happen to it")
