"""Money budgets under concurrency, for real: gunicorn (2 workers) and the fake upstream, with the default storage
(budgets in DATA_DIR/limits.db, shared by the host's workers) and with a real redis-server (shared by every
instance). Bursts of concurrent requests against a key's daily spend limit never spend more than the limit,
because each request reserves its most expensive outcome before the upstream is called."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import pytest

from proxy.budgets import Hold
from proxy.host_counters import HostCounters
from proxy.limits import MemoryCounters, RedisCounters
from tests.conftest import UPSTREAM_KEY, RelayProcess, relay_env, start_relay
from tests.fake_upstream import FakeUpstream
from tests.servers import find_program, running_redis
from tests.test_anthropic import ANTHROPIC_KEY, upstreams_toml
from tests.unit.test_host_counters import RULES  # the budget rules' cases, one table for every store

# The bursts assert bounds on what was spent, not timings: they run beside other test files (each request
# has 30 s, and a refusal is told apart from a wait by its record, not by the clock).

SPENDER = "spender-key-0123456789abcdef"
PRICE_PER_TOKEN = 0.001  # 1000 per million tokens, input and output
PRICES = '[[prices]]\nmodel = "gpt-4o*"\ninput = 1000\noutput = 1000\n'
OUTPUT_CAP = 20
# The fake reports the prompt's words as prompt tokens and one completion token per content token.
CONTENT = '#fake {"n_tokens": 20, "token_interval": 0.02}'
COST = (len(CONTENT.split()) + 20) * PRICE_PER_TOKEN  # what each answered request really costs
LIMIT = 0.5  # about 21 requests' worth; each reserves about three times its real cost
BURST = 24


def keys_and_prices(directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    keys, prices = directory / "keys.toml", directory / "prices.toml"
    keys.write_text(f'[keys.spender]\nkey = "{SPENDER}"\ndaily_spend = {LIMIT}\n')
    prices.write_text(PRICES)
    return {"KEYS_FILE": str(keys), "PRICES_FILE": str(prices)}


def spend(relay: RelayProcess) -> tuple[int, int, int]:
    """One request: (status, whether a refusal is only for requests in flight, Retry-After)."""
    body = {"messages": [{"role": "user", "content": CONTENT}], "max_tokens": OUTPUT_CAP}
    response = httpx2.post(f"{relay.url}/chat", json=body, headers={"Authorization": f"Bearer {SPENDER}"},
                           timeout=30)
    if response.status_code != 200:
        record = json.loads(response.text.splitlines()[0])
        assert response.status_code == 429 and record["code"] == "daily_spend_exhausted", response.text
        return 429, "in flight" in record["content"], int(response.headers["Retry-After"])
    assert response.text.count('"content"') >= OUTPUT_CAP, "the answer streamed whole"
    return 200, False, 0


def spend_until_refused(relays: list[RelayProcess]) -> int:
    """Bursts of BURST concurrent requests, spread over the relays, until a whole burst is refused for good
    (the budget, not requests in flight, leaves no room); how many were answered."""
    answered = 0
    with ThreadPoolExecutor(BURST) as pool:
        for _burst in range(12):
            results = list(pool.map(lambda index: spend(relays[index % len(relays)]), range(BURST)))
            answered += sum(status == 200 for status, _, _ in results)
            if all(status == 429 and not in_flight for status, in_flight, _ in results):
                assert all(retry_after > 5 for _, _, retry_after in results), "refused until 00:00 UTC"
                return answered
    raise AssertionError("the budget never ran out")


def assert_within_budget(answered: int, budgets: int) -> None:
    """What was spent stays within the limit(s); and the limit was nearly used: at most one reservation's worth
    (a request's prompt estimate and output cap) was left when requests were refused for good."""
    reservation = 3.5 * COST  # generously above the real estimate (about 3x the cost for this body)
    spent = answered * COST
    assert spent <= budgets * LIMIT + 1e-9, f"{answered} answered: {spent} spent over {budgets} x {LIMIT}"
    assert spent >= budgets * (LIMIT - reservation), f"only {answered} answered: the budget was not used"


def test_burst_never_overshoots_the_money_budget_with_memory_storage(tmp_path: Path, fake: FakeUpstream) -> None:
    """Default storage, 2 workers: the budget counters are the host's (DATA_DIR/limits.db), one for both
    workers, so the spend never passes the limit (it used to be up to 2 x the limit, each worker counting
    on its own), and the limit is used up to one reservation's worth."""
    relay = start_relay(tmp_path / "relay", relay_env(fake.base_url, GUNICORN_WORKERS="2",
                                                      **keys_and_prices(tmp_path / "files")))
    try:
        answered = spend_until_refused([relay])
        log = relay.log_text()
    finally:
        relay.stop()
    assert_within_budget(answered, budgets=1)
    assert (tmp_path / "relay" / "data" / "limits.db").exists()
    assert "budget counters file unusable" not in log


@pytest.mark.skipif(find_program("redis-server") is None, reason="redis-server is not installed")
def test_burst_on_two_instances_never_overshoots_the_money_budget_through_redis(tmp_path: Path,
                                                                                fake: FakeUpstream) -> None:
    """Redis storage, two relay instances of 2 workers each: one budget for all four processes, reserved by
    one Lua script, so the spend never passes the limit."""
    files = keys_and_prices(tmp_path / "files")
    with running_redis(tmp_path / "redis") as redis:
        relays = [start_relay(tmp_path / f"relay{index}", relay_env(
            fake.base_url, GUNICORN_WORKERS="2", RATE_LIMIT_STORAGE_URI=redis.url, **files)) for index in range(2)]
        try:
            answered = spend_until_refused(relays)
        finally:
            for relay in relays:
                relay.stop()
    assert_within_budget(answered, budgets=1)


def test_one_worker_memory_storage_holds_the_limit_exactly(relay_factory: Callable[..., Any], tmp_path: Path,
                                                          fake: FakeUpstream) -> None:
    """With one worker, memory storage is the whole relay's: the same bound as Redis."""
    relay = relay_factory(fresh=True, **keys_and_prices(tmp_path / "files"))
    assert_within_budget(spend_until_refused([relay]), budgets=1)


def test_every_protocol_reserves_and_refuses_in_its_own_shape(relay_factory: Callable[..., Any], tmp_path: Path,
                                                              fake: FakeUpstream) -> None:
    """Anthropic's /v1/messages and a forwarded /v1/responses body reserve from their own size and output cap:
    too big for what is left is a 429 in Anthropic's and OpenAI's error shapes before the upstream is called;
    a small cap fits and is answered."""
    files = keys_and_prices(tmp_path / "files")
    Path(files["PRICES_FILE"]).write_text(PRICES + '[[prices]]\nmodel = "claude-*"\ninput = 1000\noutput = 1000\n')
    upstreams = tmp_path / "upstreams.toml"
    upstreams.write_text(upstreams_toml(fake.base_url, [f"http://{fake.host}:{fake.port}"]))
    relay = relay_factory(fresh=True, UPSTREAMS_FILE=str(upstreams), OPENAI_UPSTREAM_KEY=UPSTREAM_KEY,
                          ANTHROPIC_KEY=ANTHROPIC_KEY, OPENAI_API_KEY="", **files)
    headers = {"Authorization": f"Bearer {SPENDER}"}
    messages = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}
    refused = httpx2.post(f"{relay.url}/v1/messages", json={**messages, "max_tokens": 5000}, headers=headers,
                          timeout=20)
    assert refused.status_code == 429 and refused.json()["type"] == "error", refused.text
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "daily spend limit of 0.5" in refused.json()["error"]["message"]
    responses = {"model": "gpt-4o-mini", "input": "hi"}
    forwarded = httpx2.post(f"{relay.url}/v1/responses", json={**responses, "max_output_tokens": 5000},
                            headers=headers, timeout=20)
    assert forwarded.status_code == 429 and forwarded.json()["error"]["code"] == "daily_spend_exhausted"
    assert fake.requests == []
    assert httpx2.post(f"{relay.url}/v1/messages", json={**messages, "max_tokens": 10}, headers=headers,
                       timeout=20).status_code == 200
    assert httpx2.post(f"{relay.url}/v1/responses", json={**responses, "max_output_tokens": 10}, headers=headers,
                       timeout=20).status_code == 200


