"""`/ws`, the tutorials' WebSocket chat, under real gunicorn (production config) and the fake upstream."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import simple_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from proxy.routes.websocket import Conversation
from tests.conftest import ACCESS_KEY, SECRETS, RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.servers import find_program, running_nginx, wait_until

SYSTEM_PROMPT = "You are the relay's WebSocket test persona."
FAKE_ANSWER = "Hello from the fake upstream."
UPGRADE_HEADERS = {"Connection": "Upgrade", "Upgrade": "websocket"}
GOOD_NONCE = "dGhlIHNhbXBsZSBub25jZQ=="


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


def test_connection_holds_one_stream_slot_and_charges_each_answer(
    relay_factory: Callable[..., RelayProcess], fake: FakeUpstream
) -> None:
    """With MAX_STREAMS_PER_KEY=1 an open connection holds the key's slot (a second handshake gets 429) and frees
    it when it closes; each answer's tokens count against DAILY_TOKEN_BUDGET as soon as it ends."""
    relay = relay_factory(fresh=True, MAX_STREAMS_PER_KEY="1", DAILY_TOKEN_BUDGET="10")
    upgrade = {**UPGRADE_HEADERS, "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": GOOD_NONCE}
    first = connect(relay)
    try:
        ask(first, "hello")
        refused = httpx2.get(f"{relay.url}/ws?key={ACCESS_KEY}", headers=upgrade)
        assert refused.status_code == 429
    finally:
        first.close()
    # The slot is free again once the relay has seen the close (7 of the 10 tokens used so far): a handshake
    # of the wrong version then passes the limits and gets its 426 instead of 429.
    assert wait_until(lambda: httpx2.get(f"{relay.url}/ws?key={ACCESS_KEY}", headers={
        **upgrade, "Sec-WebSocket-Version": "8"}).status_code == 426)
    second = connect(relay)
    try:
        ask(second, "again")
        over_budget = httpx2.post(f"{relay.url}/chat", headers=relay.headers(),
                                  json={"messages": [{"role": "user", "content": "one more"}]})
    finally:
        second.close()
    assert over_budget.status_code == 429, relay.log_text()
    assert "budget" in over_budget.text


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


# ---------------------------------------------------------------- limits per message, bounded memory, handshakes


WS_KEYS = {"wsa": "ws-key-a-3c9e1f7b5d20", "wsb": "ws-key-b-8a6d4f2e0c19"}


def keys_toml(**limits: dict[str, int]) -> str:
    """A keys file with the WS_KEYS named in `limits`, each with its own settings."""
    tables = []
    for name, settings in limits.items():
        lines = [f"[keys.{name}]", f'key = "{WS_KEYS[name]}"',
                 *(f"{field} = {value}" for field, value in settings.items())]
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


def rewrite(path: Path, text: str) -> None:
    """Swap a new keys file in, as config tools do; the relay rereads it within a second or two."""
    replacement = path.with_suffix(".new")
    replacement.write_text(text)
    os.replace(replacement, path)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.toml"


def keyed_relay(relay_factory: Callable[..., RelayProcess], keys_file: Path, **limits: dict[str, int]
                ) -> RelayProcess:
    keys_file.write_text(keys_toml(**limits))
    return relay_factory(fresh=True, KEYS_FILE=str(keys_file))


def away_from_minute_boundary() -> None:
    """Fixed one-minute windows: do not start a count a moment before the window turns."""
    if time.time() % 60 > 50:
        time.sleep(60 - time.time() % 60 + 0.1)


def error_code(records: list[dict[str, Any]]) -> str | None:
    """The error kind inside one answer's frame, or None when it was answered."""
    assert records[0] == {"reply": "", "isStreaming": True} and records[-1] == {"reply": "", "done": True}, records
    errors = [record for record in records if record.get("error")]
    return str(errors[0]["code"]) if errors else None


