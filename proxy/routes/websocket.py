"""`/ws`: the tutorials' WebSocket chat, with the conversation kept on the server for each connection.

The client sends `{"content": "..."}` (and optionally `"model"`). Every message gets one answer framed by
`WebSocketEncoder`: `{"reply":"","isStreaming":true}`, `{"reply":"<delta>"}`..., `{"reply":"","done":true}`;
an error is `{"reply":"<message>","error":true,"code":...}` inside that frame and the connection stays
usable. The conversation starts with `SYSTEM_PROMPT` and is bounded: the oldest turns go first, the system
prompt never.

Browsers cannot set headers on a WebSocket, so the access key comes as a `key` query parameter (the access
log redacts it) or an `Authorization` header. A wrong key gets the handshake accepted and the connection
closed with 1008 (policy violation), which a page can see in `CloseEvent.code`. A malformed handshake (no
`Sec-WebSocket-Key`, no `Host`) gets 400, a version other than 13 gets 426 with `Sec-WebSocket-Version: 13`,
both in the relay's error shape.

simple-websocket (wsproto) runs the protocol on the socket gunicorn hands over; under the gevent worker its
reader thread is a greenlet. Each answer goes through the same pump as `POST /chat`, with a different
encoder.

Limits. The handshake is a request like any other (one count against the key's requests per minute and
per day, the token budget checked) and the connection then holds one stream slot of its key (and of
MAX_OPEN_STREAMS) for as long as it is open: its answers stream one at a time inside that slot. Every
message is then a request of its own, through `RequestLimits`' public checks, which its HTTP hooks use too:
- the key's entry is looked up again in the keyring (KEYS_FILE is reread on change): a key that is gone
  closes the connection with 1008, at its next message or, while idle, within about a second (the
  keyring's reload check plus DRAIN_CHECK_SECONDS, half a second each); the message is judged by the
  entry's current limits;
- one count in the key's per-minute and per-day buckets, the very ones its HTTP requests count in;
- the key's budgets checked, and the most the answer can cost reserved (`proxy/budgets.py`), before the
  answer; the reservation settled from its usage when it ends;
- one usage-ledger row per answer (not one per connection), written when the answer ends or is refused;
- the connection's slot taken again under the key's current caps (a lowered max_streams applies); this
  also renews it, as does an idle connection every half MAX_STREAM_SECONDS, so it never expires while the
  connection lives. Refused, the connection holds no slot until a later message gets one.
A refusal is an error record (`rate_limited`, `token_budget_exhausted`, `too_many_streams`) inside the
message's answer frame; the connection stays usable.

Memory. A message may be MAX_BODY_BYTES long; messages sent while an answer is being produced wait in a
queue of at most QUEUED_MESSAGES messages and MAX_BODY_BYTES characters in all. Beyond that the connection
is closed with 1013 (try again later) and a reason, and whatever else arrives is read and dropped until the
client answers the close (or CLOSE_HANDSHAKE_SECONDS pass). So one connection holds at most a partial
message, the queue and the bounded conversation, whatever the client sends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, SupportsIndex, cast

import orjson
from flask import Blueprint, Flask, Response, request
from simple_websocket import ConnectionClosed, Server
from wsproto.events import CloseConnection
from wsproto.utilities import RemoteProtocolError

from proxy.accesslog import AccessRecord
from proxy.budgets import Reservation
from proxy.encoders import WebSocketEncoder
from proxy.errors import BadRequest, RateLimited, RelayError, Unauthorized, UpgradeRequired
from proxy.keys import KeyPolicy
from proxy.pipeline import admit_shaped, endpoint
from proxy.pump import StreamStats, pump
from proxy.relay import Relay, current_relay
from proxy.request_state import RequestState, request_state
from proxy.shaping import shape_chat_request
from proxy.upstream import UpstreamStream, open_stream
from proxy.usage import TokenUsage

log = logging.getLogger("relay.websocket")

POLICY_VIOLATION = 1008
GOING_AWAY = 1001
TRY_AGAIN_LATER = 1013
QUEUED_MESSAGES = 8
KEY_GONE_REASON = "this access key is no longer valid"
DRAIN_CHECK_SECONDS = 0.5  # an idle connection wakes this often: a restart, or its key revoked
RESTARTING_REASON = "the relay is restarting; reconnect to continue (the conversation starts afresh)"
# The kept conversation: the system prompt plus at most this many messages (20 exchanges); older turns
# are dropped first. Its text is also held under MAX_BODY_BYTES, the size a POST /chat body may have.
HISTORY_MESSAGES = 40
CLOSE_HANDSHAKE_SECONDS = 2.0
INTERNAL_ERROR_MESSAGE = "the relay hit an internal error answering this message; the operator can find it in the logs"


@dataclass
class Conversation:
    """One connection's conversation: an optional system prompt and the turns after it, bounded."""

    system: list[dict[str, Any]]
    max_messages: int
    max_chars: int
    turns: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def starting_with(cls, system_prompt: str | None, max_messages: int, max_chars: int) -> Conversation:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return cls(system, max_messages, max_chars)

    def messages(self) -> list[dict[str, Any]]:
        return self.system + self.turns

    def add(self, role: str, content: str) -> None:
        self.turns.append({"role": role, "content": content})
        self._trim()

    def drop_unanswered_question(self) -> None:
        """Forget the last question when it got no answer, so asking again does not send it twice."""
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()

    def _trim(self) -> None:
        while len(self.turns) > self.max_messages or (len(self.turns) > 1 and self._chars() > self.max_chars):
            del self.turns[0]
        # A conversation the model sees should start with a question, not half an exchange.
        while len(self.turns) > 1 and self.turns[0]["role"] != "user":
            del self.turns[0]

    def _chars(self) -> int:
        return sum(len(turn["content"]) for turn in self.turns)


