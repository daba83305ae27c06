"""`GET /doctor`: a test stream for the path between a client and the relay (no upstream involved).

It sends timestamped records with a steady rhythm, then stays silent for a long gap, then sends a few more,
exactly as an answer would travel: the records come from an in-process stand-in upstream and go through
the same SDK, SSE parsing, pump (keep-alive lines every KEEPALIVE_SECONDS during the gap) and NDJSON
encoder as `POST /chat`. `python -m proxy doctor URL KEY` reads it and says what the path did to it.

Query parameters: `records` (rhythm records, default 8), `interval` (seconds between them, default 0.5),
`gap` (seconds of silence, default 75: longer than nginx's default 60 s read timeout, shorter than
Cloudflare's 100 s), `after` (records after the gap, default 3). Each record's `content` is a JSON
object: `{"seq", "phase", "sent"}` (`sent`: the relay's clock, Unix seconds); the first one also carries
the plan and what the relay saw of the proxies on the way in.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Blueprint, Response, request

from proxy.chat_stream import NDJSON_HEADERS, stream_response
from proxy.config import Config
from proxy.encoders import NdjsonEncoder
from proxy.errors import BadRequest
from proxy.pipeline import endpoint
from proxy.relay import current_relay
from proxy.standin import SSE_END, Timed, sse_chunk, stand_in_upstream
from proxy.upstream import Upstream

bp = Blueprint("doctor", __name__)

DOCTOR_MODEL = "relay-doctor"
# Request headers that tell which proxies a request went through; shown back to the doctor client.
PROXY_HEADERS = ("Via", "X-Forwarded-For", "X-Forwarded-Proto", "X-Real-IP", "Forwarded", "CF-Connecting-IP",
                 "CF-Ray", "X-Amzn-Trace-Id", "Fastly-Client-IP")
LIMITS = {"records": (1, 50), "interval": (0.05, 5.0), "gap": (0.0, 600.0), "after": (1, 20)}
DEFAULTS = {"records": 8, "interval": 0.5, "gap": 75.0, "after": 3}


@dataclass(frozen=True)
class DoctorPlan:
    """The test stream asked for; its `model` is the stand-in's, which no key's model list needs to allow."""

    plan: dict[str, Any]
    model: str = DOCTOR_MODEL

    @property
    def upstream_body(self) -> dict[str, Any]:
        return {"model": DOCTOR_MODEL, "messages": [{"role": "user", "content": "doctor"}]}


def shape_doctor_query(args: Mapping[str, str], config: Config) -> DoctorPlan:
    return DoctorPlan(read_plan(args, config.idle_timeout))


@bp.get("/doctor")
@endpoint("ndjson", streams=True, query=shape_doctor_query, checks_model=False)
def doctor(shaped: DoctorPlan) -> Response:
    relay = current_relay()
    seen = {name: request.headers[name] for name in PROXY_HEADERS if name in request.headers}
    plan_record = {**shaped.plan, "keepalive_seconds": relay.timers.keepalive, "seen_headers": seen,
                   "peer": request.environ.get("werkzeug.proxy_fix.orig_remote_addr", request.remote_addr)}
    body = {**shaped.upstream_body, "doctor": plan_record}
    return stream_response(relay, body, NdjsonEncoder(), NDJSON_HEADERS, upstreams=(doctor_upstream(),))


def read_plan(args: Mapping[str, str], idle_timeout: float) -> dict[str, Any]:
    plan: dict[str, Any] = {}
    for name, (low, high) in LIMITS.items():
        raw = args.get(name)
        if raw is None:
            plan[name] = DEFAULTS[name]
            continue
        try:
            number = int(raw) if isinstance(low, int) else float(raw)
        except ValueError:
            raise BadRequest(f"'{name}' must be a number between {low} and {high}") from None
        if not low <= number <= high:
            raise BadRequest(f"'{name}' must be between {low} and {high}")
        plan[name] = number
    if plan["gap"] >= idle_timeout:
        raise BadRequest(f"'gap' must be shorter than this relay's IDLE_TIMEOUT ({idle_timeout:g} s), "
                         "or the relay itself would end the stream")
    return plan


def doctor_rhythm(body: dict[str, Any]) -> Iterator[Timed]:
    """The stand-in upstream's SSE body: the rhythm, the silent gap, the last records, [DONE]."""
    plan = body.get("doctor", {})
    schedule = ([("rhythm", 0.0)] + [("rhythm", plan["interval"])] * (plan["records"] - 1)
                + [("after_gap", plan["gap"])] + [("after_gap", plan["interval"])] * (plan["after"] - 1))
    for seq, (phase, wait) in enumerate(schedule):
        yield wait, functools.partial(_record, seq, phase, plan if seq == 0 else None)
    yield 0.0, sse_chunk(DOCTOR_MODEL, {}, "stop", completion_id="chatcmpl-doctor") + SSE_END


def _record(seq: int, phase: str, plan: dict[str, Any] | None) -> bytes:
    """A doctor record, stamped when it is due (`sent`: the relay's clock, Unix seconds)."""
    record: dict[str, Any] = {"seq": seq, "phase": phase, "sent": time.time()}
    if plan is not None:
        record["plan"] = plan
    return sse_chunk(DOCTOR_MODEL, {"content": orjson.dumps(record).decode()}, completion_id="chatcmpl-doctor")


def doctor_upstream() -> Upstream:
    return stand_in_upstream("doctor", doctor_rhythm)
