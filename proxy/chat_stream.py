"""How a view answers with a chat completion: a stream opened with fall-over and run through the pump
(`stream_response`), or a whole answer's account (`whole_answer_stats`); and the headers each streaming
protocol goes out with. Shared by every view that speaks chat to an upstream (`/chat`, `/v1/chat/completions`,
the EventSource `GET /chat`, the stream doctor, the Messages and Responses bridges), so no view imports
another view's module."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

from flask import Response, request
from werkzeug.datastructures import Headers

from proxy.encoders import Encoder
from proxy.pump import StreamStats, pump, socket_watcher
from proxy.relay import Relay
from proxy.request_state import request_state
from proxy.upstream import Completion, Upstream, open_stream

NDJSON_HEADERS = {
    "Content-Type": "application/x-ndjson; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer this response
}

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer this response
}


class StreamResponse(Response):
    """A streamed answer (chat's, a forwarded event stream's). Before any response goes out, werkzeug copies
    its headers to make a Location absolute, a Content-Location a URI and a Content-Length right for its
    status; a 200 whose body is a stream and whose headers are the relay's own and the upstream's
    allow-listed ones (`forwarding.RESPONSE_HEADERS`) has none of those, so its headers go out as they are."""

    def get_wsgi_headers(self, environ: dict[str, Any]) -> Headers:
        return self.headers if self.status_code == 200 else super().get_wsgi_headers(environ)

    def get_app_iter(self, environ: dict[str, Any]) -> Iterable[bytes]:
        if self.status_code != 200 or environ["REQUEST_METHOD"] == "HEAD":
            return super().get_app_iter(environ)
        return BodyThenClose(cast("Iterable[bytes]", self.response), self.close)  # the relay's bodies are bytes


class BodyThenClose:
    """A stream's body as the server iterates it: the body's own iterator, where werkzeug's `ClosingIterator`
    and `iter_encoded` would put two more Python calls in front of every chunk (the relay's bodies are bytes
    already); once the server closes it, the body, then the response (its `call_on_close` callbacks: the
    pipeline's close step), as werkzeug closes them."""

    __slots__ = ("_body", "_close_response")

    def __init__(self, body: Iterable[bytes], close_response: Callable[[], None]) -> None:
        self._body = body
        self._close_response = close_response

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close_body = getattr(self._body, "close", None)
            if close_body is not None:
                close_body()
        finally:
            self._close_response()


def stream_response(relay: Relay, upstream_body: dict[str, Any], encoder: Encoder, headers: dict[str, str],
                    upstreams: Sequence[Upstream] | None = None) -> Response:
    """Open the upstream stream (falling over as needed) and answer with what the pump makes of it.
    `upstreams` replaces the configured ones (the stream doctor's stand-in)."""
    access = request_state().access
    stream = open_stream(relay.upstreams if upstreams is None else upstreams, upstream_body,
                         relay.config.upstream_timeout, relay.body_read_timeout)
    stats = StreamStats(keep_content=relay.config.log_content, started_at=access.started)
    access.stats = stats
    body = pump(stream, encoder, relay.timers, stats, client_socket_watcher(request.environ), relay.draining)
    return StreamResponse(body, status=200, headers=headers)


def client_socket_watcher(environ: dict[str, Any]) -> Any:
    return socket_watcher(environ.get("gunicorn.socket") or environ.get("werkzeug.socket"))


def whole_answer_stats(answer: Completion, started_at: float) -> StreamStats:
    """A non-streaming chat completion's account for the access log, metrics and budgets (its usage)."""
    stats = StreamStats(started_at=started_at)
    stats.upstream, stats.fallbacks, stats.outcome = answer.upstream.name, answer.fallbacks, "ok"
    model = answer.data.get("model")
    stats.answered_model = model if isinstance(model, str) else None
    usage = answer.data.get("usage")
    if isinstance(usage, dict):
        stats.usage = usage
        completion_tokens = usage.get("completion_tokens")
        stats.tokens = completion_tokens if isinstance(completion_tokens, int) else 0
    return stats