def register_websocket(app: Flask) -> None:
    """Route `/ws` (WebSocket upgrade requests only) on `app`."""
    blueprint = Blueprint("websocket", __name__)
    blueprint.add_url_rule("/ws", "chat", endpoint("ndjson", access="own", streams=True)(websocket_chat),
                           websocket=True)
    app.register_blueprint(blueprint)


class ConversationEnded(Response):
    """What the view returns once the conversation is over on the raw socket: nothing is left to send.

    Closing it runs the request's close callbacks (the access-log line, the connection's stream slot given
    back; its tokens were charged answer by answer). Under gunicorn, raising StopIteration is its convention
    for "the app handled the socket itself; close the connection" (flask-sock, the Flask glue for
    simple-websocket, does the same without the close).
    """

    def __init__(self, server_mode: str, status: int) -> None:
        super().__init__(status=status)
        self.server_mode = server_mode

    def __call__(self, environ: Any, start_response: Any) -> Any:
        if self.server_mode == "gunicorn":
            self.close()
            raise StopIteration()
        return super().__call__(environ, start_response)  # the dev server closes the response itself


class WholeFrameSocket:
    """The connection as simple-websocket writes to it. It sends each frame with one `socket.send()`, which
    writes only part of a large frame when the kernel buffer is full, corrupting the stream (simple-websocket
    issue #45, still in 1.1.0), and its ping thread writes concurrently: here every frame goes out whole, one
    frame at a time."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._sending = threading.Lock()

    def send(self, data: bytes) -> int:
        with self._sending:
            self._sock.sendall(data)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Inbox(list[str | bytes]):
    """simple-websocket's queue of received messages (its reader appends, `receive` pops), with a cap on what
    it holds: past QUEUED_MESSAGES messages or `max_chars` characters a message is dropped, not queued, and
    the connection marked as overflowed (the reader then closes it)."""

    def __init__(self, max_chars: int, max_messages: int = QUEUED_MESSAGES) -> None:
        super().__init__()
        self.max_chars = max_chars
        self.max_messages = max_messages
        self.queued_chars = 0
        self.overflowed = False

    def append(self, message: str | bytes) -> None:
        if self.overflowed:
            return
        if len(self) >= self.max_messages or self.queued_chars + len(message) > self.max_chars:
            self.overflowed = True
            return
        self.queued_chars += len(message)
        super().append(message)

    def pop(self, index: SupportsIndex = -1) -> str | bytes:
        message = super().pop(index)
        self.queued_chars -= len(message)
        return message


class BoundedServer(Server):  # type: ignore[misc]  # simple-websocket ships no type hints
    """simple-websocket's server with a capped queue (`Inbox`): when the client sends more than the queue holds,
    the reader closes the connection with 1013 and stops queueing anything."""

    def __init__(self, environ: dict[str, Any], *, queue_chars: int, **options: Any) -> None:
        self._queue_chars = queue_chars
        self.closed_for: int | None = None  # the close code, when this reader closed the connection itself
        super().__init__(environ, **options)

    @property
    def input_buffer(self) -> Inbox:
        return self._inbox

    @input_buffer.setter
    def input_buffer(self, _initial: list[str | bytes]) -> None:
        # simple-websocket assigns a plain list before its reader starts; every message goes through ours.
        self._inbox = Inbox(self._queue_chars)

    def _handle_events(self) -> bool:
        keep_going = bool(super()._handle_events())
        if keep_going and self._inbox.overflowed:
            self.closed_for = TRY_AGAIN_LATER
            # A close reason has at most 123 bytes.
            self.close(TRY_AGAIN_LATER, f"more than {QUEUED_MESSAGES} messages or {self._inbox.max_chars} characters "
                                        "queued while an answer was pending")
            self.event.set()
            self._drain_until_close()
            return False
        return keep_going

    def _drain_until_close(self) -> None:
        """Read and drop what the client still sends until it answers the close frame (or a moment passes):
        closing a socket with unread data resets it, and the client would see 1006 instead of the reason."""
        deadline = time.monotonic() + CLOSE_HANDSHAKE_SECONDS
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self.sock.settimeout(remaining)
                data = self.sock.recv(65536)
            except OSError:  # the timeout included
                return
            if not data:
                return
            self.ws.receive_data(data)
            if any(isinstance(event, CloseConnection) for event in self.ws.events()):
                return
            time.sleep(0)  # a socket that always has data never blocks: let the worker's other greenlets run


def accept_connection(relay: Relay) -> BoundedServer:
    """Complete the handshake, or refuse a malformed one with 400 (426 for another protocol version)."""
    if request.headers.get("Sec-WebSocket-Version", "13") != "13":
        raise UpgradeRequired()
    try:
        ws = BoundedServer(request.environ, queue_chars=relay.config.max_body_bytes,
                           ping_interval=relay.config.keepalive_seconds,
                           max_message_size=relay.config.max_body_bytes)
    except RemoteProtocolError as exc:  # wsproto checks the headers before a byte is sent: answer in HTTP
        raise BadRequest(f"not a valid WebSocket handshake: {exc}", kind="bad_handshake") from None
    ws.sock = WholeFrameSocket(ws.sock)
    return ws


@dataclass
class Session:
    """One open connection: its socket, the request state (caller, stream slot) and its conversation."""

    ws: BoundedServer
    relay: Relay
    state: RequestState
    conversation: Conversation
    slot_renewed_at: float = field(default_factory=time.monotonic)

    def current_policy(self) -> KeyPolicy | None:
        """The caller's entry as the keyring has it now (KEYS_FILE is reread on change); None once it is gone."""
        caller = self.state.caller
        return self.relay.config.keyring.by_digest(caller.digest) if caller is not None else None

    def renew_slot(self, policy: KeyPolicy) -> None:
        """Take the connection's stream slot again under the key's current caps; RateLimited when none is free
        (the connection then holds none)."""
        lease, self.state.lease = self.state.lease, None
        self.state.lease = self.relay.limits.renew_stream(policy, lease)
        self.slot_renewed_at = time.monotonic()

    def keep_slot_while_idle(self, policy: KeyPolicy) -> None:
        """Renew the slot before its lease (MAX_STREAM_SECONDS plus a margin) could expire under an idle socket."""
        if time.monotonic() - self.slot_renewed_at < self.relay.config.max_stream_seconds / 2:
            return
        try:
            self.renew_slot(policy)
        except RateLimited:
            log.info("WebSocket connection of key %s holds no stream slot until its next message", policy.name)


