"""The model lists (`GET /v1/models`, `GET /v1/models/{id}`), unknown paths' 404s and CORS preflights, in-process:
upstreams are the unit FakeTransport (its `GET /models` answers `transport.models`), the catalog's clock is
injected, so caching and back-off are tested without waiting."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from flask.testing import FlaskClient

from proxy import create_app
from proxy.access import allowed_request_headers
from proxy.config import Config, UpstreamSpec
from proxy.demo import DEMO_MODEL
from proxy.errors import SERVED_ENDPOINTS, unknown_endpoint
from proxy.models import ModelCatalog, model_entries
from proxy.upstream import AnthropicUpstream, Upstream
from tests.conftest import ACCESS_KEY, UPSTREAM_KEY
from tests.unit.conftest import FakeTransport, Reply, bearer, fake_upstream, unit_config

ORIGIN = "https://app.example.com"
LIMITED_KEY = "limited-access-key-93c1d7e2"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def listing(*ids: str, owner: str = "them") -> Reply:
    """An upstream's GET /models answer in OpenAI's list shape."""
    return Reply(json={"object": "list", "data": [
        {"id": model, "object": "model", "created": 1700000000, "owned_by": owner, "context_length": 8192}
        for model in ids]})


def relay_client(upstreams: list[Upstream], clock: Clock | None = None, timeout: float = 2.0,
                 **overrides: Any) -> FlaskClient:
    """A relay with these upstreams and a model catalog on `clock` (MODELS_CACHE_SECONDS from the config)."""
    app = create_app(unit_config(**overrides))
    relay = app.extensions["relay"]
    catalog = ModelCatalog(ttl=relay.config.models_cache_seconds, timeout=timeout, clock=clock or Clock())
    app.extensions["relay"] = dataclasses.replace(relay, upstreams=tuple(upstreams), catalog=catalog)
    return app.test_client()


def ids(client: FlaskClient, key: str = ACCESS_KEY) -> list[str]:
    response = client.get("/v1/models", headers=bearer(key))
    assert response.status_code == 200, response.data
    return [entry["id"] for entry in response.json["data"]]


# --- merging ----------------------------------------------------------------------------------------------------

def test_lists_merge_in_upstream_order_and_the_first_lister_owns() -> None:
    """Configured exact names first, then each upstream's list in upstream order; a model two upstreams list
    is the first's; the upstream's fields are kept and owned_by names the relay's upstream."""
    first, second = FakeTransport(), FakeTransport()
    first.models = listing("shared", "a-1")
    second.models = listing("b-1", "shared", "a-1")
    client = relay_client([fake_upstream(first, "first"), fake_upstream(second, "second")],
                          default_model="shared")
    data = client.get("/v1/models", headers=bearer()).json["data"]
    assert [(entry["id"], entry["owned_by"]) for entry in data] == [
        ("shared", "first"), ("a-1", "first"), ("b-1", "second")]
    assert data[0] == {"id": "shared", "object": "model", "created": 1700000000, "owned_by": "first",
                       "context_length": 8192}


def test_an_upstream_lists_only_what_its_globs_serve() -> None:
    """An upstream's listed models count only where its UPSTREAMS_FILE `models` globs match."""
    first, second = FakeTransport(), FakeTransport()
    first.models = listing("gpt-4o-mini", "gpt-4o", "deepseek-chat")
    second.models = listing("deepseek-chat", "deepseek-reasoner", "gpt-4o")
    client = relay_client([fake_upstream(first, "first", ("gpt-*",)),
                           fake_upstream(second, "second", ("deepseek-*",))])
    listed = client.get("/v1/models", headers=bearer()).json["data"]
    assert [(entry["id"], entry["owned_by"]) for entry in listed] == [
        ("gpt-4o-mini", "first"), ("gpt-4o", "first"), ("deepseek-chat", "second"),
        ("deepseek-reasoner", "second")]


