"""`GET /chat?prompt=...`: Server-Sent Events for `EventSource` pages.

The events are OpenAI's streaming chunks (`data: <chunk JSON>`) ending in `data: [DONE]`, what the widely
copied EventSource tutorial's page reads. `EventSource` cannot send headers, so the access key may come as
the `key` query parameter (the access log redacts it).

Errors before the stream keep their real status (401, 400, 429, 502...): a browser's EventSource then fails
the connection for good, firing `error` with `readyState === CLOSED` and never reconnecting, which is what a
page wants for a wrong key or an unknown model. The body is still SSE (`event: error` with the OpenAI error
object, then `data: [DONE]`) for curl and fetch-based SSE readers, which can show the message. Errors
mid-stream arrive the same way, as `event: error`, then `data: [DONE]`.

Every chunk carries `id: <request id>`. When the connection drops mid-answer, EventSource reconnects on
its own with the same URL and a `Last-Event-ID` header; asking the model again would repeat the answer on
the page (and pay for it twice), so such a request gets 204 No Content, which makes EventSource stop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, request

from proxy.chat_stream import SSE_HEADERS, stream_response
from proxy.config import Config
from proxy.encoders import SseEncoder
from proxy.errors import BadRequest
from proxy.pipeline import endpoint
from proxy.relay import current_relay
from proxy.request_state import request_state
from proxy.shaping import ask_for_usage, cap_max_tokens, choose_model, with_system_prompt

bp = Blueprint("sse", __name__)


@dataclass(frozen=True)
class PromptRequest:
    """`GET /chat?prompt=...&model=...` as the upstream will see it."""

    model: str
    upstream_body: dict[str, Any]


def shape_prompt_query(args: Mapping[str, str], config: Config) -> PromptRequest:
    prompt = args.get("prompt", "")
    if not prompt.strip():
        raise BadRequest("the 'prompt' query parameter is required: GET /chat?prompt=Hello", kind="invalid_prompt")
    model = choose_model(args.get("model") or None, config)
    body = {"model": model, "messages": with_system_prompt([{"role": "user", "content": prompt}], config)}
    cap_max_tokens(body, config)
    ask_for_usage(body)  # for the token budget; the page gets the chunks without it
    return PromptRequest(model, body)


@bp.get("/chat")
@endpoint("sse", streams=True, query=shape_prompt_query)
def chat_events(shaped: PromptRequest) -> Response:
    if "Last-Event-ID" in request.headers:
        return Response(status=204)  # EventSource reconnecting after a drop: do not answer twice
    if request.method == "HEAD":
        return Response(status=200, headers=SSE_HEADERS)  # Flask routes HEAD here: never ask the model for it
    encoder = SseEncoder(error_event=True, event_id=request_state().access.request_id, hide_usage=True)
    return stream_response(current_relay(), shaped.upstream_body, encoder, SSE_HEADERS)
