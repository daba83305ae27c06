from __future__ import annotations

from flask import Blueprint, Response, jsonify

from proxy.relay import current_relay

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """Unauthenticated liveness for load balancers and systemd; says nothing secret."""
    return jsonify(status="ok", demo=current_relay().config.demo)
