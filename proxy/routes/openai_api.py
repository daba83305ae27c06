"""The OpenAI-compatible API: `POST /v1/chat/completions` and `GET /v1/models`.

Point any OpenAI client at `http://host/v1` with an access key as its API key. Requests go upstream as
sent, apart from the relay's model allow-list, `MAX_TOKENS` cap and `SYSTEM_PROMPT`; streamed chunks come
back exactly as the upstream wrote them; errors come in OpenAI's shape, so the SDKs raise their usual
exception classes.
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response

from proxy.encoders import SseEncoder
from proxy.pipeline import endpoint
from proxy.pump import StreamStats
from proxy.relay import Relay, current_relay
from proxy.request_state import request_state
from proxy.routes.chat import stream_response
from proxy.shaping import OpenAIRequest, shape_openai_request
from proxy.upstream import complete, model_allowed

bp = Blueprint("openai_api", __name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer this response
}
GLOB_CHARACTERS = frozenset("*?[")


@bp.post("/v1/chat/completions")
@endpoint("openai", streams=True, body=shape_openai_request)
def chat_completions(shaped: OpenAIRequest) -> Response:
    relay = current_relay()
    if shaped.stream:
        return stream_response(relay, shaped.upstream_body, SseEncoder(hide_usage=shaped.hide_usage), SSE_HEADERS)
    access = request_state().access
    stats = StreamStats(started_at=access.started)
    answer = complete(relay.upstreams, shaped.upstream_body, relay.config.upstream_timeout,
                      relay.config.max_stream_seconds)
    stats.upstream, stats.fallbacks, stats.outcome = answer.upstream.name, answer.fallbacks, "ok"
    usage = answer.data.get("usage")
    if isinstance(usage, dict):
        stats.usage = usage
        completion_tokens = usage.get("completion_tokens")
        stats.tokens = completion_tokens if isinstance(completion_tokens, int) else 0
    access.stats = stats
    return Response(answer.raw, status=200, mimetype="application/json")


@bp.get("/v1/models")
@endpoint("openai")
def models() -> Response:
    caller = request_state().caller
    return Response(_model_list(current_relay(), caller.models if caller is not None else ()),
                    mimetype="application/json")


def served_models(relay: Relay, key_models: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(model, upstream name) for every exact model name the relay can route and allows (for this key,
    when its KEYS_FILE entry lists models), in config order: the default model, the allow-list's exact
    names, then each upstream's. Globs cannot be listed."""
    config = relay.config
    names = [config.default_model, *config.allowed_models]
    for upstream in relay.upstreams:
        names.extend(upstream.models)
    served: dict[str, str] = {}
    for name in names:
        if name in served or GLOB_CHARACTERS & set(name) or not model_allowed(config.allowed_models, name):
            continue
        if not model_allowed(key_models, name):
            continue
        first = next((upstream for upstream in relay.upstreams if upstream.serves(name)), None)
        if first is not None:
            served[name] = first.name
    return list(served.items())


def _model_list(relay: Relay, key_models: tuple[str, ...]) -> bytes:
    data: list[dict[str, Any]] = [
        {"id": name, "object": "model", "created": 0, "owned_by": upstream}
        for name, upstream in served_models(relay, key_models)
    ]
    return orjson.dumps({"object": "list", "data": data})
