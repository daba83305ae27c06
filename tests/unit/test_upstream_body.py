"""The chunked-transfer decoder the pump reads upstream bodies with (proxy/upstream_body.py)."""

from __future__ import annotations

import httpx2
import pytest

from proxy import upstream_body
from proxy.upstream_body import BrokenBody, ChunkedDecoder, DirectBody

PAYLOADS = [b'data: {"a":1}\n\n', b"x" * 300, b"data: [DONE]\n\n"]


def chunked(parts: list[bytes], trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n" + trailer + b"\r\n"


def decode(wire: bytes, step: int) -> tuple[bytes, ChunkedDecoder]:
    decoder = ChunkedDecoder()
    out = b"".join(decoder.feed(wire[at:at + step]) for at in range(0, len(wire), step))
    return out, decoder


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_any_split_gives_the_payload_and_the_end(step: int) -> None:
    """However the network splits the body, the payload comes out whole and the end is seen once it arrives."""
    out, decoder = decode(chunked(PAYLOADS), step)
    assert out == b"".join(PAYLOADS)
    assert decoder.done and not decoder.extra


def test_extensions_and_trailers_are_read_past() -> None:
    """Chunk extensions and trailer fields are legal HTTP/1.1 and carry nothing the relay needs."""
    wire = b"5;name=value\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n"
    out, decoder = decode(wire, 4)
    assert out == b"hello" and decoder.done


def test_no_end_until_the_last_chunk() -> None:
    """A body cut before its last chunk is not ended: the reader keeps waiting (or reports the break)."""
    out, decoder = decode(chunked(PAYLOADS)[:-5], 5)
    assert out == b"".join(PAYLOADS) and not decoder.done


def test_bytes_after_the_end_forbid_reuse() -> None:
    """Anything after the body's end means the connection is not in a state to be reused."""
    _, decoder = decode(chunked([b"a"]) + b"HTTP/1.1", 100)
    assert decoder.done and decoder.extra


@pytest.mark.parametrize("wire", [b"zz\r\n", b"-5\r\nhello\r\n", b"1\r\nab\r\n", b"f" * 2000],
                         ids=["not-hex", "negative", "no-crlf-after-data", "endless-size-line"])
def test_bad_framing_is_a_broken_body(wire: bytes) -> None:
    """Framing that is not HTTP/1.1's chunked coding ends the stream as a broken body, never a crash."""
    with pytest.raises(BrokenBody):
        ChunkedDecoder().feed(wire)


@pytest.mark.parametrize("headers", [
    {"transfer-encoding": "chunked", "content-encoding": "gzip"},
    {"content-length": "10"},
    {"transfer-encoding": "chunked"},  # but not on httpx2's own pool (an in-process transport here)
], ids=["compressed", "not-chunked", "not-pooled"])
def test_bodies_it_cannot_read_are_left_to_httpx2(headers: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A compressed or non-chunked body, or one not on a pooled HTTP/1.1 connection, is not taken over: the
    reader thread reads it through httpx2, which decodes it."""
    monkeypatch.setattr(upstream_body, "gevent_sockets", lambda: True)
    response = httpx2.Response(200, headers=headers, stream=httpx2.ByteStream(b"0\r\n\r\n"))
    assert DirectBody.take(response) is None


def test_nothing_is_taken_over_without_gevent() -> None:
    """Under plain threads (the in-process tests, `flask run`) every body keeps the reader thread."""
    response = httpx2.Response(200, headers={"transfer-encoding": "chunked"}, stream=httpx2.ByteStream(b"0\r\n\r\n"))
    assert not upstream_body.gevent_sockets()
    assert DirectBody.take(response) is None


class _CountingWire:
    """A connection that would have more to give, counting how often it is asked."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, max_bytes: int, timeout: float) -> bytes | None:
        self.reads += 1
        return b"later"

    def release(self, reusable: bool) -> None:
        return None

    def abort(self) -> None:
        return None


def test_a_read_with_no_time_gives_only_what_came_with_the_head() -> None:
    """read(0) (the forwarded loop's first look) hands over the bytes read past the head, then None at once,
    without touching the connection; a read with time left reads it."""
    wire = _CountingWire()
    body = DirectBody(wire, upstream_body.UntilClose(), b"with the head")
    assert body.read(0.0) == b"with the head"
    assert body.read(0.0) is None and wire.reads == 0
    assert body.read(1.0) == b"later" and wire.reads == 1
    body.close()
