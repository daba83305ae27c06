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

from flask import request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.access import presented_key
from proxy.config import Config
from proxy.errors import Forbidden, Unauthorized
from proxy.request_state import RequestState

TTFT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


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
        # The usage ledger's health (proxy/ledger/writer.py), published by each worker from its writer's counts.
        self.ledger_queue_depth = Gauge("relay_ledger_queue_depth", "Ledger rows waiting to be written",
                                        registry=registry, multiprocess_mode="livesum")
        self.ledger_written = Counter("relay_ledger_rows_written", "Ledger rows written to the database",
                                      registry=registry)
        self.ledger_dropped = Counter("relay_ledger_rows_dropped", "Ledger rows that could not be written "
                                      "(queue full, or the database refused them)", registry=registry)

    def stream_opened(self, state: RequestState) -> None:
        """A streaming response is going out (the pipeline's finish step): one more open stream."""
        if state.streamed:
            self.open_streams.inc()

    def stream_closed(self, state: RequestState) -> None:
        """The request closed (the pipeline's close step, at once): one fewer open stream."""
        if state.streamed:
            self.open_streams.dec()

    def record(self, state: RequestState) -> None:
        """Once per request, after it closed (its records, `proxy/reports.py`)."""
        access = state.access
        if access.method == "OPTIONS":
            return
        self.requests.labels(state.route, str(access.status), access.key_name).inc()
        stats = access.stats
        error = state.error
        # Every failed attempt counts, including those another upstream then covered for.
        failures = stats.upstream_failures if stats is not None else error.upstream_failures if error else ()
        for upstream, kind in failures:
            self.upstream_errors.labels(kind, upstream).inc()
        if stats is None:
            return
        if stats.first_token_at is not None:
            self.first_token.labels(state.route).observe(max(0.0, stats.first_token_at - access.started))
        if stats.ended_at is not None:
            self.duration.labels(state.route).observe(max(0.0, stats.ended_at - access.started))
        used = stats.token_usage()
        for kind, count in (("prompt", used.prompt), ("completion", used.completion)):
            if count:
                self.tokens.labels(access.key_name, kind).inc(count)
        if stats.fallbacks:
            self.fallbacks.labels(stats.upstream or "-").inc(stats.fallbacks)

    def ledger_health(self, written: int, dropped: int, depth: int) -> None:
        """Rows written and dropped since the last call, and the queue's depth now."""
        if written:
            self.ledger_written.inc(written)
        if dropped:
            self.ledger_dropped.inc(dropped)
        self.ledger_queue_depth.set(depth)

    def exposition(self) -> bytes:
        if self.config.prometheus_multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.config.prometheus_multiproc_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


def check_metrics_access(_state: RequestState, config: Config) -> None:
    """`GET /metrics`' guard (proxy/pipeline.py): Bearer METRICS_KEY; with none set, only a loopback peer whose
    request no proxy forwarded."""
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
