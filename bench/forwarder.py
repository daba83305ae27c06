"""The bare forwarder: the benchmark's reference for what a Python proxy on this stack costs at least.

A Flask view that takes a `/chat`-style request, forwards it as a streamed chat completion through one pooled
urllib3 connection per worker to the upstream, and answers one JSON record per token (the relay's `/chat`
records): no batching, no checks, no auth, no limits, no logs. A second view, `/v1/responses`, is the same
floor for a Responses stream: the body forwarded as it came, the upstream's events passed on as they are, one
write per event. It runs under gunicorn with the relay's production settings (bench/forwarder_gunicorn.py).
Benchmark-only: it never belongs in proxy/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import orjson
import urllib3
from flask import Flask, Response, request

UPSTREAM = urlsplit(os.environ.get("FORWARD_UPSTREAM", "http://127.0.0.1:8000/v1"))
HEADERS = {"Authorization": f"Bearer {os.environ.get('FORWARD_KEY', '')}", "Content-Type": "application/json"}
pool = urllib3.HTTPConnectionPool(UPSTREAM.hostname or "127.0.0.1", UPSTREAM.port, maxsize=10_000, retries=False)
app = Flask(__name__)


@app.post("/chat")
def chat() -> Response:
    asked = request.get_json()
    body = orjson.dumps({"model": asked["model"], "messages": asked["messages"], "stream": True})
    answer = pool.urlopen("POST", UPSTREAM.path + "/chat/completions", body=body, headers=HEADERS,
                          preload_content=False)

    def records() -> Iterator[bytes]:
        pending = b""
        try:
            for block in answer.stream(None):  # one read per HTTP chunk, to the body's end: the connection is reused
                *lines, pending = (pending + block).split(b"\n")
                for line in lines:
                    if line == b"data: [DONE]":
                        yield b'{"done":true}\n'
                    elif line.startswith(b"data: "):
                        choices = orjson.loads(line[6:]).get("choices")
                        content = choices[0]["delta"].get("content") if choices else None
                        if content:
                            yield orjson.dumps({"content": content}) + b"\n"
        finally:
            answer.release_conn()

    return Response(records(), content_type="application/x-ndjson")


@app.post("/v1/responses")
def responses() -> Response:
    answer = pool.urlopen("POST", UPSTREAM.path + "/responses", body=request.get_data(), headers=HEADERS,
                          preload_content=False)

    def events() -> Iterator[bytes]:
        pending = b""
        try:
            for block in answer.stream(None):
                *whole, pending = (pending + block).split(b"\n\n")
                for event in whole:
                    yield event + b"\n\n"
        finally:
            answer.release_conn()

    return Response(events(), content_type="text/event-stream")
