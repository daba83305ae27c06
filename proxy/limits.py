"""Who may use how much.

- Requests per minute and per day, per key: Flask-Limiter, one shared bucket per key across all endpoints.
- Requests in flight (open streams) per key, and for the whole relay: leases that end when the response
  is closed (last byte sent, or the client gone).
- A daily token budget per key, counted from the usage the upstream reports at the end of each answer
  (the number of content deltas when it reports none), renewed at 00:00 UTC; and daily and monthly spend
  limits in money. All three are reserved before the upstream is called and settled when the request
  closes (`proxy/budgets.py` says how much and by which rule), atomically across processes (see below).
- Each key's last use, recorded at most once a LAST_USE_SECONDS per key and process, for `keys list`.

Every refusal is a 429 with Retry-After, rendered by the endpoint's own error shape. A WebSocket connection
(`routes/websocket.py`) is admitted like any request at its handshake, then each of its messages goes through
the same public checks (`admit_message`, `renew_stream`, `charge`): one count in the same per-key buckets,
the same budget, the same slots.

Counters live, with RATE_LIMIT_STORAGE_URI=redis://..., in Redis, shared by every worker and every relay
instance. With the default memory://, rates and stream slots live in memory (one process: each gunicorn
worker counts on its own), and the budget counters and last uses in the host's file DATA_DIR/limits.db
(`proxy/host_counters.py`), shared by every worker of the host. When Redis cannot be reached the relay
keeps serving: rates and slots fall back to the process's memory, budgets to the host's file (logged
once), Redis is tried again after a few seconds and used as soon as it answers; counts made meanwhile are
not carried over to Redis. When the host's file cannot be used, budgets fall back to the process's memory
(logged once), and the file is tried again after HOST_RETRY_SECONDS.
A leased stream slot always expires by itself after MAX_STREAM_SECONDS (plus a minute), so a crashed
instance cannot hold slots for ever.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from flask import Flask, Response
from flask_limiter import Limit, Limiter, RequestLimit
from flask_limiter.errors import RateLimitExceeded
from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from proxy.budgets import (
    DAILY,
    MONTHLY,
    TOKENS,
    Charge,
    Hold,
    Reservation,
    actual_charges,
    plan,
    refusal,
    refused_by,
    spend_counter,
    tokens_counter,
    utc_day,
    utc_month,
)
from proxy.config import Config
from proxy.errors import RateLimited, render_error
from proxy.host_counters import HostCounters, host_file
from proxy.keys import KeyPolicy
from proxy.request_state import RequestState, current_request_state
from proxy.usage import TokenUsage

log = logging.getLogger("relay.limits")

REDIS_TIMEOUT_SECONDS = 0.5  # a Redis that hangs must not hang requests
REDIS_RETRY_SECONDS = 5.0  # after a Redis failure, count elsewhere this long before trying Redis again
HOST_RETRY_SECONDS = 30.0  # after the budget file failed, count budgets in memory this long before trying it again
REDIS, HOST, MEMORY = "redis", "host", "memory"  # where a reservation was granted (Reservation.store)
STREAM_RETRY_AFTER_SECONDS = 5
LEASE_MARGIN_SECONDS = 60.0
GLOBAL_BUCKET = "*"  # cannot collide with a key name (names start with a letter or digit)
KEY_PREFIX = "relay"
RATE_SCOPE = "per-key"  # the scope of the one shared per-key limit, as Flask-Limiter names its buckets
LAST_USE_SECONDS = 60.0  # a key's last use is written to the store at most this often (per process)
LAST_USE_TTL = 400 * 86400

# KEYS: the buckets' sorted sets. ARGV: now, lease expiry, lease id, then one limit per bucket.
# Drops expired leases, refuses (returning the full bucket's 1-based index) or leases in every bucket.
_ACQUIRE_LUA = """
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
  if redis.call('ZCARD', key) >= tonumber(ARGV[3 + i]) then return i end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[2], ARGV[3])
  redis.call('EXPIREAT', key, math.ceil(tonumber(ARGV[2])))