@pytest.fixture(params=["redis", "host"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisCounters | HostCounters]:
    """Each store shared across processes: Redis (its Lua script) and the host's SQLite file."""
    if request.param == "host":
        yield HostCounters(tmp_path / "limits.db")
        return
    if find_program("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with running_redis(tmp_path / "redis") as redis:
        yield RedisCounters(redis.url)


@pytest.mark.parametrize(("spent", "held", "amount", "limit", "strict", "admitted"), RULES)
def test_shared_stores_follow_the_memory_rules(shared_store: RedisCounters | HostCounters, spent: float,
                                               held: float, amount: float, limit: float, strict: bool,
                                               admitted: bool) -> None:
    """The Lua script and the SQLite file admit and refuse exactly as MemoryCounters does (the same case, run
    on memory here), all or nothing across budgets, and settling gives the hold back."""
    memory = MemoryCounters()
    for store in (memory, shared_store):
        store.settle((), [("c", spent, 100)])
        assert store.reserve([Hold("k", "c", held, 1e9, True, 100)]) == 0
        refused = store.reserve([Hold("k", "other", 1, 1e9, True, 100), Hold("k", "c", amount, limit, strict, 100)])
        assert (refused == 0) is admitted and (refused in (0, 2))
        expected_held = held + (amount if admitted else 0)
        assert store.amounts(["c", "other"]) == [(spent, pytest.approx(expected_held)),
                                                 (0.0, 1.0 if admitted else 0.0)]
        store.settle([("c", expected_held)], [("c", 0.25, 100)])
        assert store.amounts(["c"]) == [(spent + 0.25, pytest.approx(0.0))]
    if isinstance(shared_store, RedisCounters):
        assert 0 < shared_store.client.ttl("relay:c") <= 100
    else:
        assert shared_store.amounts(["c"], now=time.time() + 101) == [(0.0, 0.0)], "expired with its period"