def chat_as(relay: RelayProcess, name: str) -> httpx2.Response:
    return httpx2.post(f"{relay.url}/chat", json={"messages": [{"role": "user", "content": "hi"}]},
                       headers={"Authorization": f"Bearer {WS_KEYS[name]}"}, timeout=20)


@pytest.mark.parametrize(("headers", "status"), [
    ({"Sec-WebSocket-Version": "13"}, 400),
    ({"Sec-WebSocket-Version": "8", "Sec-WebSocket-Key": GOOD_NONCE}, 426),
    ({"Sec-WebSocket-Key": GOOD_NONCE}, 400),
], ids=["no-key", "version-8", "no-version"])
def test_malformed_handshake_gets_4xx_in_the_error_shape_without_a_traceback(
    ws_relay: RelayProcess, headers: dict[str, str], status: int
) -> None:
    """An upgrade without Sec-WebSocket-Key or -Version gets 400, another version 426 naming 13; no crash logged."""
    response = httpx2.get(f"{ws_relay.url}/ws?key={ACCESS_KEY}", headers={**UPGRADE_HEADERS, **headers})
    assert response.status_code == status, response.text
    record = json.loads(response.text.splitlines()[0])
    assert record["error"] is True and record["code"] in ("bad_handshake", "upgrade_required")
    if status == 426:
        assert response.headers["sec-websocket-version"] == "13"
    assert wait_until(lambda: f"status={status}" in ws_relay.log_text())
    assert "Traceback" not in ws_relay.log_text()


def test_key_parameter_and_a_different_authorization_header_are_refused(
    ws_relay: RelayProcess, fake: FakeUpstream, tmp_path: Path
) -> None:
    """`/ws?key=<valid>` with `Authorization: Bearer junk` gets 401 before any upgrade, directly and through
    the shipped nginx site."""
    headers = {**UPGRADE_HEADERS, "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": GOOD_NONCE,
               "Authorization": "Bearer junk"}
    direct = httpx2.get(f"{ws_relay.url}/ws?key={ACCESS_KEY}", headers=headers)
    assert direct.status_code == 401 and "different keys" in direct.text
    if find_program("nginx") is None:
        pytest.skip("nginx is not installed")
    with running_nginx(tmp_path / "nginx", ws_relay.url.removeprefix("http://")) as nginx:
        proxied = httpx2.get(f"{nginx.url}/ws?key={ACCESS_KEY}", headers=headers)
        assert proxied.status_code == 401 and "different keys" in proxied.text
        with pytest.raises(simple_websocket.ConnectionError):
            simple_websocket.Client.connect(nginx.url.replace("http://", "ws://") + f"/ws?key={ACCESS_KEY}",
                                            headers={"Authorization": "Bearer junk"})
    assert fake.requests == []


def connect_as(relay: RelayProcess, name: str) -> simple_websocket.Client:
    return connect(relay, f"key={WS_KEYS[name]}")


def test_each_message_counts_against_the_keys_requests_per_minute(
    relay_factory: Callable[..., RelayProcess], fake: FakeUpstream, keys_file: Path
) -> None:
    """With requests_per_minute=3 the handshake and two messages use the minute up: the third message gets a
    rate_limited record on a still usable connection, and the key's HTTP requests are refused too."""
    relay = keyed_relay(relay_factory, keys_file, wsa={"requests_per_minute": 3}, wsb={})
    away_from_minute_boundary()
    ws = connect_as(relay, "wsa")
    try:
        assert error_code(ask(ws, "one")) is None
        assert error_code(ask(ws, "two")) is None
        refused = ask(ws, "three")
        assert error_code(refused) == "rate_limited" and "3 per 1 minute" in refused[1]["reply"]
        assert error_code(ask(ws, "four")) == "rate_limited"  # still open, still counted
        assert chat_as(relay, "wsa").status_code == 429  # one count for HTTP and WebSocket
        assert chat_as(relay, "wsb").status_code == 200
    finally:
        ws.close()
    assert len(fake.requests) == 3  # two answers and wsb's request; nothing refused went upstream
    assert wait_until(lambda: relay.log_text().count("method=WS") >= 4 and "status=429" in relay.log_text())


