"""GET /chat: Server-Sent Events for EventSource pages, read the way a browser's EventSource reads them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest

from tests.conftest import ACCESS_KEY, SECRETS, RelayProcess
from tests.fake_upstream import FakeUpstream


@dataclass
class Event:
    type: str
    data: str
    last_event_id: str = ""


def parse_event_stream(body: bytes) -> tuple[list[Event], int]:
    """Parse an event stream as the HTML standard's EventSource does (line by line, any of CRLF/LF/CR,
    comments skipped, multi-line data joined, an event dispatched on a blank line, a trailing event
    without its blank line dropped). Returns the events and the number of comment lines seen."""
    text = body.decode("utf-8")
    events: list[Event] = []
    comments = 0
    event_type, data, last_id = "", [], ""
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line == "":
            if data:
                events.append(Event(event_type or "message", "\n".join(data), last_id))
            event_type, data = "", []
            continue
        if line.startswith(":"):
            comments += 1
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event_type = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
    return events, comments


def tutorial_page(events: list[Event]) -> str:
    """What the EventSource tutorial's page shows: onmessage appends delta.content until [DONE]."""
    shown = ""
    for event in events:
        if event.type != "message":
            continue  # named events never reach onmessage
        if event.data == "[DONE]":
            break
        chunk = json.loads(event.data)
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            shown += content
    return shown


def get_chat(relay: RelayProcess, headers: dict[str, str] | None = None, **params: str) -> httpx2.Response:
    return httpx2.get(f"{relay.url}/chat", params=params, headers=headers or {}, timeout=20)


def test_eventsource_page_reads_the_answer(relay: RelayProcess, fake: FakeUpstream) -> None:
    """GET /chat?prompt=...&key=... streams OpenAI chunks as `data:` events then [DONE], which the
    tutorial's page turns into the answer; the prompt went upstream as one user message."""
    response = get_chat(relay, prompt="Hi there", key=ACCESS_KEY)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events, _ = parse_event_stream(response.content)
    assert all(event.type == "message" for event in events)
    assert events[-1].data == "[DONE]"
    assert tutorial_page(events) == "Hello from the fake upstream."
    assert all(json.loads(e.data)["object"] == "chat.completion.chunk" for e in events[:-1])
    sent = fake.requests[-1].json
    assert sent["messages"] == [{"role": "user", "content": "Hi there"}] and sent["model"] == "gpt-4o-mini"
    # The relay asks for usage (the token budget counts it) but the page never sees a choices-less chunk
    # that would trip its choices[0]: tutorial_page above read every event.
    assert sent["stream_options"] == {"include_usage": True}
    assert all(json.loads(e.data)["choices"] and "usage" not in json.loads(e.data) for e in events[:-1])
    assert {event.last_event_id for event in events} == {response.headers["x-request-id"]}


def test_head_never_asks_the_model(relay: RelayProcess, fake: FakeUpstream) -> None:
    """HEAD /chat (which Flask routes to the GET view) checks the request but never calls the upstream."""
    response = httpx2.head(f"{relay.url}/chat", params={"prompt": "Hi", "key": ACCESS_KEY})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert httpx2.head(f"{relay.url}/chat", params={"prompt": "Hi"}).status_code == 401
    assert not fake.requests


def test_reconnect_after_a_drop_is_told_to_stop(relay: RelayProcess, fake: FakeUpstream) -> None:
    """EventSource reconnecting on its own (Last-Event-ID set) gets 204, which stops it, and the model is not
    asked a second time."""
    response = get_chat(relay, {"Last-Event-ID": "0123abcd"}, prompt="Hi", key=ACCESS_KEY)
    assert response.status_code == 204 and not response.content
    assert not fake.requests


def test_model_parameter_and_header_key(relay: RelayProcess, fake: FakeUpstream) -> None:
    """`model` picks the model; the key may also come as an Authorization header."""
    response = get_chat(relay, relay.headers(), prompt="Hi", model="gpt-4o")
    assert response.status_code == 200
    assert fake.requests[-1].json["model"] == "gpt-4o"


def test_keepalive_comments_are_invisible_to_eventsource(relay: RelayProcess, fake: FakeUpstream) -> None:
    """During a slow first token the stream carries comment lines, which EventSource ignores."""
    fake.behave(first_token_delay=1.0, tokens=["late"])
    events, comments = parse_event_stream(get_chat(relay, prompt="Hi", key=ACCESS_KEY).content)
    assert comments >= 2
    assert tutorial_page(events) == "late"


