"""`POST /chat`: the old Node relay's protocol, NDJSON records `{"done","error","content"}`."""

from __future__ import annotations

from flask import Blueprint, Response

from proxy.chat_stream import NDJSON_HEADERS, stream_response
from proxy.encoders import NdjsonEncoder
from proxy.pipeline import endpoint
from proxy.relay import current_relay
from proxy.shaping import ChatRequest, shape_chat_request

bp = Blueprint("chat", __name__)


@bp.post("/chat")
@endpoint("ndjson", streams=True, body=shape_chat_request)
def chat(shaped: ChatRequest) -> Response:
    return stream_response(current_relay(), shaped.upstream_body, NdjsonEncoder(shaped.include_reasoning),
                           NDJSON_HEADERS)
