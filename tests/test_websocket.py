"""`/ws`, the tutorials' WebSocket chat, under real gunicorn (production config) and the fake upstream."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
import simple_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from proxy.routes.websocket import Conversation
from tests.conftest import ACCESS_KEY, SECRETS, RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until

SYSTEM_PROMPT = "You are the relay's WebSocket test persona."
FAKE_ANSWER = "Hello from the fake upstream."


@pytest.fixture(scope="module")
def ws_relay(relay_factory: Callable[..., RelayProcess]) -> Iterator[RelayProcess]:
    relay = relay_factory(fresh=True, SYSTEM_PROMPT=SYSTEM_PROMPT, KEEPALIVE_SECONDS="1", MAX_BODY_BYTES="4096")
    yield relay
    relay.stop()


def ws_url(relay: RelayProcess, query: str = f"key={ACCESS_KEY}") -> str:
    return relay.url.replace("http://", "ws://", 1) + "/ws" + (f"?{query}" if query else "")


def connect(relay: RelayProcess, query: str = f"key={ACCESS_KEY}", **options: Any) -> simple_websocket.Client:
    return simple_websocket.Client.connect(ws_url(relay, query), **options)


def receive_answer(ws: simple_websocket.Client, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every record of one answer, from isStreaming to done."""
    records: list[dict[str, Any]] = []
    while True:
        raw = ws.receive(timeout=timeout)
        assert raw is not None, f"no record within {timeout} s; got so far: {records}"
        records.append(json.loads(raw))
        if records[-1].get("done"):
            return records


def ask(ws: simple_websocket.Client, content: str) -> list[dict[str, Any]]:
    ws.send(json.dumps({"content": content}))
    return receive_answer(ws)


def replies(records: list[dict[str, Any]]) -> str:
    return "".join(record["reply"] for record in records if not record.get("error"))


def test_answer_is_framed_exactly_like_the_tutorials_server(ws_relay: RelayProcess, fake: FakeUpstream) -> None:
    """One message gets {"reply":"","isStreaming":true}, a {"reply":delta} per delta, then {"reply":"","done":true}."""
    ws = connect(ws_relay)
    try:
        records = ask(ws, "hello")
    finally:
        ws.close()
    assert records[0] == {"reply": "", "isStreaming": True}
    assert records[-1] == {"reply": "", "done": True}
    assert all(set(record) == {"reply"} for record in records[1:-1])
    assert replies(records) == FAKE_ANSWER


def test_deltas_arrive_as_they_are_generated(ws_relay: RelayProcess, fake: FakeUpstream) -> None:
    """With 300 ms between upstream tokens, the first delta reaches the client long before the last exists."""
    fake.behave(tokens=["one", " two", " three", " four"], token_interval=0.3)
    ws = connect(ws_relay)
    try:
        ws.send(json.dumps({"content": "count"}))
        sent = time.monotonic()
        assert json.loads(ws.receive(timeout=5))["isStreaming"] is True
        assert json.loads(ws.receive(timeout=5)) == {"reply": "one"}
        first_delta_after = time.monotonic() - sent
        rest = receive_answer(ws)
        whole_answer_after = time.monotonic() - sent
    finally:
        ws.close()
    assert replies(rest) == " two three four"
    # The last three tokens come 0.9 s after the first: unbuffered, the first delta is out long before the end.
    assert whole_answer_after - first_delta_after > 0.6, (first_delta_after, whole_answer_after)


def test_conversation_is_remembered_per_connection_after_the_system_prompt(
    ws_relay: RelayProcess, fake: FakeUpstream
) -> None:
    """The second message's upstream request carries SYSTEM_PROMPT, the first question and its answer."""
    ws = connect(ws_relay)
    try:
        ask(ws, "first question")
        ask(ws, "second question")
    finally:
        ws.close()
    assert fake.requests[-1].json["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": FAKE_ANSWER},
        {"role": "user", "content": "second question"},
    ]
    other = connect(ws_relay)
    try:
        ask(other, "fresh start")
    finally:
        other.close()
    assert [m["role"] for m in fake.requests[-1].json["messages"]] == ["system", "user"]


def events_until_server_closes(relay: RelayProcess, query: str) -> list[Any]:
    """Open a WebSocket with wsproto on a plain socket and return every event until the server hangs up.

    (simple_websocket's client drops a close frame that arrives in the same read as the handshake answer.)
    """
    host, port = relay.url.removeprefix("http://").split(":")
    connection = WSConnection(ConnectionType.CLIENT)
    events: list[Any] = []
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(connection.send(Request(host=f"{host}:{port}", target=f"/ws?{query}")))
        while data := sock.recv(65536):
            connection.receive_data(data)
            events.extend(connection.events())
    return events


