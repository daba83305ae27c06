"""Where one request's CPU goes at concurrency 1: py-spy on one gunicorn worker, summed by part of the path.

    sudo .venv/bin/python -m bench.profile_c1 [--target relay|forwarder] [--path /chat] [--seconds 15]
    sudo .venv/bin/python -m bench.profile_c1 --concurrency 200 --tokens 20 --interval 0.05   # slow streams

Starts the fake upstream and the target with ONE worker (so every request lands in the sampled process),
warms it up, then runs sequential streams (2 tokens each: the per-request path, not per-token work) while
`py-spy record --gil` samples the worker. GIL-holding samples are the worker's Python CPU time; plain sampling
would count time spent runnable-but-descheduled on a busy machine as work. Prints each part's share and its
µs per request (samples × interval ÷ streams). py-spy needs ptrace rights (root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.loadgen import StreamSpec, Target, run_load
from bench.procs import Server, descendants, export_revision, start_fake_upstream, start_forwarder, start_relay

RATE = 500  # samples per second
# (part, frame marker): a stack counts for the part of the DEEPEST marker it contains.
PARTS = (
    ("gunicorn: parse the request, write the response", "AsyncWorker.handle ("),
    ("Flask + werkzeug: request context, routing, response iteration", "Flask.__call__ ("),
    ("Flask + werkzeug: request context, routing, response iteration", "ClosingIterator."),
    ("pipeline begin: request id, access record, caller", "_begin (proxy/pipeline.py"),
    ("limits: admit and settle", "(proxy/limits.py"),
    ("read and shape the body", "shape_input (proxy/pipeline.py"),
    ("pipeline after_request: headers, metrics", "_finish (proxy/pipeline.py"),
    ("close: the stream slot and budgets settled, the request's records handed over", "close_request (proxy/pipeline"),
    ("records, a later batch: the ledger's row and the rest", "write_records (proxy/pipeline.py"),
    ("records, a later batch: metrics", "Metrics.record ("),
    ("records, a later batch: access-log line", "AccessRecord.write ("),
    ("forwarded: the request read, its model admitted", "read_request (proxy/routes/passthrough.py"),
    ("forwarded: the lane's send and response head", "forward_stream (proxy/upstream_wire.py"),
    ("forwarded: the answer's status, headers and source", "answer (proxy/forwarded_answer.py"),
    ("forwarded: the events read, checked and passed on", "relay_sse (proxy/forwarding.py"),
    ("pump, stream machine, encoder", "pump (proxy/pump.py"),
    ("open the stream's source (before: start the reader greenlet and its inbox)", "_Wiring.__init__ ("),
    ("upstream: body and request built (relay code)", "_request (proxy/upstream.py"),
    ("upstream: SDK request path (chat.completions.create)", "Completions.create ("),
    ("upstream: SDK request build (options, transforms, headers)", "BaseClient._build_request ("),
    ("upstream: httpx2/httpcore/h11 send and response head", "Client.send (httpx2"),
    ("upstream: the chat request's own lane, send and response head", "WireLane.send ("),
    ("upstream: httpcore's idle-connection check (gevent poll)", "has_expired ("),
    ("upstream: read and parse the body (reader greenlet)", "UpstreamStream.read_into ("),
    ("upstream: drain the body's end, connection back to the pool", "UpstreamStream._drain ("),
    ("upstream: read and parse the body (the pump's own read)", "DirectSource.next_item ("),
    ("upstream: drain the body's end, connection back to the pool", "DirectBody.finish ("),
    ("gunicorn worker: ledger thread (not the request path)", "LedgerWriter._run ("),
    ("start-up imports (not the request path)", "_run_module_as_main ("),
    ("bare forwarder: urllib3 request and response head", "HTTPConnectionPool.urlopen ("),
    ("bare forwarder: read, parse and encode the records", "records (bench/forwarder.py"),
)
LINE_NUMBER = re.compile(r":\d+\)")


def parts(raw: str) -> tuple[int, collections.Counter[str]]:
    """Samples in py-spy's raw (collapsed) output, and their count per part."""
    total = 0
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        samples = int(number)
        total += samples
        part = "gevent hub and the rest"
        for frame in LINE_NUMBER.sub(")", stack).split(";"):
            for name, marker in PARTS:
                if marker in frame:
                    part = name
        counts[part] += samples
    return total, counts


async def drive(target: Target, seconds: float, spec: StreamSpec, concurrency: int) -> int:
    await run_load(target, StreamSpec(n_tokens=2), 1, requests_per_worker=200)  # warm-up
    ramp = spec.n_tokens * spec.token_interval
    load = await run_load(target, spec, concurrency, duration=seconds, ramp_seconds=ramp)
    if load.errors:
        raise SystemExit(f"streams failed: {load.errors}")
    return len(load.results)


def start(kind: str, fake: Server, revision: str | None) -> tuple[Server, str]:
    url = f"http://{fake.host}:{fake.port}/v1"
    if kind == "forwarder":
        return start_forwarder(url, "sk-fake-upstream", 1), "none"
    key = "bench-" + secrets.token_hex(8)
    env = {"AUTHORIZATION_KEY": key, "OPENAI_API_KEY": "sk-fake-upstream", "OPENAI_BASE_URL": url,
           "DEFAULT_MODEL": "bench-model", "GUNICORN_WORKERS": "1"}
    if revision is None:
        return start_relay(env), key
    return start_relay(env, checkout=export_revision(revision, Path(tempfile.mkdtemp(prefix="profile-rev-")))), key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("relay", "forwarder"), default="relay")
    parser.add_argument("--path", default="/chat", help="/chat, /v1/chat/completions or /v1/responses")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--revision", help="profile the relay as of this git revision instead (before/after)")
    parser.add_argument("--tokens", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between upstream tokens")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    fake = start_fake_upstream()
    server, key = start(args.target, fake, args.revision)
    try:
        worker = next(pid for pid in descendants(server.process.pid) if pid != server.process.pid)
        path = "/chat" if args.target == "forwarder" else args.path
        protocol = {"/chat": "ndjson", "/v1/responses": "responses"}.get(path, "sse")
        target = Target(args.target, server.host, server.port, path, protocol,  # type: ignore[arg-type]
                        key if protocol == "ndjson" else f"Bearer {key}")
        out = Path(tempfile.mkdtemp(prefix="profile-c1-")) / "stacks.txt"
        recorder = subprocess.Popen([spy, "record", "--gil", "-r", str(RATE), "-p", str(worker), "-f", "raw",
                                     "-o", str(out), "-d", str(int(args.seconds))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spec = StreamSpec(n_tokens=args.tokens, token_interval=args.interval)
        streams = asyncio.run(drive(target, args.seconds, spec, args.concurrency))
        recorder.wait()
    finally:
        server.stop()
        fake.stop()
    total, counts = parts(out.read_text())
    per_request = total / RATE / streams * 1e6
    print(f"{args.target} {path}, c={args.concurrency}, {args.tokens} tokens {args.interval:g} s apart: {streams} "
          f"streams, {total} GIL samples, {per_request:.0f} µs of worker CPU per request (raw stacks: {out})")
    for name, samples in counts.most_common():
        print(f"{100 * samples / total:5.1f}%  {per_request * samples / total:5.0f} µs  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
