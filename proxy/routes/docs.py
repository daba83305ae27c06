"""`GET /openapi.yaml`: the OpenAPI description of the relay's API (proxy/openapi.yaml), unauthenticated:
it describes the protocol, never this relay's configuration."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response

from proxy.pipeline import endpoint

bp = Blueprint("docs", __name__)

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"


@bp.get("/openapi.yaml")
@endpoint("json", access="public")
def openapi() -> Response:
    return Response(OPENAPI_PATH.read_bytes(), mimetype="application/yaml")