end
return 0
"""

# KEYS: each budget's spent and reserved counters, in pairs. ARGV: per budget amount, limit, strict (1/0), ttl.
# Refuses (returning the budget's 1-based index) unless every budget has room, then reserves in every one.
_RESERVE_LUA = """
local n = #KEYS / 2
for i = 1, n do
  local committed = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
      + math.max(0, tonumber(redis.call('GET', KEYS[2 * i]) or '0'))
  local amount, limit = tonumber(ARGV[4 * i - 3]), tonumber(ARGV[4 * i - 2])
  if ARGV[4 * i - 1] == '1' then
    if committed + amount > limit then return i end
  elseif committed >= limit then return i end
end
for i = 1, n do
  redis.call('INCRBYFLOAT', KEYS[2 * i], ARGV[4 * i - 3])
  redis.call('EXPIRE', KEYS[2 * i], ARGV[4 * i])
end
return 0
"""


@dataclass(frozen=True)
class Lease:
    """A held stream slot: which buckets, and which store granted it (release goes back there)."""

    lease_id: str
    buckets: tuple[str, ...]
    in_redis: bool


class MemoryCounters:
    """Stream leases and budget counters of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, dict[str, float]] = {}
        self._spent: dict[str, float] = {}
        self._held: dict[str, float] = {}
        self._forget_at: dict[str, float] = {}  # counter -> wall-clock time it expires (as Redis's EXPIRE)
        self._last_use: dict[str, float] = {}

    def acquire(self, buckets: Sequence[tuple[str, int]], lease_id: str, expires: float, now: float) -> str | None:
        with self._lock:
            for bucket, limit in buckets:
                held = self._leases.setdefault(bucket, {})
                for stale in [lease for lease, until in held.items() if until <= now]:
                    del held[stale]
                if len(held) >= limit:
                    return bucket
            for bucket, _ in buckets:
                self._leases[bucket][lease_id] = expires
            return None

    def release(self, buckets: Sequence[str], lease_id: str) -> None:
        with self._lock:
            for bucket in buckets:
                self._leases.get(bucket, {}).pop(lease_id, None)

    def leases_held(self, now: float | None = None) -> int:
        """Stream slots held right now, in every bucket (per key and the relay's): for tests and diagnostics."""
        now = time.time() if now is None else now
        with self._lock:
            return sum(1 for held in self._leases.values() for until in held.values() if until > now)

    def amounts(self, counters: Sequence[str], now: float | None = None) -> list[tuple[float, float]]:
        """(spent, reserved) of each counter."""
        with self._lock:
            self._forget(now if now is not None else time.time())
            return [(self._spent.get(counter, 0.0), max(0.0, self._held.get(counter, 0.0))) for counter in counters]

    def reserve(self, holds: Sequence[Hold], now: float | None = None) -> int:
        """0 with every hold reserved, or the 1-based index of the first budget without room (nothing held)."""
        now = now if now is not None else time.time()
        with self._lock:
            self._forget(now)
            refused = refused_by(holds, [self._spent.get(hold.counter, 0.0)
                                         + max(0.0, self._held.get(hold.counter, 0.0)) for hold in holds])
            if refused:
                return refused
            for hold in holds:
                self._held[hold.counter] = self._held.get(hold.counter, 0.0) + hold.amount
                self._forget_at[hold.counter] = now + hold.ttl
            return 0

    def settle(self, held: Sequence[tuple[str, float]], charges: Sequence[Charge], now: float | None = None) -> None:
        """Give back reserved amounts and add spent ones."""
        now = now if now is not None else time.time()
        with self._lock:
            for counter, amount in held:
                self._held[counter] = max(0.0, self._held.get(counter, 0.0) - amount)
            for counter, amount, ttl in charges:
                self._spent[counter] = self._spent.get(counter, 0.0) + amount
                self._forget_at[counter] = max(self._forget_at.get(counter, 0.0), now + ttl)

    def _forget(self, now: float) -> None:
        for counter in [counter for counter, until in self._forget_at.items() if until <= now]:
            for table in (self._spent, self._held, self._forget_at):
                table.pop(counter, None)

    def touch(self, name: str, when: float, ttl: int = LAST_USE_TTL) -> None:
        self._last_use[name] = max(when, self._last_use.get(name, when))

    def last_use(self, name: str) -> float | None:
        return self._last_use.get(name)


