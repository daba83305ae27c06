"""MAX_TOKENS and MAX_CHOICES on every body the relay sends upstream, fast: the one table of answer sizes
(proxy/shaping.py `ANSWER_SIZES`), its rules per family, the bytes a forwarded body becomes
(proxy/forwarding.py `capped_body`), and the forwarded routes in-process (OpenAI and Anthropic shapes, the
upstream's body, the budgets' reservation)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import create_app
from proxy.budgets import OUTPUT_CAP_FIELDS, output_cap, spend_counter, utc_day
from proxy.config import Config
from proxy.errors import BadRequest
from proxy.forwarding import capped_body
from proxy.shaping import ANSWER_SIZES, CHAT_SIZE, CHOICE_FIELDS, answer_size, size_changes
from proxy.upstream import Upstream
from tests.conftest import ACCESS_KEY, UPSTREAM_KEY
from tests.unit.conftest import bearer, unit_config
from tests.unit.test_anthropic import Upstream as AnthropicRecorder
from tests.unit.test_anthropic import messages_client
from tests.unit.test_passthrough import Recorder, forwarding_client

CAPPED = unit_config(max_tokens=256)
FREE = unit_config()
FOUR = unit_config(max_tokens=256, max_choices=4)
RESPONSES, COMPLETIONS, MESSAGES = ANSWER_SIZES["responses"], ANSWER_SIZES["completions"], ANSWER_SIZES["v1/messages"]


# --- the table -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "family"), [
    ("responses", "responses"), ("responses/", "responses"), ("/responses", "responses"),
    ("completions", "completions"), ("v1/messages", "v1/messages"), ("v1//messages", "v1/messages"),
    ("threads/runs", "threads/runs"), ("threads/thread_1/runs", "threads/*/runs"),
    ("chat/completions", "chat/completions"),
    ("responses/resp_1", None), ("responses/input_tokens", None), ("v1/messages/count_tokens", None),
    ("embeddings", None), ("threads/thread_1/runs/run_1", None), ("threads/thread_1/messages", None), ("", None),
])
def test_each_path_finds_its_row(path: str, family: str | None) -> None:
    """A forwarded path finds its family's row (stray slashes ignored); paths whose bodies set no answer size
    (a stored response, token counting, embeddings...) find none."""
    assert answer_size(path) is (ANSWER_SIZES[family] if family is not None else None)


def test_the_table_is_what_chat_and_the_budgets_read() -> None:
    """Chat's own rule is the table's row; the budgets read every token field and every choice count of it;
    each row's inserted field is one of its token fields."""
    assert ANSWER_SIZES["chat/completions"] is CHAT_SIZE
    assert set(OUTPUT_CAP_FIELDS) == {name for size in ANSWER_SIZES.values() for name in size.tokens}
    assert set(CHOICE_FIELDS) == {"n", "best_of"}
    assert all(size.insert in size.tokens for size in ANSWER_SIZES.values())


# --- the rules, per family -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "body", "config", "changes"), [
    # capped
    (RESPONSES, {"max_output_tokens": 100_000}, CAPPED, {"max_output_tokens": 256}),
    (MESSAGES, {"max_tokens": 100_000}, CAPPED, {"max_tokens": 256}),
    (COMPLETIONS, {"max_tokens": 100_000, "n": 1, "best_of": 1}, CAPPED, {"max_tokens": 256}),
    (COMPLETIONS, {"max_tokens": 100_000.0}, CAPPED, {"max_tokens": 256}),
    (ANSWER_SIZES["threads/*/runs"], {"max_completion_tokens": 9999}, CAPPED, {"max_completion_tokens": 256}),
    # inserted when the client set none (null is none)
    (RESPONSES, {"input": "hi"}, CAPPED, {"max_output_tokens": 256}),
    (RESPONSES, {"max_output_tokens": None}, CAPPED, {"max_output_tokens": 256}),
    (MESSAGES, {}, CAPPED, {"max_tokens": 256}),
    (COMPLETIONS, {"prompt": "x"}, CAPPED, {"max_tokens": 256}),
    # left alone when under the cap, or with no cap
    (RESPONSES, {"max_output_tokens": 100}, CAPPED, {}),
    (MESSAGES, {"max_tokens": 256}, CAPPED, {}),
    (COMPLETIONS, {"max_tokens": 10, "n": 4, "best_of": 4}, FOUR, {}),
    (RESPONSES, {"max_output_tokens": 100_000}, FREE, {}),
    (RESPONSES, {}, FREE, {}),
    (COMPLETIONS, {"n": 64, "best_of": 64}, FREE, {}),
    # a whole number sent as a float goes as an integer (which the budgets read), capped or not
    (MESSAGES, {"max_tokens": 100.0}, FREE, {"max_tokens": 100}),
    (COMPLETIONS, {"max_tokens": 8, "n": 2.0, "best_of": 3.0}, FREE, {"n": 2, "best_of": 3}),
])
def test_each_family_is_held_to_the_caps(size: Any, body: dict[str, Any], config: Config,
                                         changes: dict[str, Any]) -> None:
    """Over MAX_TOKENS: capped; no cap sent: MAX_TOKENS inserted; under it or no MAX_TOKENS: as sent."""
    assert size_changes(size, body, config) == changes
    assert all(type(value) is int for value in changes.values())


