"""Serving a Responses request from chat-completions upstreams: the transport around the pure bridge.

`serve_bridged_responses` is what `routes/passthrough.py`'s `bridged_responses` calls once routing found
only chat upstreams for the model. A stream goes through the relay's own pump with a `ResponsesEncoder`
(proxy/chat_stream.py's `stream_response`): fall-over before the first token, keep-alive comments during silence,
first-token/idle/whole-stream timers, cancellation when the client leaves, and the chat usage in the
request's stats for budgets, logs and metrics. A whole answer is one chat completion (with fall-over at
open), mapped to a Response object. Errors before the answer starts are the relay's usual ones in OpenAI's
shape, with the status for which the openai SDK raises the class it would for the same trouble at OpenAI
(proxy/bridge/responses_errors.py). The chat request keeps to `MAX_TOKENS`, as every chat request does.

The bridge keeps no responses: their ids carry `BRIDGED_ID_PREFIX`, and asking for one (GET, DELETE,
cancel, input items) is a 404 that says why.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import orjson
from flask import Response

from proxy.bridge.responses_answer import frame_for, random_id, response_of_completion
from proxy.bridge.responses_encoder import ResponsesEncoder
from proxy.bridge.responses_errors import client_status
from proxy.bridge.responses_request import map_request, shown
from proxy.bridge.responses_stream import ResponsesStream
from proxy.chat_stream import SSE_HEADERS, stream_response, whole_answer_stats
from proxy.errors import BadRequest, NotFound, RelayError
from proxy.relay import Relay
from proxy.request_state import RequestState
from proxy.shaping import cap_max_tokens, parse_json_object
from proxy.upstream import Upstream, complete

BRIDGE = "responses->chat"
MAX_LOGGED_TOOLS = 10
# Ids of responses the bridge made: OpenAI's `resp_` prefix, then a mark that tells the relay it made them.
BRIDGED_ID_PREFIX = "resp_bridged_"
RESPONSE_ID_PREFIX = "resp_"


def bridged_id(prefix: str) -> str:
    """Ids as OpenAI makes them; a response id is marked as the bridge's own."""
    return random_id("resp_bridged" if prefix == "resp" else prefix)


def serve_bridged_responses(relay: Relay, state: RequestState, method: str, path: str,
                            body: bytes | Iterator[bytes], upstreams: Sequence[Upstream]) -> Response:
    """POST /v1/responses answered by chat-completions upstreams, streaming or whole."""
    if method != "POST" or path != "responses":
        raise NotFound(f"/v1/{path[:100]} is not available for this model: its upstream speaks chat "
                       "completions, which only POST /v1/responses can be translated to", kind="bridge_untranslatable")
    if not isinstance(body, bytes):
        raise BadRequest("a Responses request must be a JSON body")
    bridged = map_request(parse_json_object(body))
    state.access.bridge = BRIDGE
    # Named once each, and a few at most: a client's list must not make the log line long.
    state.access.dropped_tools = tuple(dict.fromkeys(bridged.dropped_tools))[:MAX_LOGGED_TOOLS]
    cap_max_tokens(bridged.chat, relay.config)  # a chat request now: MAX_TOKENS holds, as for chat
    frame = frame_for(bridged, int(time.time()), bridged_id)
    try:
        if bridged.stream:
            encoder = ResponsesEncoder(ResponsesStream(frame, bridged.tools, bridged_id))
            return stream_response(relay, bridged.chat, encoder, SSE_HEADERS, upstreams)
        answer = complete(upstreams, bridged.chat, relay.config.upstream_timeout, relay.config.max_stream_seconds)
    except RelayError as error:
        # An upstream failure before the first token: the status the openai SDKs read as the same trouble.
        error.status = client_status(error.kind, error.status, error.upstream_status)
        raise
    state.access.stats = whole_answer_stats(answer, state.access.started)
    response = response_of_completion(answer.data, bridged, frame, bridged_id)
    return Response(orjson.dumps(response), status=200, mimetype="application/json")


def refuse_bridged_lookup(family: str, rest: str, upstreams: Sequence[Upstream]) -> None:
    """GET/DELETE /v1/responses/<id>[/...] for a response the bridge made, or when no upstream keeps
    responses at all (every one speaks chat completions only): a 404 saying why, in OpenAI's shape."""
    if family != "responses" or not rest.startswith(RESPONSE_ID_PREFIX):
        return  # not about a stored response (`input_tokens`, `compact`...)
    response_id = shown(rest.split("/", 1)[0])
    if rest.startswith(BRIDGED_ID_PREFIX):
        raise NotFound(f"response '{response_id}' was made by this relay from a chat completions upstream and "
                       "is not stored: send the whole conversation in 'input' instead", kind="response_not_found")
    if not any(upstream.speaks("responses") for upstream in upstreams):
        raise NotFound(f"response '{response_id}' cannot be found: no upstream of this relay speaks the Responses "
                       "API, so none stores responses", kind="response_not_found")
