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

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import orjson
from flask import Blueprint, Response, g, request

from proxy.access import authenticate
from proxy.encoders import NdjsonEncoder
from proxy.errors import BadRequest, error_shape
from proxy.relay import current_relay
from proxy.routes.chat import NDJSON_HEADERS, stream_response
from proxy.upstream import Upstream

bp = Blueprint("doctor", __name__)

DOCTOR_MODEL = "relay-doctor"
# Request headers that tell which proxies a request went through; shown back to the doctor client.
PROXY_HEADERS = ("Via", "X-Forwarded-For", "X-Forwarded-Proto", "X-Real-IP", "Forwarded", "CF-Connecting-IP",
                 "CF-Ray", "X-Amzn-Trace-Id", "Fastly-Client-IP")
LIMITS = {"records": (1, 50), "interval": (0.05, 5.0), "gap": (0.0, 600.0), "after": (1, 20)}
DEFAULTS = {"records": 8, "interval": 0.5, "gap": 75.0, "after": 3}


@bp.get("/doctor")
@error_shape("ndjson")
def doctor() -> Response:
    relay = current_relay()
    access = g.access
    access.key_name = authenticate(relay.config, request.headers.get("Authorization"))
    plan = read_plan(request.args, relay.timers.idle)
    access.model = DOCTOR_MODEL
    seen = {name: request.headers[name] for name in PROXY_HEADERS if name in request.headers}
    plan_record = {**plan, "keepalive_seconds": relay.timers.keepalive, "seen_headers": seen,
                   "peer": request.environ.get("werkzeug.proxy_fix.orig_remote_addr", request.remote_addr)}
    body = {"model": DOCTOR_MODEL, "messages": [{"role": "user", "content": "doctor"}], "doctor": plan_record}
    return stream_response(relay, access, body, NdjsonEncoder(), NDJSON_HEADERS, upstreams=(doctor_upstream(),))


def read_plan(args: Any, idle_timeout: float) -> dict[str, Any]:
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


class DoctorRhythm(httpx2.SyncByteStream):
    """The stand-in upstream's SSE body: the rhythm, the silent gap, the last records, [DONE]."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        plan = self.plan
        schedule = ([("rhythm", 0.0)] + [("rhythm", plan["interval"])] * (plan["records"] - 1)
                    + [("after_gap", plan["gap"])] + [("after_gap", plan["interval"])] * (plan["after"] - 1))
        for seq, (phase, wait) in enumerate(schedule):
            if wait and self.closed.wait(wait):
                return  # the relay closed the stream: the client left
            record: dict[str, Any] = {"seq": seq, "phase": phase, "sent": time.time()}
            if seq == 0:
                record["plan"] = plan
            yield _sse_content(orjson.dumps(record).decode())
        yield _sse_finish() + b"data: [DONE]\n\n"

    def close(self) -> None:
        self.closed.set()


def _sse_content(text: str) -> bytes:
    chunk = {"id": "chatcmpl-doctor", "object": "chat.completion.chunk", "model": DOCTOR_MODEL,
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _sse_finish() -> bytes:
    chunk = {"id": "chatcmpl-doctor", "object": "chat.completion.chunk", "model": DOCTOR_MODEL,
             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class DoctorTransport(httpx2.BaseTransport):
    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        plan = orjson.loads(request.read()).get("doctor", {})
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=DoctorRhythm(plan))


def doctor_upstream() -> Upstream:
    client = openai.OpenAI(api_key="doctor", base_url="http://doctor.invalid/v1", max_retries=0,
                           http_client=httpx2.Client(transport=DoctorTransport()))
    return Upstream("doctor", client)
