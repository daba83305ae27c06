"""The ledger's tables, declared once (SQLAlchemy Core). Alembic's migrations (`proxy/ledger/migrations`)
create and change them; `tests/unit/test_ledger_store.py` checks that the migrations build exactly these.

Never a key and never content: a row names the key by its configured name only.
Money is kept as whole nano-units (`cost_nanos`, 1e-9 of the price table's currency) so that sums stay
exact across the roll-up; NULL means "no price known" (the `cost_of` hook, `proxy/ledger/row.py`).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# One row per request (per answer on a WebSocket), kept LEDGER_RETENTION_DAYS, then rolled up.
requests = sa.Table(
    "ledger_requests", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),  # UTC, when the request began
    sa.Column("day", sa.Date(), nullable=False),  # the UTC day of `time`: the roll-up's and queries' unit
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("key_name", sa.String(200), nullable=False),  # "-" for a request without a key
    sa.Column("route", sa.String(200), nullable=False),
    sa.Column("protocol", sa.String(20), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),  # asked for ("-" when none)
    sa.Column("upstream", sa.String(200), nullable=True),  # the one that answered
    sa.Column("answered_model", sa.String(200), nullable=True),  # as the upstream named it, when it did
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("outcome", sa.String(40), nullable=False),  # ok, client_gone, or an error kind
    sa.Column("prompt_tokens", sa.Integer(), nullable=False),
    sa.Column("completion_tokens", sa.Integer(), nullable=False),
    sa.Column("reasoning_tokens", sa.Integer(), nullable=False),
    sa.Column("cached_tokens", sa.Integer(), nullable=False),
    sa.Column("usage_reported", sa.Boolean(), nullable=False),  # else completion = content deltas counted
    sa.Column("cost_nanos", sa.BigInteger(), nullable=True),
    sa.Column("ttft_ms", sa.Float(), nullable=True),
    sa.Column("duration_ms", sa.Float(), nullable=False),
    sa.Index("ix_ledger_requests_day_key", "day", "key_name"),
)

# Per UTC day, key and model: the rolled-up rows' totals, kept indefinitely.
daily = sa.Table(
    "ledger_daily", metadata,
    sa.Column("day", sa.Date(), primary_key=True),
    sa.Column("key_name", sa.String(200), primary_key=True),
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("requests", sa.BigInteger(), nullable=False),
    sa.Column("errors", sa.BigInteger(), nullable=False),  # outcome other than ok
    sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
    sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
    sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
    sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
    sa.Column("cost_nanos", sa.BigInteger(), nullable=False),  # of the priced requests
    sa.Column("unpriced", sa.BigInteger(), nullable=False),  # requests whose cost was unknown
)

TOTAL_COLUMNS = ("prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens")
