"""The chunked-transfer decoder the pump reads upstream bodies with (proxy/upstream_body.py)."""

from __future__ import annotations

import pytest

from proxy.upstream_body import BrokenBody, ChunkedDecoder

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
