"""The per-app services: configuration, upstream clients, stream timers, model lists. Built once by create_app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import httpx2
import openai
from flask import current_app

from proxy.config import Config
from proxy.ledger import Ledger, build_ledger
from proxy.ledger.row import CostOf, LedgerUsage
from proxy.limits import RequestLimits
from proxy.metrics import Metrics
from proxy.models import ModelCatalog
from proxy.prices import PriceTable
from proxy.redaction import Redactor
from proxy.reports import Reports
from proxy.shutdown import Draining
from proxy.stream_machine import StreamTimers
from proxy.upstream import AnthropicUpstream, Upstream, with_cheap_idle_check

# Each open stream holds one upstream connection; the SDK's default pool (1,000) would queue the rest.
UPSTREAM_POOL = httpx2.Limits(max_connections=None, max_keepalive_connections=256)


@dataclass(frozen=True)
class Relay:
    config: Config
    upstreams: tuple[Upstream, ...]
    timers: StreamTimers
    limits: RequestLimits
    metrics: Metrics
    redact: Callable[[str], str]  # the configuration's secrets out of upstream text and log lines
    catalog: ModelCatalog  # each upstream's own model list, cached (GET /v1/models)
    ledger: Ledger  # the usage ledger (proxy/ledger): one row per request, written by a thread of its own
    reports: Reports  # each closed request's metrics, access-log line and ledger row, written off its path
    draining: Draining = field(default_factory=Draining)  # set when this worker is asked to stop
    # UPSTREAMS_FILE's `api = "anthropic"` entries: only POST /v1/messages goes to them, and nothing else does.
    anthropic_upstreams: tuple[AnthropicUpstream, ...] = ()

    @property
    def body_read_timeout(self) -> float:
        """A backstop for reads inside a stream; the pump's own timers normally act first."""
        return max(self.timers.first_token, self.timers.idle) + self.timers.keepalive


def build_relay(config: Config) -> Relay:
    redact = Redactor(config.secrets)
    return Relay(config, configured_upstreams(config, redact), StreamTimers.from_config(config),
                 RequestLimits(config), Metrics(config), redact, ModelCatalog.from_config(config),
                 build_ledger(config, cost_of=priced_by(config.prices)), Reports.for_server(config.log_flush_seconds),
                 anthropic_upstreams=anthropic_upstreams(config, redact))


def priced_by(prices: PriceTable) -> CostOf:
    """The ledger's cost of a request: PRICES_FILE's price of the model asked for (the name budgets
    reserve under too), cached prompt tokens at the cached price; None where no entry prices it."""

    def cost_of(model: str, usage: LedgerUsage) -> float | None:
        return prices.cost(model, usage.as_token_usage())

    return cost_of


def configured_upstreams(config: Config, redact: Callable[[str], str]) -> tuple[Upstream, ...]:
    """The upstreams of `UPSTREAMS_FILE` in file order, else the single OPENAI_* one (or the demo model)."""
    if config.demo:
        from proxy.demo import demo_upstream  # the stand-in model exists only when asked for

        return (demo_upstream(),)
    if config.upstreams:
        return tuple(Upstream(spec.name, upstream_client(spec.base_url, spec.api_key, config), spec.models,
                              redact, frozenset(spec.protocols), spec.model_map)
                     for spec in config.upstreams if spec.api == "openai")
    return (Upstream("default", upstream_client(config.openai_base_url, config.openai_api_key, config),
                     redact=redact),)


def anthropic_upstreams(config: Config, redact: Callable[[str], str]) -> tuple[AnthropicUpstream, ...]:
    """UPSTREAMS_FILE's Anthropic-protocol upstreams, each on its own pooled client (no SDK: requests are
    forwarded as sent, so timeouts are set per request by proxy/forwarding.py); in demo mode, the stand-in."""
    if config.demo:
        from proxy.demo import demo_anthropic_upstream

        return (demo_anthropic_upstream(),)
    return tuple(AnthropicUpstream(spec.name, spec.base_url.rstrip("/"),
                                   httpx2.Client(limits=UPSTREAM_POOL, timeout=config.upstream_timeout),
                                   spec.api_key, spec.models, redact, frozenset(spec.protocols), spec.model_map)
                 for spec in config.upstreams if spec.api == "anthropic" and not config.demo)


def upstream_client(base_url: str, api_key: str, config: Config) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=api_key,
        base_url=base_url,
        max_retries=0,  # a failing upstream is reported (or fallen over) at once, not retried with backoff
        timeout=config.upstream_timeout,
        http_client=with_cheap_idle_check(openai.DefaultHttpx2Client(limits=UPSTREAM_POOL)),
    )


def current_relay() -> Relay:
    relay: Relay = current_app.extensions["relay"]
    return relay
