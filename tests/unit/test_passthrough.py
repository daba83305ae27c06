"""The forwarding path's rules, fast: header allow-lists, the model in JSON and multipart bodies, usage read
from passing bytes, the SSE loop's keep-alives and timers on a fake clock, and the routes in-process."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx2
import openai
import orjson
import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.datastructures import Headers

from proxy import create_app
from proxy.encoders import SSE_KEEPALIVE
from proxy.forwarding import (
    _EVENT_END,
    HELD_LIMIT,
    JsonUsage,
    ModelFieldWatch,
    SseClock,
    SseFramer,
    SseUsage,
    client_response_headers,
    forwardable_headers,
    last_event_end,
    normalized_usage,
    relay_sse,
    sse_data,
    upstream_request_headers,
)
from proxy.pump import StreamStats
from proxy.shutdown import Draining
from proxy.stream_machine import StreamTimers
from proxy.upstream import StreamEnd, StreamFailure, Upstream
from tests.conftest import UPSTREAM_KEY
from tests.unit.conftest import bearer, unit_config

TIMERS = StreamTimers(keepalive=1.0, first_token=10.0, idle=5.0, max_stream=60.0)


# --- headers ---------------------------------------------------------------------------------------------------

def test_only_allow_listed_request_headers_go_upstream() -> None:
    """The client's key, cookies, address and hop-by-hop headers never reach the upstream; its key does."""
    incoming = [("Authorization", "Bearer client-key"), ("Cookie", "a=b"), ("X-Forwarded-For", "1.2.3.4"),
                ("X-Real-IP", "1.2.3.4"), ("Forwarded", "for=1.2.3.4"), ("Via", "1.1 nginx"),
                ("CF-Connecting-IP", "1.2.3.4"), ("CF-IPCountry", "CN"), ("True-Client-IP", "1.2.3.4"),
                ("Connection", "keep-alive"), ("Keep-Alive", "5"), ("TE", "trailers"), ("Trailer", "x"),
                ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Proxy-Authorization", "x"),
                ("OpenAI-Organization", "org-x"), ("OpenAI-Project", "proj-x"), ("X-Stainless-OS", "Linux"),
                ("Accept-Encoding", "gzip"), ("Content-Length", "999"),
                ("Content-Type", "application/json"), ("Accept", "text/event-stream"), ("OpenAI-Beta", "assistants=v2"),
                ("Idempotency-Key", "k1"), ("Anthropic-Version", "2023-06-01"), ("Anthropic-Beta", "b")]
    forwardable = forwardable_headers(Headers(incoming))
    assert upstream_request_headers(forwardable, {"authorization": f"Bearer {UPSTREAM_KEY}"}, 12) == {
        "content-type": "application/json", "accept": "text/event-stream", "openai-beta": "assistants=v2",
        "idempotency-key": "k1", "anthropic-version": "2023-06-01", "anthropic-beta": "b",
        "authorization": f"Bearer {UPSTREAM_KEY}", "accept-encoding": "identity", "content-length": "12"}


def test_only_allow_listed_response_headers_come_back() -> None:
    """Status-related and rate-limit headers come back; hop-by-hop, cookies and the organization do not."""
    upstream = [("Content-Type", "audio/mpeg"), ("x-request-id", "req_1"), ("openai-processing-ms", "12"),
                ("openai-version", "2020-10-01"), ("openai-organization", "org-secret"),
                ("x-ratelimit-remaining-requests", "9"), ("retry-after", "3"),
                ("content-disposition", 'attachment; filename="a.mp3"'), ("Connection", "close"),
                ("Transfer-Encoding", "chunked"), ("Set-Cookie", "x=y"), ("Content-Encoding", "gzip")]
    assert client_response_headers(upstream) == [
        ("Content-Type", "audio/mpeg"), ("X-Upstream-Request-ID", "req_1"), ("openai-processing-ms", "12"),
        ("openai-version", "2020-10-01"), ("x-ratelimit-remaining-requests", "9"), ("retry-after", "3"),
        ("content-disposition", 'attachment; filename="a.mp3"')]


# --- the model in a multipart form -----------------------------------------------------------------------------

