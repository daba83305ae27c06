"""When each step of one request happens before its first token, in-process, at concurrency 1.

    .venv/bin/python -m bench.phases_c1 [--path /v1/responses] [--streams 1500] [--tokens 20] [--interval 0]

The relay's WSGI app is called directly under gevent (no gunicorn, no client socket) against the fake
upstream, one stream after the other. Each step's first entry is timed from the app's call (µs, medians of
the last three quarters of the streams): the request context, the pipeline's begin, the view, the upstream
send and the answer's head (the lane's `Connections.exchange`), the app's return and the first token.
"The relay's own" is the first token's time less the upstream's (from the send to the answer's head): what
the relay itself spends before the first token. A one-line timing wrapper adds ~1 µs per step.

It complements `bench.profile_c1` (CPU by part, under gunicorn): this one has the order and the wall time of
the steps, with nothing but the relay and the fake upstream running.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after gevent's patching, as under gunicorn's gevent worker)
import functools  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from typing import Any  # noqa: E402

from bench.loadgen import StreamSpec  # noqa: E402
from bench.procs import start_fake_upstream  # noqa: E402

KEY = "bench-key-0123456789abcdef"
# (label, module:attribute): where each step begins; a step a path does not take is left out.
STEPS = (
    ("request context pushed, routing done", "flask.app:Flask.preprocess_request"),
    ("pipeline begin", "proxy.pipeline:_begin"),
    ("the view called", "flask.app:Flask.dispatch_request"),
    ("the body read", "proxy.shaping:read_body"),
    ("the upstream request sent", "proxy.upstream_wire:Connections.exchange"),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="/v1/responses", help="/chat, /v1/chat/completions or /v1/responses")
    parser.add_argument("--streams", type=int, default=1500)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds between tokens: with 0 the whole answer may come in the first read")
    args = parser.parse_args(argv)
    fake = start_fake_upstream()
    try:
        url = f"http://{fake.host}:{fake.port}/v1"
        os.environ.update({"AUTHORIZATION_KEY": KEY, "OPENAI_API_KEY": "sk-fake", "OPENAI_BASE_URL": url,
                           "DEFAULT_MODEL": "bench-model", "LOG_FLUSH_SECONDS": "0.1"})
        rows = measure(args.path, args.streams, StreamSpec(n_tokens=args.tokens, token_interval=args.interval))
    finally:
        fake.stop()
    report(args.path, rows)


def measure(path: str, streams: int, spec: StreamSpec) -> list[dict[str, float]]:
    marks: dict[str, float] = {}
    start = [0.0]
    for label, target in STEPS:
        _mark_entry(target, label, marks, start)
    _mark_head(marks, start)
    from proxy import create_app

    app = create_app()
    payload, auth = _request(path, spec)
    rows = []
    for _ in range(streams):
        marks.clear()
        start[0] = time.perf_counter()
        answer = app(_environ(path, payload, auth), _ignore)
        marks["the app returned its response"] = time.perf_counter() - start[0]
        chunks = iter(answer)
        for chunk in chunks:
            if b"tok" in chunk:
                break
        marks["the first token handed to the server"] = time.perf_counter() - start[0]
        for _chunk in chunks:
            pass
        getattr(answer, "close", _ignore)()
        rows.append(dict(marks))
    return rows[streams // 4:]


def report(path: str, rows: list[dict[str, float]]) -> None:
    labels = [label for label, _ in STEPS] + ["the answer's head read", "the app returned its response",
                                              "the first token handed to the server"]
    print(f"{path}, c=1, in-process, {len(rows)} streams (medians, µs after the app is called):")
    for label in sorted((label for label in labels if all(label in row for row in rows)),
                        key=lambda label: statistics.median(row[label] for row in rows)):
        print(f"  {statistics.median(row[label] for row in rows) * 1e6:7.0f}  {label}")
    send, head, first = "the upstream request sent", "the answer's head read", "the first token handed to the server"
    if all(send in row and head in row for row in rows):
        own = statistics.median(row[first] - (row[head] - row[send]) for row in rows)
        after = statistics.median(row[first] - row[head] for row in rows)
        print(f"  the relay's own before the first token: {own * 1e6:.0f} µs ({after * 1e6:.0f} after the head)")


def _mark_entry(target: str, label: str, marks: dict[str, float], start: list[float]) -> None:
    owner, name = _owner(target)
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def entered(*args: Any, **kwargs: Any) -> Any:
        marks.setdefault(label, time.perf_counter() - start[0])
        return original(*args, **kwargs)

    setattr(owner, name, entered)
    for module in list(sys.modules.values()):  # names imported elsewhere before (`from x import f`)
        if module is not None and getattr(module, name, None) is original:
            setattr(module, name, entered)


def _mark_head(marks: dict[str, float], start: list[float]) -> None:
    from proxy import upstream_wire

    original = upstream_wire.Connections.exchange

    def exchange(self: Any, *args: Any) -> Any:
        answer = original(self, *args)
        marks.setdefault("the answer's head read", time.perf_counter() - start[0])
        return answer

    upstream_wire.Connections.exchange = exchange  # type: ignore[method-assign]


def _owner(target: str) -> tuple[Any, str]:
    module_name, _, attribute = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def _request(path: str, spec: StreamSpec) -> tuple[bytes, str]:
    if path == "/v1/responses":
        body: dict[str, Any] = {"model": "bench-model", "input": spec.fake_override(), "stream": True}
    else:
        body = {"model": "bench-model", "messages": [{"role": "user", "content": spec.fake_override()}]}
        if path != "/chat":
            body["stream"] = True
    return json.dumps(body).encode(), KEY if path == "/chat" else f"Bearer {KEY}"


def _environ(path: str, payload: bytes, auth: str) -> dict[str, Any]:
    return {"REQUEST_METHOD": "POST", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "5555", "HTTP_HOST": "127.0.0.1:8000",
            "HTTP_AUTHORIZATION": auth, "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(payload)),
            "HTTP_ACCEPT": "*/*", "wsgi.input": io.BytesIO(payload), "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True,
            "wsgi.run_once": False, "wsgi.version": (1, 0)}


def _ignore(*_args: Iterable[Any]) -> None:
    return None


if __name__ == "__main__":
    main()