def test_daily_token_budget_is_checked_and_charged_per_answer(
    relay_factory: Callable[..., RelayProcess], fake: FakeUpstream, keys_file: Path
) -> None:
    """An answer's tokens count as soon as it ends: on the same open connection the next message gets
    token_budget_exhausted, and so does the key's next HTTP request."""
    relay = keyed_relay(relay_factory, keys_file, wsa={"daily_tokens": 5})
    ws = connect_as(relay, "wsa")
    try:
        assert error_code(ask(ws, "spend it")) is None  # the fake reports more than 5 tokens
        refused = ask(ws, "and more")
        assert error_code(refused) == "token_budget_exhausted" and "5 tokens" in refused[1]["reply"]
        assert chat_as(relay, "wsa").status_code == 429
    finally:
        ws.close()
    assert len(fake.requests) == 1


def test_lowered_max_streams_applies_to_the_next_message_of_open_connections(
    relay_factory: Callable[..., RelayProcess], fake: FakeUpstream, keys_file: Path
) -> None:
    """Two connections fit max_streams=2; lowered to 1 in KEYS_FILE, one of them is refused with
    too_many_streams on its next message while the other keeps its slot and is answered."""
    relay = keyed_relay(relay_factory, keys_file, wsa={"max_streams": 2})
    first, second = connect_as(relay, "wsa"), connect_as(relay, "wsa")
    try:
        assert error_code(ask(first, "hi")) is None and error_code(ask(second, "hi")) is None
        assert chat_as(relay, "wsa").status_code == 429  # both slots held by the idle connections
        rewrite(keys_file, keys_toml(wsa={"max_streams": 1}))
        assert wait_until(lambda: error_code(ask(first, "still there?")) == "too_many_streams", timeout=10)
        assert error_code(ask(second, "and you?")) is None
        assert error_code(ask(first, "again?")) == "too_many_streams"
    finally:
        first.close()
        second.close()
    assert wait_until(lambda: chat_as(relay, "wsa").status_code == 200)  # both slots given back on close


def closed_with(ws: simple_websocket.Client, timeout: float) -> tuple[int, str]:
    """The close code and reason the server ends the connection with, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with pytest.raises(simple_websocket.ConnectionClosed) as closed:
        while time.monotonic() < deadline:
            ws.receive(timeout=deadline - time.monotonic())
        raise AssertionError(f"still open after {timeout} s")
    return closed.value.reason, closed.value.message


def test_key_removed_from_keys_file_closes_its_open_connections(
    relay_factory: Callable[..., RelayProcess], fake: FakeUpstream, keys_file: Path
) -> None:
    """Once a key leaves KEYS_FILE its idle connection and its chatty one are closed with 1008 and a reason
    within a few seconds; another key's connection is untouched."""
    relay = keyed_relay(relay_factory, keys_file, wsa={}, wsb={})
    idle, chatty, other = connect_as(relay, "wsa"), connect_as(relay, "wsa"), connect_as(relay, "wsb")
    try:
        assert error_code(ask(chatty, "hi")) is None
        rewrite(keys_file, keys_toml(wsb={}))
        removed_at = time.monotonic()
        with pytest.raises(simple_websocket.ConnectionClosed) as chatty_closed:
            while time.monotonic() - removed_at < 8:  # answered until the reread keyring no longer has the key
                ask(chatty, "still me")
        assert chatty_closed.value.reason == 1008 and "no longer valid" in chatty_closed.value.message
        assert closed_with(idle, timeout=5) == (1008, "this access key is no longer valid")
        assert time.monotonic() - removed_at < 6
        assert error_code(ask(other, "fine?")) is None
    finally:
        for ws in (idle, chatty, other):
            if ws.connected:
                ws.close()
    assert chat_as(relay, "wsa").status_code == 401