def test_allowed_models_filters_listed_and_configured_names() -> None:
    """ALLOWED_MODELS (globs) filters what the upstreams list; its exact names are listed even unlisted."""
    transport = FakeTransport()
    transport.models = listing("gpt-4o-mini", "gpt-4o", "o3-mini", "whisper-1")
    client = relay_client([fake_upstream(transport)], allowed_models=("gpt-4o*", "o3-*", "kimi-k2"))
    assert ids(client) == ["gpt-4o-mini", "kimi-k2", "gpt-4o", "o3-mini"]


def test_a_keys_own_models_narrow_the_list(tmp_path: Path) -> None:
    """A KEYS_FILE key's `models` narrows the list for that key only."""
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.limited]\nkey = "{LIMITED_KEY}"\nmodels = ["gpt-4o*"]\n')
    transport = FakeTransport()
    transport.models = listing("gpt-4o-mini", "gpt-4o", "deepseek-chat")
    client = relay_client([fake_upstream(transport)], keys_file=keys)
    assert ids(client, LIMITED_KEY) == ["gpt-4o-mini", "gpt-4o"]
    assert ids(client) == ["gpt-4o-mini", "gpt-4o", "deepseek-chat"]
    assert client.get("/v1/models").status_code == 401


def test_merge_rule_alone() -> None:
    """model_entries: a configured name no upstream serves is left out; one nobody lists goes to the first
    upstream whose globs serve it, with created 0."""
    config = Config(authorization_keys=(ACCESS_KEY,), openai_api_key=UPSTREAM_KEY, default_model="kimi-k2",
                    allowed_models=("kimi-k2", "nobody-serves", "gpt-*", "deepseek-chat"))
    one, two = (fake_upstream(FakeTransport(), "one", ("gpt-*",)),
                fake_upstream(FakeTransport(), "two", ("kimi-*", "deepseek-*")))
    entries = model_entries(config, (one, two), {"one": ({"id": "gpt-x"},), "two": ()})
    assert entries == [{"id": "kimi-k2", "object": "model", "created": 0, "owned_by": "two"},
                       {"id": "deepseek-chat", "object": "model", "created": 0, "owned_by": "two"},
                       {"id": "gpt-x", "object": "model", "created": 0, "owned_by": "one"}]


# --- caching, failure, slowness ---------------------------------------------------------------------------------

def test_list_is_cached_for_models_cache_seconds_then_asked_again() -> None:
    """Within MODELS_CACHE_SECONDS the upstream is asked once; after it, once more, and its new list shows."""
    clock, transport = Clock(), FakeTransport()
    transport.models = listing("m-1")
    client = relay_client([fake_upstream(transport)], clock, models_cache_seconds=60.0)
    assert ids(client)[-1] == "m-1"
    transport.models = listing("m-2")
    clock.now += 59
    assert ids(client)[-1] == "m-1"
    assert len(transport.model_requests) == 1
    clock.now += 2
    assert ids(client)[-1] == "m-2"
    assert len(transport.model_requests) == 2
    assert transport.model_requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize("failure", [
    Reply(status=500, json={"error": {"message": "boom"}}),
    Reply(raise_=httpx2.ConnectError),
    Reply(raise_=httpx2.ReadTimeout),
    Reply(json={"models": "not a list"}),
], ids=["500", "refused", "timeout", "garbage"])
def test_a_failing_upstream_lists_the_configured_names_and_backs_off(failure: Reply) -> None:
    """An upstream that cannot list never breaks the endpoint: the configured exact names are listed, and
    it is asked again only after the back-off, not on every request."""
    clock, transport = Clock(), FakeTransport()
    transport.models = failure
    client = relay_client([fake_upstream(transport, "only", ("gpt-4o-mini", "kimi-*"))], clock,
                          allowed_models=("gpt-4o-mini", "kimi-k2", "kimi-*"))
    assert ids(client) == ["gpt-4o-mini", "kimi-k2"]
    assert ids(client) == ["gpt-4o-mini", "kimi-k2"]
    assert len(transport.model_requests) == 1
    clock.now += 16  # past FAILURE_BACKOFF_SECONDS (15)
    transport.models = listing("kimi-k2-turbo")
    assert ids(client) == ["gpt-4o-mini", "kimi-k2", "kimi-k2-turbo"]
    assert len(transport.model_requests) == 2