@pytest.mark.parametrize(("size", "body", "config", "words"), [
    (RESPONSES, {"max_output_tokens": "100000"}, CAPPED, "'max_output_tokens' must be a whole number"),
    (RESPONSES, {"max_output_tokens": 12.5}, FREE, "'max_output_tokens' must be a whole number"),
    (MESSAGES, {"max_tokens": True}, CAPPED, "'max_tokens' must be a whole number"),
    (MESSAGES, {"max_tokens": 0}, CAPPED, "'max_tokens' must be at least 1"),
    (COMPLETIONS, {"max_tokens": [5]}, FREE, "'max_tokens' must be a whole number"),
    (COMPLETIONS, {"n": 64}, CAPPED, "'n' may be at most 1 on this relay (MAX_CHOICES)"),
    (COMPLETIONS, {"best_of": 64}, CAPPED, "'best_of' may be at most 1 on this relay (MAX_CHOICES)"),
    (COMPLETIONS, {"n": 2, "best_of": 5}, FOUR, "'best_of' may be at most 4 on this relay (MAX_CHOICES)"),
    (COMPLETIONS, {"best_of": "2"}, FREE, "'best_of' must be a whole number"),
])
def test_counts_that_would_dodge_the_caps_are_refused(size: Any, body: dict[str, Any], config: Config,
                                                      words: str) -> None:
    """A token count or choice count that is not a whole number (a string, a fraction, a boolean), and
    choices above MAX_CHOICES (1 with MAX_TOKENS, as on chat), are a 400 naming the field."""
    with pytest.raises(BadRequest) as caught:
        size_changes(size, body, config)
    assert caught.value.description == words
    assert caught.value.kind == ("too_many_choices" if "MAX_CHOICES" in words else "invalid_request")


# --- the bytes the upstream gets -------------------------------------------------------------------------------

def test_a_body_that_needs_no_change_is_the_same_bytes() -> None:
    """The hot path: nothing to change, nothing re-encoded (the very same bytes object)."""
    for path, raw, config in [("responses", b'{"model":"m","max_output_tokens":10}', CAPPED),
                              ("responses", b'{"model": "m"}', FREE), ("embeddings", b'{"model":"m"}', CAPPED),
                              ("responses/resp_1", b'{"x":1}', CAPPED)]:
        assert capped_body(path, raw, orjson.loads(raw), config) is raw


