"""The rest of the OpenAI API under `/v1/` (Responses, embeddings, completions, moderations, audio, images,
files, uploads, batches, vector stores...), forwarded by one view through `proxy/forwarding.py`.

Routing: a request naming a model (a JSON body's `model`, a multipart form's `model` field) goes to the
upstreams serving that model, in order, with chat's fall-over rules; one naming none (GET /v1/files,
/v1/responses/{id}...) goes to the first configured upstream, and only to it: stored objects (files,
responses, batches) live on the provider that made them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.wsgi import get_input_stream

from proxy.bridge.responses_transport import refuse_bridged_lookup, serve_bridged_responses
from proxy.config import Config
from proxy.errors import BadRequest, Forbidden, PayloadTooLarge
from proxy.forwarded_answer import answer
from proxy.forwarding import (
    MODEL_PREFIX_BYTES,
    ForwardTarget,
    ModelFieldWatch,
    Outgoing,
    forward,
    forwardable_headers,
    json_object,
    model_of,
    multipart_boundary,
    read_prefix,
    upload_blocks,
)
from proxy.pipeline import admit_forwarded, admit_model, endpoint
from proxy.relay import Relay, current_relay
from proxy.request_state import RequestState, request_state
from proxy.routing import Route, not_served, route
from proxy.shaping import answer_size, read_body
from proxy.upstream import Upstream

bp = Blueprint("passthrough", __name__)

# OpenAI's API families forwarded as they are. `chat` and `models` are the relay's own views and are not
# here; an unknown family stays the relay's 404.
FAMILIES = ("responses", "conversations", "embeddings", "completions", "moderations", "audio", "images", "files",
            "uploads", "batches", "vector_stores", "fine_tuning", "assistants", "threads", "containers", "evals",
            "videos", "realtime")
METHODS = ["GET", "POST", "DELETE"]
_FAMILY = f"any({', '.join(FAMILIES)}):family"
# Bodies streamed under MAX_UPLOAD_BYTES; every other body is read whole under MAX_BODY_BYTES.
UPLOAD_TYPES = ("multipart/", "application/octet-stream")


# The most used family, on its own rule: a static path is matched before the any(...) rules are tried.
@bp.route("/v1/responses", methods=METHODS, defaults={"family": "responses", "rest": ""})
@bp.route(f"/v1/<{_FAMILY}>", methods=METHODS, defaults={"rest": ""})
@bp.route(f"/v1/<{_FAMILY}>/<path:rest>", methods=METHODS)
@endpoint("openai", streams=True)
def forwarded(family: str, rest: str) -> Response:
    relay = current_relay()
    state = request_state()
    path = forwarded_path(family, rest)
    refuse_bridged_lookup(family, rest, relay.upstreams)
    if request.method == "POST":
        refuse_unseen_work(relay.config, state, family, rest)
    outgoing, model = read_request(relay.config, state, path)
    if family == "responses" and model is not None:
        chosen = route(relay, "responses", model)
        if not chosen.native:
            return bridged_responses(relay, state, outgoing, chosen)
        targets: Sequence[ForwardTarget] = chosen.upstreams
    else:
        targets = candidates(relay.upstreams, model, family)
    opened = forward(targets, outgoing, relay.config.upstream_timeout, relay.config.max_stream_seconds)
    return answer(relay, state, opened)


def forwarded_path(family: str, rest: str) -> str:
    """The path under the upstream's base URL. `.` and `..` segments (`%2e%2e` too, decoded by then) are
    refused: the upstream's URL would lose them (httpx removes them, as RFC 3986 says), so
    `/v1/embeddings/../completions` would reach `completions` while the relay judged it as `embeddings`
    (its caps, its batch rule, its routing)."""
    if any(segment in (".", "..") for segment in rest.split("/")):
        raise BadRequest("the path must not contain '.' or '..' segments", kind="invalid_path")
    return f"{family}/{rest}" if rest else family


def bridged_responses(relay: Relay, state: RequestState, outgoing: Outgoing, chosen: Route) -> Response:
    """A Responses request for a model only chat-completions upstreams serve: translated (proxy/bridge)."""
    return serve_bridged_responses(relay, state, outgoing.method, outgoing.path, outgoing.body,
                                   chosen.chat_upstreams)


def candidates(upstreams: Sequence[Upstream], model: str | None, family: str) -> list[Upstream]:
    """The upstreams to try in order: those serving `model`; for a request naming none, the first upstream
    (the first speaking the Responses API, for `responses/...`: stored responses live there)."""
    if model is None:
        speaking = [upstream for upstream in upstreams if upstream.speaks(family)] if family == "responses" else []
        return (speaking or list(upstreams))[:1]
    serving = [upstream for upstream in upstreams if upstream.serves(model)]
    if not serving:
        raise not_served("chat", model)
    return serving


# POSTs whose work the relay never sees, so none of its rules could apply to it. A batch or an eval run
# reads its requests (models, answer sizes) from an uploaded file. A Realtime client secret or session is a
# short-lived key the client then uses with the provider directly: past every limit, budget, model list and
# cap of the relay, and out of its usage ledger. (family, the path after it, with * for one segment)
WORK_IN_A_FILE = {("batches", ""): "batches", ("evals", "*/runs"): "eval runs"}
MINTED_KEYS = {("realtime", "client_secrets"), ("realtime", "sessions"), ("realtime", "transcription_sessions")}
_UNSEEN_FAMILIES = frozenset(family for family, _pattern in (*WORK_IN_A_FILE, *MINTED_KEYS))


def _matches(pattern: str, rest: str) -> bool:
    wanted, given = pattern.split("/"), rest.strip("/").split("/")
    return len(wanted) == len(given) and all(part in ("*", seen) for part, seen in zip(wanted, given, strict=True))


def refuse_unseen_work(config: Config, state: RequestState, family: str, rest: str) -> None:
    """Refuse the POSTs of WORK_IN_A_FILE where models are restricted (ALLOWED_MODELS, or the key's own list)
    or answers capped (MAX_TOKENS, MAX_CHOICES), and those of MINTED_KEYS wherever any rule of the relay
    applies (those and every limit or budget): each would get round the rule."""
    if family not in _UNSEEN_FAMILIES:
        return
    models_restricted = bool(config.allowed_models or (state.caller is not None and state.caller.models))
    capped = config.max_tokens is not None or config.max_choices is not None
    work = next((name for (known, pattern), name in WORK_IN_A_FILE.items()
                 if known == family and _matches(pattern, rest)), None)
    if work is not None and models_restricted:
        raise Forbidden(f"{work} are not available where models are restricted: the relay cannot check the "
                        "models inside their input file", kind="model_not_allowed")
    if work is not None and capped:
        raise Forbidden(f"{work} are not available where answers are capped (MAX_TOKENS, MAX_CHOICES): the "
                        "relay cannot cap the requests inside their input file", kind="batch_not_capped")
    minted = any(known == family and _matches(pattern, rest) for known, pattern in MINTED_KEYS)
    if minted and (models_restricted or capped or config.limits_configured):
        raise Forbidden(f"POST /v1/{family}/{rest} is not available on this relay: it makes a short-lived key "
                        "for the provider's own API, which would get round this relay's limits, budgets, model "
                        "lists and caps", kind="minted_key_not_allowed")


def read_request(config: Config, state: RequestState, path: str) -> tuple[Outgoing, str | None]:
    """The request to forward and the model it names (checked)."""
    content_type = request.headers.get("Content-Type", "")
    common: dict[str, Any] = {"method": request.method, "path": path, "query": request.query_string,
                              "headers": forwardable_headers(request.headers)}
    capped = answer_size(path) is not None
    if content_type.lower().startswith(UPLOAD_TYPES):
        if capped:
            raise json_only(path)
        return read_upload(config, state, content_type, common)
    raw = read_body(request, config.max_body_bytes)
    body = json_object(raw, "json" in content_type.lower())
    if capped and body is None and raw.strip():
        raise json_only(path)
    model = model_of(body)
    raw = admit_forwarded(state, path, model, body, raw, config)
    streaming = body is not None and body.get("stream") is True
    return Outgoing(**common, body=raw, content_length=len(raw) if raw else None, streaming=streaming,
                    model=model), model


def json_only(path: str) -> BadRequest:
    """A family whose answers are capped must send a JSON object the relay reads: anything else (an upload, a
    body of another type or shape) might still be read as JSON by an upstream, unchecked and uncapped."""
    return BadRequest(f"/v1/{path.strip('/')} takes a JSON object as its body (Content-Type: application/json)",
                      kind="invalid_content_type")


def read_upload(config: Config, state: RequestState, content_type: str, common: dict[str, Any]
                ) -> tuple[Outgoing, str | None]:
    """A multipart (or binary) body: its first bytes read to find the form's `model`, the rest streamed to
    the upstream as it arrives, within MAX_UPLOAD_BYTES. Only a body that fit in those first bytes may be
    sent to a second upstream."""
    cap = config.max_upload_bytes
    too_large = f"the upload is larger than the {cap} bytes allowed (MAX_UPLOAD_BYTES)"
    if request.content_length is not None and request.content_length > cap:
        raise PayloadTooLarge(too_large)
    stream = get_input_stream(request.environ, safe_fallback=False)
    prefix = read_prefix(stream, min(MODEL_PREFIX_BYTES, cap + 1))
    if len(prefix) > cap:
        raise PayloadTooLarge(too_large)
    boundary = multipart_boundary(content_type)
    watch = ModelFieldWatch(boundary) if boundary else None
    found = watch.feed(prefix) if watch is not None else []
    model = found[0] if found else None
    for named in found:
        late_model(config, state, model, named)
    if len(prefix) < min(MODEL_PREFIX_BYTES, cap + 1):  # the whole body: it can be sent again
        return Outgoing(**common, body=prefix, content_length=len(prefix), streaming=False), model

    def on_model(named: str) -> None:
        late_model(config, state, model, named)

    body = upload_blocks(prefix, stream, cap, on_model, watch)
    return Outgoing(**common, body=body, content_length=request.content_length, streaming=False), model


def late_model(config: Config, state: RequestState, routed: str | None, named: str) -> None:
    """A form's `model` field: checked like any model; a second, different one is refused (which one the
    upstream would read is its business, so the relay cannot know which it checked). One that comes after
    the first MODEL_PREFIX_BYTES, when the upload already goes to the first upstream (as a request naming
    no model does), must be served by it: else it is refused before the upstream has the whole upload."""
    if not named:
        raise BadRequest("the form's 'model' field must be a short non-empty string")
    if routed is not None and named != routed:
        raise BadRequest("the form names two different models", kind="model_conflict")
    admit_model(state, named, config)
    if routed is None:
        refuse_misrouted(current_relay().upstreams, named)


def refuse_misrouted(upstreams: Sequence[Upstream], model: str) -> None:
    """A model first named past the routing prefix: fine when the first upstream (where the upload goes) is
    the one its name routes to; else a 400 naming the rule."""
    serving = next((upstream for upstream in upstreams if upstream.serves(model)), None)
    if upstreams and serving is not upstreams[0]:
        raise BadRequest(f"the form's 'model' field ('{model[:100]}') comes after the first "
                         f"{MODEL_PREFIX_BYTES // 1024} KiB of the upload, and the relay routes an upload by a "
                         "model it finds there: put the 'model' field before the file (curl: -F model=... "
                         "before -F file=@...)", kind="model_too_late")
