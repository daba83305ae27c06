"""Budgets reserved before the upstream is called, settled from the reported usage afterwards.

A key's budgets: `daily_tokens` (or DAILY_TOKEN_BUDGET) and, in money, `daily_spend` and `monthly_spend`
(priced by PRICES_FILE, `proxy/prices.py`). Counting after the fact lets concurrent requests overshoot: ten
requests admitted at once against the same remaining dollar each see it free. So once the request's body is
known (`RequestLimits.reserve`: chat's shaped body, a forwarded /v1 JSON body, an Anthropic body, a WebSocket
message) the most it can cost is reserved, atomically across workers and instances (one Redis Lua script;
without Redis, one SQLite transaction in the host's DATA_DIR/limits.db, shared by its workers; one lock in
memory as the last fallback), and when it ends the reservation is released and what it really cost is added.

The most a request can cost:
- its prompt: the body's UTF-8 bytes / 3, rounded up (`prompt_estimate`). English text runs about 4 bytes a
  token and CJK text 3 bytes a character of about one token, and the JSON around the messages adds bytes
  that are no tokens, so this errs high;
- its output: the body's `max_tokens` / `max_completion_tokens` / `max_output_tokens` (times `n` or
  completions' `best_of`), else MAX_TOKENS, else DEFAULT_OUTPUT_CAP (4096) tokens (`output_cap`), read from
  the body the upstream gets, already held to MAX_TOKENS and MAX_CHOICES (`shaping.ANSWER_SIZES`).

The rules:
- money (`daily_spend`, `monthly_spend`) is strict: a request whose reservation does not fit in what is left
  (limit - spent - reserved by requests in flight) is refused with 429 (`daily_spend_exhausted`,
  `monthly_spend_exhausted`, Retry-After: the next UTC day or month). Spend cannot pass the limit except by
  what an upstream writes beyond the output cap it was given (or a prompt that tokenizes denser than 3 bytes
  a token): **the overshoot is at most that excess**. With no cap in the body and no MAX_TOKENS, an upstream
  may write more than DEFAULT_OUTPUT_CAP: set MAX_TOKENS where money budgets must hold exactly.
  A key with a spend limit may only use models PRICES_FILE prices (403 `model_not_priced` otherwise).
- tokens (`daily_tokens`) keep their meaning ("admitted while some of the day's tokens are left"): a request
  is admitted while spent + reserved is under the budget, and reserves its estimate. Concurrent requests
  therefore overshoot it by at most one request's reservation (plus the same excess), not by their number.
- a refusal because requests in flight hold the budget (it would fit once they settle) has Retry-After
  IN_FLIGHT_RETRY_SECONDS; one because the spent amount leaves no room, the start of the next day or month.
- a request's reservation lives until it closes; one whose worker is killed stays reserved until the period
  ends (erring on the refusing side).
- actual cost: the upstream's reported usage priced by PriceTable.cost; when it reported none, the prompt
  estimate plus the counted deltas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from proxy.config import Config
from proxy.errors import Forbidden, RateLimited
from proxy.keys import KeyPolicy
from proxy.prices import PriceTable
from proxy.shaping import CHOICE_FIELDS, TOKEN_FIELDS
from proxy.usage import TokenUsage

BYTES_PER_TOKEN = 3
DEFAULT_OUTPUT_CAP = 4096
OUTPUT_CAP_FIELDS = TOKEN_FIELDS  # every token-budget field of every family (shaping.ANSWER_SIZES)
DAY_SECONDS = 86400
DAY_TTL = 2 * DAY_SECONDS  # a day's counters outlive the day, for `keys list` and late settlements
MONTH_TTL = 40 * DAY_SECONDS
IN_FLIGHT_RETRY_SECONDS = 5
TOKENS, DAILY, MONTHLY = "token_budget_exhausted", "daily_spend_exhausted", "monthly_spend_exhausted"
Charge = tuple[str, float, int]  # (counter, amount, seconds the counter is kept)


@dataclass(frozen=True)
class Hold:
    """An amount reserved in one budget's counter: `counter` names the period (`tokens:alice:2026-12-04`,
    `spend:alice:2026-12`); `strict`: the amount must fit under `limit`, else spent + reserved < limit."""

    kind: str  # the refusal's kind: token_budget_exhausted, daily_spend_exhausted, monthly_spend_exhausted
    counter: str
    amount: float
    limit: float
    strict: bool
    ttl: int


@dataclass(frozen=True)
class Reservation:
    """What a request holds until it closes, and where (the store that granted it settles it)."""

    name: str
    model: str
    prompt_tokens: int
    holds: tuple[Hold, ...]
    store: str  # the counters that granted it: "redis", "host" (DATA_DIR/limits.db) or "memory"


def refused_by(holds: Sequence[Hold], committed: Sequence[float]) -> int:
    """The admission rule every store applies (Redis's Lua script spells it again): 0 when every hold has
    room beside what its counter has committed (spent + reserved), else the first refusing hold's 1-based
    index. Strict (money): the amount must fit under the limit; else committed must be under it."""
    for index, (hold, already) in enumerate(zip(holds, committed, strict=True), start=1):
        if already + hold.amount > hold.limit if hold.strict else already >= hold.limit:
            return index
    return 0


def utc_day(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%d")


def utc_month(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m")


def seconds_to_utc_midnight(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - now).total_seconds()))


def seconds_to_next_utc_month(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    first = (now.replace(day=28) + timedelta(days=4)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((first - now).total_seconds()))


def tokens_counter(name: str, day: str) -> str:
    return f"tokens:{name}:{day}"


def spend_counter(name: str, period: str) -> str:
    return f"spend:{name}:{period}"


def prompt_estimate(body: Mapping[str, Any] | bytes) -> int:
    """The prompt's tokens, estimated from the body's size (see the module's docstring)."""
    size = len(body) if isinstance(body, bytes) else len(orjson.dumps(body))
    return math.ceil(size / BYTES_PER_TOKEN)


def output_cap(body: Mapping[str, Any] | None, config: Config) -> int:
    """The most output tokens the request allows: its own cap, else MAX_TOKENS, else DEFAULT_OUTPUT_CAP; times
    the most answers it asks for (`n`, completions' `best_of`). The body is the one the upstream gets: held to
    the caps (shaping.ANSWER_SIZES), its whole numbers integers."""
    body = body or {}
    caps = [value for value in _counts(body, OUTPUT_CAP_FIELDS) if value > 0]
    cap = min(caps) if caps else config.max_tokens or DEFAULT_OUTPUT_CAP
    return cap * max([1, *_counts(body, CHOICE_FIELDS)])


def _counts(body: Mapping[str, Any], names: Sequence[str]) -> list[int]:
    values = (body.get(name) for name in names)
    return [value for value in values if isinstance(value, int) and not isinstance(value, bool)]


def plan(policy: KeyPolicy, config: Config, prices: PriceTable, model: str, body: Mapping[str, Any],
         raw: bytes | None = None, now: datetime | None = None) -> tuple[int, tuple[Hold, ...]]:
    """The prompt estimate and what to reserve in each of the key's budgets; Forbidden when a spend limit
    applies and the model has no price."""
    now = now or datetime.now(UTC)
    prompt = prompt_estimate(raw if raw is not None else body)
    cap = output_cap(body, config)
    holds: list[Hold] = []
    token_budget = policy.daily_tokens or config.daily_token_budget
    if token_budget:
        counter = tokens_counter(policy.name, utc_day(now))
        holds.append(Hold(TOKENS, counter, prompt + cap, token_budget, False, DAY_TTL))
    if policy.daily_spend or policy.monthly_spend:
        cost = prices.estimate(model, prompt, cap)
        if cost is None:
            raise Forbidden(f"model '{model[:100]}' has no price in this relay's PRICES_FILE, and this key has "
                            "a spend limit", kind="model_not_priced")
        if policy.daily_spend:
            holds.append(Hold(DAILY, spend_counter(policy.name, utc_day(now)), cost, policy.daily_spend, True, DAY_TTL))
        if policy.monthly_spend:
            holds.append(Hold(MONTHLY, spend_counter(policy.name, utc_month(now)), cost, policy.monthly_spend, True,
                              MONTH_TTL))
    return prompt, tuple(holds)


def refusal(hold: Hold, in_flight: bool = False, now: datetime | None = None) -> RateLimited:
    """The 429 for the budget a reservation did not fit in. `in_flight`: it would fit but for what requests in
    flight hold, which they give back as they end: retry in a few seconds, not at the period's end."""
    if in_flight:
        what = "daily token budget" if hold.kind == TOKENS else hold.kind.replace("_exhausted", " limit")
        what = what.replace("_", " ")
        return RateLimited(f"this key's {what} of {hold.limit:g} is held by its requests in flight; retry when "
                           "they end", kind=hold.kind, retry_after=IN_FLIGHT_RETRY_SECONDS)
    if hold.kind == TOKENS:
        return RateLimited(f"this key's daily budget of {hold.limit:g} tokens is used up; it renews at 00:00 UTC",
                           kind=TOKENS, retry_after=seconds_to_utc_midnight(now))
    period, renews, retry = (("monthly", "on the 1st at 00:00 UTC", seconds_to_next_utc_month(now))
                             if hold.kind == MONTHLY else ("daily", "at 00:00 UTC", seconds_to_utc_midnight(now)))
    return RateLimited(f"this key's {period} spend limit of {hold.limit:g} cannot cover this request (up to "
                       f"{hold.amount:.6g} with its output cap, beside what is spent and reserved); it renews "
                       f"{renews}", kind=hold.kind, retry_after=retry)


def actual_charges(reservation: Reservation | None, policy: KeyPolicy, config: Config, prices: PriceTable,
                   model: str | None, usage: TokenUsage, now: datetime | None = None
                   ) -> tuple[tuple[str, float, int], ...]:
    """What the request really cost, per counter: its tokens against the day's token count (when a token
    budget applies), its price against the day's and the month's spend (whenever the model is priced, so
    `keys list` can show a month's spend)."""
    now = now or datetime.now(UTC)
    charges: list[tuple[str, float, int]] = []
    if usage.total and (policy.daily_tokens or config.daily_token_budget):
        charges.append((tokens_counter(policy.name, utc_day(now)), float(usage.total), DAY_TTL))
    if model:
        if not usage.reported and reservation is not None:  # the prompt was not reported: its estimate
            usage = TokenUsage(reservation.prompt_tokens, usage.completion, usage.total, False)
        cost = prices.cost(model, usage)
        if cost:
            charges.append((spend_counter(policy.name, utc_day(now)), cost, DAY_TTL))
            charges.append((spend_counter(policy.name, utc_month(now)), cost, MONTH_TTL))
    return tuple(charges)
