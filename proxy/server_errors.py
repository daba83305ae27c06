"""gunicorn's own answers to requests it refuses before the app sees them (a malformed request line 400, a URI
too long 414, too many or too large headers 431 ...), in the relay's shape: JSON with the relay's security
headers, never an HTML page. `deploy/gunicorn.conf.py` installs `write_server_error` in place of gunicorn's.

No Flask here: gunicorn's master imports this before any worker patches the standard library.
"""

from __future__ import annotations

import socket

import orjson
from gunicorn import util

# The headers every response of the relay carries (the pipeline sets them on the app's own responses).
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


def server_error_response(status: int, reason: str, message: str) -> bytes:
    """The whole HTTP response for a request gunicorn refused, in OpenAI's error shape."""
    text = f"{reason}: {message}" if message else reason
    body = orjson.dumps({"error": {"message": text[:500], "type": "invalid_request_error",
                                   "code": "bad_http_request"}})
    lines = [f"HTTP/1.1 {status} {reason}", "Connection: close", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Cache-Control: no-store",
             *(f"{name}: {value}" for name, value in SECURITY_HEADERS)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def write_server_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's signature: gunicorn's workers call it by that name."""
    util.write_nonblock(sock, server_error_response(status_int, reason, mesg))