def test_a_missing_cap_is_appended_to_the_bytes_as_sent() -> None:
    """MAX_TOKENS sent when the client set none: the client's bytes kept as they are, the field appended."""
    raw = b'{"model": "m", "input": "caf\\u00e9", "seed": 18446744073709551617}  \n'
    body = orjson.loads(raw)
    sent = capped_body("responses", raw, body, CAPPED)
    assert sent == b'{"model": "m", "input": "caf\\u00e9", "seed": 18446744073709551617,"max_output_tokens":256}'
    assert json.loads(sent)["max_output_tokens"] == body["max_output_tokens"] == 256


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"model":"m","max_output_tokens":100000,"seed":18446744073709551617}',
     {"model": "m", "max_output_tokens": 256, "seed": 18446744073709551617}),
    (b'{"model":"m","max_output_tokens":null}', {"model": "m", "max_output_tokens": 256}),
    (b"{}", {"max_output_tokens": 256}),
])
def test_a_changed_field_is_replaced_once(raw: bytes, expected: dict[str, Any]) -> None:
    """A field present (a value over the cap, or null) is replaced, not sent twice; every other value as
    sent (a seed beyond 64 bits exactly)."""
    body = orjson.loads(raw)
    sent = capped_body("responses", raw, body, CAPPED)
    assert json.loads(sent) == expected and sent.count(b"max_output_tokens") == 1
    assert body["max_output_tokens"] == 256


# --- the routes, in-process ------------------------------------------------------------------------------------

def posted(client: FlaskClient, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return client.post(path, data=orjson.dumps(body), headers={**(headers or bearer()),
                                                               "Content-Type": "application/json"})


@pytest.mark.parametrize(("path", "body", "field", "sent"), [
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 100_000}, "max_output_tokens",
     256),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}, "max_output_tokens", 256),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": "x", "max_tokens": 100_000, "n": 1}, "max_tokens", 256),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": "x", "max_tokens": 12}, "max_tokens", 12),
    ("/v1/threads/thread_1/runs", {"assistant_id": "a", "max_completion_tokens": 100_000},
     "max_completion_tokens", 256),
])
def test_forwarded_openai_bodies_reach_the_upstream_capped(path: str, body: dict[str, Any], field: str,
                                                           sent: int) -> None:
    """What the upstream gets under MAX_TOKENS: the capped (or inserted) value, the rest as sent."""
    recorder = Recorder()
    assert posted(forwarding_client(recorder, max_tokens=256), path, body).status_code == 200
    got = json.loads(recorder.bodies[0])
    assert got == {**body, field: sent}


@pytest.mark.parametrize(("path", "body", "code"), [
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": "x", "max_tokens": 10, "n": 64, "best_of": 64},
     "too_many_choices"),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": "x", "best_of": 2}, "too_many_choices"),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": "100000"}, "invalid_request"),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 1e5 + 0.5}, "invalid_request"),
])
def test_forwarded_openai_refusals_are_openai_errors(path: str, body: dict[str, Any], code: str) -> None:
    """Too many choices, or a token count that is not a whole number: 400 in OpenAI's shape, as on chat;
    the upstream never asked."""
    recorder = Recorder()
    answer = posted(forwarding_client(recorder, max_tokens=256), path, body)
    assert answer.status_code == 400
    assert answer.json["error"]["code"] == code and answer.json["error"]["type"] == "invalid_request_error"
    assert recorder.seen == []


@pytest.mark.parametrize(("fields", "sent"), [({"max_tokens": 100_000}, 256), ({"max_tokens": 100}, 100), ({}, 256),
                                              ({"max_tokens": 300.0}, 256)])
def test_anthropic_bodies_reach_the_upstream_capped(fields: dict[str, Any], sent: int) -> None:
    """POST /v1/messages to an Anthropic-protocol upstream: max_tokens held to MAX_TOKENS (sent when
    missing); count_tokens, which makes no answer, goes as sent."""
    upstream = AnthropicRecorder()
    client = messages_client(upstream, max_tokens=256)
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "Hi"}], **fields}
    assert posted(client, "/v1/messages", body, {"x-api-key": ACCESS_KEY}).status_code == 200
    assert json.loads(upstream.seen[0].content) == {**body, "max_tokens": sent}
    counted = {"model": "claude-x", "messages": body["messages"]}
    assert posted(client, "/v1/messages/count_tokens", counted, {"x-api-key": ACCESS_KEY}).status_code == 200
    assert json.loads(upstream.seen[1].content) == counted