@pytest.mark.parametrize("query", ["key=wrong-key", "", "key="], ids=["wrong", "missing", "empty"])
def test_wrong_or_missing_key_is_accepted_then_closed_with_1008(
    ws_relay: RelayProcess, fake: FakeUpstream, query: str
) -> None:
    """A bad key completes the handshake, then the server closes with 1008 and the reason; nothing goes upstream."""
    events = events_until_server_closes(ws_relay, query)
    assert isinstance(events[0], AcceptConnection)
    closes = [event for event in events if isinstance(event, CloseConnection)]
    assert len(closes) == 1 and closes[0].code == 1008
    assert "access key" in closes[0].reason
    assert fake.requests == []
    # The access log says what the client saw: 1008, not an HTTP 401 that never went out.
    assert wait_until(lambda: any("path=/ws" in line and "status=1008" in line
                                  for line in ws_relay.log_text().splitlines()))


def test_authorization_header_works_for_non_browser_clients(ws_relay: RelayProcess) -> None:
    """Clients that can set headers may send `Authorization: Bearer <key>` instead of the query parameter."""
    ws = connect(ws_relay, "", headers={"Authorization": f"Bearer {ACCESS_KEY}"})
    try:
        assert replies(ask(ws, "hi")) == FAKE_ANSWER
    finally:
        ws.close()


def test_errors_are_reported_and_the_connection_stays_usable(ws_relay: RelayProcess, fake: FakeUpstream) -> None:
    """Bad JSON, an empty question, an upstream 503 and a mid-stream break each give an error record; the next
    question still works and the failed turns are not sent upstream again."""
    ws = connect(ws_relay)
    try:
        ws.send("not json")
        bad_json = receive_answer(ws)
        ws.send(json.dumps({"content": "  "}))
        empty = receive_answer(ws)
        fake.behave(status=503)
        upstream_down = ask(ws, "are you there?")
        fake.behave(tokens=["partial", " answer", " lost"], disconnect_after=1)
        broken = ask(ws, "tell me")
        fake.reset()
        recovered = ask(ws, "and now?")
    finally:
        ws.close()
    for records, words in ((bad_json, "JSON"), (empty, "content"), (upstream_down, "upstream"),
                           (broken, "incomplete")):
        assert records[0] == {"reply": "", "isStreaming": True}
        errors = [record for record in records if record.get("error")]
        assert len(errors) == 1 and words in errors[0]["reply"], records
        assert records[-1] == {"reply": "", "done": True}
    assert replies(broken) == "partial"
    assert replies(recovered) == FAKE_ANSWER
    # The unanswered question is forgotten; the broken answer's part the client saw is kept.
    assert fake.requests[-1].json["messages"][1:] == [
        {"role": "user", "content": "tell me"},
        {"role": "assistant", "content": "partial"},
        {"role": "user", "content": "and now?"},
    ]


def test_client_leaving_mid_answer_closes_the_upstream(ws_relay: RelayProcess, fake: FakeUpstream) -> None:
    """Closing the WebSocket mid-answer closes the upstream connection within 2 s, measured at the fake."""
    fake.behave(n_tokens=100, token_interval=0.1)
    ws = connect(ws_relay)
    ws.send(json.dumps({"content": "a long story"}))
    assert json.loads(ws.receive(timeout=5))["isStreaming"] is True
    assert "reply" in json.loads(ws.receive(timeout=5))
    ws.close()
    left_at = time.monotonic()
    assert fake.wait_for(lambda: fake.streams_closed, timeout=5)
    closed = fake.streams_closed[0]
    assert not closed.completed and closed.tokens_sent < 100
    assert closed.at - left_at < 2.0


def test_message_over_the_body_limit_closes_with_1009(ws_relay: RelayProcess, fake: FakeUpstream) -> None:
    """A single message larger than MAX_BODY_BYTES is refused by the WebSocket layer (close code 1009)."""
    ws = connect(ws_relay)
    ws.send(json.dumps({"content": "x" * 5000}))
    with pytest.raises(simple_websocket.ConnectionClosed) as closed:
        ws.receive(timeout=5)
    assert closed.value.reason == 1009
    assert fake.requests == []


def test_access_log_redacts_the_key_and_logs_each_answer(ws_relay: RelayProcess) -> None:
    """The `key` query parameter never reaches the log; each answer and each connection get one line."""
    ws = connect(ws_relay)
    try:
        ask(ws, "log me")
    finally:
        ws.close()
    assert wait_until(lambda: "method=WS" in ws_relay.log_text() and "outcome=ok" in ws_relay.log_text())
    log = ws_relay.log_text()
    assert "path=/ws?key=%5Bredacted%5D" in log
    assert "method=WS" in log and "outcome=ok" in log
    for secret in SECRETS:
        assert secret not in log


