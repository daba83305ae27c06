"""Who may use how much.

- Requests per minute and per day, per key: Flask-Limiter, one shared bucket per key across all endpoints.
- Requests in flight (open streams) per key, and for the whole relay: leases that end when the response
  is closed (last byte sent, or the client gone).
- A daily token budget per key, counted from the usage the upstream reports at the end of each answer
  (the number of content deltas when it reports none), renewed at 00:00 UTC.

Every refusal is a 429 with Retry-After, rendered by the endpoint's own error shape. A WebSocket connection
(`routes/websocket.py`) is admitted like any request at its handshake, then each of its messages goes through
the same public checks (`admit_message`, `renew_stream`, `charge`): one count in the same per-key buckets,
the same budget, the same slots.

Counters live in memory (one process: each gunicorn worker counts on its own) or, with
RATE_LIMIT_STORAGE_URI=redis://..., in Redis, shared by every worker and every relay instance. When Redis
cannot be reached the relay keeps serving: every counter falls back to the process's memory (logged
once), Redis is tried again after a few seconds and used as soon as it answers. While it is down, limits
hold per process instead of across processes, and counts made in memory are not carried over to Redis.
A leased stream slot always expires by itself after MAX_STREAM_SECONDS (plus a minute), so a crashed
instance cannot hold slots for ever.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from flask import Flask, Response
from flask_limiter import Limit, Limiter, RequestLimit
from flask_limiter.errors import RateLimitExceeded
from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from proxy.config import Config
from proxy.errors import RateLimited, render_error
from proxy.keys import KeyPolicy
from proxy.request_state import RequestState, current_request_state
from proxy.usage import TokenUsage

log = logging.getLogger("relay.limits")

REDIS_TIMEOUT_SECONDS = 0.5  # a Redis that hangs must not hang requests
REDIS_RETRY_SECONDS = 5.0  # after a Redis failure, count in memory this long before trying Redis again
STREAM_RETRY_AFTER_SECONDS = 5
LEASE_MARGIN_SECONDS = 60.0
GLOBAL_BUCKET = "*"  # cannot collide with a key name (names start with a letter or digit)
KEY_PREFIX = "relay"
RATE_SCOPE = "per-key"  # the scope of the one shared per-key limit, as Flask-Limiter names its buckets

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


@dataclass(frozen=True)
class Lease:
    """A held stream slot: which buckets, and which store granted it (release goes back there)."""

    lease_id: str
    buckets: tuple[str, ...]
    in_redis: bool


class MemoryCounters:
    """Stream leases and token counts of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, dict[str, float]] = {}
        self._tokens: dict[tuple[str, str], int] = {}

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

    def tokens(self, name: str, day: str) -> int:
        return self._tokens.get((name, day), 0)

    def add_tokens(self, name: str, day: str, count: int) -> None:
        with self._lock:
            for stale in [entry for entry in self._tokens if entry[1] < day]:
                del self._tokens[stale]
            self._tokens[(name, day)] = self._tokens.get((name, day), 0) + count


