"""One access-log line per request, written when the response is finished (streams included).

Never a key: the Authorization header is not logged and a `key` query parameter is redacted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from proxy.pump import StreamStats

log = logging.getLogger("relay.access")
SECRET_PARAMS = frozenset({"key", "api_key", "access_key", "token"})


@dataclass
class AccessRecord:
    method: str
    path: str
    client: str
    request_id: str
    started: float
    status: int = 0
    key_name: str = "-"
    model: str = "-"
    stats: StreamStats | None = None
    prompt: str | None = None  # only with LOG_CONTENT=1

    def line(self) -> str:
        fields: list[tuple[str, object]] = [
            ("method", self.method), ("path", self.path), ("status", self.status),
            ("duration_ms", _ms(time.monotonic() - self.started)), ("model", self.model),
            ("key", self.key_name), ("client", self.client), ("request_id", self.request_id),
        ]
        stats = self.stats
        if stats is not None:
            ttft = _ms(stats.first_token_at - self.started) if stats.first_token_at is not None else "-"
            fields += [("ttft_ms", ttft), ("tokens", stats.tokens), ("upstream", stats.upstream or "-"),
                       ("fallbacks", stats.fallbacks), ("outcome", stats.outcome)]
            if stats.keep_content:
                fields.append(("answer", repr("".join(stats.content))))
        if self.prompt is not None:
            fields.append(("prompt", repr(self.prompt)))
        return " ".join(f"{name}={value}" for name, value in fields)

    def write(self) -> None:
        log.info(self.line())


def redacted_path(path: str, query: str) -> str:
    """The path with any secret-looking query parameter replaced, so keys in URLs never reach the log."""
    if not query:
        return path
    pairs = parse_qsl(query, keep_blank_values=True)
    cleaned = [(name, "[redacted]" if name.lower() in SECRET_PARAMS else value) for name, value in pairs]
    return f"{path}?{urlencode(cleaned)}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"
