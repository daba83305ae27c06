"""The answer to a request forwarded as sent (`proxy/forwarding.py`), for both forwarding views (the rest of
the OpenAI API, `routes/passthrough.py`, and Anthropic's Messages API, `routes/anthropic.py`): the upstream's
status, allow-listed headers and body, an event stream through the byte-level SSE loop (`relay_sse`) in the
client protocol's dialect, and the request's `StreamStats` for the access log, metrics, budgets and ledger."""

from __future__ import annotations

import time

from flask import Response, request

from proxy.chat_stream import StreamResponse, client_socket_watcher
from proxy.errors import UpstreamFailed
from proxy.forwarding import (
    OPENAI,
    Dialect,
    JsonUsage,
    Opened,
    Source,
    body_source,
    client_response_headers,
    error_body,
    failure_of_status,
    next_upstreams,
    relay_bytes,
    relay_sse,
)
from proxy.pump import ClientSocket, StreamStats
from proxy.relay import Relay
from proxy.request_state import RequestState
from proxy.upstream_body import UpstreamResponse

# The upstream's own Content-Type is kept; these keep proxies and browsers from buffering the events.
SSE_HEADERS = (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))


def answer(relay: Relay, state: RequestState, opened: Opened, dialect: Dialect = OPENAI) -> Response:
    """The upstream's status, allow-listed headers and body, streamed as they arrive; `dialect` says what
    the relay's own keep-alives and error events look like and where the usage is."""
    response = opened.response
    if response.status_code in (401, 403):
        response.close()
        # The upstream refused the relay's key: the operator's problem, not the caller's key.
        error = UpstreamFailed("upstream rejected this server's API key; the operator must check it",
                               kind="upstream_auth")
        error.upstream_failures = (*opened.failures, (opened.upstream.name, "upstream_auth"))
        raise error
    content_type = response.headers.get("content-type", "application/octet-stream")
    refuse_unreadable_failure(opened, content_type)
    headers = client_response_headers(response.headers.items())
    stats = StreamStats(started_at=state.access.started, upstream=opened.upstream.name, fallbacks=opened.fallbacks,
                        upstream_failures=opened.failures)
    state.access.stats = stats
    if response.status_code >= 400:
        failure = failure_of_status(response)
        if failure is not None:  # the last upstream's 5xx/429, answered as it came: still a failure to count
            stats.upstream_failures = [*opened.failures, (opened.upstream.name, failure.kind)]
        stats.outcome = f"upstream_status_{response.status_code}"
        refusal = error_body(response, opened.upstream.redact)
        stats.ended_at = time.monotonic()
        return Response(refusal, status=response.status_code, headers=headers, content_type=content_type)
    if content_type.lower().startswith("text/event-stream"):
        client = client_socket_watcher(request.environ)
        hang_up = client.hang_up if isinstance(client, ClientSocket) else _nothing

        def read(answer: UpstreamResponse) -> Source:
            return body_source(answer, relay.timers.idle, hang_up, relay.body_read_timeout)

        body = relay_sse(read(response), relay.timers, stats, client, dialect=dialect, draining=relay.draining,
                         fall_over=next_upstreams(opened, stats, read))
        # Its Content-Type is among `headers`, the upstream's own.
        return StreamResponse(body, status=response.status_code, headers=[*headers, *SSE_HEADERS])
    usage = JsonUsage(dialect.json_usage) if "json" in content_type.lower() else None
    return Response(relay_bytes(response, stats, usage), status=response.status_code, headers=headers,
                    content_type=content_type)


def refuse_unreadable_failure(opened: Opened, content_type: str) -> None:
    """The last upstream's 5xx/429 is answered as it came when it is JSON (the provider's own error, which its
    clients read); anything else (a load balancer's HTML page) becomes the relay's own error in the client's
    protocol, with the same meaning (502 naming the status, or 429 with Retry-After)."""
    failure = failure_of_status(opened.response)
    if failure is None or "json" in content_type.lower():
        return
    opened.response.close()
    failure.upstream_failures = (*opened.failures, (opened.upstream.name, failure.kind))
    raise failure


def _nothing() -> None:
    return None
