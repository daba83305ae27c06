"""Fuzzing request validation on every endpoint, against the relay under gunicorn over real HTTP.

Hypothesis throws any JSON, any bytes, any header value, any content type and any query string at each
endpoint: the answer is always a complete stream (200) or a well-formed 4xx in the endpoint's own shape,
never a 5xx, a traceback or a hang. Schemathesis then checks the relay against its own OpenAPI description
(`GET /openapi.yaml`). Example counts are kept small for CI; FUZZ_EXAMPLES=<n> raises them.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ACCESS_KEY, RelayProcess
from tests.hardening import FAULT_SETTINGS, Outcome, assert_no_secrets, parse_ndjson, parse_sse

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
AUTH = {"Authorization": f"Bearer {ACCESS_KEY}"}
TIMEOUT = httpx2.Timeout(15.0)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
chat_like = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool",
                                                                           "bogus", ""]),
                                                 "content": json_values}), max_size=3) | json_values},
    optional={"model": json_values, "temperature": json_values, "max_tokens": json_values, "stop": json_values,
              "stream": json_values, "stream_options": json_values, "include_reasoning": json_values,
              "seed": json_values, "top_p": json_values},
)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=80).map(lambda value: value.strip(" \t"))  # h11 sends no edge whitespace
content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=latin-1", "",
                                 "application/octet-stream", "text/html"]) | header_text

POST_PATHS = ("/chat", "/v1/chat/completions")


def latin1(headers: dict[str, str]) -> dict[str, bytes]:
    """Header values as bytes, so any Latin-1 text goes on the wire as it is (HTTP allows it)."""
    return {name: value.encode("latin-1") for name, value in headers.items()}


@pytest.fixture(scope="module")
def fuzz_relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    return relay_factory(**FAULT_SETTINGS)


@pytest.fixture(scope="module")
def client(fuzz_relay: RelayProcess) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=fuzz_relay.url, timeout=TIMEOUT) as http:
        yield http


def check_answer(path: str, response: httpx2.Response) -> None:
    """A complete stream or a well-formed 4xx in the endpoint's shape; never 5xx, a traceback or a key."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert "Traceback" not in response.text
    assert_no_secrets(response.content, f"the answer of {path}")
    assert response.headers.get("x-content-type-options") == "nosniff"
    assert response.headers.get("x-request-id")
    content_type = response.headers.get("content-type", "")
    outcome = Outcome(response.status_code, response.headers, response.content, 0.0)
    if path == "/chat" and response.request.method == "POST":
        assert content_type.startswith("application/x-ndjson"), content_type
        parse_ndjson(outcome)
    elif path == "/chat":
        assert content_type.startswith("text/event-stream"), content_type
        parse_sse(outcome)
    elif response.status_code == 200 and content_type.startswith("application/json"):
        assert json.loads(response.content)["object"] == "chat.completion"  # a non-streaming answer
        return
    else:
        parse_sse(outcome)
    assert outcome.ends == 1 and outcome.last_is_end, response.text[-300:]
    if response.status_code == 200:
        return
    assert 400 <= response.status_code < 500
    assert len(outcome.errors) == 1 and outcome.errors[0]["message"] and outcome.errors[0]["code"]


@FUZZ
@given(path=st.sampled_from(POST_PATHS), body=chat_like)
def test_any_json_shaped_like_a_chat(client: httpx2.Client, path: str, body: dict[str, Any]) -> None:
    """Chat-like bodies with any JSON in every field: a stream or a 4xx naming what is wrong."""
    check_answer(path, client.post(path, json=body, headers=AUTH))


@FUZZ
@given(path=st.sampled_from(POST_PATHS), body=json_values)
def test_any_json(client: httpx2.Client, path: str, body: Any) -> None:
    """Any JSON document at all as the body."""
    check_answer(path, client.post(path, json=body, headers=AUTH))


