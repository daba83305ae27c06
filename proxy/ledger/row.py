"""One ledger row, built from what the access record already knows when a request closes.

Never a key (the key's configured name only) and never content (no prompt, no answer).

The cost seam: `CostOf`, a function `(model, usage) -> float | None` that `Ledger` is built with. The relay
builds it with `no_prices` (every cost unknown, NULL in the ledger) until a price table is wired into
`proxy.ledger.build_ledger`; its float is money in the price table's currency, kept as nano-units.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from proxy.usage import TokenUsage, reasoning_tokens

if TYPE_CHECKING:
    from proxy.accesslog import AccessRecord
    from proxy.request_state import RequestState


@dataclass(frozen=True)
class LedgerUsage:
    """An answer's tokens as the upstream reported them (completion: content deltas counted when it did not)."""

    prompt: int = 0
    completion: int = 0
    reasoning: int = 0
    cached: int = 0
    reported: bool = False

    @classmethod
    def of_answer(cls, usage: dict[str, Any] | None, deltas: int) -> LedgerUsage:
        tokens = TokenUsage.of_answer(usage, deltas)
        return cls(tokens.prompt, tokens.completion, reasoning_tokens(usage or {}), tokens.cached, tokens.reported)

    def as_token_usage(self) -> TokenUsage:
        """The same tokens as the limits and the price table count them."""
        return TokenUsage(self.prompt, self.completion, self.prompt + self.completion, self.reported, self.cached)


CostOf = Callable[[str, LedgerUsage], "float | None"]


def no_prices(_model: str, _usage: LedgerUsage) -> float | None:
    """The cost hook until a price table is wired in: every cost is unknown (NULL)."""
    return None


@dataclass(frozen=True, slots=True)
class LedgerRow:
    time: datetime
    day: date
    request_id: str
    key_name: str
    route: str
    protocol: str
    model: str
    upstream: str | None
    answered_model: str | None
    status: int
    outcome: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    usage_reported: bool
    cost_nanos: int | None
    ttft_ms: float | None
    duration_ms: float

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ROW_FIELDS}


ROW_FIELDS = tuple(field.name for field in fields(LedgerRow))


def row_of(record: AccessRecord, route: str, protocol: str, cost_of: CostOf,
           error_kind: str | None = None) -> LedgerRow:
    """The ledger row of one request (or one WebSocket answer) from its access record."""
    now = time.monotonic()
    began = datetime.now(UTC).timestamp() - (now - record.started)
    stats = record.stats
    usage = LedgerUsage.of_answer(stats.usage if stats else None, stats.tokens if stats else 0)
    ttft = None
    if stats is not None and stats.first_token_at is not None:
        ttft = round((stats.first_token_at - record.started) * 1000, 1)
    ended = stats.ended_at if stats is not None and stats.ended_at is not None else record.started + record.duration()
    outcome = stats.outcome if stats is not None and stats.outcome != "open" else None
    moment = datetime.fromtimestamp(began, UTC)
    model = record.model[:200]
    return LedgerRow(
        time=moment, day=moment.date(), request_id=record.request_id[:64], key_name=record.key_name[:200],
        route=route[:200], protocol=protocol, model=model, upstream=(stats.upstream or None) if stats else None,
        answered_model=(stats.answered_model or "")[:200] or None if stats else None, status=record.status,
        outcome=(outcome or error_kind or ("ok" if record.status < 400 else f"http_{record.status}"))[:40],
        prompt_tokens=usage.prompt, completion_tokens=usage.completion, reasoning_tokens=usage.reasoning,
        cached_tokens=usage.cached, usage_reported=usage.reported, cost_nanos=_nanos(cost_of(model, usage)),
        ttft_ms=ttft, duration_ms=round(max(0.0, ended - record.started) * 1000, 1),
    )


def row_of_request(state: RequestState, cost_of: CostOf) -> LedgerRow:
    """The pipeline's close step: the request's row, its error kind when it was refused or failed."""
    error = state.error
    # A rule with variables (the forwarded families: /v1/<any(responses, ...)>/<path:rest>) says less than
    # the path itself (/v1/responses, /v1/files/file-abc), which carries no key (accesslog redacts).
    route = state.route if "<" not in state.route else state.access.path.split("?")[0]
    return row_of(state.access, route, state.declaration.protocol, cost_of,
                  error.kind if error is not None else None)


def _nanos(cost: float | None) -> int | None:
    return None if cost is None else round(cost * 1_000_000_000)
