"""`GET /metrics`: the Prometheus text format, behind METRICS_KEY or for this host only (proxy/metrics.py)."""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.metrics import check_metrics_access
from proxy.pipeline import endpoint
from proxy.relay import current_relay

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@endpoint("json", access="public", guard=check_metrics_access)  # not an access key's business: its own key
def metrics() -> Response:
    relay = current_relay()
    relay.reports.flush()  # this worker's closed requests, counted now rather than with the next batch
    relay.ledger.publish(relay.metrics)  # this worker's ledger queue and counts, as of now
    return Response(relay.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST,
                                                         "Cache-Control": "no-store"})
