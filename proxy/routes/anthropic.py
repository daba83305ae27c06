"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), what Claude Code and
Anthropic's SDKs call, forwarded as sent to the upstreams that speak it (`api = "anthropic"` in
UPSTREAMS_FILE: Anthropic itself, Kimi's and DeepSeek's Anthropic endpoints...) through the same path as the
rest of the OpenAI API (`proxy/forwarding.py`), in Anthropic's dialect: `ping` events during silence, an
Anthropic `error` event when the relay cuts a stream short, usage from `message_start`/`message_delta`.

A model that only chat-completions upstreams serve is bridged (`bridged_messages`, proxy/bridge/): the
request goes up as a chat completion and the answer comes back in Anthropic's terms, streamed or whole.

The view is declared with the "anthropic" protocol, so every refusal before the upstream answers (the key,
limits, budgets, the model) is an Anthropic error body that the SDKs raise as their own error classes.
"""

from __future__ import annotations

import orjson
from flask import Blueprint, Response, request

from proxy.bridge.messages_answer import to_anthropic_message
from proxy.bridge.messages_encoder import MessagesEncoder
from proxy.bridge.messages_errors import client_status
from proxy.bridge.messages_request import MessagesRefused, estimate_input_tokens, to_chat_request
from proxy.bridge.messages_stream import MessagesStream
from proxy.chat_stream import SSE_HEADERS, stream_response, whole_answer_stats
from proxy.errors import BadRequest, RelayError
from proxy.forwarded_answer import answer
from proxy.forwarding import ANTHROPIC, Outgoing, forward, forwardable_headers, json_object, model_of
from proxy.pipeline import admit_forwarded, admit_model, endpoint
from proxy.relay import Relay, current_relay
from proxy.request_state import RequestState, request_state
from proxy.routing import Route, route
from proxy.shaping import cap_max_tokens, read_body
from proxy.upstream import complete

bp = Blueprint("anthropic", __name__)

# What Anthropic's API requires of every request; Claude Code and the SDKs send it, curl users may not.
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


@bp.route("/v1/messages", methods=["POST"], defaults={"rest": ""})
@bp.route("/v1/messages/<any(count_tokens):rest>", methods=["POST"])
@endpoint("anthropic", streams=True)
def messages(rest: str) -> Response:
    relay = current_relay()
    state = request_state()
    raw = read_body(request, relay.config.max_body_bytes)
    body = json_object(raw, True)
    model = model_of(body)
    if body is None or model is None:
        raise BadRequest("the request body must be a JSON object naming a 'model'")
    path = f"v1/messages/{rest}" if rest else "v1/messages"
    if rest:  # counting tokens costs nothing: nothing to reserve, no answer to cap
        admit_model(state, model, relay.config)
    else:
        raw = admit_forwarded(state, path, model, body, raw, relay.config)
    headers = forwardable_headers(request.headers)
    if not any(name.lower() == "anthropic-version" for name, _value in headers):
        headers.append(("anthropic-version", DEFAULT_ANTHROPIC_VERSION))
    outgoing = Outgoing(method="POST", path=path, query=request.query_string, headers=headers, body=raw,
                        content_length=len(raw), streaming=body.get("stream") is True, model=model)
    chosen = route(relay, "messages", model)
    if not chosen.native:
        return bridged_messages(relay, state, outgoing, chosen)
    opened = forward(chosen.upstreams, outgoing, relay.config.upstream_timeout, relay.config.max_stream_seconds)
    return answer(relay, state, opened, ANTHROPIC)


BRIDGE = "messages->chat"


def bridged_messages(relay: Relay, state: RequestState, outgoing: Outgoing, chosen: Route) -> Response:
    """A Messages request for a model only chat-completions upstreams serve: translated to chat completions
    (proxy/bridge/messages_request.py) and answered in Anthropic's terms, streamed through the pump like
    every chat stream (timers, `ping` keep-alives, fall-over before the first token, cancellation, usage
    for the budgets) with `MessagesEncoder`, or whole. `count_tokens` answers an estimate."""
    state.access.bridge = BRIDGE
    assert isinstance(outgoing.body, bytes) and outgoing.model is not None  # the view read a JSON body
    body = orjson.loads(outgoing.body)
    try:  # count_tokens too: a request the bridge could not send is refused, not counted
        request = to_chat_request(body, outgoing.model)
    except MessagesRefused as exc:
        raise BadRequest(str(exc), kind="bridge_untranslatable") from None
    if outgoing.path.endswith("count_tokens"):
        return Response(orjson.dumps({"input_tokens": estimate_input_tokens(body)}), mimetype="application/json")
    state.access.dropped_tools = tuple(request.dropped_tools)
    cap_max_tokens(request.body, relay.config)
    try:
        if request.body.get("stream") is True:
            stream = MessagesStream(outgoing.model, estimate_input_tokens(body), request.body.get("stop", ()))
            return stream_response(relay, request.body, MessagesEncoder(stream), SSE_HEADERS, chosen.chat_upstreams)
        answer = complete(chosen.chat_upstreams, request.body, relay.config.upstream_timeout,
                          relay.config.max_stream_seconds)
    except RelayError as error:
        # An upstream failure before the first token: the status Anthropic's SDKs read as the same trouble.
        error.status = client_status(error.kind, error.status, error.upstream_status)
        raise
    state.access.stats = whole_answer_stats(answer, state.access.started)
    message = to_anthropic_message(answer.data, outgoing.model, request.body.get("stop", ()))
    return Response(orjson.dumps(message), mimetype="application/json")