def websocket_chat() -> Response:
    """Serve one WebSocket connection: authenticate, then answer each message in turn until it closes."""
    relay = current_relay()
    ws = accept_connection(relay)
    state = request_state()
    status = 101
    try:
        if state.caller is None:  # decided by the pipeline, from the `key` parameter or the header
            status = POLICY_VIOLATION  # what the client sees, so also what the access log and metrics say
            close_with_handshake(ws, POLICY_VIOLATION, str(Unauthorized().description))
            return ConversationEnded(ws.mode, status)
        state.access.stats = StreamStats(started_at=state.access.started)  # all answers: for the log line
        state.charged = True  # each answer is charged as it ends
        session = Session(ws, relay, state, Conversation.starting_with(
            relay.config.system_prompt, HISTORY_MESSAGES, relay.config.max_body_bytes))
        status = converse(session)
    except (ConnectionClosed, OSError):
        log.debug("WebSocket client left")  # the normal end of a conversation, mid-answer or not
    finally:
        ws.thread.join(CLOSE_HANDSHAKE_SECONDS)  # a closing reader may still be draining the socket
    # A connection the reader closed (1013: flooded) ended with that code, whatever the answer loop saw.
    return ConversationEnded(ws.mode, ws.closed_for or status)


def converse(session: Session) -> int:
    """Answer each message until the client leaves (ConnectionClosed), the key goes or the worker stops;
    return the status the connection ended with."""
    ws, relay = session.ws, session.relay
    while not relay.draining.active:
        # Raises ConnectionClosed once the client has gone; wakes up now and then to notice a restart.
        message = ws.receive(timeout=DRAIN_CHECK_SECONDS)
        policy = session.current_policy()
        if policy is None:
            close_with_handshake(ws, POLICY_VIOLATION, KEY_GONE_REASON)
            return POLICY_VIOLATION
        if message is None:
            session.keep_slot_while_idle(policy)
        elif ws.connected:  # a message queued before the reader closed the connection is not answered
            answer_safely(session, policy, message)
    # The worker is stopping: nothing is in progress on this connection, so let the client reconnect
    # (to the new worker) now rather than be cut when the grace period ends.
    close_with_handshake(ws, GOING_AWAY, RESTARTING_REASON)
    return 101


