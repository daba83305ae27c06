"""Who may call the relay: the presented access key, per-key models, the CORS allow-list, trusted proxies.

The caller itself is decided once per request by the pipeline (`proxy/pipeline.py`, `decide_caller`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from flask import Response, request
from werkzeug.middleware.proxy_fix import ProxyFix

from proxy.config import Config, IPNetwork
from proxy.errors import Forbidden
from proxy.globs import model_allowed
from proxy.keys import KeyPolicy

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

PREFLIGHT_MAX_AGE = "600"
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
# Answered when a preflight names no request headers.
ALLOWED_HEADERS = "Authorization, Content-Type, X-Request-ID"
# The request headers a listed origin's page may send (lower case). The official SDKs in a browser add their
# own: OpenAI's `x-stainless-*` (SDK version, retry count, timeout) and `openai-*` (organization, project),
# Anthropic's `anthropic-*` (version, beta, direct browser access) and `x-api-key`.
CORS_HEADER_NAMES = frozenset({"authorization", "content-type", "x-request-id", "accept", "accept-language",
                               "cache-control", "last-event-id", "x-api-key"})
CORS_HEADER_PREFIXES = ("x-stainless-", "openai-", "anthropic-")
# A header name (RFC 9110 token, lower-cased, as browsers send them): nothing else is ever echoed.
_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9!#$%&'*+.^_`|~-]{0,63}")


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
    asked = request.headers.get("Access-Control-Request-Headers", "")
    allowed = ", ".join(allowed_request_headers(asked)) if asked.strip() else ALLOWED_HEADERS
    if allowed:  # none of those asked for is allowed: no header at all, and the browser refuses the request
        response.headers["Access-Control-Allow-Headers"] = allowed
    response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    # The answer depends on what was asked: a cache in between must not hand one page's answer to another.
    response.vary.update(("Origin", "Access-Control-Request-Headers"))
    return response


def allowed_request_headers(asked: str) -> list[str]:
    """The names in an `Access-Control-Request-Headers` value that the allow-list admits, lower-cased, in the
    order asked. The others are left out, so the browser refuses to send the request itself."""
    allowed: list[str] = []
    for part in asked.split(","):
        name = part.strip().lower()
        if name in allowed or not _HEADER_NAME.fullmatch(name):
            continue
        if name in CORS_HEADER_NAMES or name.startswith(CORS_HEADER_PREFIXES):
            allowed.append(name)
    return allowed


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
