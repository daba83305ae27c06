"""`GET /metrics` in the Prometheus text format, and what it counts.

Readable with `Authorization: Bearer <METRICS_KEY>`; when no METRICS_KEY is set, only from this host
(a loopback peer whose request no proxy forwarded), so nginx or Caddy in front never expose it.

gunicorn runs several worker processes, so the values go through prometheus_client's multiprocess mode:
every worker writes its own files in PROMETHEUS_MULTIPROC_DIR (deploy/gunicorn.conf.py prepares that
directory on start and marks dead workers), and a scrape, whichever worker answers it, adds them up.
Without that variable (a single process, e.g. tests in-process) the app's own registry answers.

Values are recorded once per request, when its response closes (the stream's last byte, or the client
gone); nothing happens per token.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.access import presented_key
from proxy.accesslog import AccessRecord
from proxy.config import Config
from proxy.errors import Forbidden, RelayError, Unauthorized

TTFT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

bp = Blueprint("metrics", __name__)


class Metrics:
    """The relay's metrics, registered in a registry of this app's own (no module-level state)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter("relay_requests", "Requests answered, by route, status and key name",
                                ["route", "status", "key"], registry=registry)
        self.open_streams = Gauge("relay_open_streams", "Streamed responses open right now",
                                  registry=registry, multiprocess_mode="livesum")
        self.first_token = Histogram("relay_time_to_first_token_seconds",
                                     "From the request to the model's first token", ["route"],
                                     buckets=TTFT_BUCKETS, registry=registry)
        self.duration = Histogram("relay_stream_duration_seconds", "From the request to the stream's end",
                                  ["route"], buckets=DURATION_BUCKETS, registry=registry)
        self.tokens = Counter("relay_tokens", "Tokens relayed, from the upstream's reported usage "
                              "(completion: content deltas when no usage is reported)", ["key", "kind"],
                              registry=registry)
        self.upstream_errors = Counter("relay_upstream_errors", "Upstream failures, by kind and upstream",
                                       ["kind", "upstream"], registry=registry)
        self.fallbacks = Counter("relay_fallbacks", "Fall-overs to another upstream, by the upstream that "
                                 "answered in the end", ["upstream"], registry=registry)

    def init_app(self, app: Flask) -> None:
        app.after_request(self._observe)
        app.register_blueprint(bp)

    def _observe(self, response: Response) -> Response:
        access: AccessRecord | None = g.get("access")
        if access is None or request.method == "OPTIONS":
            return response
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        error: RelayError | None = g.get("relay_error")
        streamed = response.is_streamed
        if streamed:
            self.open_streams.inc()

        def on_close() -> None:
            if streamed:
                self.open_streams.dec()
            self.record(route, access, error)

        response.call_on_close(on_close)
        return response

    def record(self, route: str, access: AccessRecord, error: RelayError | None) -> None:
        self.requests.labels(route, str(access.status), access.key_name).inc()
        stats = access.stats
        # Every failed attempt counts, including those another upstream then covered for.
        failures = stats.upstream_failures if stats is not None else error.upstream_failures if error else ()
        for upstream, kind in failures:
            self.upstream_errors.labels(kind, upstream).inc()
        if stats is None:
            return
        if stats.first_token_at is not None:
            self.first_token.labels(route).observe(max(0.0, stats.first_token_at - access.started))
        if stats.ended_at is not None:
            self.duration.labels(route).observe(max(0.0, stats.ended_at - access.started))
        for kind, count in token_counts(stats.usage, stats.tokens).items():
            if count:
                self.tokens.labels(access.key_name, kind).inc(count)
        if stats.fallbacks:
            self.fallbacks.labels(stats.upstream or "-").inc(stats.fallbacks)

    def exposition(self) -> bytes:
        if self.config.prometheus_multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.config.prometheus_multiproc_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)


def token_counts(usage: dict[str, Any] | None, deltas: int) -> dict[str, int]:
    """Prompt and completion tokens from the upstream's usage; the content deltas when it sent none."""
    if usage:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            return {"prompt": prompt, "completion": completion}
    return {"completion": deltas}


def check_metrics_access(config: Config) -> None:
    """Bearer METRICS_KEY; with none set, only a loopback peer whose request no proxy forwarded."""
    if config.metrics_key:
        presented = presented_key(request.headers.get("Authorization")).encode()
        if not hmac.compare_digest(presented, config.metrics_key.encode()):
            raise Unauthorized("missing or wrong metrics key: send 'Authorization: Bearer <METRICS_KEY>'")
        return
    peer = request.environ.get("werkzeug.proxy_fix.orig_remote_addr", request.remote_addr) or ""
    forwarded = any(name in request.headers for name in ("X-Forwarded-For", "X-Real-IP", "Forwarded"))
    try:
        loopback = ipaddress.ip_address(peer).is_loopback
    except ValueError:
        loopback = False
    if not loopback or forwarded:
        raise Forbidden("metrics are readable only from this host, or with METRICS_KEY set",
                        kind="metrics_forbidden")


@bp.get("/metrics")
def metrics() -> Response:
    from proxy.relay import current_relay  # proxy.relay builds Metrics: import at call time

    relay = current_relay()
    check_metrics_access(relay.config)
    return Response(relay.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST,
                                                         "Cache-Control": "no-store"})
