"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), what Claude Code and
Anthropic's SDKs call, forwarded as sent to the upstreams that speak it (`api = "anthropic"` in
UPSTREAMS_FILE: Anthropic itself, Kimi's and DeepSeek's Anthropic endpoints...) through the same path as the
rest of the OpenAI API (`proxy/forwarding.py`), in Anthropic's dialect: `ping` events during silence, an
Anthropic `error` event when the relay cuts a stream short, usage from `message_start`/`message_delta`.

The view is declared with the "anthropic" protocol, so every refusal before the upstream answers (the key,
limits, budgets, the model) is an Anthropic error body that the SDKs raise as their own error classes.
"""

from __future__ import annotations

from collections.abc import Sequence

from flask import Blueprint, Response, request

from proxy.errors import BadRequest, NotFound
from proxy.forwarding import ANTHROPIC, Outgoing, forward, json_object, model_of
from proxy.pipeline import endpoint
from proxy.relay import current_relay
from proxy.request_state import request_state
from proxy.routes.passthrough import answer, check_model
from proxy.shaping import read_body
from proxy.upstream import AnthropicUpstream

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
    if not rest:  # counting tokens costs nothing
        relay.limits.reserve_request(state, model, body, raw)
    headers = list(request.headers.items())
    if not any(name.lower() == "anthropic-version" for name, _value in headers):
        headers.append(("anthropic-version", DEFAULT_ANTHROPIC_VERSION))
    path = f"v1/messages/{rest}" if rest else "v1/messages"
    outgoing = Outgoing(method="POST", path=path, query=request.query_string, headers=headers, body=raw,
                        content_length=len(raw), streaming=body.get("stream") is True)
    opened = forward(serving(relay.anthropic_upstreams, model), outgoing, relay.config.upstream_timeout,
                     relay.config.max_stream_seconds)
    return answer(relay, state, opened, ANTHROPIC)


def serving(upstreams: Sequence[AnthropicUpstream], model: str) -> list[AnthropicUpstream]:
    """The Anthropic-protocol upstreams serving `model`, in file order; none is a 404 naming the model
    (Anthropic answers an unknown model with not_found_error, which Claude Code shows as it is)."""
    found = [upstream for upstream in upstreams if upstream.serves(model)]
    if not found:
        raise NotFound(f"model '{model[:100]}' is not served by this relay's Anthropic-protocol upstreams "
                       "(UPSTREAMS_FILE entries with api = \"anthropic\")", kind="model_not_served")
    return found