@FUZZ
@given(path=st.sampled_from(POST_PATHS), body=st.binary(max_size=300), content_type=content_types)
def test_any_bytes_any_content_type(client: httpx2.Client, path: str, body: bytes, content_type: str) -> None:
    """Any bytes under any content type."""
    check_answer(path, client.post(path, content=body, headers=latin1({**AUTH, "Content-Type": content_type})))


@FUZZ
@given(path=st.sampled_from(POST_PATHS), authorization=header_text, request_id=header_text,
       origin=header_text, accept=header_text)
def test_any_header_values(client: httpx2.Client, path: str, authorization: str, request_id: str,
                           origin: str, accept: str) -> None:
    """Any value in the headers the relay reads: 401 (or a stream with the right key), never a crash."""
    headers = {"Authorization": authorization, "X-Request-ID": request_id, "Origin": origin, "Accept": accept}
    body = {"messages": [{"role": "user", "content": "hello"}]}
    response = client.post(path, json=body, headers=latin1(headers))
    check_answer(path, response)
    assert response.status_code in (200, 401)
    echoed = response.headers["x-request-id"]
    assert echoed == request_id or (all(c in string.ascii_letters + string.digits + "._-" for c in echoed)
                                    and 0 < len(echoed) <= 64)


@FUZZ
@given(params=st.dictionaries(st.sampled_from(["prompt", "model", "key", "stream", "x"]), header_text, max_size=4))
def test_event_source_any_query(client: httpx2.Client, params: dict[str, str]) -> None:
    """`GET /chat` with any query string: a stream or an SSE error, never a crash."""
    check_answer("/chat", client.get("/chat", params=params, headers=AUTH))


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize("depth", [100, 1_000, 100_000])
def test_deeply_nested_json(client: httpx2.Client, path: str, depth: int) -> None:
    """Arrays nested 100,000 deep (within the body limit) are refused as 400, not a RecursionError."""
    body = ('{"messages":' + "[" * depth + "]" * depth + "}").encode()
    response = client.post(path, content=body, headers={**AUTH, "Content-Type": "application/json"})
    check_answer(path, response)
    assert response.status_code in (400, 413)


@pytest.mark.parametrize("path", POST_PATHS)
def test_huge_inputs(client: httpx2.Client, path: str) -> None:
    """A body over MAX_BODY_BYTES is 413; a huge string within it and 10,000 messages are handled."""
    over = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    response = client.post(path, json=over, headers=AUTH)
    check_answer(path, response)
    assert response.status_code == 413
    many = {"messages": [{"role": "user", "content": "hi"}] * 5_000}
    check_answer(path, client.post(path, json=many, headers=AUTH))


@pytest.mark.parametrize("path", POST_PATHS)
def test_whole_number_written_as_float_is_accepted(client: httpx2.Client, path: str) -> None:
    """`max_tokens: 256.0` is the whole number 256 in JSON (and in JSON Schema): accepted, not a 400."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 256.0, "stream": True}
    response = client.post(path, json=body, headers=AUTH)
    check_answer(path, response)
    assert response.status_code == 200


def test_oversized_header_is_refused_by_gunicorn(client: httpx2.Client) -> None:
    """Headers over gunicorn's limits (8 KiB a field) are refused by gunicorn before the app, as a 4xx."""
    response = client.post("/chat", json={"messages": []}, headers={**AUTH, "X-Big": "y" * 20_000})
    assert 400 <= response.status_code < 500
    assert "Traceback" not in response.text


def test_openapi_conformance(fuzz_relay: RelayProcess, tmp_path: Path) -> None:
    """Schemathesis (its CLI: its pytest plugin does not support this pytest) checks every operation of
    `openapi.yaml` against the running relay, with valid and invalid input: statuses, content types, bodies
    and headers as described, no 5xx, authentication enforced."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{fuzz_relay.url}/openapi.yaml",
        "--header", f"Authorization: Bearer {ACCESS_KEY}", "--max-examples", str(max(10, EXAMPLES // 3)),
        "--checks", "all", "--workers", "1", "--request-timeout", "20", "--seed", "7",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    print(next(line for line in result.stdout.splitlines() if "generated" in line))  # the figure for the report