def close_with_handshake(ws: Server, code: int, reason: str) -> None:
    """Send a close frame, then give the client a moment to answer it before the socket is closed.

    Closing a socket with the client's data still unread (its answering close frame, or a message it sent
    right after connecting) makes the kernel reset the connection, and the client then reports 1006
    instead of `code`. simple-websocket's reader stops and closes the socket once the client's close
    frame arrives.
    """
    ws.close(reason=code, message=reason)
    ws.thread.join(CLOSE_HANDSHAKE_SECONDS)


def answer_safely(session: Session, policy: KeyPolicy, message: str | bytes) -> None:
    """Answer one message; a bug answering it must not end the conversation or reach the client."""
    try:
        answer(session, policy, message)
    except (ConnectionClosed, OSError):
        raise  # the client went away: the connection ends, nothing to answer
    except Exception:  # logged with its traceback (BLE allows it); the client gets a plain error record
        log.exception("unhandled error answering a WebSocket message")
        encoder = WebSocketEncoder()
        send_records(session.ws, encoder.start() + encoder.error("internal_error", INTERNAL_ERROR_MESSAGE)
                     + encoder.end(None, None))


def answer(session: Session, policy: KeyPolicy, message: str | bytes) -> None:
    """Admit one message as a request of its own, stream its answer, remember the exchange, charge its tokens."""
    ws, relay, conversation = session.ws, session.relay, session.conversation
    connection = session.state.access
    encoder = WebSocketEncoder()
    record = AccessRecord(method="WS", path=connection.path, client=connection.client,
                          request_id=connection.request_id, started=time.monotonic(), status=101,
                          key_name=policy.name)
    asked = False
    try:
        relay.limits.admit_message(policy)  # counted first, like an HTTP request whatever its body
        session.renew_slot(policy)
        content, model = parse_client_message(message)
        conversation.add("user", content)
        asked = True
        stream, reservation = open_answer(relay, conversation, model, record, policy)
    except RelayError as refused:
        if asked:
            conversation.drop_unanswered_question()
        record.status = refused.status
        send_records(ws, encoder.start() + encoder.error(refused.kind, str(refused.description))
                     + encoder.end(None, None))
        record.write()
        relay.ledger.record_answer(record, session.state.route, refused.kind)
        return
    stats = StreamStats(keep_content=relay.config.log_content, started_at=record.started)
    record.stats = stats
    try:
        # Closing the pump (a generator) when the client leaves mid-answer closes the upstream at once.
        records = cast(Generator[bytes, None, None],
                       pump(stream, encoder, relay.timers, stats, lambda: not ws.connected, relay.draining))
        with closing(records):
            for data in records:
                send_records(ws, data)
    finally:
        if encoder.reply:
            conversation.add("assistant", encoder.reply)
        else:
            conversation.drop_unanswered_question()
        record.write()
        relay.ledger.record_answer(record, session.state.route)
        relay.limits.charge(policy, stats.token_usage(), reservation)
        if connection.stats is not None:
            add_answer(connection.stats, stats)


