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

from flask import Blueprint, Response, g, request

from proxy.access import authenticate, authorize_model
from proxy.encoders import SseEncoder
from proxy.errors import BadRequest, error_shape
from proxy.relay import current_relay
from proxy.routes.chat import stream_response
from proxy.routes.openai_api import SSE_HEADERS
from proxy.shaping import cap_max_tokens, choose_model, with_system_prompt

bp = Blueprint("sse", __name__)


@bp.get("/chat")
@error_shape("sse")
def chat_events() -> Response:
    relay = current_relay()
    access = g.access
    authorization = request.headers.get("Authorization") or request.args.get("key")
    access.key_name = authenticate(relay.config, authorization)
    if "Last-Event-ID" in request.headers:
        return Response(status=204)  # EventSource reconnecting after a drop: do not answer twice
    prompt = request.args.get("prompt", "")
    if not prompt.strip():
        raise BadRequest("the 'prompt' query parameter is required: GET /chat?prompt=Hello", kind="invalid_prompt")
    model = choose_model(request.args.get("model") or None, relay.config)
    access.model = model
    authorize_model(relay.config, access.key_name, model)
    if request.method == "HEAD":
        return Response(status=200, headers=SSE_HEADERS)  # Flask routes HEAD here: never ask the model for it
    if relay.config.log_content:
        access.prompt = prompt
    body = {"model": model, "messages": with_system_prompt([{"role": "user", "content": prompt}], relay.config)}
    cap_max_tokens(body, relay.config)
    return stream_response(relay, access, body, SseEncoder(error_event=True, event_id=access.request_id), SSE_HEADERS)
