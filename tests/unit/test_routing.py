"""Which upstreams answer a request (proxy/routing.py), and the names `model_map` gives models upstream."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx2
import openai
import orjson
import pytest
from flask.testing import FlaskClient

from proxy import create_app
from proxy.errors import BadRequest, NotFound
from proxy.relay import Relay
from proxy.routing import ClientProtocol, route
from proxy.upstream import AnthropicUpstream, Upstream
from tests.conftest import UPSTREAM_KEY
from tests.unit.conftest import HELLO, FakeTransport, bearer, unit_config
from tests.unit.test_passthrough import Recorder

MAP = (("claude-sonnet-5", "deepseek-chat"),)


def openai_upstream(name: str, transport: httpx2.BaseTransport, models: tuple[str, ...],
                    protocols: frozenset[str] = frozenset({"chat", "responses"}),
                    model_map: tuple[tuple[str, str], ...] = ()) -> Upstream:
    client = openai.OpenAI(api_key=UPSTREAM_KEY, base_url=f"http://{name}.invalid/v1", max_retries=0,
                           http_client=httpx2.Client(transport=transport))
    return Upstream(name, client, models, protocols=protocols, model_map=model_map)


def anthropic_upstream(name: str, models: tuple[str, ...]) -> AnthropicUpstream:
    return AnthropicUpstream(name, f"http://{name}.invalid", httpx2.Client(transport=Recorder()), UPSTREAM_KEY,
                             models)


def relay_with(upstreams: tuple[Upstream, ...], anthropic: tuple[AnthropicUpstream, ...] = ()) -> Relay:
    relay: Relay = create_app(unit_config()).extensions["relay"]
    return dataclasses.replace(relay, upstreams=upstreams, anthropic_upstreams=anthropic)


CHAT_ONLY = openai_upstream("deepseek", Recorder(), ("deepseek-*",), frozenset({"chat"}), MAP)
FULL = openai_upstream("openai", Recorder(), ("gpt-*", "deepseek-*"))
CLAUDE = anthropic_upstream("anthropic", ("claude-*",))


@pytest.mark.parametrize(("protocol", "model", "names", "native"), [
    ("responses", "gpt-4o", ["openai"], True),
    ("responses", "deepseek-chat", ["openai"], True),  # native wins over an earlier chat-only upstream
    ("messages", "claude-sonnet-5", ["anthropic"], True),  # likewise over a chat upstream mapping the name
    ("chat", "deepseek-chat", ["deepseek", "openai"], True),
])
def test_native_upstreams_win_in_file_order(protocol: ClientProtocol, model: str, names: list[str],
                                            native: bool) -> None:
    """The upstreams serving the model in the client's own protocol, in file order."""
    chosen = route(relay_with((CHAT_ONLY, FULL), (CLAUDE,)), protocol, model)
    assert ([upstream.name for upstream in chosen.upstreams], chosen.native) == (names, native)


@pytest.mark.parametrize(("protocol", "model"), [("responses", "deepseek-chat"), ("messages", "claude-sonnet-5")])
def test_a_model_served_only_over_chat_is_bridged(protocol: ClientProtocol, model: str) -> None:
    """With no native upstream for the model, the chat upstreams serving it (a mapped name too) are chosen."""
    chosen = route(relay_with((CHAT_ONLY,)), protocol, model)
    assert (chosen.chat_upstreams, chosen.native) == ((CHAT_ONLY,), False)


@pytest.mark.parametrize(("protocol", "error"), [("responses", BadRequest), ("messages", NotFound),
                                                 ("chat", BadRequest)])
def test_a_model_nobody_serves_is_each_protocol_s_own_error(protocol: ClientProtocol, error: type[Exception]) -> None:
    """OpenAI's protocols answer an unserved model 400, Anthropic's 404 (not_found_error), naming it."""
    with pytest.raises(error, match="llama-3"):
        route(relay_with((CHAT_ONLY, FULL), (CLAUDE,)), protocol, "llama-3")


def mapped_client(transport: FakeTransport | Recorder) -> FlaskClient:
    app = create_app(unit_config(default_model="claude-sonnet-5"))
    upstream = openai_upstream("deepseek", transport, ("deepseek-*",), frozenset({"chat"}), MAP)
    app.extensions["relay"] = dataclasses.replace(app.extensions["relay"], upstreams=(upstream,))
    return app.test_client()


@pytest.mark.parametrize("stream", [True, False])
def test_chat_sends_the_upstream_s_own_name(transport: FakeTransport, stream: bool) -> None:
    """A chat request for a mapped name reaches the upstream under the name `model_map` gives."""
    if not stream:
        transport.reply(json={"id": "c", "object": "chat.completion", "model": "deepseek-chat",
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                           "finish_reason": "stop"}]})
    answer = mapped_client(transport).post("/v1/chat/completions", headers=bearer(),
                                           json={**HELLO, "model": "claude-sonnet-5", "stream": stream})
    assert answer.status_code == 200
    assert transport.requests[0].body["model"] == "deepseek-chat"


def test_forwarded_json_bodies_are_renamed_and_others_kept_byte_for_byte() -> None:
    """A forwarded JSON body naming a mapped model is re-encoded with the upstream's name; one naming an
    unmapped model reaches the upstream exactly as sent."""
    recorder = Recorder()
    client = mapped_client(recorder)
    mapped: dict[str, Any] = {"model": "claude-sonnet-5", "input": ["é"]}
    assert client.post("/v1/embeddings", headers=bearer(), json=mapped).status_code == 200
    assert orjson.loads(recorder.bodies[0]) == {**mapped, "model": "deepseek-chat"}
    assert recorder.seen[0].headers["content-length"] == str(len(recorder.bodies[0]))
    raw = b'{"model":  "deepseek-embed", "input": "x"}'
    client.post("/v1/embeddings", headers={**bearer(), "Content-Type": "application/json"}, data=raw)
    assert recorder.bodies[1] == raw


def test_models_list_shows_mapped_names() -> None:
    """A `model_map` name is a configured exact name: /v1/models lists it."""
    ids = [entry["id"] for entry in mapped_client(Recorder()).get("/v1/models", headers=bearer()).json["data"]]
    assert "claude-sonnet-5" in ids
