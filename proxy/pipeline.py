"""The one request pipeline every endpoint goes through. Read this first, then `proxy/stream_machine.py`.

A view states what it is with `@endpoint(...)` (its protocol, who may call it, whether it streams, how its
input is shaped) and nothing else. For every request, in this order:

1. **begin** (`before_request`): the request id, the access record and the request's `RequestState`, the
   one typed object that carries everything about this request between the steps below;
2. **preflight**: `OPTIONS` is answered before any key is asked for (browsers never send one on it);
3. **caller**: the presented key is decided once (the `Authorization` header, Anthropic's `x-api-key`
   header, or the `key` query parameter that EventSource and WebSocket pages must use; two of them present
   and different is refused) and every later
   step (authentication, per-key models, limits, budgets, logs, metrics) reads that one decision;
4. **authentication**, as the declaration says: an access key, nothing (public), or the endpoint's own
   credential, its declared `guard` (`/metrics`: METRICS_KEY or this host; `/usage`: ADMIN_KEY;
   `/debug/stats`: loopback and a key), checked here; a WebSocket (`own`, no guard) refuses in its own
   protocol, with a close frame;
5. **limits** (`proxy/limits.py`, after this hook): requests per minute/day and the budgets (refused when
   used up) for keyed endpoints, a stream slot for streaming ones;
6. **input** (in the `@endpoint` wrapper): the body read within MAX_BODY_BYTES (and BODY_TIMEOUT), parsed,
   shaped into a typed request, the model authorized for the caller, the access record filled in, and the
   most the request can cost reserved in the key's budgets (`proxy/budgets.py`; the forwarding views
   reserve from the body they forward);
7. **close**, once, whichever way the request ends (`close_request`): the stream slot released, the
   reservation settled from the reported usage, the metrics recorded, the access-log line written, the
   usage ledger's row queued (`proxy/ledger`: written by a thread of its own, never waited for).

`install_pipeline` refuses to build an app with a view that declares nothing, so a new endpoint cannot
skip a step by forgetting it.
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flask import Flask, Request, Response, current_app, request
from flask.sessions import NullSession, SessionInterface, SessionMixin
from werkzeug.routing import Rule

from proxy.access import add_cors_headers, authorize_model, preflight_response, presented_key
from proxy.accesslog import AccessRecord, redacted_path
from proxy.config import Config
from proxy.deadline import limit_body_time
from proxy.errors import Unauthorized
from proxy.forwarding import capped_body
from proxy.keys import KeyPolicy
from proxy.relay import Relay, current_relay
from proxy.request_state import (
    PUBLIC,
    Access,
    BodyShaper,
    Declaration,
    Guard,
    QueryShaper,
    RequestState,
    Shaped,
    WireProtocol,
    current_request_state,
    keep_request_state,
    request_state,
)
from proxy.server_errors import SECURITY_HEADERS
from proxy.shaping import choose_model, parse_json_object, read_body

F = TypeVar("F", bound=Callable[..., Response])

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")


def endpoint(protocol: WireProtocol, *, access: Access = "key", streams: bool = False,
             body: BodyShaper | None = None, query: QueryShaper | None = None,
             checks_model: bool = True, guard: Guard | None = None) -> Callable[[F], F]:
    """Declare a view to the pipeline. A view with `body` or `query` is called with the shaped request; a
    `guard` (an admin or metrics key, loopback only) is checked before the view and its limits."""
    declaration = Declaration(protocol, access, streams, body, query, checks_model, guard)

    def wrap(view: F) -> F:
        @functools.wraps(view)
        def run(**url_values: Any) -> Response:
            shaped = shape_input(request_state(), current_relay().config)
            return view(shaped, **url_values) if shaped is not None else view(**url_values)

        run.declaration = declaration  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return wrap


def declaration_of(app: Flask, endpoint_name: str | None) -> Declaration:
    view = app.view_functions.get(endpoint_name or "")
    declared = getattr(view, "declaration", None)
    return declared if isinstance(declared, Declaration) else PUBLIC


def install_pipeline(app: Flask) -> None:
    """Steps 1-4 before every request, the limits (step 5) after them, and the close step after the
    response; the app's relay (`app.extensions["relay"]`) is built already. The order is the pipeline's:
    preflights first, the caller decided once before any limit counts it."""
    app.session_interface = NoSessions()
    app.before_request(_begin)
    app.after_request(_finish)
    app.teardown_request(_teardown)
    relay: Relay = app.extensions["relay"]
    relay.limits.init_app(app)


class NoSessions(SessionInterface):
    """The relay keeps no sessions (every request carries its key; no view reads or sets a cookie): each
    request gets one shared null session, which refuses any change, instead of a cookie looked for and a
    null session made."""

    _none = NullSession()

    def open_session(self, app: Flask, request: Request) -> SessionMixin:
        return self._none

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        return None


def check_every_view_declared(app: Flask) -> None:
    """Called once the app is wired: a view without a declaration would skip the pipeline's checks."""
    undeclared = sorted(name for name, view in app.view_functions.items()
                        if not name.endswith("static") and not isinstance(getattr(view, "declaration", None),
                                                                           Declaration))
    if undeclared:
        raise RuntimeError(f"views without an @endpoint declaration: {', '.join(undeclared)}")


