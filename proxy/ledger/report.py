"""Reading the ledger: totals per day, model or key, exact because every request is counted in exactly one
place, its raw row or (after the roll-up) its day's totals; both are read and added.

`since` is a UTC day: `7d` means today and the 6 days before it (whole days, as the roll-up keeps them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from proxy.ledger.schema import TOTAL_COLUMNS, daily, requests

Grouping = Literal["day", "model", "key"]
GROUPINGS: tuple[Grouping, ...] = ("day", "model", "key")
_SINCE = re.compile(r"(\d{1,5})d")


class ReportError(ValueError):
    """A query parameter the report cannot use; the message says what is expected."""


@dataclass(frozen=True)
class UsageQuery:
    since: date
    key: str | None = None
    by: Grouping = "day"


def parse_since(text: str, today: date | None = None) -> date:
    """`7d` (today and the 6 days before), `1d` (today), or a date `2026-11-01`."""
    today = today or datetime.now(UTC).date()
    matched = _SINCE.fullmatch(text.strip())
    if matched and int(matched.group(1)) > 0:
        return today - timedelta(days=int(matched.group(1)) - 1)
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise ReportError("'since' must be a number of days like 7d, or a date like 2026-11-01") from None


def parse_query(since: str | None, key: str | None, by: str | None) -> UsageQuery:
    """The report's parameters as the CLI and GET /usage take them (each optional: 30d, every key, by day)."""
    grouping = by or "day"
    if grouping not in GROUPINGS:
        raise ReportError("'by' must be day, model or key")
    return UsageQuery(parse_since(since or "30d"), key or None, grouping)


def usage(engine: sa.Engine, query: UsageQuery) -> list[dict[str, Any]]:
    """One dict per group, in group order: requests, errors, the four token counts, cost (None when no
    request of the group had a price) and how many requests had none."""
    merged: dict[str, dict[str, Any]] = {}
    with engine.connect() as connection:
        for table_rows in (_rolled_up(connection, query), _raw(connection, query)):
            for row in table_rows:
                group = str(row["grp"])
                totals = merged.setdefault(group, {query.by: group, "requests": 0, "errors": 0,
                                                   **dict.fromkeys(TOTAL_COLUMNS, 0), "cost_nanos": 0,
                                                   "unpriced": 0})
                for name in ("requests", "errors", *TOTAL_COLUMNS, "cost_nanos", "unpriced"):
                    totals[name] += int(row[name] or 0)
    return [_with_cost(merged[group]) for group in sorted(merged)]


def _with_cost(totals: dict[str, Any]) -> dict[str, Any]:
    nanos = totals.pop("cost_nanos")
    priced = totals["requests"] - totals["unpriced"]
    return {**totals, "cost": nanos / 1_000_000_000 if priced else None}


def _group_column(table: sa.Table, by: Grouping) -> sa.ColumnElement[Any]:
    return {"day": table.c.day, "model": table.c.model, "key": table.c.key_name}[by]


def _rolled_up(connection: sa.Connection, query: UsageQuery) -> list[Any]:
    group = _group_column(daily, query.by).label("grp")
    sums = [sa.func.sum(daily.c[name]).label(name)
            for name in ("requests", "errors", *TOTAL_COLUMNS, "cost_nanos", "unpriced")]
    statement = sa.select(group, *sums).where(daily.c.day >= query.since).group_by(group)
    if query.key is not None:
        statement = statement.where(daily.c.key_name == query.key)
    return list(connection.execute(statement).mappings())


def _raw(connection: sa.Connection, query: UsageQuery) -> list[Any]:
    group = _group_column(requests, query.by).label("grp")
    not_ok = sa.case((requests.c.outcome != "ok", 1), else_=0)
    unpriced = sa.case((requests.c.cost_nanos.is_(None), 1), else_=0)
    statement = sa.select(
        group, sa.func.count().label("requests"), sa.func.sum(not_ok).label("errors"),
        *(sa.func.sum(requests.c[name]).label(name) for name in TOTAL_COLUMNS),
        sa.func.sum(requests.c.cost_nanos).label("cost_nanos"), sa.func.sum(unpriced).label("unpriced"),
    ).where(requests.c.day >= query.since).group_by(group)
    if query.key is not None:
        statement = statement.where(requests.c.key_name == query.key)
    return list(connection.execute(statement).mappings())


def own_usage(engine: sa.Engine, key_name: str, today: date | None = None) -> dict[str, Any]:
    """A key's totals today and this month (UTC), for GET /v1/usage/me and the chat page."""
    today = today or datetime.now(UTC).date()
    month = usage(engine, UsageQuery(today.replace(day=1), key_name, "day"))
    return {"key": key_name, "today": _sum(row for row in month if row["day"] == today.isoformat()),
            "this_month": _sum(month)}


def _sum(rows: Any) -> dict[str, Any]:
    total: dict[str, Any] = {"requests": 0, **dict.fromkeys(TOTAL_COLUMNS, 0), "cost": None}
    for row in rows:
        total["requests"] += row["requests"]
        for name in TOTAL_COLUMNS:
            total[name] += row[name]
        if row["cost"] is not None:
            total["cost"] = (total["cost"] or 0.0) + row["cost"]
    return total


def table(rows: list[dict[str, Any]], by: Grouping) -> str:
    """The report as a plain-text table (`python -m proxy usage`)."""
    headers = (by, "requests", "errors", "prompt", "completion", "reasoning", "cached", "cost")
    lines = [[str(row[by]), str(row["requests"]), str(row["errors"]),
              *(str(row[name]) for name in TOTAL_COLUMNS),
              "-" if row["cost"] is None else f"{row['cost']:.6f}"] for row in rows]
    if not lines:
        return "no usage recorded in this period\n"
    widths = [max(len(cell) for cell in column) for column in zip(headers, *lines, strict=False)]
    out = ["  ".join(cell.ljust(width) if index == 0 else cell.rjust(width)
                     for index, (cell, width) in enumerate(zip(line, widths, strict=True)))
           for line in [list(headers), *lines]]
    return "\n".join(out) + "\n"
