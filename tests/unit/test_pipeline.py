"""The request pipeline in-process (`app.test_client()`): every rule it applies, without servers."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, session
from flask.testing import FlaskClient
from werkzeug.test import create_environ

from proxy import create_app
from proxy.chat_stream import StreamResponse
from proxy.config import Config
from proxy.pipeline import check_every_view_declared, endpoint, route_label
from proxy.routes.passthrough import FAMILIES
from proxy.usage import TokenUsage
from tests.unit.conftest import ACCESS_KEY, SECOND_ACCESS_KEY, FakeTransport
from tests.unit.conftest import bearer as unit_bearer

ROOT = Path(__file__).resolve().parents[2]
KEY = "pipeline-test-key-0123456789"
OTHER_KEY = "pipeline-other-key-9876543210"
UNREACHABLE = "http://127.0.0.1:9/v1"  # refused at once: requests that reach the upstream get 502


def make_app(**settings: object) -> Flask:
    config = Config(authorization_keys=(KEY, OTHER_KEY), openai_api_key="sk-test", openai_base_url=UNREACHABLE,
                    **settings)  # type: ignore[arg-type]
    return create_app(config)




def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/chat"), ("GET", "/chat?prompt=hi"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
    ("GET", "/doctor"),
])
def test_keyed_endpoints_refuse_a_missing_key_in_their_own_shape(method: str, path: str) -> None:
    """Authentication is the pipeline's: every keyed endpoint answers 401 with its protocol's error body."""
    response = make_app().test_client().open(path, method=method, json={})
    assert response.status_code == 401
    assert b"unauthorized" in response.data


def test_header_and_query_key_that_disagree_are_refused() -> None:
    """One caller per request: a valid `key` parameter beside another key in the header is a 401."""
    client = make_app().test_client()
    refused = client.get(f"/chat?prompt=hi&key={KEY}", headers={"Authorization": "Bearer junk"})
    assert refused.status_code == 401
    assert b"different keys" in refused.data
    agreeing = client.get(f"/v1/models?key={KEY}", headers=bearer())
    assert agreeing.status_code == 200


def test_query_key_alone_identifies_the_caller() -> None:
    """EventSource pages can only send the key as a parameter; the pipeline accepts it there."""
    response = make_app().test_client().get(f"/v1/models?key={OTHER_KEY}")
    assert response.status_code == 200


def test_public_endpoints_need_no_key() -> None:
    """Health, the API description and the page are public; a wrong key there changes nothing."""
    client = make_app().test_client()
    assert client.get("/healthz", headers=bearer("wrong")).status_code == 200
    assert client.get("/openapi.yaml").status_code == 200


def test_requests_that_do_not_stream_take_no_stream_slot() -> None:
    """Only streaming endpoints take a slot: model lists, health and static files never lock a key out."""
    client = make_app(max_streams_per_key=1, max_open_streams=1).test_client()
    for _ in range(3):
        assert client.get("/v1/models", headers=bearer()).status_code == 200
        assert client.get("/healthz", headers=bearer()).status_code == 200
        client.get("/static/web/icon.svg", headers=bearer()).close()
    answered = client.post("/chat", headers=bearer(), json={"messages": [{"role": "user", "content": "hi"}]})
    assert answered.status_code == 502  # it reached the (refusing) upstream: not 429 too_many_streams
    answered.close()  # as the server does when the response is sent
    again = client.post("/chat", headers=bearer(), json={"messages": [{"role": "user", "content": "hi"}]})
    assert again.status_code == 502, "the first request's slot was not given back"


def test_each_request_writes_one_access_line(access_lines: list[str]) -> None:
    """The close step runs exactly once per request, errors and refusals included."""
    client = make_app().test_client()
    client.get("/healthz").close()
    client.post("/chat", json={}).close()
    client.post("/chat", headers=bearer(), data=b"not json").close()
    client.get("/no/such/path").close()
    client.get("/static/web/icon.svg").close()  # a file: werkzeug runs no close callbacks for it
    assert len(access_lines) == 5
    assert [line.split(" status=")[1].split(" ")[0] for line in access_lines] == ["200", "401", "400", "404", "200"]
    assert "key=default" not in access_lines[1] and KEY not in "".join(access_lines)


def test_a_model_outside_the_keys_list_is_refused(tmp_path: Path) -> None:
    """Per-key model lists apply through the pipeline on every shaped endpoint."""
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.limited]\nkey = "{"k" * 24}"\nmodels = ["allowed-*"]\n')
    client = make_app(keys_file=keys).test_client()
    headers = bearer("k" * 24)
    for method, path, body in [("POST", "/chat", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-x"}),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                 "model": "gpt-x"}),
                               ("GET", "/chat?prompt=x&model=gpt-x", None)]:
        response = client.open(path, method=method, json=body, headers=headers)
        assert response.status_code == 403, (path, response.data)
        assert b"model_not_allowed" in response.data


FORWARDED_POSTS = [f"/v1/{family}" for family in FAMILIES] + ["/v1/messages", "/v1/messages/count_tokens"]


@pytest.mark.parametrize("path", FORWARDED_POSTS)
def test_every_forwarded_body_naming_a_model_outside_the_keys_list_is_refused(tmp_path: Path, path: str) -> None:
    """The views that forward a body as sent admit its model through the pipeline too (`admit_model`): a
    JSON body on every forwarded family and on Anthropic's Messages paths is a 403 before any upstream is
    asked, in the path's protocol (a batch, whose models hide in its file, is refused where keys have lists)."""
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.limited]\nkey = "{"k" * 24}"\nmodels = ["allowed-*"]\n')
    client = make_app(keys_file=keys).test_client()
    response = client.post(path, json={"model": "gpt-x", "messages": [], "input": "x"}, headers=bearer("k" * 24))
    assert response.status_code == 403, (path, response.data)
    if path.startswith("/v1/messages"):
        assert response.json is not None and response.json["error"]["type"] == "permission_error"
    else:
        assert b"model_not_allowed" in response.data


