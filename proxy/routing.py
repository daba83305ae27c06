"""Which upstreams answer a request, and whether in the client's own protocol.

Every upstream declares the client protocols it speaks natively (UPSTREAMS_FILE's `protocols`: "chat" and
"responses" for OpenAI-protocol upstreams by default, "messages" for Anthropic-protocol ones). A Responses or
Messages request goes to the upstreams that serve its model and speak its protocol; only when none does,
it goes to those serving the model over chat completions, and the caller translates (a bridge). Native
always wins, so an operator who adds a native upstream never gets a translated answer by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from proxy.errors import BadRequest, NotFound
from proxy.relay import Relay
from proxy.upstream import AnthropicUpstream, Upstream

ClientProtocol = Literal["chat", "responses", "messages"]


@dataclass(frozen=True)
class Route:
    """The upstreams to try in order; `native`: they speak the client's protocol (else: bridge over chat)."""

    upstreams: tuple[Upstream | AnthropicUpstream, ...]
    native: bool

    @property
    def chat_upstreams(self) -> tuple[Upstream, ...]:
        """A bridged route's upstreams, as the chat-completions upstreams they are."""
        return tuple(upstream for upstream in self.upstreams if isinstance(upstream, Upstream))


def route(relay: Relay, protocol: ClientProtocol, model: str) -> Route:
    """The upstreams serving `model` that speak `protocol`, else those serving it over chat completions."""
    candidates: tuple[Upstream | AnthropicUpstream, ...] = (
        relay.anthropic_upstreams if protocol == "messages" else relay.upstreams)
    native = tuple(upstream for upstream in candidates if upstream.serves(model) and upstream.speaks(protocol))
    if native:
        return Route(native, native=True)
    over_chat = tuple(upstream for upstream in relay.upstreams if upstream.serves(model) and upstream.speaks("chat"))
    if over_chat and protocol != "chat":
        return Route(over_chat, native=False)
    raise not_served(protocol, model)


def not_served(protocol: ClientProtocol, model: str) -> BadRequest | NotFound:
    """In each protocol's own terms: Anthropic answers an unknown model with not_found_error (Claude Code
    shows it as it is), OpenAI with a 400."""
    if protocol == "messages":
        return NotFound(f"model '{model[:100]}' is not served by this relay", kind="model_not_served")
    return BadRequest(f"model '{model[:100]}' is not served by this relay", kind="model_not_served")