def decide_caller(config: Config, incoming: Request) -> KeyPolicy | None:
    """The caller, from the Authorization header, the x-api-key header (what Anthropic's clients send) or
    the `key` query parameter; refused when two of them name different keys."""
    headers = incoming.headers
    sources = {"the Authorization header": presented_key(headers.get("Authorization")),
               "the x-api-key header": headers.get("x-api-key", "").strip(),
               # Only a query string can name one: most requests have none to parse.
               "the 'key' query parameter": incoming.args.get("key", "") if incoming.query_string else ""}
    named = {where: key for where, key in sources.items() if key}
    if len(set(named.values())) > 1:
        # Which one would win is not the caller's to guess: neither is trusted.
        raise Unauthorized(f"{' and '.join(named)} name different keys")
    presented = next(iter(named.values()), "")
    return config.keyring.identify(presented) if presented else None


def _begin() -> Response | None:
    started = time.monotonic()
    incoming = current_request()
    relay = current_relay()
    supplied = incoming.headers.get("X-Request-ID", "")
    record = AccessRecord(
        method=incoming.method,
        path=redacted_path(incoming.path, incoming.query_string.decode("latin-1")),
        client=incoming.remote_addr or "-",
        request_id=supplied if _SAFE_REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex,
        started=started,
    )
    declaration = declaration_of(current_app, incoming.endpoint)
    state = RequestState(record, declaration, route_label(incoming.url_rule, incoming.view_args))
    keep_request_state(state)
    if incoming.method == "OPTIONS":
        return preflight_response(relay.config)
    limit_body_time(incoming.environ, relay.config.body_timeout)
    if declaration.access != "public":
        state.caller = decide_caller(relay.config, incoming)
        if state.caller is not None:
            record.key_name = state.caller.name
        elif declaration.access == "key":
            raise Unauthorized()
    if declaration.guard is not None:
        declaration.guard(state, relay.config)
    return None


def current_request() -> Request:
    """The request object itself: each attribute read through Flask's `request` proxy costs a lookup."""
    incoming: Request = request._get_current_object()  # type: ignore[attr-defined]
    return incoming


def shape_input(state: RequestState, config: Config) -> Shaped | None:
    """Step 6: the declared input read and shaped, then admitted (`admit_shaped`)."""
    declaration = state.declaration
    if declaration.body is not None:
        shaped = declaration.body(parse_json_object(read_body(request, config.max_body_bytes)), config)
    elif declaration.query is not None:
        shaped = declaration.query(request.args, config)
    else:
        return None
    admit_shaped(state.access, state.caller, shaped, config, declaration.checks_model)
    current_relay().limits.reserve_request(state, shaped.model, shaped.upstream_body)
    return shaped


def admit_shaped(record: AccessRecord, caller: KeyPolicy | None, shaped: Shaped, config: Config,
                 checks_model: bool = True) -> None:
    """The model authorized for the caller, and the access record told what was asked. A WebSocket runs
    this for each message, the pipeline for every other request."""
    record.model = shaped.model
    if checks_model:
        authorize_model(caller, shaped.model)
    if config.log_content:
        record.prompt = last_user_text(shaped.upstream_body.get("messages", []))


