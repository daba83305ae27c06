"""Keeping the ledger small: raw rows older than LEDGER_RETENTION_DAYS are added to the per-day, per-key,
per-model totals (`ledger_daily`) and deleted, in small batches, each batch one transaction.

Totals stay exact: a batch's rows are added and deleted in the same transaction, so every row is counted in
exactly one of the two tables at any moment (`proxy/ledger/report.py` reads both). Two relays rolling up at
once cannot count a row twice: each batch deletes exactly the rows it read or rolls back (on PostgreSQL the
rows are read `FOR UPDATE SKIP LOCKED`, so two workers take different batches, and batches take turns).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from proxy.ledger.schema import TOTAL_COLUMNS, daily, requests

BATCH_ROWS = 2000
SUMMED = ("requests", "errors", *TOTAL_COLUMNS, "cost_nanos", "unpriced")


class RaceLost(Exception):
    """Another roll-up took some of this batch's rows first: the batch is rolled back, nothing counted."""


def cutoff_day(retention_days: int, today: date | None = None) -> date:
    """Rows of days before this one are rolled up: `retention_days` whole days are kept raw, today included."""
    return (today or datetime.now(UTC).date()) - timedelta(days=retention_days - 1)


def roll_up(engine: sa.Engine, retention_days: int, max_batches: int = 50, today: date | None = None) -> int:
    """Roll up to `max_batches` batches of old rows; how many rows were rolled up."""
    before = cutoff_day(retention_days, today)
    moved = 0
    for _ in range(max_batches):
        try:
            count = roll_up_batch(engine, before)
        except RaceLost:
            continue
        moved += count
        if count < BATCH_ROWS:
            break
    return moved


# Roll-ups of every relay on one PostgreSQL take turns (a transaction-scoped advisory lock): two batches
# adding to the same daily totals in different orders would otherwise deadlock.
ROLL_UP_LOCK = 0x72656C6179  # "relay"


def roll_up_batch(engine: sa.Engine, before: date) -> int:
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(ROLL_UP_LOCK)))
        # Any BATCH_ROWS old rows will do: no ORDER BY, so the day index serves them without a sort.
        query = sa.select(requests).where(requests.c.day < before).limit(BATCH_ROWS)
        if connection.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        rows = connection.execute(query).mappings().all()
        if not rows:
            return 0
        ids = [row["id"] for row in rows]
        deleted = connection.execute(sa.delete(requests).where(requests.c.id.in_(ids))).rowcount
        if deleted != len(ids):
            raise RaceLost
        add_to_daily(connection, group_totals(rows))
        return len(ids)


def group_totals(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """The rows' sums per (day, key, model), in `ledger_daily`'s columns."""
    groups: dict[tuple[date, str, str], dict[str, Any]] = {}
    for row in rows:
        group = (row["day"], row["key_name"], row["model"])
        totals = groups.setdefault(group, {"day": group[0], "key_name": group[1], "model": group[2],
                                           **dict.fromkeys(SUMMED, 0)})
        totals["requests"] += 1
        totals["errors"] += row["outcome"] != "ok"
        for column in TOTAL_COLUMNS:
            totals[column] += row[column]
        if row["cost_nanos"] is None:
            totals["unpriced"] += 1
        else:
            totals["cost_nanos"] += row["cost_nanos"]
    return [groups[group] for group in sorted(groups)]  # one order for every writer of the same totals


def add_to_daily(connection: sa.Connection, groups: list[dict[str, Any]]) -> None:
    """INSERT each group's totals, or add them to the day's existing ones (both dialects say it the same)."""
    insert = (postgresql.insert(daily) if connection.dialect.name == "postgresql" else sqlite.insert(daily))
    statement = insert.on_conflict_do_update(
        index_elements=[daily.c.day, daily.c.key_name, daily.c.model],
        set_={column: daily.c[column] + insert.excluded[column] for column in SUMMED},
    )
    connection.execute(statement, groups)
