"""The request body's deadline: the whole body must arrive within BODY_TIMEOUT, whichever endpoint reads it.

A client trickling its body (slowloris) gets a 408 instead of holding a connection for as long as it likes.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from proxy.errors import RequestTimeout

T = TypeVar("T")


def limit_body_time(environ: dict[str, Any], seconds: float) -> None:
    """Give the request body `seconds` to arrive, whichever endpoint reads it (must run before the body is
    touched). Only under gevent (production): elsewhere reads are left as the server does them."""
    from gevent import monkey

    if monkey.is_module_patched("socket") and "wsgi.input" in environ:
        sock = environ.get("gunicorn.socket")
        environ["wsgi.input"] = DeadlineInput(environ["wsgi.input"], seconds, sock)


class DeadlineInput:
    """`wsgi.input` with a deadline for the whole body: a client trickling it (slowloris) gets a 408 instead
    of holding a connection for as long as it likes."""

    def __init__(self, raw: Any, seconds: float, sock: socket.socket | None) -> None:
        self._raw = raw
        self._seconds = seconds
        self._deadline = time.monotonic() + seconds
        self._sock = sock

    def read(self, size: int = -1) -> bytes:
        read: Callable[[int], bytes] = self._raw.read
        return self._in_time(read, size)

    def readline(self, size: int = -1) -> bytes:
        readline: Callable[[int], bytes] = self._raw.readline
        return self._in_time(readline, size)

    def _in_time(self, read: Callable[[int], T], size: int) -> T:
        from gevent import Timeout

        remaining = self._deadline - time.monotonic()
        timer = Timeout(max(remaining, 0.001))
        try:
            with timer:
                return read(size)
        except Timeout as expired:
            if expired is not timer:
                raise
            self._stop_reading()
            raise RequestTimeout(f"the request body did not arrive within {self._seconds:g} s") from None

    def _stop_reading(self) -> None:
        # Shut the read side so the server does not wait for the rest of the body before answering and closing.
        if self._sock is None:
            return
        try:
            with socket.fromfd(self._sock.fileno(), self._sock.family, self._sock.type) as duplicate:
                duplicate.shutdown(socket.SHUT_RD)
        except OSError:
            return
