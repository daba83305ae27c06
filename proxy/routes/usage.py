"""Reading the usage ledger over HTTP (proxy/ledger/report.py does the counting):

- `GET /usage?since=7d&key=NAME&by=day|model|key`: every key's usage, for whoever holds ADMIN_KEY
  (`Authorization: Bearer <ADMIN_KEY>`); JSON `{"since", "by", "key", "rows": [...]}`, the rows as
  `python -m proxy usage` prints them;
- `GET /v1/usage/me`: the caller's own key, today and this month (UTC): requests, tokens and cost.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from flask import Blueprint, Response, jsonify, request

from proxy.access import presented_key
from proxy.config import Config
from proxy.errors import BadRequest, Forbidden, LedgerUnavailable, Unauthorized
from proxy.ledger import LedgerUnavailable as NoLedger
from proxy.ledger.report import ReportError, parse_query
from proxy.pipeline import endpoint
from proxy.relay import current_relay
from proxy.request_state import RequestState, request_state

bp = Blueprint("usage", __name__)
T = TypeVar("T")


def check_admin(_state: RequestState, config: Config) -> None:
    """`GET /usage`' guard (proxy/pipeline.py): ADMIN_KEY, which is not an access key."""
    if not config.admin_key:
        raise Forbidden("GET /usage is off: set ADMIN_KEY to read every key's usage", kind="usage_forbidden")
    presented = presented_key(request.headers.get("Authorization")).encode()
    if not hmac.compare_digest(presented, config.admin_key.encode()):
        raise Unauthorized("missing or wrong admin key: send 'Authorization: Bearer <ADMIN_KEY>'")


@bp.get("/usage")
# The admin key is not an access key (its guard checks it), and `key` names the key to report on, not the
# caller: declared public so that the pipeline decides no caller (its one-caller rule would refuse `?key=alice`).
@endpoint("json", access="public", guard=check_admin)
def all_usage() -> Response:
    relay = current_relay()
    try:
        query = parse_query(request.args.get("since"), request.args.get("key"), request.args.get("by"))
    except ReportError as exc:
        raise BadRequest(str(exc)) from None
    rows = _read(lambda: relay.ledger.usage(query))
    return jsonify(since=query.since.isoformat(), by=query.by, key=query.key, rows=rows)


@bp.get("/v1/usage/me")
@endpoint("openai")
def my_usage() -> Response:
    relay = current_relay()
    caller = request_state().caller
    assert caller is not None  # access="key": the pipeline refused a request without one
    return jsonify(_read(lambda: relay.ledger.own_usage(caller.name)))


def _read(query: Callable[[], T]) -> T:
    try:
        return query()
    except (sa.exc.SQLAlchemyError, NoLedger, OSError):
        raise LedgerUnavailable() from None
