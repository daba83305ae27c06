"""The one typed object a request carries between the pipeline's steps (`proxy/pipeline.py`), the limits,
the metrics and the access log; and the declaration a view gives the pipeline.

A leaf module: the services that read the state (limits, metrics) import it without importing the
pipeline, which imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from flask import g

if TYPE_CHECKING:  # types only, so that every module, proxy.errors included, may import this one
    from proxy.accesslog import AccessRecord
    from proxy.budgets import Reservation
    from proxy.config import Config
    from proxy.errors import RelayError
    from proxy.keys import KeyPolicy
    from proxy.limits import Lease

# The wire protocol a view speaks, which is also the shape its errors are rendered in (proxy/errors.py).
WireProtocol = Literal["ndjson", "openai", "sse", "json", "anthropic"]
# key: an access key is required (401 otherwise); public: anyone; own: the caller is decided but not required,
# and the declaration's `guard` (or, for a WebSocket, the view in its own protocol: close frames) decides.
Access = Literal["key", "public", "own"]
STATE_ATTRIBUTE = "relay_request"


class Shaped(Protocol):
    """What every shaping function returns: at least the model asked for and the upstream body."""

    @property
    def model(self) -> str: ...

    @property
    def upstream_body(self) -> dict[str, Any]: ...


# A credential other than an access key (ADMIN_KEY, METRICS_KEY, loopback only), checked by the pipeline
# before the view runs and before any limit is counted: it raises the refusal.
Guard = Callable[["RequestState", "Config"], None]
BodyShaper = Callable[[dict[str, Any], "Config"], Shaped]
QueryShaper = Callable[[Mapping[str, str], "Config"], Shaped]


@dataclass(frozen=True)
class Declaration:
    """What a view is, for the pipeline. `body` shapes a JSON body, `query` the query string; with neither
    the view gets no shaped request. `checks_model`: the shaped model is one the caller must be allowed.
    `guard`: the endpoint's own credential, checked by the pipeline once the caller is decided."""

    protocol: WireProtocol
    access: Access = "key"
    streams: bool = False
    body: BodyShaper | None = None
    query: QueryShaper | None = None
    checks_model: bool = True
    guard: Guard | None = None


PUBLIC = Declaration("json", access="public")  # static files, routing errors (404/405)


@dataclass
class RequestState:
    """Everything about one request that outlives a single step of the pipeline."""

    access: AccessRecord
    declaration: Declaration
    route: str
    caller: KeyPolicy | None = None  # decided once, by proxy.pipeline.decide_caller
    error: RelayError | None = None  # the error this request was answered with, for the metrics
    lease: Lease | None = None  # the stream slot held, released when the request closes
    reservation: Reservation | None = None  # what its budgets hold for it until it closes (proxy/budgets.py)
    breach: tuple[str, int] | None = None  # (limit, seconds to retry) when a rate limit refused it
    streamed: bool = False  # a streaming response went out: it counts as an open stream until closed
    # The view charged its tokens and wrote its ledger rows itself (a WebSocket, answer by answer), not the close.
    charged: bool = False
    closed: bool = False


def keep_request_state(state: RequestState) -> None:
    """Put `state` on the request context (the pipeline's first step); the only per-request value there."""
    setattr(g, STATE_ATTRIBUTE, state)


def request_state() -> RequestState:
    """This request's state (the pipeline makes it before anything else runs)."""
    state: RequestState = getattr(g, STATE_ATTRIBUTE)
    return state


def current_request_state() -> RequestState | None:
    """The state, or None when the pipeline did not begin this request."""
    state: RequestState | None = g.get(STATE_ATTRIBUTE)
    return state