def test_a_refetch_that_fails_keeps_the_last_good_list() -> None:
    """Once listed, a model stays listed while its upstream blips; the retry waits for the back-off."""
    clock, transport = Clock(), FakeTransport()
    transport.models = listing("m-1")
    client = relay_client([fake_upstream(transport)], clock, models_cache_seconds=30.0)
    assert "m-1" in ids(client)
    transport.models = Reply(status=503, json={"error": {"message": "down"}})
    clock.now += 31
    assert "m-1" in ids(client)
    clock.now += 5
    assert "m-1" in ids(client)
    assert len(transport.model_requests) == 2


class SlowModels(FakeTransport):
    """An upstream whose GET /models answers only once `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/models"):
            self.release.wait(10)
        return super().handle_request(request)


def test_a_slow_upstream_holds_the_request_only_briefly() -> None:
    """A slow upstream delays the list by the listing timeout at most (the others' lists and the configured
    names go out); its answer, arriving later, serves the next request without asking again."""
    slow, fast = SlowModels(), FakeTransport()
    slow.models, fast.models = listing("slow-model"), listing("fast-model")
    client = relay_client([fake_upstream(slow, "slow"), fake_upstream(fast, "fast")], timeout=0.3)
    started = time.monotonic()
    assert ids(client) == ["gpt-4o-mini", "fast-model"]
    assert time.monotonic() - started < 2
    slow.release.set()
    deadline = time.monotonic() + 5
    while "slow-model" not in (listed := ids(client)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert listed == ["gpt-4o-mini", "slow-model", "fast-model"]
    assert len(slow.model_requests) == 1


def test_demo_mode_lists_its_model() -> None:
    """Demo mode lists the model it answers as by default (DEFAULT_MODEL) and the stand-in's own name,
    which both its chat and its Anthropic stand-ins list (and answer, as they answer any model)."""
    client = create_app(Config(authorization_keys=(ACCESS_KEY,), openai_api_key="", demo=True)).test_client()
    assert ids(client) == ["gpt-4o-mini", DEMO_MODEL]
    assert client.get("/v1/models/gpt-4o-mini", headers=bearer()).json["owned_by"] == "demo"
    anthropic = client.get("/v1/models", headers={**bearer(), "anthropic-version": "2023-06-01"}).json
    assert [entry["id"] for entry in anthropic["data"]] == ["gpt-4o-mini", DEMO_MODEL]


# --- GET /v1/models/{id} ----------------------------------------------------------------------------------------

def test_retrieve_answers_the_entry_with_slashes_in_the_id(tmp_path: Path) -> None:
    """GET /v1/models/{id} answers the list's entry, ids with '/' included (raw or %2F-encoded)."""
    transport = FakeTransport()
    transport.models = listing("meta-llama/Llama-3-8B", "gpt-4o-mini")
    client = relay_client([fake_upstream(transport, "vllm")])
    for path in ("/v1/models/meta-llama/Llama-3-8B", "/v1/models/meta-llama%2FLlama-3-8B"):
        response = client.get(path, headers=bearer())
        assert response.status_code == 200, response.data
        assert response.json == {"id": "meta-llama/Llama-3-8B", "object": "model", "created": 1700000000,
                                 "owned_by": "vllm", "context_length": 8192}