def test_a_form_field_model_outside_the_keys_list_is_refused(tmp_path: Path) -> None:
    """A multipart upload's `model` field, found as the form streams, is admitted by the same pipeline step."""
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.limited]\nkey = "{"k" * 24}"\nmodels = ["allowed-*"]\n')
    client = make_app(keys_file=keys).test_client()
    response = client.post("/v1/audio/transcriptions", headers=bearer("k" * 24),
                           data={"model": "gpt-x", "file": (io.BytesIO(b"RIFF"), "a.wav")})
    assert response.status_code == 403 and b"model_not_allowed" in response.data


def test_only_the_pipeline_checks_a_callers_models() -> None:
    """`authorize_model` and a request's reservation (`reserve_request`) are called by proxy/pipeline.py alone
    (`shape_input`, `admit_shaped`, `admit_model`, `admit_forwarded`): a view cannot hold a check of its own
    that the next endpoint family would forget to copy."""
    callers = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "proxy").rglob("*.py")
                     if "authorize_model(" in path.read_text())
    assert callers == ["proxy/access.py", "proxy/pipeline.py"]
    reservers = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "proxy").rglob("*.py")
                       if "reserve_request(" in path.read_text())
    assert reservers == ["proxy/limits.py", "proxy/pipeline.py"]  # a request's budget hold, likewise


def test_a_view_without_a_declaration_is_refused_at_start() -> None:
    """A new endpoint cannot skip the pipeline by forgetting to declare itself."""
    app = make_app()

    @app.get("/forgot")
    def forgot() -> Response:
        return Response("open")

    with pytest.raises(RuntimeError, match="forgot"):
        check_every_view_declared(app)


