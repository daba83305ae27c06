from __future__ import annotations

from flask import Blueprint, Response, jsonify

from proxy.pipeline import endpoint
from proxy.relay import current_relay

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@endpoint("json", access="public")
def healthz() -> Response:
    """Unauthenticated liveness for load balancers and systemd; says nothing secret."""
    return jsonify(status="ok", demo=current_relay().config.demo)
