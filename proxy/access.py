"""Who may call the relay: the presented access key, per-key models, the CORS allow-list, trusted proxies.

The caller itself is decided once per request by the pipeline (`proxy/pipeline.py`, `decide_caller`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from flask import Response, request
from werkzeug.middleware.proxy_fix import ProxyFix

from proxy.config import Config, IPNetwork
from proxy.errors import Forbidden
from proxy.keys import KeyPolicy
from proxy.upstream import model_allowed

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

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


def authorize_model(caller: KeyPolicy | None, model: str) -> None:
    """Refuse a model outside the calling key's own `models` list (KEYS_FILE); ALLOWED_MODELS is checked
    by the shaping (proxy/shaping.py) before this."""
    if caller is not None and not model_allowed(caller.models, model):
        raise Forbidden(f"model '{model}' is not allowed for this key", kind="model_not_allowed")


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


class TrustedProxies:
    """WSGI middleware: the client address and scheme come from X-Forwarded-For / X-Forwarded-Proto only
    when the peer is one of TRUSTED_PROXIES (then werkzeug's ProxyFix takes the last hop the proxy
    added); from anyone else those headers are ignored, so a client cannot pose as another address."""

    def __init__(self, app: WSGIApplication, trusted: Iterable[IPNetwork]) -> None:
        self.app = app
        self.trusted = tuple(trusted)
        self.behind_proxy = ProxyFix(app, x_for=1, x_proto=1)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._trusted(environ.get("REMOTE_ADDR", "")):
            return self.behind_proxy(environ, start_response)
        return self.app(environ, start_response)

    def _trusted(self, peer: Any) -> bool:
        try:
            address = ipaddress.ip_address(str(peer))
        except ValueError:
            return False
        return any(address in network for network in self.trusted)
