"""proxy/budgets.py and the reservations in proxy/limits.py, in-process: what a request reserves, the rules a
reservation is admitted by, its settlement from the reported usage, and the 429s in each protocol's shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from flask import Flask
from flask.testing import FlaskClient

from proxy import create_app
from proxy.budgets import (
    DEFAULT_OUTPUT_CAP,
    Hold,
    output_cap,
    prompt_estimate,
    refusal,
    spend_counter,
    tokens_counter,
    utc_day,
    utc_month,
)
from proxy.limits import MemoryCounters, RequestLimits
from proxy.upstream import Upstream
from proxy.usage import TokenUsage
from tests.conftest import UPSTREAM_KEY
from tests.unit.conftest import FakeTransport, unit_config
from tests.unit.test_app import records

ALICE = "alice-budget-key-0123456789"
PRICES = """
[[prices]]
model = "gpt-4o-mini"
input = 1000
output = 1000
"""
COSTS_PER_TOKEN = 1000 / 1e6  # 0.001 a token, input or output
HELLO = {"messages": [{"role": "user", "content": "Hello"}]}


@pytest.mark.parametrize(("body", "max_tokens", "cap"), [
    ({}, None, DEFAULT_OUTPUT_CAP),
    ({}, 300, 300),
    ({"max_tokens": 50}, 300, 50),
    ({"max_completion_tokens": 70}, None, 70),
    ({"max_output_tokens": 90}, None, 90),
    ({"max_tokens": 50, "max_completion_tokens": 20}, None, 20),
    ({"max_tokens": 50, "n": 3}, None, 150),
    ({"max_tokens": 50, "n": 2, "best_of": 5}, None, 250),
    ({"best_of": 4}, 300, 1200),
    ({"max_tokens": 50, "n": 0}, None, 50),
    ({"max_tokens": True}, None, DEFAULT_OUTPUT_CAP),
    ({"max_tokens": "50"}, None, DEFAULT_OUTPUT_CAP),
    ({"max_tokens": 0}, None, DEFAULT_OUTPUT_CAP),
])
def test_output_cap(body: dict[str, Any], max_tokens: int | None, cap: int) -> None:
    """The body's own cap (the smallest named), times n or best_of (the larger); else MAX_TOKENS; else the
    documented default."""
    assert output_cap(body, unit_config(max_tokens=max_tokens)) == cap


@pytest.mark.parametrize(("body", "tokens"), [(b"", 0), (b"abc", 1), (b"abcd", 2), ("é".encode() * 3, 2)])
def test_prompt_estimate_is_bytes_over_three_rounded_up(body: bytes, tokens: int) -> None:
    """UTF-8 bytes / 3, rounded up (erring high for English, about right for CJK)."""
    assert prompt_estimate(body) == tokens


@pytest.mark.parametrize(("spent", "held", "amount", "limit", "strict", "admitted"), [
    (0, 0, 10, 10, True, True),  # fits exactly
    (0, 0, 10.5, 10, True, False),  # a reservation bigger than the whole limit never fits
    (4, 5, 1, 10, True, True),
    (4, 5, 1.5, 10, True, False),  # what requests in flight hold counts
    (9, 0, 100, 10, False, True),  # tokens: admitted while some is left
    (4, 6, 1, 10, False, False),
    (10, 0, 1, 10, False, False),
])
def test_memory_reservation_rules(spent: float, held: float, amount: float, limit: float, strict: bool,
                                  admitted: bool) -> None:
    """strict (money): spent + held + amount must fit; not strict (tokens): spent + held must be under it."""
    memory = MemoryCounters()
    memory.settle((), [("c", spent, 100)], now=0.0)
    memory.reserve([Hold("k", "c", held, 1e9, True, 100)], now=0.0)
    assert (memory.reserve([Hold("k", "c", amount, limit, strict, 100)], now=0.0) == 0) is admitted
    assert memory.amounts(["c"], now=0.0) == [(spent, held + (amount if admitted else 0))]


def test_reservation_is_all_or_nothing() -> None:
    """Refused by the second budget, nothing is held in the first; settling gives holds back and adds spend."""
    memory = MemoryCounters()
    holds = [Hold("d", "day", 3, 10, True, 100), Hold("m", "month", 3, 2, True, 100)]
    assert memory.reserve(holds, now=0.0) == 2
    assert memory.amounts(["day", "month"], now=0.0) == [(0.0, 0.0), (0.0, 0.0)]
    assert memory.reserve(holds[:1], now=0.0) == 0
    memory.settle([("day", 3)], [("day", 1.25, 100)], now=0.0)
    assert memory.amounts(["day"], now=0.0) == [(1.25, 0.0)]


@pytest.mark.parametrize(("kind", "in_flight", "now", "retry_after"), [
    ("daily_spend_exhausted", False, datetime(2026, 12, 31, 23, 0, tzinfo=UTC), 3600),
    ("monthly_spend_exhausted", False, datetime(2026, 12, 31, 23, 0, tzinfo=UTC), 3600),
    ("monthly_spend_exhausted", False, datetime(2026, 2, 27, 0, 0, tzinfo=UTC), 2 * 86400),
    ("token_budget_exhausted", False, datetime(2026, 3, 1, 12, 0, tzinfo=UTC), 43200),
    ("daily_spend_exhausted", True, datetime(2026, 3, 1, 12, 0, tzinfo=UTC), 5),
])
def test_refusal_names_the_budget_and_when_to_retry(kind: str, in_flight: bool, now: datetime,
                                                    retry_after: int) -> None:
    """429 with the budget as `kind`; Retry-After: the next UTC day or month, or a few seconds when only
    requests in flight hold the room."""
    error = refusal(Hold(kind, "c", 1.0, 2.0, True, 1), in_flight, now)
    assert (error.code, error.kind, error.retry_after) == (429, kind, retry_after)


def test_periods_on_a_fake_clock() -> None:
    """Counters are named by UTC day and month."""
    now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert (utc_day(now), utc_month(now)) == ("2026-12-31", "2026-12")
    assert spend_counter("a", utc_month(now)) == "spend:a:2026-12"


# --- in-process relays -----------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    keys, prices = tmp_path / "keys.toml", tmp_path / "prices.toml"
    prices.write_text(PRICES)
    yield keys, prices


def budget_app(files: tuple[Path, Path], transport: httpx2.BaseTransport, **limits: object) -> Flask:
    keys, prices = files
    keys.write_text(f'[keys.alice]\nkey = "{ALICE}"\n' + "".join(f"{name} = {value!r}\n"
                                                              for name, value in limits.items()))
    app = create_app(unit_config(keys_file=keys, prices_file=prices))
    client = openai.OpenAI(api_key=UPSTREAM_KEY, base_url="http://upstream.invalid/v1", max_retries=0,
                           http_client=httpx2.Client(transport=transport))
    relay = app.extensions["relay"]
    app.extensions["relay"] = dataclasses.replace(relay, upstreams=(Upstream("fake", client),))
    return app


def alice() -> dict[str, str]:
    return {"Authorization": f"Bearer {ALICE}"}


def amounts(app: Flask, *counters: str) -> list[tuple[float, float]]:
    limits: RequestLimits = app.extensions["relay"].limits
    return limits.counters.amounts(counters)


def finished(response: Any) -> int:
    """Read the response to its end and close it (which settles the request); its status."""
    response.get_data()
    response.close()
    return int(response.status_code)


def chat_body(max_tokens: int) -> dict[str, Any]:
    return {**HELLO, "max_tokens": max_tokens}


def reservation_of(body: dict[str, Any]) -> float:
    """What a POST /chat with this body reserves in money (the shaped body adds the model and stream)."""
    shaped = {"messages": body["messages"], "model": "gpt-4o-mini", "stream": True,
              "stream_options": {"include_usage": True}, "max_tokens": body["max_tokens"]}
    return (prompt_estimate(shaped) + body["max_tokens"]) * COSTS_PER_TOKEN


def test_spend_is_reserved_while_the_answer_streams_and_settled_from_usage(
        files: tuple[Path, Path], transport: FakeTransport) -> None:
    """While a response is open its reservation is held; at close it is given back and the reported usage
    (1 prompt + 2 completion tokens) is what is spent, in the day's and the month's counters."""
    app = budget_app(files, transport, daily_spend=5.0, monthly_spend=50.0)
    day, month = spend_counter("alice", utc_day()), spend_counter("alice", utc_month())
    held = app.test_client().post("/chat", json=chat_body(100), headers=alice(), buffered=False)
    assert held.status_code == 200
    (spent, reserved), = amounts(app, day)
    assert spent == 0 and reserved > 100 * COSTS_PER_TOKEN
    held.get_data()
    held.close()
    assert amounts(app, day, month) == [(pytest.approx(3 * COSTS_PER_TOKEN), 0.0)] * 2


def test_reservation_that_cannot_fit_is_refused_before_the_upstream(files: tuple[Path, Path],
                                                                    transport: FakeTransport) -> None:
    """A request whose prompt and output cap could cost more than the limit is refused with 429 in its
    protocol's shape (NDJSON record on /chat, OpenAI error on /v1/chat/completions), Retry-After to 00:00 UTC;
    the upstream never sees it. A smaller cap fits."""
    app = budget_app(files, transport, daily_spend=0.2)
    client = app.test_client()
    refused = client.post("/chat", json=chat_body(1000), headers=alice())
    assert refused.status_code == 429 and records(refused.data)[0]["code"] == "daily_spend_exhausted"
    assert int(refused.headers["Retry-After"]) > 5
    openai_shape = client.post("/v1/chat/completions", json={**chat_body(1000), "model": "gpt-4o-mini"},
                               headers=alice())
    assert openai_shape.status_code == 429 and openai_shape.json["error"]["code"] == "daily_spend_exhausted"
    assert transport.requests == []
    assert client.post("/chat", json=chat_body(10), headers=alice()).status_code == 200


def test_requests_in_flight_hold_the_budget(files: tuple[Path, Path], transport: FakeTransport) -> None:
    """Room for one reservation: a second request while the first streams is refused (Retry-After a few
    seconds: it is worth retrying), and admitted once the first has settled."""
    one = reservation_of(chat_body(100))
    app = budget_app(files, transport, daily_spend=round(one * 1.5, 6))
    client = app.test_client()
    first = client.post("/chat", json=chat_body(100), headers=alice(), buffered=False)
    second = client.post("/chat", json=chat_body(100), headers=alice())
    assert second.status_code == 429 and records(second.data)[0]["code"] == "daily_spend_exhausted"
    assert second.headers["Retry-After"] == "5"
    first.get_data()
    first.close()
    assert client.post("/chat", json=chat_body(100), headers=alice()).status_code == 200


def test_monthly_limit_and_unpriced_models(files: tuple[Path, Path], transport: FakeTransport) -> None:
    """monthly_spend refuses as monthly_spend_exhausted (Retry-After to the next month); a key with a spend
    limit cannot use a model without a price (403 model_not_priced)."""
    app = budget_app(files, transport, monthly_spend=0.01)
    client = app.test_client()
    refused = client.post("/chat", json=chat_body(1000), headers=alice())
    assert records(refused.data)[0]["code"] == "monthly_spend_exhausted"
    unpriced = client.post("/chat", json={**chat_body(1), "model": "o3"}, headers=alice())
    assert unpriced.status_code == 403 and records(unpriced.data)[0]["code"] == "model_not_priced"


def test_forwarded_json_bodies_reserve_too(files: tuple[Path, Path]) -> None:
    """A forwarded /v1/responses body is reserved from its own size and max_output_tokens: too big is 429 in
    OpenAI's shape before the upstream; the usage the answer reports is what is spent."""

    class Answers(httpx2.BaseTransport):
        def __init__(self) -> None:
            self.seen = 0

        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            self.seen += 1
            return httpx2.Response(200, json={"usage": {"input_tokens": 7, "output_tokens": 3}}, request=request)

    upstream = Answers()
    app = budget_app(files, upstream, daily_spend=0.5)
    client = app.test_client()
    body = {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 100_000}
    refused = client.post("/v1/responses", json=body, headers=alice())
    assert refused.status_code == 429 and refused.json["error"]["code"] == "daily_spend_exhausted"
    assert upstream.seen == 0
    assert finished(client.post("/v1/responses", json={**body, "max_output_tokens": 50}, headers=alice())) == 200
    assert amounts(app, spend_counter("alice", utc_day())) == [(pytest.approx(10 * COSTS_PER_TOKEN), 0.0)]