def test_plain_http_get_on_ws_is_a_clear_json_error(ws_relay: RelayProcess) -> None:
    """A GET /ws without the upgrade gets a JSON error, not an HTML page or a 500."""
    response = httpx2.get(f"{ws_relay.url}/ws?key={ACCESS_KEY}")
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith("application/json")
    assert "error" in response.json()


def test_history_is_bounded_oldest_turns_first_never_the_system_prompt() -> None:
    """Past the message or size bound the oldest turns go; the system prompt stays; history starts with a question."""
    conversation = Conversation.starting_with("persona", max_messages=4, max_chars=1000)
    for turn in range(5):
        conversation.add("user", f"question {turn}")
        conversation.add("assistant", f"answer {turn}")
    assert conversation.messages() == [
        {"role": "system", "content": "persona"},
        {"role": "user", "content": "question 3"},
        {"role": "assistant", "content": "answer 3"},
        {"role": "user", "content": "question 4"},
        {"role": "assistant", "content": "answer 4"},
    ]
    by_size = Conversation.starting_with("persona", max_messages=100, max_chars=50)
    by_size.add("user", "q" * 20)
    by_size.add("assistant", "a" * 20)
    by_size.add("user", "z" * 20)
    assert by_size.messages() == [{"role": "system", "content": "persona"}, {"role": "user", "content": "z" * 20}]


def connect_when_free(relay: RelayProcess, timeout: float = 5.0) -> simple_websocket.Client:
    """A connection as soon as the key's stream slot is free (the relay frees it a moment after a close)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(relay)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_connection_holds_one_stream_slot_and_counts_its_tokens_when_it_closes(
    relay_factory: Callable[..., RelayProcess], fake: FakeUpstream
) -> None:
    """With MAX_STREAMS_PER_KEY=1 an open connection holds the key's slot (a second handshake gets 429) and frees
    it when it closes; its answers' tokens count against DAILY_TOKEN_BUDGET."""
    relay = relay_factory(fresh=True, MAX_STREAMS_PER_KEY="1", DAILY_TOKEN_BUDGET="10")
    try:
        first = connect(relay)
        try:
            ask(first, "hello")
            refused = httpx2.get(f"{relay.url}/ws?key={ACCESS_KEY}", headers={
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
            assert refused.status_code == 429
        finally:
            first.close()
        second = connect_when_free(relay)  # the slot is free again (7 of the 10 tokens used)
        try:
            ask(second, "again")
        finally:
            second.close()
        # The tokens are counted when the connection's close is handled, a moment after the client's.
        assert wait_until(lambda: httpx2.post(f"{relay.url}/chat", headers=relay.headers(), json={
            "messages": [{"role": "user", "content": "one more"}]}).status_code == 429), relay.log_text()
        over_budget = httpx2.post(f"{relay.url}/chat", headers=relay.headers(),
                                  json={"messages": [{"role": "user", "content": "one more"}]})
        assert over_budget.status_code == 429, relay.log_text()
        assert "budget" in over_budget.text
    finally:
        relay.stop()


def test_restart_closes_idle_connections_with_1001_and_ends_answers_properly(
    relay_factory: Callable[..., RelayProcess], fake: FakeUpstream
) -> None:
    """On SIGTERM an idle connection is closed at once with 1001 (going away); an answer still streaming when
    the grace period runs out ends with a server_restarting error record and done, then 1001."""
    relay = relay_factory(fresh=True, GUNICORN_GRACEFUL_TIMEOUT="4")
    idle = connect(relay)
    busy = connect(relay)
    busy.send(json.dumps({"content": "#fake " + json.dumps({"n_tokens": 300, "token_interval": 0.1})}))
    assert json.loads(busy.receive(timeout=5))["isStreaming"] is True
    relay.process.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    with pytest.raises(simple_websocket.ConnectionClosed) as idle_closed:
        idle.receive(timeout=5)
    assert idle_closed.value.reason == 1001
    assert time.monotonic() - signalled_at < 2.5
    records = receive_answer(busy)
    errors = [record for record in records if record.get("error")]
    assert len(errors) == 1 and errors[0]["code"] == "server_restarting", records
    assert replies(records)  # the part streamed during the grace period arrived
    with pytest.raises(simple_websocket.ConnectionClosed) as busy_closed:
        busy.receive(timeout=5)
    assert busy_closed.value.reason == 1001
    assert relay.process.wait(10) == 0
