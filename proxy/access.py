"""Who may call the relay: access keys (constant-time) and the CORS allow-list."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from flask import Response, request

from proxy.config import Config
from proxy.errors import Forbidden, Unauthorized

PREFLIGHT_MAX_AGE = "600"
ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, X-Request-ID"


def presented_key(authorization: str | None) -> str:
    """The key in an `Authorization` header: `Bearer <key>` or the raw `<key>` old clients send."""
    value = (authorization or "").strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    return value


def key_name(keys: Sequence[str], presented: str) -> str | None:
    """The name of the matching key, or None. Compares against every key, so timing tells nothing."""
    candidate = presented.encode()
    match: str | None = None
    for index, key in enumerate(keys):
        if hmac.compare_digest(candidate, key.encode()) and match is None:
            match = "default" if len(keys) == 1 else f"key{index + 1}"
    return match


def authenticate(config: Config, authorization: str | None) -> str:
    """Check the caller's key; return the key's name (never the key) or raise `Unauthorized`."""
    presented = presented_key(authorization)
    name = key_name(config.authorization_keys, presented) if presented else None
    if name is None:
        raise Unauthorized()
    return name


def preflight_response(config: Config) -> Response:
    """Answer an OPTIONS preflight before any authentication: browsers never send keys on it."""
    origin = request.headers.get("Origin")
    if origin and not _origin_allowed(config.cors_origins, origin):
        raise Forbidden(f"origin {origin} is not in this relay's CORS_ORIGINS", kind="cors_origin_not_allowed")
    response = Response(status=204)
    response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
    response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
    response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    return response


def add_cors_headers(config: Config, response: Response) -> None:
    """Allow listed origins (with credentials); `*` allows any origin, never with credentials."""
    origin = request.headers.get("Origin")
    if not origin or not config.cors_origins:
        return
    response.vary.add("Origin")
    if origin in config.cors_origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
    elif "*" in config.cors_origins:
        response.headers["Access-Control-Allow-Origin"] = "*"
    else:
        return
    response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After"


def _origin_allowed(allowed: Sequence[str], origin: str) -> bool:
    return origin in allowed or "*" in allowed
