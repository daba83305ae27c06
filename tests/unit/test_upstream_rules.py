"""proxy/upstream.py's pure rules: the SSE parser, chunk parsing, SDK error mapping, Retry-After, routing."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from typing import Any

import httpcore2
import httpx2
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import BadRequest, RelayError
from proxy.globs import model_allowed
from proxy.redaction import redact_secret_like
from proxy.upstream import (
    MALFORMED,
    Candidates,
    CheapIdleCheckBackend,
    Chunk,
    SseParser,
    StreamEnd,
    StreamFailure,
    Upstream,
    UpstreamStream,
    _CheapIdleCheck,
    _retry_after,
    _upstream_message,
    map_sdk_error,
    parse_chunk,
    with_cheap_idle_check,
)
from tests.unit.conftest import chunk_event

REQUEST = httpx2.Request("POST", "http://upstream.invalid/v1/chat/completions")


class _Response:
    """What UpstreamStream reads: the upstream's streamed HTTP response, reduced to its body."""

    def __init__(self, blocks: list[bytes], error: Exception | None = None) -> None:
        self.blocks = blocks
        self.error = error
        self.extensions: dict[str, Any] = {}
        self.closed = False

    def iter_bytes(self) -> Iterator[bytes]:
        yield from self.blocks
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.closed = True


def read(blocks: list[bytes], error: Exception | None = None) -> tuple[list[object], _Response]:
    """Everything `read_into` hands the pump: batches (lists of Chunks), then one StreamEnd or StreamFailure."""
    response = _Response(blocks, error)
    stream = UpstreamStream(Upstream("u", None), response, fallbacks=0)  # type: ignore[arg-type]
    out: list[object] = []
    stream.read_into(out.append)
    return out, response


def contents(out: list[object]) -> list[str | None]:
    return [chunk.content for batch in out if isinstance(batch, list) for chunk in batch]


# ------------------------------------------------------------------ the SSE parser


def test_parser_batches_per_read_and_ends_at_done() -> None:
    """Each network read becomes one batch of Chunks; [DONE] ends the stream; the response is closed."""
    out, response = read([chunk_event({"content": "a"}) + chunk_event({"content": "b"}),
                          chunk_event({"content": "c"}) + b"data: [DONE]\n\n"])
    assert [len(batch) for batch in out[:-1]] == [2, 1]  # type: ignore[arg-type]
    assert contents(out) == ["a", "b", "c"]
    assert out[-1] == StreamEnd()
    assert response.closed


@pytest.mark.parametrize("cut", [1, 5, 7, 20, 40])
def test_parser_joins_events_split_anywhere(cut: int) -> None:
    """An event split across reads (inside `data:`, the JSON, a UTF-8 character or the blank line) parses whole."""
    whole = chunk_event({"content": "héllo ✓"}) + b"data: [DONE]\n\n"
    out, _ = read([whole[:cut], whole[cut:]])
    assert contents(out) == ["héllo ✓"]
    assert out[-1] == StreamEnd()


def test_parser_byte_at_a_time() -> None:
    """A stream arriving one byte per read gives the same chunks."""
    whole = chunk_event({"content": "a"}) + chunk_event({"content": "é"}) + b"data: [DONE]\n\n"
    out, _ = read([whole[i:i + 1] for i in range(len(whole))])
    assert contents(out) == ["a", "é"]


def test_parser_accepts_crlf_comments_fields_and_no_space() -> None:
    """CRLF line ends, `: comments`, event:/id:/retry: fields and `data:` without a space are all read."""
    body = (b": keep-alive\r\n\r\nevent: message\r\nid: 7\r\nretry: 100\r\n"
            b'data:{"choices":[{"delta":{"content":"x"}}]}\r\n\r\ndata: [DONE]\r\n\r\n')
    out, _ = read([body])
    assert contents(out) == ["x"]
    assert out[-1] == StreamEnd()


def test_parser_joins_multi_line_data() -> None:
    """Several `data:` lines of one event are one payload joined with newlines (JSON allows them)."""
    out, _ = read([b'data: {"choices":[{"delta":\ndata: {"content":"x"}}]}\n\ndata: [DONE]\n\n'])
    assert contents(out) == ["x"]