@pytest.mark.parametrize(("usage", "deltas", "expected"), [
    ({"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}, 9, (12, 2, 14, True)),
    ({"prompt_tokens": 12, "completion_tokens": 2}, 9, (12, 2, 14, True)),
    ({"total_tokens": 30}, 9, (0, 30, 30, True)),
    ({"prompt_tokens": "12", "completion_tokens": 2}, 9, (0, 9, 9, False)),
    (None, 9, (0, 9, 9, False)),
])
def test_token_usage_is_read_once_from_the_upstream(usage: dict | None, deltas: int, expected: tuple) -> None:
    """Budgets, metrics and WebSocket totals all read an answer's cost through one rule."""
    used = TokenUsage.of_answer(usage, deltas)
    assert (used.prompt, used.completion, used.total, used.reported) == expected
    assert (used + used).total == 2 * used.total


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def chat_upstream_fails(client: FlaskClient, transport: FakeTransport) -> None:
    """A way out of a request: the upstream answers 500 before the stream."""
    transport.reply(status=500, json={"error": {"message": "boom"}})
    client.post("/chat", headers=unit_bearer(), json=CHAT).close()


def chat_not_streamed(client: FlaskClient, transport: FakeTransport) -> None:
    """A way out of a request: a whole (non-streaming) chat completion."""
    transport.reply(json={"id": "c", "object": "chat.completion", "choices": [], "usage": {}})
    client.post("/v1/chat/completions", headers=unit_bearer(), json=CHAT).close()


def test_every_way_out_of_a_request_gives_its_stream_slot_back(make_client: Callable[..., FlaskClient],
                                                                transport: FakeTransport) -> None:
    """With one slot per key, each kind of request (a whole stream, a client leaving mid-stream, a bad body,
    a wrong key, an upstream 500, a non-streaming answer, an SSE page) leaves the slot free for the next."""
    client = make_client(max_streams_per_key=1)
    chat = {"messages": [{"role": "user", "content": "hi"}]}

    def whole_stream() -> None:
        client.post("/chat", headers=unit_bearer(), json=chat).close()

    def client_leaves() -> None:
        response = client.post("/chat", headers=unit_bearer(), json=chat, buffered=False)
        next(response.response)  # the first bytes, then the client is gone
        response.close()

    upstream_fails = functools.partial(chat_upstream_fails, client, transport)
    non_streaming = functools.partial(chat_not_streamed, client, transport)

    ways_out = [whole_stream, client_leaves, upstream_fails, non_streaming,
                lambda: client.post("/chat", headers=unit_bearer(), data=b"{").close(),
                lambda: client.post("/chat", headers=unit_bearer("wrong-key"), json=chat).close(),
                lambda: client.get("/chat?prompt=hi", headers=unit_bearer()).close()]
    for way_out in ways_out:
        way_out()
        answer = client.post("/chat", headers=unit_bearer(), json=chat)
        assert answer.status_code == 200, f"the slot was still held after {getattr(way_out, '__name__', way_out)}"
        answer.close()


@pytest.mark.parametrize(("path", "label"), [
    ("/v1/responses", "/v1/responses"),
    ("/v1/files/file-abc/content", "/v1/files/<path:rest>"),
    ("/v1/messages/count_tokens", "/v1/messages/count_tokens"),
    ("/v1/models/gpt-4o", "/v1/models/<path:model>"),
    ("/chat", "/chat"),
])
def test_metrics_route_label_names_the_family_not_the_rule_s_whole_list(path: str, label: str) -> None:
    """Forwarded routes are labelled by the family they matched (a bounded set), not by the `any(...)` list."""
    app = make_app()
    rule, args = app.url_map.bind("relay.test").match(path, method="POST" if "models/" not in path else "GET",
                                                      return_rule=True)
    assert route_label(rule, args) == label
    assert route_label(None, None) == "unmatched"


def test_every_own_credential_is_a_declared_guard() -> None:
    """A view that is not behind an access key checks its own credential as a declared `guard` the pipeline
    runs (before the view and its limits), not inside the view: only the WebSocket, which must refuse with
    close frames in its own protocol, is `own` without one."""
    app = make_app(debug_stats=True)
    unguarded = sorted(name for name, view in app.view_functions.items()
                       if getattr(view, "declaration", None) is not None and view.declaration.access == "own"
                       and view.declaration.guard is None)
    assert unguarded == ["websocket.chat"]
    guarded = {name for name, view in app.view_functions.items()
               if getattr(getattr(view, "declaration", None), "guard", None) is not None}
    assert guarded == {"metrics.metrics", "usage.all_usage", "debug.debug_stats"}


@pytest.mark.parametrize(("settings", "path", "headers", "status"), [
    ({}, "/usage", {}, 403),  # ADMIN_KEY unset: off
    ({"admin_key": "a" * 24}, "/usage", {"Authorization": f"Bearer {KEY}"}, 401),  # an access key is not it
    ({"metrics_key": "m" * 24}, "/metrics", {"Authorization": "Bearer wrong"}, 401),
    ({"debug_stats": True}, "/debug/stats", {"Authorization": f"Bearer {KEY}", "X-Forwarded-For": "1.2.3.4"}, 200),
])
def test_guards_refuse_before_the_view(settings: dict[str, object], path: str, headers: dict[str, str],
                                       status: int) -> None:
    """Each guard gives its refusal in the endpoint's JSON shape (the test client is a loopback peer)."""
    response = make_app(**settings).test_client().get(path, headers=headers)
    assert response.status_code == status, response.data
    if status != 200:
        assert response.json is not None and "error" in response.json


def test_limits_run_after_the_caller_is_decided() -> None:
    """The pipeline installs the limits itself, after its first step: a rate limit counts the caller the
    pipeline decided, never a request it has not begun (the order no longer rests on create_app's lines)."""
    app = make_app(rate_limit_per_minute=5)
    hooks = [hook.__name__ for hook in app.before_request_funcs[None]]
    assert hooks[0] == "_begin" and "_admit" in hooks[1:]


def _slots_and_gauge(client: FlaskClient) -> tuple[int, float | None]:
    relay = client.application.extensions["relay"]
    return relay.limits.counters.memory.leases_held(), relay.metrics.registry.get_sample_value("relay_open_streams")


def test_slot_count_and_open_streams_gauge_return_to_zero_after_every_kind_of_request(
        make_client: Callable[..., FlaskClient], transport: FakeTransport) -> None:
    """Issue 12, point 2: after each kind of request (page, static file, lists, refusals, errors, whole and
    abandoned streams on every streaming route, a slot refusal itself) no stream slot is held, per key or
    relay-wide, and relay_open_streams is back to 0; only streaming responses ever raised them."""
    client = make_client(max_streams_per_key=3, max_open_streams=20, max_body_bytes=256)
    chat = {"messages": [{"role": "user", "content": "hi"}]}

    def leave_after_first_bytes(method: str, path: str, body: Any = None) -> None:
        response = client.open(path, method=method, headers=unit_bearer(), json=body, buffered=False)
        next(iter(response.response))  # the first bytes, then the client is gone
        assert _slots_and_gauge(client)[0] > 0, f"{path} streamed without holding a slot"
        response.close()

    upstream_fails = functools.partial(chat_upstream_fails, client, transport)
    non_streaming = functools.partial(chat_not_streamed, client, transport)

    def forwarded() -> None:
        transport.reply(json={"object": "list", "data": [], "model": "m", "usage": {"prompt_tokens": 1}})
        client.post("/v1/embeddings", headers=unit_bearer(), json={"model": "m", "input": "hi"}).close()

    def streams_refused() -> None:
        held = [client.post("/chat", headers=unit_bearer(), json=chat, buffered=False) for _ in range(3)]
        refused = client.post("/chat", headers=unit_bearer(), json=chat)
        assert refused.status_code == 429, refused.data
        for response in (*held, refused):
            response.close()

    def get(path: str, **options: Any) -> Callable[[], None]:
        return lambda: client.get(path, **options).close()

    ways_out: dict[str, Callable[[], None]] = {
        "page": get("/", headers=unit_bearer()),
        "static file": get("/static/web/icon.svg", headers=unit_bearer()),
        "health": get("/healthz"), "models": get("/v1/models", headers=unit_bearer()),
        "unknown path": get("/no/such/path", headers=unit_bearer()),
        "plain GET /ws": get(f"/ws?key={ACCESS_KEY}"),
        "preflight": lambda: client.options("/chat", headers={"Origin": "https://x.example"}).close(),
        "wrong key": lambda: client.post("/chat", headers=unit_bearer("wrong-key"), json=chat).close(),
        "keys disagree": get(f"/chat?prompt=hi&key={ACCESS_KEY}", headers=unit_bearer(SECOND_ACCESS_KEY)),
        "bad body": lambda: client.post("/chat", headers=unit_bearer(), data=b"{").close(),
        "body too large": lambda: client.post("/chat", headers=unit_bearer(), json={"x": "y" * 1000}).close(),
        "whole /chat": lambda: client.post("/chat", headers=unit_bearer(), json=chat).close(),
        "/chat left": lambda: leave_after_first_bytes("POST", "/chat", chat),
        "/v1 stream left": lambda: leave_after_first_bytes("POST", "/v1/chat/completions", {**chat, "stream": True}),
        "SSE left": lambda: leave_after_first_bytes("GET", "/chat?prompt=hi"),
        "whole SSE": get("/chat?prompt=hi", headers=unit_bearer()),
        "upstream 500": upstream_fails, "non-streaming /v1": non_streaming, "forwarded /v1/embeddings": forwarded,
        "too many streams": streams_refused,
    }
    for name, way_out in ways_out.items():
        way_out()
        assert _slots_and_gauge(client) == (0, 0.0), f"a slot or the gauge was still up after: {name}"


def test_a_security_header_a_view_set_is_kept_and_none_is_repeated() -> None:
    """The finish step adds each security header an answer lacks, once; one the view set itself stays as set;
    X-Request-ID is the relay's, once, even where a view set one."""
    app = make_app()

    @app.get("/framed")
    @endpoint("openai", access="public")
    def framed() -> Response:
        return Response("framed", headers={"X-Frame-Options": "SAMEORIGIN", "X-Request-ID": "the view's"})

    answer = app.test_client().get("/framed", headers={"X-Request-ID": "abc-123"})
    assert answer.headers.getlist("X-Frame-Options") == ["SAMEORIGIN"]
    assert answer.headers.getlist("X-Content-Type-Options") == ["nosniff"]
    assert answer.headers.getlist("Referrer-Policy") == ["no-referrer"]
    assert answer.headers.getlist("X-Request-ID") == ["abc-123"]


def test_a_request_has_no_session_to_write_and_no_answer_sets_a_cookie() -> None:
    """The relay keeps no sessions: the one null session every request shares refuses a write."""
    app = make_app()
    with app.test_request_context("/health"):
        assert app.session_interface.is_null_session(session)
        with pytest.raises(RuntimeError):
            session["user"] = "someone"
    assert "Set-Cookie" not in app.test_client().get("/health").headers


@pytest.mark.parametrize("status", [200, 204, 304])
def test_a_stream_response_goes_out_with_the_headers_werkzeug_would_give_it(status: int) -> None:
    """StreamResponse skips werkzeug's copy and fix-ups of a 200's headers: the same headers go out."""
    headers = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
               ("x-ratelimit-remaining-requests", "7"), ("Content-Length", "5")]
    environ = create_environ("/v1/responses")
    lean = StreamResponse(iter([b"data"]), status=status, headers=headers).get_wsgi_headers(environ)
    plain = Response(iter([b"data"]), status=status, headers=headers).get_wsgi_headers(environ)
    assert lean.to_wsgi_list() == plain.to_wsgi_list()


def test_a_stream_response_closes_its_body_then_its_close_step() -> None:
    """What the server iterates is the body itself; closing it closes the body (its `finally`) and then runs
    the response's close callbacks (the pipeline's close step), even when closing the body fails."""
    order: list[str] = []

    def body() -> Iterator[bytes]:
        try:
            yield b"one"
            yield b"two"
        finally:
            order.append("body")
            raise RuntimeError("the body's close failed")

    response = StreamResponse(body(), status=200)
    response.call_on_close(lambda: order.append("close step"))
    served = response.get_app_iter(create_environ("/chat", method="POST"))
    assert next(iter(served)) == b"one"
    with pytest.raises(RuntimeError):
        served.close()  # type: ignore[attr-defined]
    assert order == ["body", "close step"]
