"""proxy/stream_sources.py's DirectSource: what the pump's own read hands over, and in which order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from proxy.encoders import NdjsonEncoder
from proxy.pump import StreamStats, pump
from proxy.redaction import redact_secret_like
from proxy.stream_machine import StreamTimers
from proxy.stream_sources import DirectSource
from proxy.upstream import Chunk, StreamEnd
from proxy.upstream_body import DirectBody, LengthDecoder
from tests.unit.conftest import chunk_event


class _Wire:
    """A body's connection that never has more to give: everything came with the response's head."""

    def __init__(self, later: bytes | None = None) -> None:
        self.reads = 0
        self.released: bool | None = None
        self._later = later  # what one read gives, when something did not come with the head

    def read(self, max_bytes: int, timeout: float) -> bytes | None:
        self.reads += 1
        later, self._later = self._later, None
        return later

    def release(self, reusable: bool) -> None:
        self.released = reusable

    def abort(self) -> None:
        self.released = False


def contents(item: object) -> list[str | None]:
    assert isinstance(item, list)
    return [chunk.content for chunk in item if isinstance(chunk, Chunk)]


def test_the_first_token_is_handed_over_before_what_came_with_it_is_parsed() -> None:
    """A whole answer read with the head (a fast upstream): the first batch ends at the first token, so it is
    written before the rest is parsed; the rest, [DONE] included, follows without another read."""
    body = (chunk_event({"role": "assistant", "content": ""}) + chunk_event({"content": "a"})
            + chunk_event({"content": "b"}) + chunk_event({"content": "c"}) + b"data: [DONE]\n\n")
    wire = _Wire()
    stream = SimpleNamespace(upstream=SimpleNamespace(name="u", redact=redact_secret_like))
    source = DirectSource(stream, DirectBody(wire, LengthDecoder(len(body)), body), 5.0,  # type: ignore[arg-type]
                          lambda: None)
    first = source.next_item(1.0)
    assert contents(first) == ["", "a"] and source.take_ready([]) is None
    rest = source.next_item(1.0)
    assert contents(rest) == ["b", "c"] and source.take_ready([]) == StreamEnd()
    assert wire.reads == 0  # nothing was waited for
    source.close()
    assert wire.released is True  # a clean end: the connection goes back to its pool


@pytest.mark.parametrize(("with_head", "first_writes"), [
    (True, [b'{"done":false,"error":false,"content":"a"}\n']),  # one write: the headers go with the token
    (False, [b"", b'{"done":false,"error":false,"content":"a"}\n']),  # the headers alone, before the wait
])
def test_the_status_goes_out_with_the_first_token_when_it_came_with_the_head(
        with_head: bool, first_writes: list[bytes]) -> None:
    """The pump's first write is the first token when it came with the upstream's head; an empty write
    (the status and headers) goes first only when the pump must wait for the upstream."""
    body = chunk_event({"content": "a"}) + b"data: [DONE]\n\n"
    wire = _Wire(later=None if with_head else body)
    upstream = SimpleNamespace(name="u", redact=redact_secret_like)
    direct = DirectBody(wire, LengthDecoder(len(body)), body if with_head else b"")
    stream = SimpleNamespace(upstream=upstream, failures=[], fallbacks=0, can_fall_over=lambda: False,
                             direct_body=lambda: direct)
    writes = pump(stream, NdjsonEncoder(), StreamTimers(15.0, 30.0, 30.0, 60.0),  # type: ignore[arg-type]
                  StreamStats())
    assert [next(writes) for _ in first_writes] == first_writes
    writes.close()
