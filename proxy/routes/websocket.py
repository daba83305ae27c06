"""`/ws`: the tutorials' WebSocket chat, with the conversation kept on the server for each connection.

The client sends `{"content": "..."}` (and optionally `"model"`). Every message gets one answer framed by
`WebSocketEncoder`: `{"reply":"","isStreaming":true}`, `{"reply":"<delta>"}`..., `{"reply":"","done":true}`;
an error is `{"reply":"<message>","error":true,"code":...}` inside that frame and the connection stays
usable. The conversation starts with `SYSTEM_PROMPT` and is bounded: the oldest turns go first, the system
prompt never.

Browsers cannot set headers on a WebSocket, so the access key comes as a `key` query parameter (the access
log redacts it) or an `Authorization` header. A wrong key gets the handshake accepted and the connection
closed with 1008 (policy violation), which a page can see in `CloseEvent.code`.

simple-websocket (wsproto) runs the protocol on the socket gunicorn hands over; under the gevent worker its
reader thread is a greenlet. Each answer goes through the same pump as `POST /chat`, with a different
encoder. The connection is one request to the hooks and limits: it holds one stream slot while open, and
its answers' tokens count against the key's daily budget when it closes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from flask import Blueprint, Flask, Response, request
from simple_websocket import ConnectionClosed, Server

from proxy.accesslog import AccessRecord
from proxy.encoders import WebSocketEncoder
from proxy.errors import BadRequest, RelayError, Unauthorized
from proxy.keys import KeyPolicy
from proxy.pipeline import admit_shaped, endpoint
from proxy.pump import StreamStats, pump
from proxy.relay import Relay, current_relay
from proxy.request_state import request_state
from proxy.shaping import shape_chat_request
from proxy.upstream import open_stream
from proxy.usage import TokenUsage

log = logging.getLogger("relay.websocket")

POLICY_VIOLATION = 1008
GOING_AWAY = 1001
DRAIN_CHECK_SECONDS = 1.0
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

    Closing it runs the request's close callbacks (the access-log line, the limits' stream slot and token
    count). Under gunicorn, raising StopIteration is its convention for "the app handled the socket itself;
    close the connection" (flask-sock, the Flask glue for simple-websocket, does the same without the close).
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


def websocket_chat() -> Response:
    """Serve one WebSocket connection: authenticate, then answer each message in turn until it closes."""
    relay = current_relay()
    ws = Server.accept(request.environ, ping_interval=relay.config.keepalive_seconds,
                       max_message_size=relay.config.max_body_bytes)
    ws.sock = WholeFrameSocket(ws.sock)
    state = request_state()
    connection = state.access
    status = 101
    try:
        if state.caller is None:  # decided by the pipeline, from the `key` parameter or the header
            status = POLICY_VIOLATION  # what the client sees, so also what the access log and metrics say
            close_with_handshake(ws, POLICY_VIOLATION, str(Unauthorized().description))
            return ConversationEnded(ws.mode, status)
        connection.stats = StreamStats(started_at=connection.started)  # all answers: for the log and limits
        conversation = Conversation.starting_with(
            relay.config.system_prompt, HISTORY_MESSAGES, relay.config.max_body_bytes
        )
        while not relay.draining.active:
            # Raises ConnectionClosed once the client has gone; wakes up now and then to notice a restart.
            message = ws.receive(timeout=DRAIN_CHECK_SECONDS)
            if message is not None:
                answer_safely(ws, relay, conversation, message, connection, state.caller)
        # The worker is stopping: nothing is in progress on this connection, so let the client reconnect
        # (to the new worker) now rather than be cut when the grace period ends.
        close_with_handshake(ws, GOING_AWAY, RESTARTING_REASON)
    except (ConnectionClosed, OSError):
        log.debug("WebSocket client left")  # the normal end of a conversation, mid-answer or not
    return ConversationEnded(ws.mode, status)


def close_with_handshake(ws: Server, code: int, reason: str) -> None:
    """Send a close frame, then give the client a moment to answer it before the socket is closed.

    Closing a socket with the client's data still unread (its answering close frame, or a message it sent
    right after connecting) makes the kernel reset the connection, and the client then reports 1006
    instead of `code`. simple-websocket's reader stops and closes the socket once the client's close
    frame arrives.
    """
    ws.close(reason=code, message=reason)
    ws.thread.join(CLOSE_HANDSHAKE_SECONDS)


def answer_safely(ws: Server, relay: Relay, conversation: Conversation, message: str | bytes,
                  connection: AccessRecord, caller: KeyPolicy) -> None:
    """Answer one message; a bug answering it must not end the conversation or reach the client."""
    try:
        answer(ws, relay, conversation, message, connection, caller)
    except (ConnectionClosed, OSError):
        raise  # the client went away: the connection ends, nothing to answer
    except Exception:  # logged with its traceback (BLE allows it); the client gets a plain error record
        log.exception("unhandled error answering a WebSocket message")
        encoder = WebSocketEncoder()
        send_records(ws, encoder.start() + encoder.error("internal_error", INTERNAL_ERROR_MESSAGE)
                     + encoder.end(None, None))


def answer(ws: Server, relay: Relay, conversation: Conversation, message: str | bytes,
           connection: AccessRecord, caller: KeyPolicy) -> None:
    """Stream the answer to one client message and remember the exchange."""
    encoder = WebSocketEncoder()
    record = AccessRecord(method="WS", path=connection.path, client=connection.client,
                          request_id=connection.request_id, started=time.monotonic(), status=101,
                          key_name=connection.key_name)
    try:
        content, model = parse_client_message(message)
        conversation.add("user", content)
        body: dict[str, Any] = {"messages": conversation.messages()}
        if model is not None:
            body["model"] = model
        shaped = shape_chat_request(body, relay.config)
        admit_shaped(record, caller, shaped, relay.config)
        stream = open_stream(relay.upstreams, shaped.upstream_body, relay.config.upstream_timeout,
                             relay.body_read_timeout)
    except RelayError as refused:
        conversation.drop_unanswered_question()
        record.status = refused.status
        send_records(ws, encoder.start() + encoder.error(refused.kind, str(refused.description))
                     + encoder.end(None, None))
        record.write()
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
        if connection.stats is not None:
            add_answer(connection.stats, stats)


def add_answer(total: StreamStats, answer: StreamStats) -> None:
    """Fold one answer's numbers into the connection's, which its log line and the daily token budget read."""
    if total.first_token_at is None:
        total.first_token_at = answer.first_token_at
    total.upstream = answer.upstream
    total.tokens += answer.tokens
    total.outcome = answer.outcome
    total.finish_reason = answer.finish_reason
    so_far = TokenUsage.of_answer(total.usage, 0)
    total.usage = (so_far + TokenUsage.of_answer(answer.usage, answer.tokens)).as_upstream_usage()


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