def form(*parts: tuple[str, str | None, bytes], boundary: bytes = b"BOUNDARY") -> bytes:
    out = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def watch_in_blocks(body: bytes, size: int) -> list[str]:
    watch = ModelFieldWatch(b"BOUNDARY")
    found: list[str] = []
    for start in range(0, len(body), size):
        found += watch.feed(body[start:start + size])
    return found


@pytest.mark.parametrize("size", [1, 3, 7, 64, 10_000])
def test_model_field_is_found_however_the_body_is_cut(size: int) -> None:
    """The `model` field before or after the file is found in blocks of any size; a file named model is not."""
    body = form(("purpose", None, b"x"), ("model", "model.bin", b"--not this"),
                ("file", "a.wav", b"\x00RIFF" * 300 + b"\r\n--BOUND"), ("model", None, b"whisper-1"))
    assert watch_in_blocks(body, size) == ["whisper-1"]


def test_overlong_model_field_is_reported_empty() -> None:
    """A `model` field too long to be a model name is reported as '' (refused by the view), not buffered."""
    assert watch_in_blocks(form(("model", None, b"m" * 5000)), 100) == [""]


# --- usage -----------------------------------------------------------------------------------------------------

def test_usage_shapes_are_normalized() -> None:
    """Responses' input/output tokens, embeddings' prompt/total and chat's shape all become chat's shape."""
    assert normalized_usage({"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}) == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert normalized_usage({"prompt_tokens": 8, "total_tokens": 8}) == {
        "prompt_tokens": 8, "completion_tokens": 0, "total_tokens": 8}
    assert normalized_usage({"seconds": 3}) is None and normalized_usage(None) is None


def test_sse_usage_comes_from_response_completed() -> None:
    """A Responses stream's usage is read from its `response.completed` event only."""
    usage = SseUsage()
    usage.feed(b'event: response.output_text.delta\n'
               b'data: {"type":"response.output_text.delta","delta":"\\"usage\\""}\n\n')
    assert usage.usage is None
    usage.feed(b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
               b'{"input_tokens":5,"output_tokens":2,"total_tokens":7}}}\n\n')
    assert usage.usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_a_null_usage_is_skipped_but_a_usage_after_it_in_the_same_event_is_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`"usage":null` (in a Responses stream's opening events) parses nothing; a real usage later in the same
    event is still read."""
    parsed: list[bytes] = []
    monkeypatch.setattr(SseUsage, "_read", lambda self, event: parsed.append(event))
    SseUsage().feed(b'data: {"type":"response.created","response":{"usage" : null}}\n\n')
    assert parsed == []
    both = b'data: {"type":"x","usage":null,"response":{"usage":{"input_tokens":1,"total_tokens":1}}}\n\n'
    usage = SseUsage()
    monkeypatch.undo()
    usage.feed(both)
    assert usage.usage == {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}


def test_json_usage_small_whole_and_large_by_its_tail() -> None:
    """A small answer's top-level usage is parsed whole; a large one's is found in its last bytes."""
    small = JsonUsage()
    for block in (b'{"usage":{"prompt_tokens":1,', b'"total_tokens":1},"data":[{"usage":{"prompt_tokens":99}}]}'):
        small.feed(block)
    assert small.usage() == {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
    large = JsonUsage()
    large.feed(b'{"data":[' + b"0.1," * 600_000 + b'0.1],"usage":{"prompt_tokens":8,"total_tokens":8}}')
    assert large.usage() == {"prompt_tokens": 8, "completion_tokens": 0, "total_tokens": 8}


# --- the SSE loop on a fake clock ------------------------------------------------------------------------------

class ScriptedSource:
    """Upstream items at given times; waiting advances the fake clock instead of sleeping."""

    def __init__(self, script: list[tuple[float, object]]) -> None:
        self.now = 0.0
        self.script = script
        self.closed = False

    def clock(self) -> float:
        return self.now

    def get(self, timeout: float) -> object:
        if self.script and self.script[0][0] <= self.now + timeout:
            at, item = self.script.pop(0)
            self.now = max(self.now, at)
            return item
        self.now += timeout
        return None

    def close(self) -> None:
        self.closed = True


def run(script: list[tuple[float, object]]) -> tuple[list[bytes], StreamStats, ScriptedSource]:
    source = ScriptedSource(script)
    stats = StreamStats()
    out = [part for part in relay_sse(source, TIMERS, stats, clock=source.clock) if part]
    return out, stats, source


def test_silence_gets_keepalives_between_whole_events() -> None:
    """A 3.5 s silence mid-event gets no keep-alive inside the event; whole events pass as they complete."""
    out, stats, source = run([(0.5, b"event: a\ndata: 1\n\nevent: b\nda"), (4.0, b"ta: 2\n\ndata: [DONE]\n\n"),
                              (4.2, StreamEnd())])
    assert out == [b"event: a\ndata: 1\n\n", SSE_KEEPALIVE, SSE_KEEPALIVE, SSE_KEEPALIVE,
                   b"event: b\ndata: 2\n\ndata: [DONE]\n\n"]
    assert stats.outcome == "ok" and source.closed


@pytest.mark.parametrize(("script", "kind"), [
    ([], "upstream_timeout"),  # nothing within FIRST_TOKEN_TIMEOUT
    ([(1.0, b"data: 1\n\n")], "upstream_timeout"),  # silent for IDLE_TIMEOUT after the first byte
    ([(t / 2, b"data: {}\n\n") for t in range(1, 200)], "stream_time_limit"),  # never silent, never done
    ([(t / 2, b": ping\n\n") for t in range(1, 200)], "upstream_timeout"),  # comments are not a first token
    ([(1.0, StreamFailure("upstream_disconnected", "broke"))], "upstream_disconnected"),
])
def test_stream_ends_with_one_error_event(script: list[tuple[float, object]], kind: str) -> None:
    """Timers and a broken upstream end the stream with an OpenAI error event and nothing after it."""
    out, stats, source = run(script)
    assert out[-1].startswith(b"event: error\ndata: ")
    last = orjson.loads(out[-1].removeprefix(b"event: error\ndata: "))
    assert last["type"] == "error" and last["code"] == kind and last["error"]["code"] == kind
    assert stats.outcome == kind and source.closed


def test_clock_waits_no_longer_than_the_next_deadline() -> None:
    """The loop sleeps until the next keep-alive or deadline, and checks the client at least every second."""
    clock = SseClock(StreamTimers(keepalive=0.3, first_token=10, idle=5, max_stream=60), started=0.0)
    assert clock.wait(0.0) == pytest.approx(0.3)
    assert SseClock(TIMERS, started=0.0).wait(0.0) == 1.0


def test_framer_keeps_a_partial_event() -> None:
    """Only whole events leave the framer; the rest waits for its end."""
    framer = SseFramer()
    assert framer.feed(b"data: 1\r\n\r\ndata: 2") == b"data: 1\r\n\r\n"
    assert framer.feed(b"\n\n") == b"data: 2\n\n"


CREATED = b'event: response.created\ndata: {"type":"response.created"}\n\n'
DELTA = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
COMPLETED = b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n'


@pytest.mark.parametrize(("script", "passed", "outcome", "relays_error"), [
    # the whole stream, its last event without the closing blank line: passed on with one
    ([(0.1, CREATED + DELTA + COMPLETED[:-1]), (0.2, StreamEnd())], [CREATED + DELTA, COMPLETED], "ok", False),
    # the upstream's own error event (either shape) ends a stream as well as response.completed; it passes on
    # as it came (nothing to add), counted as an upstream error
    ([(0.1, b'data: {"error":{"message":"overloaded"}}\n\n'), (0.2, StreamEnd())],
     [b'data: {"error":{"message":"overloaded"}}\n\n'], "upstream_error", False),
    ([(0.1, CREATED + DELTA), (0.2, StreamEnd())], [CREATED + DELTA], "upstream_disconnected", True),  # cut short
    # events before a malformed one pass (held ones too), then the error
    ([(0.1, CREATED + b"data: {nope\n\n" + DELTA)], [CREATED], "upstream_malformed", True),
    ([(0.1, b"<html><body>502</body></html>\n"), (0.2, StreamEnd())], [], "upstream_disconnected", True),
])
def test_stream_ends_only_after_its_last_event(script: list[tuple[float, object]], passed: list[bytes],
                                               outcome: str, relays_error: bool) -> None:
    """Events pass on until a malformed one; a body that ends before its protocol's last event (or in the
    middle of one) gets the relay's error event: the client always knows whether the answer is whole."""
    out, stats, _source = run(script)
    if relays_error:
        assert out[:-1] == passed and b'"code":"' + outcome.encode() + b'"' in out[-1]
    else:
        assert out == passed
    assert stats.outcome == outcome


def test_the_first_token_goes_out_before_the_events_that_came_with_it_are_checked() -> None:
    """A fast upstream's whole answer in one read: the first write ends with the first token's event, the
    rest follows in order (nothing lost, nothing twice); a malformed event among the rest still ends the
    stream with the error event, after the whole events before it."""
    second = DELTA.replace(b'"Hi"', b'"there"')
    out, stats, _source = run([(0.1, CREATED + DELTA + second + COMPLETED), (0.2, StreamEnd())])
    assert out == [CREATED + DELTA, second + COMPLETED] and stats.outcome == "ok"
    out, stats, _source = run([(0.1, CREATED + DELTA + second + b"data: {oops\n\n" + COMPLETED)])
    assert out[:2] == [CREATED + DELTA, second] and b'"code":"upstream_malformed"' in out[2]
    assert len(out) == 3 and stats.outcome == "upstream_malformed"


@pytest.mark.parametrize(("script", "first_writes"), [
    ([(0.0, CREATED + DELTA), (0.0, StreamEnd())], [CREATED + DELTA]),  # the token came with the head
    ([(0.0, CREATED), (0.5, DELTA), (0.6, StreamEnd())], [b"", CREATED + DELTA]),  # the opening alone
    ([(0.5, CREATED + DELTA), (0.6, StreamEnd())], [b"", CREATED + DELTA]),  # nothing yet
])
def test_status_goes_out_with_the_first_token_or_before_the_first_wait(
        script: list[tuple[float, object]], first_writes: list[bytes]) -> None:
    """A first token already at hand carries the status and headers in its write (one write, not an empty
    one before it); otherwise an empty write sends them before the loop waits on the upstream."""
    source = ScriptedSource(script)
    writes = list(relay_sse(source, TIMERS, StreamStats(), clock=source.clock))
    assert writes[:len(first_writes)] == first_writes


def test_opening_events_are_not_the_first_token() -> None:
    """`response.created` comes at once, but a model that thinks longer than FIRST_TOKEN_TIMEOUT is cut off
    by that timer (not by IDLE_TIMEOUT); a long thought within it is fine."""
    out, stats, _source = run([(0.1, CREATED), (8.0, DELTA + COMPLETED), (8.1, StreamEnd())])
    # response.created waits with the first token (keep-alives meanwhile): see the fall-over tests; the
    # first token is written before the events that came with it are checked
    assert out == [SSE_KEEPALIVE] * 7 + [CREATED + DELTA, COMPLETED] and stats.outcome == "ok"
    out, stats, _source = run([(0.1, CREATED), (11.0, DELTA)])
    assert b"did not start answering within 10 s" in out[-1] and stats.outcome == "upstream_timeout"


def test_framer_finds_the_end_of_an_event_sent_in_many_blocks() -> None:
    """A 1 MiB event in 1 KiB blocks comes out whole, once, with what follows kept for later."""
    framer = SseFramer()
    event = b"data: " + b"x" * (1024 * 1024) + b"\r\n\r\n"
    pieces = [event[i:i + 1024] for i in range(0, len(event), 1024)]
    out = b"".join(framer.feed(piece) for piece in pieces[:-1])
    assert out == b""
    assert framer.feed(pieces[-1] + b"data: 2") == event
    assert framer.rest() == b"data: 2"


# --- the routes, in-process ------------------------------------------------------------------------------------

class Recorder(httpx2.BaseTransport):
    """An in-process upstream that records what it got and answers JSON with usage."""

    def __init__(self) -> None:
        self.seen: list[httpx2.Request] = []
        self.bodies: list[bytes] = []
        self.answers: list[tuple[int, Any]] = []  # (status, JSON) for the next requests, before the default

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.bodies.append(request.read())
        self.seen.append(request)
        if self.answers:
            status, payload = self.answers.pop(0)
            return httpx2.Response(status, json=payload, request=request)
        return httpx2.Response(200, json={"object": "list", "usage": {"prompt_tokens": 2, "total_tokens": 2}},
                               headers={"x-request-id": "req_up"}, request=request)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def forwarding_client(recorder: Recorder, **overrides: Any) -> FlaskClient:
    app = create_app(unit_config(**overrides))
    client = openai.OpenAI(api_key=UPSTREAM_KEY, base_url="http://upstream.invalid/v1", max_retries=0,
                           http_client=httpx2.Client(transport=recorder))
    relay = app.extensions["relay"]
    app.extensions["relay"] = dataclasses.replace(relay, upstreams=(Upstream("fake", client),))
    return app.test_client()


def test_path_query_and_body_pass_unchanged(recorder: Recorder) -> None:
    """Method, path, query and body reach `<base_url>/<rest>` as sent; the answer comes back with its headers."""
    client = forwarding_client(recorder)
    body = b'{"model": "text-embedding-3-small", "input": ["a", "b"]}'
    answer = client.post("/v1/embeddings?x=1&y=%2F", data=body,
                         headers={**bearer(), "Content-Type": "application/json"})
    assert answer.status_code == 200 and answer.headers["X-Upstream-Request-ID"] == "req_up"
    seen = recorder.seen[0]
    assert (seen.method, str(seen.url)) == ("POST", "http://upstream.invalid/v1/embeddings?x=1&y=%2F")
    assert recorder.bodies == [body]
    assert client.delete("/v1/files/file-1", headers=bearer()).status_code == 200
    assert (recorder.seen[1].method, recorder.seen[1].url.path) == ("DELETE", "/v1/files/file-1")


def test_models_chat_and_unknown_paths_are_not_forwarded(recorder: Recorder) -> None:
    """/v1/models and /v1/chat/completions keep their own views; an unknown family stays the relay's 404."""
    client = forwarding_client(recorder)
    assert client.get("/v1/models", headers=bearer()).json["object"] == "list"
    assert client.get("/v1/nothing", headers=bearer()).status_code == 404
    assert client.get("/v1/chat/completions", headers=bearer()).status_code == 405
    # Only the model catalog's own fetch of the upstream's list (GET /v1/models) reached the upstream.
    assert [(seen.method, seen.url.path) for seen in recorder.seen] in ([], [("GET", "/v1/models")])


def test_refused_model_and_key_never_reach_the_upstream(recorder: Recorder) -> None:
    """A model outside ALLOWED_MODELS is 400 (JSON or form field after the file), a batch (models inside its
    file) 403, no key 401, bad JSON 400."""
    client = forwarding_client(recorder, allowed_models=("gpt-4o*",))
    refused = client.post("/v1/responses", json={"model": "o3", "input": "hi"}, headers=bearer())
    assert refused.status_code == 400 and refused.json["error"]["code"] == "model_not_allowed"
    late = form(("file", "a.wav", b"RIFF" * 20_000), ("model", None, b"whisper-1"))
    upload = client.post("/v1/audio/transcriptions", data=late, headers={
        **bearer(), "Content-Type": "multipart/form-data; boundary=BOUNDARY"})
    assert upload.status_code == 400 and upload.json["error"]["code"] == "model_not_allowed"
    batch = client.post("/v1/batches", json={"input_file_id": "file-1", "endpoint": "/v1/chat/completions"},
                        headers=bearer())
    assert batch.status_code == 403 and batch.json["error"]["code"] == "model_not_allowed"
    assert client.post("/v1/responses", json={"model": "gpt-4o"}).status_code == 401
    assert client.post("/v1/responses", data=b"{nope", headers={**bearer(), "Content-Type": "application/json"}
                       ).json["error"]["code"] == "invalid_json"
    assert recorder.seen == []


def test_upload_cap_is_its_own(recorder: Recorder) -> None:
    """Uploads may exceed MAX_BODY_BYTES up to MAX_UPLOAD_BYTES; past it, 413 in OpenAI's shape."""
    client = forwarding_client(recorder, max_body_bytes=1000, max_upload_bytes=200_000)
    body = form(("purpose", None, b"batch"), ("file", "a.jsonl", b"x" * 100_000))
    headers = {**bearer(), "Content-Type": "multipart/form-data; boundary=BOUNDARY"}
    assert client.post("/v1/files", data=body, headers=headers).status_code == 200
    assert recorder.bodies == [body]
    too_big = client.post("/v1/files", data=form(("file", "a", b"x" * 300_000)), headers=headers)
    assert too_big.status_code == 413 and too_big.json["error"]["code"] == "body_too_large"



def test_upstream_errors_pass_through_redacted_but_its_key_refusal_is_502(recorder: Recorder) -> None:
    """An upstream 404 comes back as sent, with the upstream key taken out; its 401 is the relay's 502."""
    client = forwarding_client(recorder)
    recorder.answers = [(404, {"error": {"message": f"no response resp_1 for key {UPSTREAM_KEY}", "code": None}}),
                        (401, {"error": {"message": "bad key"}})]
    missing = client.get("/v1/responses/resp_1", headers=bearer())
    assert missing.status_code == 404 and "no response resp_1" in missing.json["error"]["message"]
    assert UPSTREAM_KEY not in missing.text
    refused = client.get("/v1/responses/resp_1", headers=bearer())
    assert refused.status_code == 502 and refused.json["error"]["code"] == "upstream_auth"


def test_drain_deadline_ends_a_forwarded_stream_with_a_restart_error() -> None:
    """A graceful stop's deadline ends the stream with the dialect's error event (server_restarting)."""
    draining = Draining()
    draining.deadline = 2.0
    source = ScriptedSource([(0.1, CREATED + DELTA), (5.0, COMPLETED)])
    stats = StreamStats()
    out = [part for part in relay_sse(source, TIMERS, stats, clock=source.clock, draining=draining) if part]
    assert out[0] == CREATED + DELTA and b'"code":"server_restarting"' in out[-1] and b"restarting" in out[-1]
    assert stats.outcome == "server_restarting" and source.now == pytest.approx(2.0)


def test_a_model_named_after_the_routing_prefix_must_be_the_first_upstreams(recorder: Recorder) -> None:
    """An upload whose `model` field comes after its first 64 KiB goes to the first upstream (routed before
    the field arrives): accepted when that upstream is where the model routes, else a 400 naming the rule
    before the upstream has the whole upload."""
    app = create_app(unit_config())
    other = Recorder()
    upstreams = tuple(Upstream(name, openai.OpenAI(api_key=UPSTREAM_KEY, base_url="http://upstream.invalid/v1",
                                                   max_retries=0, http_client=httpx2.Client(transport=transport)),
                               models)
                      for name, transport, models in (("whisper", recorder, ("whisper-*",)), ("rest", other, ())))
    app.extensions["relay"] = dataclasses.replace(app.extensions["relay"], upstreams=upstreams)
    client = app.test_client()
    headers = {**bearer(), "Content-Type": "multipart/form-data; boundary=BOUNDARY"}
    served = form(("file", "a.wav", b"RIFF" * 20_000), ("model", None, b"whisper-1"))
    assert client.post("/v1/audio/transcriptions", data=served, headers=headers).status_code == 200
    assert len(recorder.bodies) == 1 and other.bodies == []
    elsewhere = form(("file", "a.wav", b"RIFF" * 20_000), ("model", None, b"gpt-4o-transcribe"))
    refused = client.post("/v1/audio/transcriptions", data=elsewhere, headers=headers)
    assert refused.status_code == 400 and refused.json["error"]["code"] == "model_too_late"
    assert "before the file" in refused.json["error"]["message"] and "64 KiB" in refused.json["error"]["message"]
    early = form(("model", None, b"gpt-4o-transcribe"), ("file", "a.wav", b"RIFF" * 20_000))
    assert client.post("/v1/audio/transcriptions", data=early, headers=headers).status_code == 200
    assert len(other.bodies) == 1 and len(recorder.bodies) == 1


@pytest.mark.parametrize(("first_script", "falls_over_on"), [
    ([(0.1, CREATED), (0.2, StreamFailure("upstream_disconnected", "broke"))], "upstream_disconnected"),
    ([(0.1, CREATED + b"data: {nope\n\n")], "upstream_malformed"),
    ([(0.1, CREATED + b'event: error\ndata: {"type":"error","code":"x","message":"overloaded"}\n\n'),
      (0.2, StreamEnd())], "upstream_error"),
    ([(0.1, CREATED), (0.2, StreamEnd())], "upstream_disconnected"),
    ([(0.1, CREATED + DELTA), (0.2, StreamFailure("upstream_disconnected", "broke"))], None),  # text was sent
    ([(0.1, CREATED)], None),  # a slow first token is no reason: the model is thinking
])
def test_falls_over_only_before_the_first_token(first_script: list[tuple[float, object]],
                                                falls_over_on: str | None) -> None:
    """A stream failing before its first token is replaced by the next upstream's (what the first sent,
    held back, is dropped: the client sees one beginning); after the first token, or on a timer, it ends
    with the error event."""
    first = ScriptedSource(first_script)
    second = ScriptedSource([(0.0, CREATED + DELTA + COMPLETED), (0.0, StreamEnd())])
    sources, kinds = [first], []

    def fall_over(kind: str) -> ScriptedSource | None:
        kinds.append(kind)
        second.now = first.now
        sources.append(second)
        return second

    stats = StreamStats()
    out = [part for part in relay_sse(first, TIMERS, stats, clock=lambda: sources[-1].now, fall_over=fall_over)
           if part]
    assert first.closed and second.closed == (falls_over_on is not None)
    if falls_over_on is None:
        assert kinds == [] and b'"type":"error"' in out[-1] and stats.outcome != "ok"
    else:
        assert kinds == [falls_over_on] and b"".join(out) == CREATED + DELTA + COMPLETED and stats.outcome == "ok"


def test_headers_go_out_before_anything_is_read() -> None:
    """The loop's first part is empty, so the server sends the status and headers at once, even while the
    opening events are held back for the first token."""
    source = ScriptedSource([(5.0, CREATED + DELTA + COMPLETED), (5.1, StreamEnd())])
    stream = relay_sse(source, TIMERS, StreamStats(), clock=source.clock)
    assert next(stream) == b"" and source.now == 0.0
    assert b"".join(stream).endswith(CREATED + DELTA + COMPLETED)


def test_opening_events_held_back_are_bounded() -> None:
    """An upstream whose opening (events before the first token) grows past HELD_LIMIT has it passed on."""
    ping = b'event: response.in_progress\ndata: {"type":"response.in_progress","pad":"' + b"x" * 1000 + b'"}\n\n'
    out, stats, _source = run([(0.1 + n / 1000, ping) for n in range(300)] + [(0.5, DELTA + COMPLETED),
                                                                            (0.6, StreamEnd())])
    assert len(out[0]) > HELD_LIMIT and b"".join(out) == ping * 300 + DELTA + COMPLETED and stats.outcome == "ok"


EVAL_RUN = {"name": "r", "data_source": {"type": "completions", "model": "o3-pro",
                                         "sampling_params": {"max_completion_tokens": 100_000}}}
SECRET_BODY = {"session": {"type": "realtime", "model": "gpt-realtime"}}


@pytest.mark.parametrize(("settings", "path", "body", "code"), [
    ({"max_tokens": 256}, "/v1/evals/eval_1/runs", EVAL_RUN, "batch_not_capped"),
    ({"allowed_models": ("gpt-4o-mini",)}, "/v1/evals/eval_1/runs", EVAL_RUN, "model_not_allowed"),
    ({}, "/v1/evals/eval_1/runs", EVAL_RUN, None),
    ({"rate_limit_per_minute": 100}, "/v1/realtime/client_secrets", SECRET_BODY, "minted_key_not_allowed"),
    ({"max_tokens": 256}, "/v1/realtime/sessions", SECRET_BODY, "minted_key_not_allowed"),
    ({"allowed_models": ("gpt-*",)}, "/v1/realtime/transcription_sessions", {}, "minted_key_not_allowed"),
    ({"daily_token_budget": 1000}, "/v1/realtime/client_secrets/", SECRET_BODY, "minted_key_not_allowed"),
    ({}, "/v1/realtime/client_secrets", SECRET_BODY, None),
])
def test_work_the_relay_cannot_see_is_refused_where_its_rules_apply(
        recorder: Recorder, settings: dict[str, Any], path: str, body: dict[str, Any], code: str | None) -> None:
    """An eval run reads its requests from a file, as a batch does (refused where models are restricted or
    answers capped); a Realtime client secret or session is a key for the provider's own API, past every rule
    of the relay (refused wherever any applies). With no rule in force both are forwarded."""
    client = forwarding_client(recorder, **settings)
    answer = client.post(path, json=body, headers=bearer())
    if code is None:
        assert answer.status_code == 200 and len(recorder.seen) == 1, answer.data
    else:
        assert answer.status_code == 403 and answer.json["error"]["code"] == code, answer.data
        assert recorder.seen == [], "refused before the upstream"


@pytest.mark.parametrize("mark", [b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"])
@pytest.mark.parametrize(("path", "content_type"), [
    ("/v1/embeddings", None), ("/v1/embeddings", "text/plain"), ("/v1/moderations", "application/json"),
    ("/v1/images/generations", None), ("/v1/responses", None),
])
def test_a_body_behind_a_byte_order_mark_is_refused(recorder: Recorder, mark: bytes, path: str,
                                                    content_type: str | None) -> None:
    """Python's json module (many upstream servers parse bodies with it, with or without a Content-Type) reads
    JSON behind a byte-order mark, where the relay's checks would not see its model: 400 on every family,
    before the upstream."""
    client = forwarding_client(recorder, allowed_models=("gpt-4o-mini",))
    body = '{"model": "o3-pro", "input": "hi", "prompt": "hi"}'
    encoding = {b"\xef\xbb\xbf": "utf-8", b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be",
                b"\xff\xfe\x00\x00": "utf-32-le", b"\x00\x00\xfe\xff": "utf-32-be"}[mark]
    data = mark + body.encode(encoding)
    assert json.loads(data)["model"] == "o3-pro", "what such an upstream would read"
    headers = {**bearer(), **({"Content-Type": content_type} if content_type else {})}
    answer = client.post(path, data=data, headers=headers)
    assert answer.status_code == 400 and answer.json["error"]["code"] == "invalid_json", answer.data
    assert recorder.seen == []


@given(st.text(alphabet="a\r\n:", max_size=60))
def test_the_last_event_end_found_from_the_back_is_the_scans(text: str) -> None:
    """`last_event_end` finds the same last event end as scanning every event from the start, however
    line breaks of every kind are run together."""
    data = text.encode()
    scanned = 0
    for match in _EVENT_END.finditer(data):
        scanned = match.end()
    assert last_event_end(data, len(data)) == scanned


@given(st.lists(st.sampled_from(["data:", "data: ", "event: x", ": data:", "{}", "[DONE]", " ", "\r", "\n", "a"]),
                max_size=12))
def test_an_events_data_is_what_its_data_lines_say(parts: list[str]) -> None:
    """`sse_data`'s shortcut for the usual one-`data:`-line event gives what splitting every line gives:
    the `data:` lines' values joined by line feeds, None without one, whatever else the event holds."""
    event = "".join(parts).encode()
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    assert sse_data(event) == (b"\n".join(lines) if lines else None)


def test_usage_is_found_in_a_block_of_many_events() -> None:
    """A whole fast answer in one block: the usage of its last event is read, whatever comes before it."""
    usage = SseUsage()
    created = b'event: response.created\r\ndata: {"type":"response.created","response":{"usage":null}}\r\n\r\n'
    usage.feed(created + DELTA * 200 + b'event: response.completed\ndata: {"type":"response.completed",'
               b'"response":{"usage":{"input_tokens":5,"output_tokens":200,"total_tokens":205}}}\n\n')
    assert usage.usage == {"prompt_tokens": 5, "completion_tokens": 200, "total_tokens": 205}