def test_retrieve_refuses_unknown_and_forbidden_models_alike(tmp_path: Path) -> None:
    """An unlisted model, one outside ALLOWED_MODELS and one outside the key's `models` are the same 404 in
    OpenAI's shape (code model_not_found); no key is 401."""
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.limited]\nkey = "{LIMITED_KEY}"\nmodels = ["gpt-4o-mini"]\n')
    transport = FakeTransport()
    transport.models = listing("gpt-4o-mini", "gpt-4o", "whisper-1")
    client = relay_client([fake_upstream(transport)], keys_file=keys, allowed_models=("gpt-*",))
    assert client.get("/v1/models/gpt-4o", headers=bearer()).status_code == 200
    for model, key in (("no-such-model", ACCESS_KEY), ("whisper-1", ACCESS_KEY), ("gpt-4o", LIMITED_KEY)):
        response = client.get(f"/v1/models/{model}", headers=bearer(key))
        assert response.status_code == 404
        assert response.json == {"error": {
            "message": f"the model '{model}' does not exist or you do not have access to it",
            "type": "invalid_request_error", "code": "model_not_found"}}
    assert client.get("/v1/models/gpt-4o").status_code == 401


# --- unknown paths ----------------------------------------------------------------------------------------------

SERVES = "this relay serves " + ", ".join(SERVED_ENDPOINTS)


def test_unknown_paths_name_the_path_in_their_familys_shape(client: FlaskClient) -> None:
    """A 404 names the path and what the relay serves: OpenAI's shape under /v1/, Anthropic's under
    /v1/messages, NDJSON under /chat/, the JSON (OpenAI) shape elsewhere; kind not_found."""
    openai_shape = client.post("/v1/foo", headers=bearer())
    assert openai_shape.status_code == 404
    assert openai_shape.json == {"error": {"message": f"no such endpoint: /v1/foo; {SERVES}",
                                           "type": "invalid_request_error", "code": "not_found"}}
    for path in ("/v1/messages/batches", "/v1/messages/foo"):  # /v1/messages itself is served
        anthropic = client.post(path, headers=bearer())
        assert anthropic.status_code == 404
        assert anthropic.json == {"type": "error", "error": {"type": "not_found_error",
                                                             "message": f"no such endpoint: {path}; {SERVES}"}}
    ndjson = client.get("/chat/history")
    assert ndjson.status_code == 404 and ndjson.mimetype == "application/x-ndjson"
    assert orjson.loads(ndjson.data.splitlines()[0]) == {
        "done": False, "error": True, "content": f"no such endpoint: /chat/history; {SERVES}", "code": "not_found"}
    elsewhere = client.get("/nothing/here")
    assert elsewhere.json["error"] == {"message": f"no such endpoint: /nothing/here; {SERVES}",
                                       "type": "invalid_request_error", "code": "not_found"}


def test_unknown_endpoint_message_is_short_and_keyless(client: FlaskClient) -> None:
    """The message echoes at most 200 characters of the path, and never a key pasted into it."""
    assert str(unknown_endpoint("/x" * 500).description).startswith("no such endpoint: " + "/x" * 100 + "...;")
    response = client.get(f"/v1/{UPSTREAM_KEY}/{ACCESS_KEY}")
    message = response.json["error"]["message"]
    assert UPSTREAM_KEY not in message and ACCESS_KEY not in message and "[redacted]" in message


# --- CORS preflight ---------------------------------------------------------------------------------------------

def preflight(client: FlaskClient, headers: str | None, origin: str = ORIGIN) -> Any:
    sent = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    if headers is not None:
        sent["Access-Control-Request-Headers"] = headers
    return client.options("/v1/chat/completions", headers=sent)


