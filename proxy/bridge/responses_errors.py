"""Upstream failures before the first token, in the status a Responses client sees: pure, no I/O.

A chat upstream's failure arrives as the relay's error (proxy/upstream.py `map_sdk_error`: a `kind`, and
the upstream's own status). The Responses bridge answers with the status for which the openai SDKs raise
the class they raise for the same trouble at OpenAI; the body stays the relay's OpenAI-shaped error
(`{"error": {"message", "type", "code": <kind>}}`):

| upstream                         | client status | openai SDK class            |
|----------------------------------|---------------|-----------------------------|
| 400                              | 400           | BadRequestError             |
| 400/413/422 "context too long"   | 400           | BadRequestError             |
| 404 (the model)                  | 404           | NotFoundError               |
| 409                              | 409           | ConflictError               |
| 413                              | 413           | APIStatusError              |
| 422                              | 422           | UnprocessableEntityError    |
| 429                              | 429           | RateLimitError              |
| 5xx                              | 502           | InternalServerError         |
| 401 / 403                        | 502           | InternalServerError         |
| timeout / unreachable            | 504 / 502     | InternalServerError         |

An upstream 401/403 refuses the relay's own upstream key: the operator's problem, not the caller's (a
client told AuthenticationError would ask its user for a new key that would not help), so it is 502
`upstream_auth` as on every other path of the relay, natively forwarded Responses included. The caller's
own key is checked by the relay before any upstream is asked (401).
"""

from __future__ import annotations

from proxy.bridge.statuses import ClientStatuses

RESPONSES = ClientStatuses(
    # Upstream statuses that keep their meaning for an OpenAI client as they are.
    kept=frozenset({404, 409, 413, 422, 429}),
    by_kind={"context_too_long": 400, "upstream_auth": 502, "upstream_rate_limited": 429},
)
client_status = RESPONSES.of
