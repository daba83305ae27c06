"""Upstream failures before the first token, in the status a Messages client sees: pure, no I/O.

A chat upstream's failure arrives as the relay's error (proxy/upstream.py `map_sdk_error`: a `kind`, and
the upstream's own status). The Messages bridge answers with the status that makes Anthropic's SDKs raise
the class they raise for the same trouble at Anthropic; the body's error `type` follows from the status
(proxy/errors.py `anthropic_error_type`):

| upstream                         | client status | Anthropic type          | anthropic SDK class      |
|----------------------------------|---------------|-------------------------|--------------------------|
| 400 / 422                        | 400           | invalid_request_error   | BadRequestError          |
| 400/413/422 "context too long"   | 400           | invalid_request_error   | BadRequestError          |
| 404 (the model)                  | 404           | not_found_error         | NotFoundError            |
| 413                              | 413           | request_too_large       | ContentTooLargeError     |
| 429                              | 429           | rate_limit_error        | RateLimitError           |
| 500, 502, other 5xx              | 502           | api_error               | InternalServerError      |
| 503                              | 503           | overloaded_error        | ServiceUnavailableError  |
| 529                              | 529           | overloaded_error        | OverloadedError          |
| 401 / 403                        | 502           | api_error               | InternalServerError      |
| timeout / unreachable            | 504 / 502     | timeout_error/api_error | GatewayTimeout/Internal  |

An upstream 401/403 refuses the relay's own upstream key: it is the operator's problem, not the caller's,
and a client told AuthenticationError would ask its user for a new key that would not help. The relay
answers it as it does on every other path (natively forwarded Messages included): 502 upstream_auth.
The caller's own key is checked by the relay before any upstream is asked (401 authentication_error).
"""

from __future__ import annotations

from proxy.bridge.statuses import ClientStatuses

MESSAGES = ClientStatuses(
    # Upstream statuses that keep their meaning for a Messages client as they are.
    kept=frozenset({404, 413, 429, 503, 529}),
    by_kind={"context_too_long": 400, "upstream_bad_request": 400, "upstream_auth": 502,
             "upstream_rate_limited": 429, "model_not_found": 404},
)
client_status = MESSAGES.of