def test_preflight_allows_the_sdks_headers(make_client: Any) -> None:
    """The headers the OpenAI and Anthropic SDKs send from a browser are allowed, by name or prefix, lower-cased
    in the order asked; the methods include DELETE; the answer varies with what was asked."""
    client = make_client(cors_origins=(ORIGIN,))
    asked = ("authorization, content-type, X-Stainless-Lang, x-stainless-retry-count, x-stainless-timeout, "
             "OpenAI-Organization, openai-project, anthropic-version, anthropic-dangerous-direct-browser-access, "
             "x-api-key, accept, x-request-id")
    response = preflight(client, asked)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Headers"] == ", ".join(
        part.strip().lower() for part in asked.split(","))
    assert response.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, OPTIONS"
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert {"Origin", "Access-Control-Request-Headers"} <= {v.strip() for v in response.headers["Vary"].split(",")}


def test_preflight_leaves_out_headers_outside_the_allow_list(make_client: Any) -> None:
    """A header outside the allow-list (or not a header name) is left out, so the browser refuses the request;
    a preflight naming no headers gets the basic list."""
    client = make_client(cors_origins=(ORIGIN,))
    response = preflight(client, "authorization, x-evil, cookie, x-stainless-os, openai, bad header")
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, x-stainless-os"
    assert "Access-Control-Allow-Headers" not in preflight(client, "x-evil").headers
    basic = preflight(client, None).headers["Access-Control-Allow-Headers"]
    assert basic == "Authorization, Content-Type, X-Request-ID"


def test_preflight_from_an_unlisted_origin_is_refused(make_client: Any) -> None:
    """Whatever headers it asks for, an origin outside CORS_ORIGINS gets 403 and no CORS headers; with no
    CORS_ORIGINS at all, every origin does."""
    refused = preflight(make_client(cors_origins=(ORIGIN,)), "x-stainless-lang", origin="https://evil.example")
    assert refused.status_code == 403 and refused.json["error"]["code"] == "cors_origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert preflight(make_client(), "authorization").status_code == 403


def test_allowed_request_headers_rule() -> None:
    """The allow-list rule alone: exact names, the three prefixes, duplicates once, junk never."""
    assert allowed_request_headers(" Accept ,accept, anthropic-beta, x-stainless-arch, x-forwarded-for, ,") == [
        "accept", "anthropic-beta", "x-stainless-arch"]
    assert allowed_request_headers("x-stainless-a\r\nset-cookie") == []


# --- Anthropic-protocol upstreams and Anthropic clients ---------------------------------------------------------

def anthropic_lister(pages: list[dict[str, Any]] | None, seen: list[httpx2.Request], name: str = "claude",
                     models: tuple[str, ...] = ()) -> AnthropicUpstream:
    """An in-process Anthropic upstream whose GET /v1/models answers `pages` in turn (None: a 500)."""
    answers = list(pages or [])

    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        if pages is None:
            return httpx2.Response(500, json={"type": "error", "error": {"type": "api_error", "message": "down"}})
        return httpx2.Response(200, json=answers.pop(0))

    return AnthropicUpstream(name, "http://anthropic.invalid", httpx2.Client(transport=httpx2.MockTransport(handle)),
                             "sk-ant-unit", models)


def anthropic_listing(*ids: str, more: bool = False) -> dict[str, Any]:
    return {"data": [{"type": "model", "id": model, "display_name": model.title(),
                      "created_at": "2025-02-19T00:00:00Z"} for model in ids],
            "has_more": more, "first_id": ids[0], "last_id": ids[-1]}


def spec(name: str, api: str = "openai") -> UpstreamSpec:
    return UpstreamSpec(name, "http://x.invalid", "KEY", (), api=api)


def anthropic_relay(openai_upstreams: list[Upstream], anthropic_upstreams: list[AnthropicUpstream],
                    order: list[UpstreamSpec], **overrides: Any) -> FlaskClient:
    app = create_app(unit_config(**overrides))
    relay = app.extensions["relay"]
    config = dataclasses.replace(relay.config, upstreams=tuple(order))
    app.extensions["relay"] = dataclasses.replace(
        relay, config=config, upstreams=tuple(openai_upstreams), anthropic_upstreams=tuple(anthropic_upstreams),
        catalog=ModelCatalog(ttl=60, timeout=2.0, clock=Clock()))
    return app.test_client()