def test_parser_keeps_raw_bytes() -> None:
    """`Chunk.raw` is the upstream's JSON exactly as sent (no re-encode)."""
    raw = b'{"choices":[{"delta":{"content":"\\u00e9"}}],  "x": 1.50}'
    out, _ = read([b"data: " + raw + b"\n\ndata: [DONE]\n\n"])
    assert out[0][0].raw == raw  # type: ignore[index]


def test_parser_can_stop_at_the_first_token_and_keep_the_rest() -> None:
    """`stop_at_progress`: the chunks up to the first that makes progress; the lines after it are held
    (`holds_lines`) and parsed by the next call, even an empty one, [DONE] included (so the first token goes
    out before the many that may have come with it are parsed)."""
    parser = SseParser(redact_secret_like)
    body = (chunk_event({"role": "assistant", "content": ""}) + chunk_event({"content": "a"})
            + chunk_event({"content": "b"}) + b"data: [DONE]\n\n")
    first, end = parser.feed(body, stop_at_progress=True)
    assert [chunk.content for chunk in first] == ["", "a"] and end is None
    assert parser.holds_lines
    rest, end = parser.feed(b"")  # past the first token (DirectSource stops no more): b, then [DONE]
    assert [chunk.content for chunk in rest] == ["b"] and end == StreamEnd()


@given(events=st.lists(st.sampled_from([{"content": "x"}, {"content": ""}, {"role": "assistant"},
                                        {"reasoning_content": "r"}]), max_size=6),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=4), done=st.booleans())
def test_stopping_at_the_first_token_changes_no_chunk_and_no_end(events: list[dict[str, str]], cuts: list[int],
                                                                 done: bool) -> None:
    """Fed however the body is cut, and called again while lines are held, the stopping parser hands over
    the same chunks in the same order and the same end as the plain one."""
    body = b"".join(chunk_event(event) for event in events) + (b"data: [DONE]\n\n" if done else b"")
    blocks = [body[start:stop] for start, stop in itertools.pairwise([0, *sorted(cuts), len(body)])]
    plain, stopping = SseParser(redact_secret_like), SseParser(redact_secret_like)
    expected: list[bytes] = []
    expected_end = None
    for block in blocks:
        chunks, expected_end = plain.feed(block)
        expected += [chunk.raw for chunk in chunks]
        if expected_end is not None:
            break
    got: list[bytes] = []
    end = None
    for block in blocks:
        chunks, end = stopping.feed(block, stop_at_progress=True)
        got += [chunk.raw for chunk in chunks]
        while end is None and stopping.holds_lines:
            chunks, end = stopping.feed(b"", stop_at_progress=True)
            got += [chunk.raw for chunk in chunks]
        if end is not None:
            break
    assert got == expected and end == expected_end


@pytest.mark.parametrize(("blocks", "outcome"), [
    ([chunk_event({"content": "a"}, "stop")], StreamEnd()),  # some servers omit [DONE] after the finish reason
    ([chunk_event({"content": "a"})], StreamFailure("upstream_disconnected",
                                                    "the upstream ended the answer early; it is incomplete")),
    ([chunk_event({"content": "a"}), b"data: {oops\n\n", chunk_event({"content": "b"})], MALFORMED),
    ([b'data: {"error": {"message": "overloaded"}}\n\n'],
     StreamFailure("upstream_error", "the upstream reported an error: overloaded")),
])
def test_parser_outcomes(blocks: list[bytes], outcome: object) -> None:
    """How a body ends decides the outcome; what came before a failure is still handed over."""
    out, _ = read(blocks)
    assert out[-1] == outcome
    assert "b" not in contents(out)


@pytest.mark.parametrize(("error", "code"), [
    (httpx2.ReadTimeout("slow", request=REQUEST), "upstream_timeout"),
    (httpx2.RemoteProtocolError("peer closed", request=REQUEST), "upstream_disconnected"),
    (ConnectionResetError(), "upstream_disconnected"),
])
def test_parser_maps_read_errors(error: Exception, code: str) -> None:
    """A timeout or a broken connection mid-body ends the stream with a failure of that kind."""
    out, response = read([chunk_event({"content": "a"})], error)
    assert contents(out) == ["a"]
    assert isinstance(out[-1], StreamFailure) and out[-1].kind == code
    assert response.closed


# ------------------------------------------------------------------ one chunk