@pytest.mark.parametrize("value", ["100000", 12.5, True, 0])
def test_anthropic_refusals_are_anthropic_errors(value: Any) -> None:
    """A max_tokens that is not a whole number of at least 1: 400 in Anthropic's shape, upstream unasked."""
    upstream = AnthropicRecorder()
    body = {"model": "claude-x", "max_tokens": value, "messages": [{"role": "user", "content": "Hi"}]}
    answer = posted(messages_client(upstream, max_tokens=256), "/v1/messages", body, {"x-api-key": ACCESS_KEY})
    assert answer.status_code == 400
    assert answer.json["type"] == "error" and answer.json["error"]["type"] == "invalid_request_error"
    assert "'max_tokens' must be" in answer.json["error"]["message"]
    assert not upstream.seen


PRICES = '[[prices]]\nmodel = "gpt-4o-mini"\ninput = 1000\noutput = 1000\n'  # 0.001 a token
ALICE = "alice-caps-key-0123456789"


def test_the_reservation_reads_the_capped_body(tmp_path: Path) -> None:
    """A key's spend limit reserves what the upstream is allowed to write: max_output_tokens 100000 under
    MAX_TOKENS 50 is reserved (and sent) as 50, so it fits a limit 100000 would not; completions' best_of
    multiplies the reservation."""
    keys, prices = tmp_path / "keys.toml", tmp_path / "prices.toml"
    keys.write_text(f'[keys.alice]\nkey = "{ALICE}"\ndaily_spend = 0.5\n')
    prices.write_text(PRICES)
    recorder = Recorder()
    app = create_app(unit_config(keys_file=keys, prices_file=prices, max_tokens=50, max_choices=8))
    client = openai.OpenAI(api_key=UPSTREAM_KEY, base_url="http://upstream.invalid/v1", max_retries=0,
                           http_client=httpx2.Client(transport=recorder))
    app.extensions["relay"] = dataclasses.replace(app.extensions["relay"], upstreams=(Upstream("fake", client),))
    alice = {"Authorization": f"Bearer {ALICE}"}
    body = {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 100_000}
    answer = posted(app.test_client(), "/v1/responses", body, alice)
    answer.get_data()
    answer.close()
    assert answer.status_code == 200 and json.loads(recorder.bodies[0])["max_output_tokens"] == 50
    # 50 tokens times best_of 8 and the prompt's estimate: more than the 0.5 left of the limit.
    many = {"model": "gpt-4o-mini", "prompt": "x" * 600, "max_tokens": 50, "best_of": 8}
    assert output_cap(many, app.extensions["relay"].config) == 400
    refused = posted(app.test_client(), "/v1/completions", many, alice)
    assert refused.status_code == 429 and refused.json["error"]["code"] == "daily_spend_exhausted"
    assert len(recorder.bodies) == 1
    assert app.extensions["relay"].limits.counters.amounts([spend_counter("alice", utc_day())])[0][1] == 0.0


@pytest.mark.parametrize("path", ["/v1/responses/x/..", "/v1/responses/./", "/v1/responses/%2e%2e/responses",
                                  "/v1/completions/.", "/v1/threads/t1/./runs", "/v1/embeddings/../completions",
                                  "/v1/files/%2E%2E/batches"])
def test_dot_segments_cannot_move_a_request_to_another_family(path: str) -> None:
    """The upstream's URL loses `.` and `..` segments (httpx removes them), so a path judged as one family
    (no caps, no batch rule) would reach another: refused with 400 before the upstream."""
    recorder = Recorder()
    body = {"model": "gpt-4o-mini", "input": "x", "max_output_tokens": 100_000, "max_tokens": 100_000}
    answer = posted(forwarding_client(recorder, max_tokens=256), path, body)
    assert answer.status_code == 400 and answer.json["error"]["code"] == "invalid_path"
    assert recorder.seen == []


@pytest.mark.parametrize(("caps", "refused"), [({"max_tokens": 256}, True), ({"max_choices": 2}, True), ({}, False)])
def test_batches_are_refused_where_answers_are_capped(caps: dict[str, int], refused: bool) -> None:
    """A batch's requests are inside a file the relay never reads, so it cannot cap them: POST /v1/batches is
    403 `batch_not_capped` under MAX_TOKENS or MAX_CHOICES, as it is where models are restricted; reading one
    is still allowed."""
    recorder = Recorder()
    client = forwarding_client(recorder, **caps)
    batch = posted(client, "/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
                                           "completion_window": "24h"})
    if refused:
        assert batch.status_code == 403 and batch.json["error"]["code"] == "batch_not_capped"
        assert recorder.seen == []
    else:
        assert batch.status_code == 200 and len(recorder.seen) == 1
    assert client.get("/v1/batches/batch_1", headers=bearer()).status_code == 200