def test_anthropic_upstreams_lists_merge_in_file_order() -> None:
    """An Anthropic-protocol upstream is asked in its protocol (x-api-key, anthropic-version, every page) and
    its models join the list where it stands in UPSTREAMS_FILE, keeping display_name and created_at."""
    first, last = FakeTransport(), FakeTransport()
    first.models, last.models = listing("gpt-a"), listing("gpt-z")
    seen: list[httpx2.Request] = []
    claude = anthropic_lister([anthropic_listing("claude-1", more=True), anthropic_listing("claude-2")], seen)
    client = anthropic_relay([fake_upstream(first, "first"), fake_upstream(last, "last")], [claude],
                             [spec("first"), spec("claude", "anthropic"), spec("last")], default_model="gpt-a")
    data = client.get("/v1/models", headers=bearer()).json["data"]
    assert [(entry["id"], entry["owned_by"]) for entry in data] == [
        ("gpt-a", "first"), ("claude-1", "claude"), ("claude-2", "claude"), ("gpt-z", "last")]
    assert data[1] == {"id": "claude-1", "object": "model", "created": 1739923200, "owned_by": "claude",
                       "display_name": "Claude-1", "created_at": "2025-02-19T00:00:00Z"}
    assert [request.url.params.get("after_id") for request in seen] == [None, "claude-1"]
    assert all(request.headers["x-api-key"] == "sk-ant-unit" and request.headers["anthropic-version"]
               for request in seen)


def test_a_failing_anthropic_upstream_never_breaks_the_list() -> None:
    """An Anthropic upstream that answers 500 lists nothing; the others and the configured names stay, and
    the allow-list filters its models like any other."""
    good_seen: list[httpx2.Request] = []
    down = anthropic_lister(None, [], name="down", models=("claude-exact", "claude-*"))
    good = anthropic_lister([anthropic_listing("claude-a", "kimi-k2")], good_seen, name="good")
    client = anthropic_relay([], [down, good], [spec("down", "anthropic"), spec("good", "anthropic")],
                             default_model="claude-exact", allowed_models=("claude-*",))
    assert ids(client) == ["claude-exact", "claude-a"]


@pytest.mark.parametrize(("query", "page", "has_more"), [
    ("", ["m0", "m1", "m2", "m3", "m4"], False),
    ("?limit=2", ["m0", "m1"], True),
    ("?limit=2&after_id=m1", ["m2", "m3"], True),
    ("?limit=2&after_id=m3", ["m4"], False),
    ("?limit=2&before_id=m2", ["m0", "m1"], False),
    ("?limit=1&before_id=m3", ["m2"], True),
    ("?after_id=unknown", [], False),
])
def test_anthropic_clients_get_anthropics_shape_and_pages(query: str, page: list[str], has_more: bool) -> None:
    """A request carrying anthropic-version gets Anthropic's list shape (type, id, display_name, created_at)
    with its pagination (limit, after_id, before_id), which the anthropic SDK's models.list() follows."""
    transport = FakeTransport()
    transport.models = listing(*(f"m{n}" for n in range(5)))
    client = relay_client([fake_upstream(transport, "u")], default_model="m0")
    headers = {**bearer(), "anthropic-version": "2023-06-01"}
    answer = client.get(f"/v1/models{query}", headers=headers).json
    assert [entry["id"] for entry in answer["data"]] == page
    assert answer["has_more"] is has_more
    assert answer["first_id"] == (page[0] if page else None) and answer["last_id"] == (page[-1] if page else None)
    if page:
        assert answer["data"][0] == {"type": "model", "id": page[0], "display_name": page[0],
                                     "created_at": "2023-11-14T22:13:20Z"}
    one = client.get("/v1/models/m1", headers=headers).json
    assert one == {"type": "model", "id": "m1", "display_name": "m1", "created_at": "2023-11-14T22:13:20Z"}