class RedisCounters:
    """The same counters in Redis, shared by every process and instance using it."""

    def __init__(self, uri: str) -> None:
        url = "unix://" + uri.removeprefix("redis+unix://") if uri.startswith("redis+unix://") else uri
        self.client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
        )
        self._acquire = self.client.register_script(_ACQUIRE_LUA)
        self._reserve = self.client.register_script(_RESERVE_LUA)

    def acquire(self, buckets: Sequence[tuple[str, int]], lease_id: str, expires: float, now: float) -> str | None:
        keys = [f"{KEY_PREFIX}:streams:{bucket}" for bucket, _ in buckets]
        full = int(self._acquire(keys=keys, args=[now, expires, lease_id, *(limit for _, limit in buckets)]))
        return buckets[full - 1][0] if full else None

    def release(self, buckets: Sequence[str], lease_id: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for bucket in buckets:
            pipe.zrem(f"{KEY_PREFIX}:streams:{bucket}", lease_id)
        pipe.execute()

    def amounts(self, counters: Sequence[str]) -> list[tuple[float, float]]:
        pipe = self.client.pipeline(transaction=False)
        for counter in counters:
            pipe.get(_spent_key(counter))
            pipe.get(_held_key(counter))
        values = [float(value or 0) for value in pipe.execute()]
        return [(values[2 * index], max(0.0, values[2 * index + 1])) for index in range(len(counters))]

    def reserve(self, holds: Sequence[Hold]) -> int:
        keys = [key for hold in holds for key in (_spent_key(hold.counter), _held_key(hold.counter))]
        args = [arg for hold in holds for arg in (repr(hold.amount), repr(hold.limit), int(hold.strict), hold.ttl)]
        return int(self._reserve(keys=keys, args=args))

    def settle(self, held: Sequence[tuple[str, float]], charges: Sequence[Charge]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for counter, amount in held:
            pipe.incrbyfloat(_held_key(counter), -amount)
        for counter, amount, ttl in charges:
            pipe.incrbyfloat(_spent_key(counter), amount)
            pipe.expire(_spent_key(counter), ttl)
        pipe.execute()

    def touch(self, name: str, when: float, ttl: int = LAST_USE_TTL) -> None:
        self.client.set(f"{KEY_PREFIX}:last-use:{name}", repr(when), ex=ttl)

    def last_use(self, name: str) -> float | None:
        value = self.client.get(f"{KEY_PREFIX}:last-use:{name}")
        return float(value) if value is not None else None


def _spent_key(counter: str) -> str:
    return f"{KEY_PREFIX}:{counter}"  # relay:tokens:NAME:DAY as before reservations existed


def _held_key(counter: str) -> str:
    return f"{KEY_PREFIX}:held:{counter}"


class Outage:
    """A store that failed: left alone for `retry_seconds`, then tried again; the first failure and the
    recovery are logged once each."""

    def __init__(self, failed: str, recovered: str, retry_seconds: float) -> None:
        self._failed, self._recovered, self.retry_seconds = failed, recovered, retry_seconds
        self._down_until = 0.0

    def usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, exc: Exception) -> None:
        if self._down_until == 0.0:
            log.warning(self._failed, type(exc).__name__, self.retry_seconds)
        self._down_until = time.monotonic() + self.retry_seconds

    def answered(self) -> None:
        if self._down_until != 0.0:
            log.info(self._recovered)
            self._down_until = 0.0


class Counters:
    """Redis when configured and answering, this process's memory otherwise; for the budgets and last uses,
    the host's file (`proxy/host_counters.py`, DATA_DIR/limits.db) comes between the two: it is where they
    live without Redis, and where they fall back to while Redis is down."""

    def __init__(self, storage_uri: str | None, host_path: Path | None = None) -> None:
        self.memory = MemoryCounters()
        self.redis = RedisCounters(storage_uri) if storage_uri and storage_uri != "memory://" else None
        self.host = HostCounters(host_path) if host_path is not None else None
        fallback = "DATA_DIR/limits.db for budgets, this process's memory for the rest" if self.host else \
            "this process's memory"
        self._redis_outage = Outage(f"rate limit storage unreachable (%s); counting in {fallback} and retrying "
                                    "every %g s", "rate limit storage reachable again", REDIS_RETRY_SECONDS)
        self._host_outage = Outage("budget counters file unusable (%s); counting budgets in this process's memory "
                                   "and retrying every %g s", "budget counters file usable again",
                                   HOST_RETRY_SECONDS)

    def _call(self, operation: Callable[[Any], Any]) -> tuple[Any, bool]:
        """Run `operation` on Redis if possible, else on memory; return its result and where it ran."""
        if self.redis is not None and self._redis_outage.usable():
            try:
                result = operation(self.redis)
            except redis.RedisError as exc:
                self._redis_outage.failed(exc)
            else:
                self._redis_outage.answered()
                return result, True
        return operation(self.memory), False

    def _budget_store(self) -> str:
        """Where budget counters are counted now."""
        if self.redis is not None and self._redis_outage.usable():
            return REDIS
        return HOST if self.host is not None and self._host_outage.usable() else MEMORY

    def _budget_call(self, operation: Callable[[Any], Any], start: str | None = None) -> tuple[Any, str]:
        """Run `operation` on the budgets' store (Redis, else the host's file, else memory), falling back down
        that order when one fails; return its result and where it ran."""
        store = start or self._budget_store()
        if store == REDIS and self.redis is not None:
            try:
                result = operation(self.redis)
            except redis.RedisError as exc:
                self._redis_outage.failed(exc)
                return self._budget_call(operation, HOST if self.host is not None else MEMORY)
            self._redis_outage.answered()
            return result, REDIS
        if store == HOST and self.host is not None and self._host_outage.usable():
            try:
                result = operation(self.host)
            except (sqlite3.Error, OSError) as exc:
                self._host_outage.failed(exc)
            else:
                self._host_outage.answered()
                return result, HOST
        return operation(self.memory), MEMORY

    def acquire(self, buckets: Sequence[tuple[str, int]], max_seconds: float, renewing: Lease | None = None
                ) -> Lease | str:
        """A Lease, or the name of the bucket that is full. Renewing gives the old lease back first (to the
        store that holds it, which may not be the one used now) and keeps its id; refused, it is gone."""
        if renewing is not None:
            self.release(renewing)
        lease_id = renewing.lease_id if renewing is not None else uuid.uuid4().hex
        now = time.time()
        full, in_redis = self._call(
            lambda store: store.acquire(buckets, lease_id, now + max_seconds + LEASE_MARGIN_SECONDS, now)
        )
        if full is not None:
            return str(full)
        return Lease(lease_id, tuple(bucket for bucket, _ in buckets), in_redis)

    def release(self, lease: Lease) -> None:
        if lease.in_redis and self.redis is not None:
            try:
                self.redis.release(lease.buckets, lease.lease_id)
            except redis.RedisError as exc:
                self._redis_outage.failed(exc)  # the lease expires by itself
            return
        self.memory.release(lease.buckets, lease.lease_id)

    def amounts(self, counters: Sequence[str]) -> list[tuple[float, float]]:
        """(spent, reserved) of each counter."""
        found, _ = self._budget_call(lambda store: store.amounts(counters))
        return list(found)

    def tokens(self, name: str, day: str) -> int:
        return int(self.amounts([tokens_counter(name, day)])[0][0])

    def reserve(self, holds: Sequence[Hold]) -> tuple[int, str]:
        """0 and where the holds were reserved, or the 1-based index of the budget without room."""
        refused, store = self._budget_call(lambda counters: counters.reserve(holds))
        return int(refused), store

    def settle(self, reserved_in: str, held: Sequence[tuple[str, float]], charges: Sequence[Charge],
               budgeted: bool = True) -> None:
        """Give the holds back to the store that granted them (which may not be the one used now); add the
        charges where counting happens now. One call (one transaction) when both are the same store. The
        charges of a key without budgets never go to the host's file (no file I/O for such keys)."""
        now_in = self._budget_store()
        if now_in == HOST and not budgeted:
            now_in = MEMORY
        if held and reserved_in == now_in:
            self._budget_call(lambda store: store.settle(held, charges), now_in)
            return
        if held:
            self._give_back(reserved_in, held)
        if charges:
            self._budget_call(lambda store: store.settle((), charges), now_in)

    def _give_back(self, reserved_in: str, held: Sequence[tuple[str, float]]) -> None:
        # A store that fails now keeps what it held until its period ends: refusing errs safe.
        try:
            if reserved_in == REDIS and self.redis is not None:
                self.redis.settle(held, ())
            elif reserved_in == HOST and self.host is not None:
                self.host.settle(held, ())
            else:
                self.memory.settle(held, ())
        except redis.RedisError as exc:
            self._redis_outage.failed(exc)
        except (sqlite3.Error, OSError) as exc:
            self._host_outage.failed(exc)

    def touch(self, name: str, when: float) -> None:
        self._budget_call(lambda store: store.touch(name, when, LAST_USE_TTL))

    def last_use(self, name: str) -> float | None:
        found, _ = self._budget_call(lambda store: store.last_use(name))
        return float(found) if found is not None else None


class RequestLimits:
    """The per-app limits: installed on the app by `init_app`, after the pipeline's first step (which decides
    the caller); released and charged by `settle` when the request closes (the pipeline's last step)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._use_noted: dict[str, float] = {}  # key name -> when this process last recorded its use (monotonic)
        storage_uri = config.rate_limit_storage_uri or "memory://"
        is_redis = storage_uri != "memory://"
        self.counters = Counters(storage_uri, host_file(config))
        # redis-py takes float timeouts; Flask-Limiter's annotation says str | int.
        redis_options: dict[str, Any] = {
            "socket_timeout": REDIS_TIMEOUT_SECONDS, "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
        }
        self.limiter = Limiter(
            key_func=self._bucket,
            default_limits=[Limit(self._rate_limits, shared=True, scope=RATE_SCOPE)],
            storage_uri=storage_uri,
            storage_options=redis_options if is_redis else {},
            strategy="fixed-window",
            key_prefix=KEY_PREFIX,
            in_memory_fallback_enabled=is_redis,
            in_memory_fallback=[self._rate_limits] if is_redis else None,  # type: ignore[list-item]
            swallow_errors=True,  # a failing store must never turn into a failed request
            headers_enabled=False,  # Retry-After is set on refusals only, by the relay's error shape
            on_breach=self._remember_breach,
        )
        self.limiter.logger = log  # its storage warnings belong in the relay's log
        self._memory_rates = FixedWindowRateLimiter(MemoryStorage())  # WebSocket messages while the store fails

    def init_app(self, app: Flask) -> None:
        if not self.config.limits_configured:
            return  # nothing to count: no per-request cost at all
        self.limiter.init_app(app)
        self.limiter.request_filter(self._exempt)
        app.before_request(self._admit)
        app.register_error_handler(RateLimitExceeded, self._render_breach)

    # -- requests per minute/day (Flask-Limiter)

    def _exempt(self) -> bool:
        """Only requests of a known caller to a keyed endpoint count; static files and health never do."""
        state = current_request_state()
        return state is None or state.caller is None or state.declaration.access == "public"

    def _policy(self) -> KeyPolicy | None:
        state = current_request_state()
        return state.caller if state is not None else None

    def _bucket(self) -> str:
        policy = self._policy()
        return bucket_of(policy) if policy is not None else "anonymous"

    def _rate_limits(self) -> str:
        """The calling key's limits in Flask-Limiter's notation; empty (no limit) for unknown callers."""
        policy = self._policy()
        return self.rate_limits_of(policy) if policy is not None else ""

    def rate_limits_of(self, policy: KeyPolicy) -> str:
        """A key's requests per minute and per day in Flask-Limiter's notation ("20/minute;500/day")."""
        per_minute = policy.requests_per_minute or self.config.rate_limit_per_minute
        per_day = policy.requests_per_day or self.config.rate_limit_per_day
        return ";".join(f"{count}/{period}" for count, period in ((per_minute, "minute"), (per_day, "day"))
                        if count)

    def _remember_breach(self, limit: RequestLimit) -> None:
        state = current_request_state()
        if state is not None:
            state.breach = (str(limit.limit), max(1, math.ceil(limit.reset_at - time.time())))

    def _render_breach(self, error: RateLimitExceeded) -> Response:
        state = current_request_state()
        breach = state.breach if state is not None else None
        description, retry_after = breach or (str(error.description), 60)
        return render_error(rate_limited(description, retry_after))

    # -- the public checks, for a request the pipeline does not see as one (a WebSocket message)

    def admit_message(self, policy: KeyPolicy) -> None:
        """Count one request of `policy`'s key in the buckets HTTP requests count in, and check its daily token
        budget; raise RateLimited (kind rate_limited or token_budget_exhausted) when either is used up."""
        if not self.config.limits_configured:
            return
        limits_text = self.rate_limits_of(policy)
        for item in sorted(parse_many(limits_text)) if limits_text else ():
            if not self._hit(item, policy):
                reset_at, _ = self._window(item, policy)
                raise rate_limited(str(item), max(1, math.ceil(reset_at - time.time())))
        self.check_budget(policy)
        self.note_use(policy)

    def _hit(self, item: RateLimitItem, policy: KeyPolicy) -> bool:
        # Flask-Limiter's own arguments for a shared per-key default limit, so both paths share one count.
        identifiers = (KEY_PREFIX, bucket_of(policy), RATE_SCOPE)
        try:
            return bool(self.limiter.limiter.hit(item, *identifiers))
        except (redis.RedisError, StorageError) as exc:
            # As Flask-Limiter does for HTTP requests: a failing store counts in this process instead. Debug
            # only: the store's failure is already logged (once) by the counters and by Flask-Limiter.
            log.debug("rate limit storage unreachable (%s); counting this message in memory", type(exc).__name__)
            return bool(self._memory_rates.hit(item, *identifiers))

    def _window(self, item: RateLimitItem, policy: KeyPolicy) -> tuple[float, int]:
        try:
            return self.limiter.limiter.get_window_stats(item, KEY_PREFIX, bucket_of(policy), RATE_SCOPE)
        except (redis.RedisError, StorageError):
            return self._memory_rates.get_window_stats(item, KEY_PREFIX, bucket_of(policy), RATE_SCOPE)

    def check_budget(self, policy: KeyPolicy) -> None:
        """Raise RateLimited (token_budget_exhausted, daily_spend_exhausted, monthly_spend_exhausted) when one of
        the key's budgets is used up: refused before the body is read. (What requests in flight hold counts
        when this request reserves, once its body is known: `reserve`.)"""
        budgets = self.budgets_of(policy)
        if not budgets:
            return
        for (kind, counter, limit), (spent, _held) in zip(budgets, self.counters.amounts(
                [counter for _, counter, _ in budgets]), strict=True):
            if spent >= limit:
                raise refusal(Hold(kind, counter, 0.0, limit, kind != TOKENS, 0))

    def budgets_of(self, policy: KeyPolicy) -> list[tuple[str, str, float]]:
        """The key's budgets now: (refusal kind, counter, limit)."""
        budgets: list[tuple[str, str, float]] = []
        token_budget = policy.daily_tokens or self.config.daily_token_budget
        if token_budget:
            budgets.append((TOKENS, tokens_counter(policy.name, utc_day()), token_budget))
        if policy.daily_spend:
            budgets.append((DAILY, spend_counter(policy.name, utc_day()), policy.daily_spend))
        if policy.monthly_spend:
            budgets.append((MONTHLY, spend_counter(policy.name, utc_month()), policy.monthly_spend))
        return budgets

    def reserve(self, policy: KeyPolicy, model: str, body: Mapping[str, Any], raw: bytes | None = None
                ) -> Reservation | None:
        """Reserve the most the request can cost in each of the key's budgets (`proxy/budgets.py`); raise
        RateLimited naming the budget without room, Forbidden for an unpriced model under a spend limit."""
        if not self.config.limits_configured:
            return None
        prompt, holds = plan(policy, self.config, self.config.prices, model, body, raw)
        refused, store = self.counters.reserve(holds) if holds else (0, MEMORY)
        if refused:
            hold = holds[refused - 1]
            spent, _ = self.counters.amounts([hold.counter])[0]
            # Would it fit once the requests in flight settle? Then it is worth retrying soon.
            in_flight = (spent + hold.amount <= hold.limit) if hold.strict else spent < hold.limit
            raise refusal(hold, in_flight)
        return Reservation(policy.name, model, prompt, holds, store)

    def reserve_request(self, state: RequestState, model: str, body: Mapping[str, Any], raw: bytes | None = None
                        ) -> None:
        """The pipeline's (and the forwarding views') reservation, once the body is known; `settle` ends it."""
        if state.caller is None or state.declaration.access == "public" or state.reservation is not None:
            return
        state.reservation = self.reserve(state.caller, model, body, raw)

    def release_reservation(self, reservation: Reservation | None) -> None:
        """Give a reservation back unspent (the request never reached the upstream)."""
        if reservation is not None and reservation.holds:
            self.counters.settle(reservation.store, _held(reservation), ())

    def note_use(self, policy: KeyPolicy) -> None:
        """Record the key's last use in the shared store, at most once a LAST_USE_SECONDS per process."""
        now = time.monotonic()
        if now - self._use_noted.get(policy.name, -math.inf) < LAST_USE_SECONDS:
            return
        self._use_noted[policy.name] = now
        self.counters.touch(policy.name, time.time())

    def renew_stream(self, policy: KeyPolicy, lease: Lease | None) -> Lease | None:
        """The stream slot a long-lived connection holds, given back and taken again under the key's current
        caps (so it never expires while the connection lives, and a lowered max_streams applies). Raise
        RateLimited (too_many_streams) when no slot is free: the old one is given back all the same."""
        return self._lease_stream_slot(policy, renewing=lease)

    def release(self, lease: Lease | None) -> None:
        if lease is not None:
            self.counters.release(lease)

    def charge(self, policy: KeyPolicy, usage: TokenUsage, reservation: Reservation | None = None,
               model: str | None = None) -> None:
        """Settle an answer: its reservation given back, its tokens counted against the key's daily budget (when
        one can apply) and its price against the key's daily and monthly spend (when the model is priced)."""
        if not self.config.limits_configured:
            return
        model = reservation.model if reservation is not None else model
        charges = actual_charges(reservation, policy, self.config, self.config.prices, model, usage)
        held = _held(reservation) if reservation is not None else []
        if held or charges:
            self.counters.settle(reservation.store if reservation is not None else MEMORY, held, charges,
                                 budgeted=bool(held) or bool(self.budgets_of(policy)))

    # -- the pipeline's hooks

    def _admit(self) -> None:
        state = current_request_state()
        if state is None or self._exempt():
            return
        policy = state.caller
        assert policy is not None  # not exempt: a known caller
        self.check_budget(policy)
        self.note_use(policy)
        if state.declaration.streams:
            state.lease = self._lease_stream_slot(policy)

    def _lease_stream_slot(self, policy: KeyPolicy, renewing: Lease | None = None) -> Lease | None:
        buckets: list[tuple[str, int]] = []
        per_key = policy.max_streams or self.config.max_streams_per_key
        if per_key:
            buckets.append((policy.name, per_key))
        if self.config.max_open_streams:
            buckets.append((GLOBAL_BUCKET, self.config.max_open_streams))
        if not buckets:
            self.release(renewing)
            return None
        lease = self.counters.acquire(buckets, self.config.max_stream_seconds, renewing)
        if isinstance(lease, str):
            whose = "this relay's" if lease == GLOBAL_BUCKET else "this key's"
            limit = dict(buckets)[lease]
            raise RateLimited(f"{whose} limit of {limit} streams open at once is reached; retry when one ends",
                              kind="too_many_streams", retry_after=STREAM_RETRY_AFTER_SECONDS)
        return lease

    def settle(self, state: RequestState) -> None:
        """When the request closes: give back its stream slot and settle its budgets (unless the view charged
        them itself, answer by answer)."""
        self.release(state.lease)
        state.lease = None
        reservation, state.reservation = state.reservation, None
        policy = state.caller
        if policy is None or state.charged:
            self.release_reservation(reservation)
            return
        stats = state.access.stats
        usage = stats.token_usage() if stats is not None else TokenUsage()
        model = state.access.model if state.access.model != "-" else None
        self.charge(policy, usage, reservation, model)


def _held(reservation: Reservation) -> list[tuple[str, float]]:
    return [(hold.counter, hold.amount) for hold in reservation.holds]


def bucket_of(policy: KeyPolicy) -> str:
    """The key's requests-per-minute/day bucket, for Flask-Limiter and the WebSocket messages alike."""
    return f"key:{policy.name}"


def rate_limited(limit: str, retry_after: int) -> RateLimited:
    return RateLimited(f"this key's limit of {limit} is used up; retry in {retry_after} s", retry_after=retry_after)