def admit_model(state: RequestState, model: str, config: Config) -> None:
    """A model named in a body the view forwards as sent: recorded, checked against ALLOWED_MODELS (400) and
    the caller's own models (403). The forwarding views (`routes/passthrough.py`, `routes/anthropic.py`) read
    their bodies themselves, since the bytes go upstream unchanged and a multipart upload names its model as
    it streams, and admit each model they find here; every other view's model is admitted by `shape_input`."""
    state.access.model = model
    choose_model(model, config)
    authorize_model(state.caller, model)


def admit_forwarded(state: RequestState, path: str, model: str | None, body: dict[str, Any] | None, raw: bytes,
                    config: Config) -> bytes:
    """A whole body a view forwards as sent: the model it names admitted (`admit_model`), a JSON object's
    answer size held to MAX_TOKENS and MAX_CHOICES by its family's row (`forwarding.capped_body`, which updates
    `body` too), then the most it can cost reserved in the caller's budgets, as `shape_input` does for shaped
    bodies. The bytes to send."""
    if model is not None:
        admit_model(state, model, config)
    if body is not None:
        raw = capped_body(path, raw, body, config)
    if model is not None:
        current_relay().limits.reserve_request(state, model, body or {}, raw)
    return raw


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


# SECURITY_HEADERS by lower-cased name: `_finish` adds those a response has not set itself.
_SECURITY_BY_NAME = tuple((name.lower(), name, value) for name, value in SECURITY_HEADERS)


def _finish(response: Response) -> Response:
    headers = response.headers
    present = {name.lower() for name, _value in headers}  # one pass, where each setdefault would scan them all
    headers.extend([(name, value) for lowered, name, value in _SECURITY_BY_NAME if lowered not in present])
    relay = current_relay()
    add_cors_headers(relay.config, response)
    state = current_request_state()
    if state is not None:
        if "x-request-id" in present:
            headers["X-Request-ID"] = state.access.request_id
        else:
            headers.add("X-Request-ID", state.access.request_id)
        state.access.status = response.status_code
        state.streamed = state.declaration.streams and response.is_streamed
        relay.metrics.stream_opened(state)
        if response.direct_passthrough:
            # A file (send_file): werkzeug hands the server the file itself and never runs close callbacks.
            close_request(relay, state)
        else:
            # Runs when the server closes the response: after a stream's last byte, or a departed client.
            response.call_on_close(functools.partial(close_request, relay, state))
    return response


def _teardown(_error: BaseException | None) -> None:
    """A request whose response never reached `_finish` (an error in another hook) still closes."""
    state = current_request_state()
    if state is not None and not state.closed and state.access.status == 0:
        close_request(current_relay(), state)


_ANY_CONVERTER = re.compile(r"<any\([^)]*\):(\w+)>")


def route_label(rule: Rule | None, view_args: Mapping[str, Any] | None) -> str:
    """The route as metrics name it: the URL rule, with each `any(...)` part (a fixed list, so the label
    set stays bounded) replaced by the value it matched: `/v1/responses/<path:rest>`, not the whole list."""
    if rule is None:
        return "unmatched"
    values = view_args or {}
    return _ANY_CONVERTER.sub(lambda part: str(values.get(part.group(1), part.group(0))), rule.rule)


def close_request(relay: Relay, state: RequestState) -> None:
    """Step 7, exactly once. At once, what the client's next request may need: the stream slot and the
    budget reservation settled, the open-streams gauge. Then its records (`relay.reports`: at once, or under
    gevent with the next batch)."""
    if state.closed:
        return
    state.closed = True
    state.access.ended = time.monotonic()
    try:
        relay.limits.settle(state)
        relay.metrics.stream_closed(state)
    finally:
        relay.reports.submit(functools.partial(write_records, relay, state))


def write_records(relay: Relay, state: RequestState) -> None:
    """A closed request's records: the metrics, then the access-log line and the ledger's row (queued only:
    the ledger's own thread writes it)."""
    try:
        relay.metrics.record(state)
    finally:
        state.access.write()
        relay.ledger.record_request(state)
        relay.ledger.publish_now_and_then(relay.metrics)