@pytest.mark.parametrize(("payload", "expected"), [
    (b'{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}', ("hi", None, None, True)),
    (b'{"choices":[{"delta":{"reasoning_content":"think"}}]}', (None, "think", None, True)),
    (b'{"choices":[{"delta":{"reasoning":"think"}}]}', (None, "think", None, True)),
    (b'{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}', (None, None, None, True)),
    (b'{"choices":[{"delta":{"role":"assistant","content":""}}]}', ("", None, None, False)),
    (b'{"choices":[{"delta":{},"finish_reason":"stop"}]}', (None, None, "stop", False)),
    (b'{"choices":[{"delta":{"content":5},"finish_reason":7}]}', (None, None, None, False)),
    (b'{"choices":[]}', (None, None, None, False)),
    (b'{"choices":["x"]}', (None, None, None, False)),
])
def test_parse_chunk_fields(payload: bytes, expected: tuple[Any, ...]) -> None:
    """content, reasoning (either field name), finish reason and progress are read; wrong types are ignored."""
    chunk = parse_chunk(payload)
    assert isinstance(chunk, Chunk)
    assert (chunk.content, chunk.reasoning, chunk.finish_reason, chunk.progress) == expected


def test_parse_chunk_usage() -> None:
    """The usage object is kept when it is an object."""
    chunk = parse_chunk(b'{"choices":[],"usage":{"total_tokens":3}}')
    assert isinstance(chunk, Chunk) and chunk.usage == {"total_tokens": 3}
    other = parse_chunk(b'{"choices":[],"usage":3}')
    assert isinstance(other, Chunk) and other.usage is None


@pytest.mark.parametrize("payload", [b"{nope", b"[1,2]", b'"text"', b"null"])
def test_parse_chunk_garbage_is_malformed(payload: bytes) -> None:
    """Anything but a JSON object is the malformed failure."""
    assert parse_chunk(payload) == MALFORMED


def test_in_stream_error_with_choices_is_a_chunk() -> None:
    """An `error` field alongside choices is not a failure (some servers send both)."""
    assert isinstance(parse_chunk(b'{"error":null,"choices":[{"delta":{"content":"x"}}]}'), Chunk)


# ------------------------------------------------------------------ error mapping