class RedisCounters:
    """The same counters in Redis, shared by every process and instance using it."""

    def __init__(self, uri: str) -> None:
        url = "unix://" + uri.removeprefix("redis+unix://") if uri.startswith("redis+unix://") else uri
        self.client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
        )
        self._acquire = self.client.register_script(_ACQUIRE_LUA)

    def acquire(self, buckets: Sequence[tuple[str, int]], lease_id: str, expires: float, now: float) -> str | None:
        keys = [f"{KEY_PREFIX}:streams:{bucket}" for bucket, _ in buckets]
        full = int(self._acquire(keys=keys, args=[now, expires, lease_id, *(limit for _, limit in buckets)]))
        return buckets[full - 1][0] if full else None

    def release(self, buckets: Sequence[str], lease_id: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for bucket in buckets:
            pipe.zrem(f"{KEY_PREFIX}:streams:{bucket}", lease_id)
        pipe.execute()

    def tokens(self, name: str, day: str) -> int:
        return int(self.client.get(f"{KEY_PREFIX}:tokens:{name}:{day}") or 0)

    def add_tokens(self, name: str, day: str, count: int) -> None:
        key = f"{KEY_PREFIX}:tokens:{name}:{day}"
        pipe = self.client.pipeline(transaction=False)
        pipe.incrby(key, count)
        pipe.expire(key, 2 * 86400)
        pipe.execute()


class Counters:
    """Redis when configured and answering, this process's memory otherwise."""

    def __init__(self, storage_uri: str | None) -> None:
        self.memory = MemoryCounters()
        self.redis = RedisCounters(storage_uri) if storage_uri and storage_uri != "memory://" else None
        self._redis_down_until = 0.0

    def _use_redis(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._redis_down_until

    def _redis_failed(self, exc: redis.RedisError) -> None:
        if self._redis_down_until == 0.0:
            log.warning("rate limit storage unreachable (%s); counting in this process's memory and "
                        "retrying every %g s", type(exc).__name__, REDIS_RETRY_SECONDS)
        self._redis_down_until = time.monotonic() + REDIS_RETRY_SECONDS

    def _redis_answered(self) -> None:
        if self._redis_down_until != 0.0:
            log.info("rate limit storage reachable again")
            self._redis_down_until = 0.0

    def _call(self, operation: Callable[[Any], Any]) -> tuple[Any, bool]:
        """Run `operation` on Redis if possible, else on memory; return its result and where it ran."""
        if self.redis is not None and self._use_redis():
            try:
                result = operation(self.redis)
            except redis.RedisError as exc:
                self._redis_failed(exc)
            else:
                self._redis_answered()
                return result, True
        return operation(self.memory), False

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
                self._redis_failed(exc)  # the lease expires by itself
            return
        self.memory.release(lease.buckets, lease.lease_id)

    def tokens(self, name: str, day: str) -> int:
        used, _ = self._call(lambda store: store.tokens(name, day))
        return int(used)

    def add_tokens(self, name: str, day: str, count: int) -> None:
        self._call(lambda store: store.add_tokens(name, day, count))


def utc_day(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%d")


def seconds_to_utc_midnight(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - now).total_seconds()))


class RequestLimits:
    """The per-app limits: installed on the app by `init_app`, after the pipeline's first step (which decides
    the caller); released and charged by `settle` when the request closes (the pipeline's last step)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        storage_uri = config.rate_limit_storage_uri or "memory://"
        is_redis = storage_uri != "memory://"
        self.counters = Counters(storage_uri)
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
        """Raise RateLimited (token_budget_exhausted) when the key's daily token budget is used up."""
        budget = policy.daily_tokens or self.config.daily_token_budget
        if budget and self.counters.tokens(policy.name, utc_day()) >= budget:
            raise RateLimited(f"this key's daily budget of {budget} tokens is used up; it renews at 00:00 UTC",
                              kind="token_budget_exhausted", retry_after=seconds_to_utc_midnight())

    def renew_stream(self, policy: KeyPolicy, lease: Lease | None) -> Lease | None:
        """The stream slot a long-lived connection holds, given back and taken again under the key's current
        caps (so it never expires while the connection lives, and a lowered max_streams applies). Raise
        RateLimited (too_many_streams) when no slot is free: the old one is given back all the same."""
        return self._lease_stream_slot(policy, renewing=lease)

    def release(self, lease: Lease | None) -> None:
        if lease is not None:
            self.counters.release(lease)

    def charge(self, policy: KeyPolicy, usage: TokenUsage) -> None:
        """Count an answer's tokens against the key's daily budget (only when a budget can apply)."""
        if usage.total and (policy.daily_tokens or self.config.daily_token_budget):
            self.counters.add_tokens(policy.name, utc_day(), usage.total)

    # -- the pipeline's hooks

    def _admit(self) -> None:
        state = current_request_state()
        if state is None or self._exempt():
            return
        policy = state.caller
        assert policy is not None  # not exempt: a known caller
        self.check_budget(policy)
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
        """When the request closes: give back its stream slot and charge its tokens to the key's budget (unless
        the view charged them itself, answer by answer)."""
        self.release(state.lease)
        state.lease = None
        policy = state.caller
        stats = state.access.stats
        if policy is None or stats is None or state.charged:
            return
        self.charge(policy, TokenUsage.of_answer(stats.usage, stats.tokens))


def bucket_of(policy: KeyPolicy) -> str:
    """The key's requests-per-minute/day bucket, for Flask-Limiter and the WebSocket messages alike."""
    return f"key:{policy.name}"


def rate_limited(limit: str, retry_after: int) -> RateLimited:
    return RateLimited(f"this key's limit of {limit} is used up; retry in {retry_after} s", retry_after=retry_after)