def test_error_mid_stream_is_a_named_error_event_then_done(relay: RelayProcess, fake: FakeUpstream) -> None:
    """An upstream cut mid-answer arrives as `event: error` (kept away from onmessage) with the OpenAI error
    object, then [DONE], so the page stops instead of waiting or reconnecting."""
    fake.behave(disconnect_after=2)
    events, _ = parse_event_stream(get_chat(relay, prompt="Hi", key=ACCESS_KEY).content)
    assert tutorial_page(events) == "Hello from"
    errors = [event for event in events if event.type == "error"]
    assert len(errors) == 1
    assert json.loads(errors[0].data)["error"]["code"] == "upstream_disconnected"
    assert (events[-1].type, events[-1].data) == ("message", "[DONE]")


@pytest.mark.parametrize(("params", "status", "code"), [
    ({"prompt": "Hi", "key": "wrong-key"}, 401, "unauthorized"),
    ({"prompt": "Hi"}, 401, "unauthorized"),
    ({"key": ACCESS_KEY}, 400, "invalid_prompt"),
    ({"prompt": "   ", "key": ACCESS_KEY}, 400, "invalid_prompt"),
], ids=["wrong-key", "no-key", "no-prompt", "blank-prompt"])
def test_errors_before_the_stream_keep_their_status(relay: RelayProcess, fake: FakeUpstream,
                                                    params: dict[str, str], status: int, code: str) -> None:
    """Errors before the stream have their real status (a browser's EventSource then closes for good, no
    reconnect loop) and an SSE body (`event: error`, then [DONE]) that curl and fetch readers can show."""
    response = get_chat(relay, **params)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/event-stream")
    events, _ = parse_event_stream(response.content)
    assert [event.type for event in events] == ["error", "message"] and events[1].data == "[DONE]"
    error = json.loads(events[0].data)["error"]
    assert error["code"] == code and error["message"]
    assert not fake.requests


def test_upstream_rate_limit_is_429_with_retry_after(relay: RelayProcess, fake: FakeUpstream) -> None:
    """An upstream 429 before the stream is a 429 with Retry-After, body in the SSE error shape."""
    fake.behave(status=429, retry_after="3")
    response = get_chat(relay, prompt="Hi", key=ACCESS_KEY)
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    events, _ = parse_event_stream(response.content)
    assert json.loads(events[0].data)["error"]["code"] == "upstream_rate_limited"


def test_relay_rules_apply(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream) -> None:
    """SYSTEM_PROMPT and MAX_TOKENS apply to GET /chat; a model outside ALLOWED_MODELS is a 400."""
    relay = relay_factory(SYSTEM_PROMPT="You are terse.", MAX_TOKENS="50", ALLOWED_MODELS="gpt-4o*")
    assert get_chat(relay, prompt="Hi", key=ACCESS_KEY).status_code == 200
    sent: dict[str, Any] = fake.requests[-1].json
    assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
    assert sent["max_tokens"] == 50
    refused = get_chat(relay, prompt="Hi", key=ACCESS_KEY, model="claude-3")
    assert refused.status_code == 400
    events, _ = parse_event_stream(refused.content)
    assert json.loads(events[0].data)["error"]["code"] == "model_not_allowed"


def test_key_in_query_string_never_reaches_the_log(relay: RelayProcess, fake: FakeUpstream) -> None:
    """The access log shows GET /chat with key=[redacted]; no key appears in any log line, whether the
    request succeeded or was refused."""
    assert get_chat(relay, prompt="Hi", key=ACCESS_KEY).status_code == 200
    assert get_chat(relay, prompt="Hi", key=ACCESS_KEY + "x").status_code == 401
    redacted = "method=GET path=/chat?prompt=%5B2+chars%5D&key=%5Bredacted%5D"  # the prompt as its length
    fake.wait_for(lambda: relay.log_text().count(redacted) >= 2, timeout=5)
    log = relay.log_text()
    lines = [line for line in log.splitlines() if redacted in line]
    assert any("status=200" in line for line in lines) and any("status=401" in line for line in lines)
    for secret in SECRETS:
        assert secret not in log