def status_error(status: int, body: object, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    response = httpx2.Response(status, headers=headers or {}, request=REQUEST)
    return openai.APIStatusError("upstream said no", response=response, body=body)


@pytest.mark.parametrize(("error", "status", "kind"), [
    (openai.APITimeoutError(request=REQUEST), 504, "upstream_timeout"),
    (openai.APIConnectionError(request=REQUEST), 502, "upstream_unreachable"),
    (status_error(401, None), 502, "upstream_auth"),
    (status_error(403, None), 502, "upstream_auth"),
    (status_error(404, None), 400, "model_not_found"),
    (status_error(429, None), 429, "upstream_rate_limited"),
    (status_error(400, {"error": {"message": "This model's maximum context length is 8192"}}), 400,
     "context_too_long"),
    (status_error(413, {"error": {"message": "prompt is too long"}}), 400, "context_too_long"),
    (status_error(422, {"error": {"message": "bad"}}), 400, "upstream_bad_request"),
    (status_error(413, {"error": {"message": "too big"}}), 502, "upstream_error"),
    (status_error(500, None), 502, "upstream_error"),
    (status_error(503, None), 502, "upstream_error"),
])
def test_map_sdk_error(error: openai.APIError, status: int, kind: str) -> None:
    """Each SDK failure before the first token becomes one relay status and kind."""
    mapped = map_sdk_error(error, "m")
    assert isinstance(mapped, RelayError)
    assert (mapped.status, mapped.kind) == (status, kind)


def test_map_sdk_error_messages() -> None:
    """Messages name the model and pass the upstream's words on, with secrets redacted."""
    not_found = map_sdk_error(status_error(404, None), "gpt-9")
    assert "model 'gpt-9'" in str(not_found.description)
    refused = map_sdk_error(status_error(400, {"error": {"message": "bad key sk-proj-abc123XYZ"}}), "m")
    assert str(refused.description) == "the upstream refused the request: bad key [redacted]"


@pytest.mark.parametrize(("header", "seconds"), [
    # RFC 9110: whole seconds or an HTTP-date (a past date: no wait worth stating); fractions are malformed.
    ("20", 20), ("0.2", None), ("1.5", None), ("0", 1), (" 7 ", 7), ("-3", None), ("soon", None),
    ("Wed, 21 Oct 2020 07:28:00 GMT", 1), ("", None),
    ("inf", None), ("Infinity", None), ("1e400", None), ("nan", None),  # int(inf) raised: a 500 instead of a 429
])
def test_retry_after(header: str, seconds: int | None) -> None:
    """Retry-After in seconds is rounded up to a whole second, at least 1; dates, garbage and negatives are dropped."""
    headers = {"retry-after": header} if header else {}
    assert _retry_after(httpx2.Response(429, headers=headers)) == seconds
    mapped = map_sdk_error(status_error(429, None, headers), "m")
    assert mapped.retry_after == seconds


@pytest.mark.parametrize(("body", "message"), [
    ({"error": {"message": "  quota  "}}, "quota"),
    ({"error": "plain words"}, "plain words"),
    ({"message": "top level"}, "top level"),
    ({"error": {"code": 1}}, "no details"),
    (None, "no details"),
    ("   ", "no details"),
    ({"error": {"message": "x" * 400}}, "x" * 300),
    ({"error": {"message": "key-ABCDEF123 and token-abcdef.ghi"}}, "[redacted] and [redacted]"),
])
def test_upstream_message(body: object, message: str) -> None:
    """The upstream's error words: found in the usual places, trimmed to 300 characters, secrets redacted."""
    assert _upstream_message(body, redact_secret_like) == message


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize(("patterns", "model", "allowed"), [
    ((), "anything", True),
    (("gpt-4o*",), "gpt-4o-mini", True),
    (("gpt-4o*",), "GPT-4o-mini", False),
    (("kimi-k2", "deepseek-?"), "deepseek-r", True),
    (("kimi-k2",), "kimi-k2x", False),
])
def test_model_globs(patterns: tuple[str, ...], model: str, allowed: bool) -> None:
    """Allow-lists and upstream model lists are case-sensitive globs; an empty list allows any model."""
    assert model_allowed(patterns, model) is allowed
    assert Upstream("u", None, patterns).serves(model) is allowed  # type: ignore[arg-type]


def test_no_upstream_serving_the_model_is_400() -> None:
    """A model no upstream serves is refused before any request, kind model_not_served."""
    upstreams = [Upstream("a", None, ("kimi-*",))]  # type: ignore[arg-type]
    with pytest.raises(BadRequest) as caught:
        Candidates(upstreams, {"model": "gpt-4o"}, 1.0, 1.0)
    assert caught.value.kind == "model_not_served"
    candidates = Candidates([*upstreams, Upstream("b", None)], {"model": "kimi-k2"}, 1.0, 1.0)  # type: ignore[arg-type]
    assert candidates.remaining() == 2


# ------------------------------------------------------------------ the pooled connection's idle check


class _SocketStream(httpcore2.NetworkStream):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, info: str) -> Any:
        return self.sock if info == "socket" else None


@pytest.mark.parametrize(("peer_does", "readable"), [
    ("nothing", False),  # an idle keep-alive connection: reusable
    ("sends", True),  # stray bytes: httpcore drops the connection
    ("closes", True),  # the upstream hung up: dropped, not reused
])
def test_idle_check_sees_what_httpcore_checks_for(peer_does: str, readable: bool) -> None:
    """The cheaper idle-connection check answers as httpcore's own: readable means data or the end is
    waiting (the connection must not be reused), silent means reusable; other extra info passes through."""
    ours, peer = socket.socketpair()
    try:
        if peer_does == "sends":
            peer.sendall(b"x")
        elif peer_does == "closes":
            peer.close()
        stream = _CheapIdleCheck(_SocketStream(ours))
        assert stream.get_extra_info("is_readable") is readable
        assert stream.get_extra_info("socket") is ours
    finally:
        ours.close()
        peer.close()


def test_upstream_client_uses_the_cheap_idle_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream client keeps httpx2's own pool (its limits) with the cheaper check under it, and still
    honours HTTPS_PROXY (a proxied URL goes through the proxy's pool, left as httpx2 made it)."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    client = with_cheap_idle_check(httpx2.Client(limits=httpx2.Limits(max_keepalive_connections=7)))
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert isinstance(pool, httpcore2.ConnectionPool) and isinstance(pool._network_backend, CheapIdleCheckBackend)
    assert pool._max_keepalive_connections == 7
    proxied = client._transport_for_url(httpx2.URL("https://api.example/v1"))
    assert isinstance(proxied._pool, httpcore2.HTTPProxy)  # type: ignore[attr-defined]
