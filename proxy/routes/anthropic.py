"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), what Claude Code and
Anthropic's SDKs call, forwarded as sent to the upstreams that speak it (`api = "anthropic"` in
UPSTREAMS_FILE: Anthropic itself, Kimi's and DeepSeek's Anthropic endpoints...) through the same path as the
rest of the OpenAI API (`proxy/forwarding.py`), in Anthropic's dialect: `ping` events during silence, an
Anthropic `error` event when the relay cuts a stream short, usage from `message_start`/`message_delta`.

The view is declared with the "anthropic" protocol, so every refusal before the upstream answers (the key,
limits, budgets, the model) is an Anthropic error body that the SDKs raise as their own error classes.
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from proxy.errors import BadRequest
from proxy.forwarding import ANTHROPIC, Outgoing, forward, json_object, model_of
from proxy.pipeline import endpoint
from proxy.relay import Relay, current_relay
from proxy.request_state import RequestState, request_state
from proxy.routes.passthrough import answer, check_model
from proxy.routing import BridgeUnavailable, Route, route
from proxy.shaping import read_body

bp = Blueprint("anthropic", __name__)

# What Anthropic's API requires of every request; Claude Code and the SDKs send it, curl users may not.
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


@bp.route("/v1/messages", methods=["POST"], defaults={"rest": ""})
@bp.route("/v1/messages/<any(count_tokens):rest>", methods=["POST"])
@endpoint("anthropic", streams=True)
def messages(rest: str) -> Response:
    relay = current_relay()
    state = request_state()
    raw = read_body(request.stream, relay.config.max_body_bytes)
    body = json_object(raw, True)
    model = model_of(body)
    if body is None or model is None:
        raise BadRequest("the request body must be a JSON object naming a 'model'")
    check_model(relay.config, state, model)
    headers = list(request.headers.items())
    if not any(name.lower() == "anthropic-version" for name, _value in headers):
        headers.append(("anthropic-version", DEFAULT_ANTHROPIC_VERSION))
    path = f"v1/messages/{rest}" if rest else "v1/messages"
    outgoing = Outgoing(method="POST", path=path, query=request.query_string, headers=headers, body=raw,
                        content_length=len(raw), streaming=body.get("stream") is True, model=model)
    chosen = route(relay, "messages", model)
    if not chosen.native:
        return bridged_messages(relay, state, outgoing, chosen)
    opened = forward(chosen.upstreams, outgoing, relay.config.upstream_timeout, relay.config.max_stream_seconds)
    return answer(relay, state, opened, ANTHROPIC)


def bridged_messages(relay: Relay, state: RequestState, outgoing: Outgoing, chosen: Route) -> Response:
    """A Messages request for a model only chat-completions upstreams serve: translated (proxy/bridge)."""
    raise BridgeUnavailable("messages", outgoing.model or "")