JSON_BODY = orjson.dumps({"model": "o3-pro", "prompt": "x", "max_tokens": 100_000})


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/octet-stream", JSON_BODY), ("multipart/form-data; boundary=x", JSON_BODY),
    ("text/plain", b"prompt=" + JSON_BODY), ("application/json", b"[" + JSON_BODY + b"]"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/responses", "/v1/threads/t1/runs"])
def test_a_capped_family_takes_json_only(content_type: str, body: bytes, path: str) -> None:
    """A JSON body the relay does not read as one (sent as an upload or as text, inside an array) would go
    with neither its model checked nor its caps held to an upstream that may parse it anyway: refused with
    400 for the families the table caps. (Behind a byte-order mark it is refused on every family:
    tests/unit/test_passthrough.py.)"""
    recorder = Recorder()
    client = forwarding_client(recorder, max_tokens=256, allowed_models=("gpt-4o-mini",))
    answer = client.post(path, data=body, headers={**bearer(), "Content-Type": content_type})
    assert answer.status_code == 400 and answer.json["error"]["code"] == "invalid_content_type"
    assert answer.json["error"]["message"] == (f"{path} takes a JSON object as its body "
                                               "(Content-Type: application/json)")
    assert recorder.seen == []


def test_a_capped_family_without_a_body_is_forwarded() -> None:
    """An empty body (a GET, a cancel) is not refused: it asks for no answer the caps could miss."""
    recorder = Recorder()
    client = forwarding_client(recorder, max_tokens=256)
    assert client.get("/v1/threads/t1/runs", headers=bearer()).status_code == 200
    assert client.post("/v1/completions", headers=bearer()).status_code == 200
    assert recorder.bodies == [b"", b""]


# Integers within 64 bits: orjson, which reads every body, reads one past that as a float (a token count that
# large is refused by any upstream; the relay sends such a body's bytes as they came).
values = st.none() | st.booleans() | st.integers(-10, 2**63 - 1) | st.floats() | st.text(max_size=8) | st.lists(
    st.integers(-(2**63), 2**63 - 1), max_size=2)
sized_bodies = st.dictionaries(st.sampled_from(["max_tokens", "max_completion_tokens", "max_output_tokens", "n",
                                                "best_of", "model", "input"]), values, max_size=5)


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(["responses", "completions", "v1/messages", "threads/t/runs"]), body=sized_bodies,
       max_tokens=st.none() | st.integers(1, 5000), max_choices=st.none() | st.integers(1, 4))
def test_whatever_the_body_the_upstream_never_gets_more_than_the_caps(path: str, body: dict[str, Any],
                                                                    max_tokens: int | None,
                                                                    max_choices: int | None) -> None:
    """Any values in any answer-size fields: either a 400, or bytes that parse to the body with every token
    field a whole number within MAX_TOKENS (one present when MAX_TOKENS is set) and every choice count a
    whole number within MAX_CHOICES; what the budgets read is what is sent."""
    config = unit_config(max_tokens=max_tokens, max_choices=max_choices)
    try:
        raw = json.dumps(body).encode()
    except ValueError:
        return  # not JSON (NaN, infinity): json_object would have refused it
    if not math.isfinite(sum(v for v in body.values() if isinstance(v, float))):
        return
    read = orjson.loads(raw)  # as the relay reads a body
    try:
        sent = json.loads(capped_body(path, raw, read, config))  # exactly, as an upstream reads it
    except BadRequest:
        return
    size = answer_size(path)
    assert size is not None and sent == read
    for name in size.tokens:
        if sent.get(name) is not None:
            assert type(sent[name]) is int and (max_tokens is None or 1 <= sent[name] <= max_tokens)
    if max_tokens is not None:
        assert any(sent.get(name) is not None for name in size.tokens)
    for name in size.choices:
        if sent.get(name) is not None:
            assert type(sent[name]) is int and (config.choices_cap is None or sent[name] <= config.choices_cap)