def test_token_budget_admits_while_some_is_left_counting_requests_in_flight(
        files: tuple[Path, Path], transport: FakeTransport) -> None:
    """daily_tokens keeps its meaning (admitted while tokens are left), but a request in flight holds its
    estimate, so a concurrent one is refused until it settles; then the reported usage is what counts."""
    app = budget_app(files, transport, daily_tokens=1000)
    client = app.test_client()
    first = client.post("/chat", json=chat_body(990), headers=alice(), buffered=False)
    assert first.status_code == 200
    busy = client.post("/chat", json=chat_body(5), headers=alice())
    assert busy.status_code == 429 and records(busy.data)[0]["code"] == "token_budget_exhausted"
    first.get_data()
    first.close()
    assert amounts(app, tokens_counter("alice", utc_day())) == [(3.0, 0.0)]
    assert client.post("/chat", json=chat_body(5), headers=alice()).status_code == 200


def test_websocket_messages_reserve_and_settle(files: tuple[Path, Path], transport: FakeTransport) -> None:
    """The public API a WebSocket answer uses: reserve before, charge(usage, reservation) after."""
    app = budget_app(files, transport, daily_spend=1.0)
    limits: RequestLimits = app.extensions["relay"].limits
    policy = app.extensions["relay"].config.keyring.identify(ALICE)
    with app.app_context():
        reservation = limits.reserve(policy, "gpt-4o-mini", {"messages": [], "max_tokens": 10})
    assert reservation is not None and reservation.holds
    day = spend_counter("alice", utc_day())
    assert amounts(app, day)[0][1] == pytest.approx(reservation.holds[0].amount)
    limits.charge(policy, TokenUsage(0, 4, 4, False), reservation)  # no usage reported: prompt estimated
    expected = (reservation.prompt_tokens + 4) * COSTS_PER_TOKEN
    assert amounts(app, day) == [(pytest.approx(expected), 0.0)]


def test_unkeyed_and_unlimited_requests_reserve_nothing(files: tuple[Path, Path], transport: FakeTransport) -> None:
    """Without limits configured nothing is counted; a key without budgets holds nothing."""
    plain = create_app(unit_config())
    assert plain.extensions["relay"].limits.reserve(
        plain.extensions["relay"].config.keyring.policies[0], "gpt-4o-mini", HELLO) is None
    app = budget_app(files, transport)
    client: FlaskClient = app.test_client()
    assert finished(client.post("/chat", json=chat_body(10), headers=alice())) == 200
    # Priced: what it cost is still recorded, for `keys list`.
    assert amounts(app, spend_counter("alice", utc_month())) == [(pytest.approx(3 * COSTS_PER_TOKEN), 0.0)]
