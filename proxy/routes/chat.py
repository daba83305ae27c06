"""`POST /chat`: the old Node relay's protocol, NDJSON records `{"done","error","content"}`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flask import Blueprint, Response, request

from proxy.encoders import Encoder, NdjsonEncoder
from proxy.pipeline import endpoint
from proxy.pump import StreamStats, pump, socket_watcher
from proxy.relay import Relay, current_relay
from proxy.request_state import request_state
from proxy.shaping import ChatRequest, shape_chat_request
from proxy.upstream import Upstream, open_stream

bp = Blueprint("chat", __name__)

NDJSON_HEADERS = {
    "Content-Type": "application/x-ndjson; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer this response
}


@bp.post("/chat")
@endpoint("ndjson", streams=True, body=shape_chat_request)
def chat(shaped: ChatRequest) -> Response:
    return stream_response(current_relay(), shaped.upstream_body, NdjsonEncoder(shaped.include_reasoning),
                           NDJSON_HEADERS)


def stream_response(relay: Relay, upstream_body: dict[str, Any], encoder: Encoder, headers: dict[str, str],
                    upstreams: Sequence[Upstream] | None = None) -> Response:
    """Open the upstream stream (falling over as needed) and answer with what the pump makes of it.
    `upstreams` replaces the configured ones (the stream doctor's stand-in)."""
    access = request_state().access
    stream = open_stream(relay.upstreams if upstreams is None else upstreams, upstream_body,
                         relay.config.upstream_timeout, relay.body_read_timeout)
    stats = StreamStats(keep_content=relay.config.log_content, started_at=access.started)
    access.stats = stats
    body = pump(stream, encoder, relay.timers, stats, client_socket_watcher(request.environ), relay.draining)
    return Response(body, status=200, headers=headers)


def client_socket_watcher(environ: dict[str, Any]) -> Any:
    return socket_watcher(environ.get("gunicorn.socket") or environ.get("werkzeug.socket"))
