"""gunicorn's own answers to requests it refuses before the app sees them (a malformed request line 400, a URI
too long 414, too many or too large headers 431 ...), in the relay's shape: JSON with the relay's security
headers, never an HTML page. `deploy/gunicorn.conf.py` installs `write_server_error` in place of gunicorn's.

No Flask here: gunicorn's master imports this before any worker patches the standard library.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable
from typing import Any

import orjson
from gunicorn import glogging, util

from proxy.accesslog import SECRET_PARAMS
from proxy.encoders import openai_error
from proxy.redaction import REDACTED, escape_control, redact_secret_like

# The headers every response of the relay carries (the pipeline sets them on the app's own responses).
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


def server_error_response(status: int, reason: str, message: str) -> bytes:
    """The whole HTTP response for a request gunicorn refused, in OpenAI's error shape."""
    text = f"{reason}: {message}" if message else reason
    body = orjson.dumps(openai_error(text[:500], "invalid_request_error", "bad_http_request"))
    lines = [f"HTTP/1.1 {status} {reason}", "Connection: close", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Cache-Control: no-store",
             *(f"{name}: {value}" for name, value in SECURITY_HEADERS)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def write_server_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's signature: gunicorn's workers call it by that name."""
    util.write_nonblock(sock, server_error_response(status_int, reason, mesg))


# A key in a query string, as a request line gunicorn quotes in its own warnings carries it.
SECRET_QUERY = re.compile(rf"((?:^|[?&\s])(?:{'|'.join(sorted(SECRET_PARAMS))})=)[^&\s'\"]*", re.I)


class ServerLogFilter(logging.Filter):
    """gunicorn's own log lines ("Invalid request from ip=...: <the request line>") keep no key and stay one
    line: query keys and key-shaped text out, then the configured secrets once the master knows them."""

    def __init__(self) -> None:
        super().__init__()
        self.redact: Callable[[str], str] = redact_secret_like

    def filter(self, record: logging.LogRecord) -> bool:
        message = SECRET_QUERY.sub(lambda match: match.group(1) + REDACTED, record.getMessage())
        record.msg, record.args = escape_control(self.redact(message)), ()
        return True


class RelayServerLogger(glogging.Logger):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's logger with `ServerLogFilter` on its error log (`logger_class` in deploy/gunicorn.conf.py)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if not any(isinstance(existing, ServerLogFilter) for existing in self.error_log.filters):
            self.error_log.addFilter(ServerLogFilter())

    def redact_with(self, redact: Callable[[str], str]) -> None:
        """Use the configuration's redactor (every configured secret), once the configuration is read."""
        for existing in self.error_log.filters:
            if isinstance(existing, ServerLogFilter):
                existing.redact = redact