class RawClient:
    """A WebSocket client on a plain socket that writes whole frames (`sendall`) and reads in a thread, so it
    can flood the server while still seeing what the server sends back."""

    def __init__(self, relay: RelayProcess, query: str) -> None:
        host, port = relay.url.removeprefix("http://").split(":")
        self.connection = WSConnection(ConnectionType.CLIENT)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.sendall(self.connection.send(Request(host=f"{host}:{port}", target=f"/ws?{query}")))
        self.events: list[Any] = []
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert wait_until(lambda: any(isinstance(event, AcceptConnection) for event in self.events))

    def _read(self) -> None:
        try:
            while data := self.sock.recv(65536):
                self.connection.receive_data(data)
                self.events.extend(self.connection.events())
        except OSError:
            pass  # reset by the server after its close frame: what was read is in self.events
        self.closed.set()

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.connection.send(TextMessage(data=text)))

    def frame(self, text: str) -> bytes:
        """The bytes of one text message, to send again and again: a flooding client ignores close frames."""
        return self.connection.send(TextMessage(data=text))

    def close_code(self) -> CloseConnection | None:
        return next((event for event in self.events if isinstance(event, CloseConnection)), None)


def worker_rss_kib(relay: RelayProcess) -> int:
    stats = httpx2.get(f"{relay.url}/debug/stats", headers=relay.headers(), timeout=10).json()
    return int(stats["rss_kib"])


def test_flood_of_large_messages_during_an_answer_is_capped(
    relay_factory: Callable[..., RelayProcess], fake: FakeUpstream
) -> None:
    """Up to 300 messages of ~1 MB sent while an answer is pending, close frame or not: the connection is closed
    with 1013 and a reason once the queue is full, and the worker's RSS grows by far less than the data sent."""
    relay = relay_factory(fresh=True, RELAY_DEBUG_STATS="1")
    client = RawClient(relay, f"key={ACCESS_KEY}")
    try:
        client.send_text(json.dumps({"content": "#fake " + json.dumps({"first_token_delay": 20})}))
        assert wait_until(lambda: len(fake.requests) == 1)  # the answer is pending upstream
        before = worker_rss_kib(relay)
        big = client.frame(json.dumps({"content": "x" * 1_000_000}))
        sent = 0
        for _ in range(300):
            try:
                client.sock.sendall(big)
            except OSError:
                break  # the server closed the connection
            sent += len(big)
        assert client.closed.wait(10)
        after = worker_rss_kib(relay)
    finally:
        client.sock.close()
    close = client.close_code()
    assert close is not None and close.code == 1013 and "queued" in close.reason, client.events
    # The access log says how the connection ended, as the client saw it.
    assert wait_until(lambda: "method=GET path=/ws?key=%5Bredacted%5D status=1013" in relay.log_text()), (
        relay.log_text()[-2000:])
    # The worker holds at most a partial message, the queue (MAX_BODY_BYTES) and allocator slack, while the
    # client got far more out (300 MB on an idle machine, read and dropped until the close completes).
    assert sent >= 48 * 2**20, sent
    assert (after - before) * 1024 < 16 * 2**20, (before, after, sent)
    assert relay.process.poll() is None


def test_a_question_sent_during_an_answer_waits_its_turn(ws_relay: RelayProcess, fake: FakeUpstream) -> None:
    """Within the queue's cap a message sent while an answer streams is answered after it, in order."""
    fake.behave(tokens=["slow", " answer"], token_interval=0.3)
    ws = connect(ws_relay)
    try:
        ws.send(json.dumps({"content": "first"}))
        assert json.loads(ws.receive(timeout=5))["isStreaming"] is True
        ws.send(json.dumps({"content": "second"}))
        first, second = receive_answer(ws), receive_answer(ws)
    finally:
        ws.close()
    assert replies(first) == "slow answer" and replies(second) == "slow answer"
    assert [request.json["messages"][-1]["content"] for request in fake.requests] == ["first", "second"]
