"""The OpenAI-compatible API: `POST /v1/chat/completions`, `GET /v1/models` and `GET /v1/models/{model}`
(the last two in Anthropic's shape for a request that carries `anthropic-version`).

Point any OpenAI client at `http://host/v1` with an access key as its API key. Requests go upstream as
sent, apart from the relay's model allow-list, `MAX_TOKENS` cap and `SYSTEM_PROMPT`; streamed chunks come
back exactly as the upstream wrote them; errors come in OpenAI's shape, so the SDKs raise their usual
exception classes.
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response, request

from proxy.chat_stream import SSE_HEADERS, stream_response, whole_answer_stats
from proxy.encoders import SseEncoder
from proxy.errors import NotFound
from proxy.models import anthropic_model, anthropic_page, in_file_order, model_entries
from proxy.pipeline import endpoint
from proxy.relay import current_relay
from proxy.request_state import request_state
from proxy.shaping import OpenAIRequest, shape_openai_request
from proxy.upstream import complete

bp = Blueprint("openai_api", __name__)


@bp.post("/v1/chat/completions")
@endpoint("openai", streams=True, body=shape_openai_request)
def chat_completions(shaped: OpenAIRequest) -> Response:
    relay = current_relay()
    if shaped.stream:
        return stream_response(relay, shaped.upstream_body, SseEncoder(hide_usage=shaped.hide_usage), SSE_HEADERS)
    answer = complete(relay.upstreams, shaped.upstream_body, relay.config.upstream_timeout,
                      relay.config.max_stream_seconds)
    access = request_state().access
    access.stats = whole_answer_stats(answer, access.started)
    return Response(answer.raw, status=200, mimetype="application/json")


@bp.get("/v1/models")
@endpoint("openai")
def models() -> Response:
    # An Anthropic client (its SDKs and Claude Code send anthropic-version on every request) gets Anthropic's
    # list shape and pagination; everyone else OpenAI's.
    if request.headers.get("anthropic-version"):
        return Response(orjson.dumps(anthropic_page(caller_models(), request.args)), mimetype="application/json")
    return Response(orjson.dumps({"object": "list", "data": caller_models()}), mimetype="application/json")


@bp.get("/v1/models/<path:model>")  # ids such as meta-llama/Llama-3-8B hold slashes
@endpoint("openai")
def retrieve_model(model: str) -> Response:
    entry = next((entry for entry in caller_models() if entry["id"] == model), None)
    if entry is None:
        # The same answer for a model that does not exist and one this key may not use: keys learn nothing.
        raise NotFound(f"the model '{model}' does not exist or you do not have access to it",
                       kind="model_not_found")
    if request.headers.get("anthropic-version"):
        return Response(orjson.dumps(anthropic_model(entry)), mimetype="application/json")
    return Response(orjson.dumps(entry), mimetype="application/json")


def caller_models() -> list[dict[str, Any]]:
    """The model entries this request's caller may use (proxy/models.py: listed, configured, filtered)."""
    relay = current_relay()
    caller = request_state().caller
    upstreams = in_file_order(relay.config, (*relay.upstreams, *relay.anthropic_upstreams))
    listed = relay.catalog.listed(upstreams)
    return model_entries(relay.config, upstreams, listed, caller.models if caller is not None else ())