def open_answer(relay: Relay, conversation: Conversation, model: str | None, record: AccessRecord,
                policy: KeyPolicy) -> tuple[UpstreamStream, Reservation | None]:
    """The conversation shaped like a POST /chat body, its model authorized for the key, its cost reserved, the
    upstream opened."""
    body: dict[str, Any] = {"messages": conversation.messages()}
    if model is not None:
        body["model"] = model
    shaped = shape_chat_request(body, relay.config)
    admit_shaped(record, policy, shaped, relay.config)
    reservation = relay.limits.reserve(policy, shaped.model, shaped.upstream_body)
    try:
        return open_stream(relay.upstreams, shaped.upstream_body, relay.config.upstream_timeout,
                           relay.body_read_timeout), reservation
    except BaseException:
        relay.limits.release_reservation(reservation)
        raise


def add_answer(total: StreamStats, answer: StreamStats) -> None:
    """Fold one answer's numbers into the connection's, for its log line (the budget was charged per answer)."""
    if total.first_token_at is None:
        total.first_token_at = answer.first_token_at
    total.upstream = answer.upstream
    total.tokens += answer.tokens
    total.outcome = answer.outcome
    total.finish_reason = answer.finish_reason
    so_far = TokenUsage.of_answer(total.usage, 0)
    total.usage = (so_far + answer.token_usage()).as_upstream_usage()


def parse_client_message(message: str | bytes) -> tuple[str, str | None]:
    """The `content` (and optional `model`) of a client message, or a BadRequest saying what is wrong."""
    try:
        parsed = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise BadRequest('send JSON like {"content": "your question"}', kind="invalid_json") from None
    if not isinstance(parsed, dict):
        raise BadRequest('send a JSON object like {"content": "your question"}')
    content = parsed.get("content")
    if not isinstance(content, str) or not content.strip():
        raise BadRequest("'content' must be a non-empty string")
    model = parsed.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    return content, model


def send_records(ws: Server, data: bytes) -> None:
    """Send each newline-terminated JSON record in `data` as its own text message."""
    for line in data.split(b"\n"):
        if line:
            ws.send(line.decode())
