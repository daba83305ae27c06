"""The benchmark driver: starts every target, runs the scenarios alternating targets, writes the report.

    python -m bench                 # the full benchmark (about 15 minutes), writes docs/benchmarks.md
    python -m bench --profile quick # a shorter run for development
    python -m bench --profile smoke --out /tmp/x --no-litellm   # what CI runs (seconds)

Targets: the fake upstream directly (the limit; its chat and Responses streams), the bare forwarder
(bench/forwarder.py: the stack's floor for a Python forwarder), the relay's `/chat`, `/v1/chat/completions` and
`/v1/responses` under gunicorn with the production config (`deploy/gunicorn.conf.py`; the forwarder under the
same server settings), and the LiteLLM proxy in its own venv.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import json
import os
import platform
import resource
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import litellm_target
from bench.loadgen import LoadResult, StreamSpec, Target, percentile, run_load
from bench.procs import (
    REPO_ROOT,
    ProcessSampler,
    Sample,
    Server,
    StartError,
    export_revision,
    raise_open_file_limit,
    start_fake_upstream,
    start_forwarder,
    start_relay,
)

FAKE_KEY = "sk-fake-upstream"
MODEL = "bench-model"


@dataclasses.dataclass(frozen=True)
class Profile:
    """How much of each scenario to run."""

    name: str
    rounds: int
    ttft_single: int  # sequential streams at concurrency 1
    ttft_levels: tuple[tuple[int, int], ...]  # (concurrency, streams per worker)
    ttft_spec: StreamSpec  # the answer during the concurrent TTFT runs
    throughput_concurrency: int
    throughput_seconds: float
    throughput_tokens: int
    capacity_levels: tuple[int, ...]
    capacity_spec: StreamSpec
    capacity_ramp: float
    charts: bool = True


PROFILES = {
    "full": Profile(
        name="full",
        rounds=2,
        ttft_single=200,
        ttft_levels=((50, 6), (200, 3)),
        ttft_spec=StreamSpec(n_tokens=20, token_interval=0.05),
        throughput_concurrency=32,
        throughput_seconds=8.0,
        throughput_tokens=200,
        capacity_levels=(1000, 2000, 5000),
        capacity_spec=StreamSpec(n_tokens=60, token_interval=1.0, first_token_delay=1.0),
        capacity_ramp=10.0,
    ),
    "quick": Profile(
        name="quick",
        rounds=1,
        ttft_single=50,
        ttft_levels=((50, 2),),
        ttft_spec=StreamSpec(n_tokens=20, token_interval=0.05),
        throughput_concurrency=16,
        throughput_seconds=3.0,
        throughput_tokens=200,
        capacity_levels=(300,),
        capacity_spec=StreamSpec(n_tokens=10, token_interval=1.0, first_token_delay=1.0),
        capacity_ramp=3.0,
    ),
    "smoke": Profile(
        name="smoke",
        rounds=1,
        ttft_single=3,
        ttft_levels=((4, 1),),
        ttft_spec=StreamSpec(n_tokens=5, token_interval=0.01),
        throughput_concurrency=2,
        throughput_seconds=0.2,
        throughput_tokens=50,
        capacity_levels=(5,),
        capacity_spec=StreamSpec(n_tokens=3, token_interval=0.05, first_token_delay=0.05),
        capacity_ramp=0.1,
        charts=False,
    ),
}


ALL_SCENARIOS = frozenset({"ttft", "throughput", "capacity"})
SINGLE_TURN = 10  # streams a target runs at one client before the next target's turn (`scenario_ttft`)


@dataclasses.dataclass
class LiveTarget:
    target: Target
    sampler: ProcessSampler | None  # the processes whose CPU and memory count for this target
    scenarios: frozenset[str] = ALL_SCENARIOS  # the scenarios it takes part in


def _summary(load: LoadResult) -> dict[str, Any]:
    ttfts = load.ttfts()
    return {
        "concurrency": load.concurrency,
        "streams": len(load.results),
        "ok": sum(1 for r in load.results if r.ok),
        "errors": load.errors,
        "tokens": load.tokens,
        "wall_seconds": round(load.wall_seconds, 4),
        "peak_open_streams": load.peak_open_streams,
        "ttft_ms": {
            "p50": _ms(percentile(ttfts, 0.50)),
            "p90": _ms(percentile(ttfts, 0.90)),
            "p99": _ms(percentile(ttfts, 0.99)),
            "max": _ms(ttfts[-1] if ttfts else None),
            "samples": len(ttfts),
        },
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _merge(loads: list[LoadResult]) -> LoadResult:
    first = loads[0]
    merged = LoadResult(
        first.target,
        first.concurrency,
        first.spec,
        sum(x.wall_seconds for x in loads),
        [],
        max(x.peak_open_streams for x in loads),
    )
    for load in loads:
        merged.results.extend(load.results)
    return merged


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Benchmark:
    def __init__(self, profile: Profile, log: Callable[[str], None]) -> None:
        self.profile = profile
        self.log = log
        self.targets: list[LiveTarget] = []
        self.fake_sampler: ProcessSampler | None = None
        self.results: dict[str, Any] = {"ttft": {}, "throughput": {}, "capacity": {}}

    def order(self, round_index: int, scenario: str) -> list[LiveTarget]:
        """The scenario's targets in a rotating order, so no target always runs first or last in a round."""
        targets = [live for live in self.targets if scenario in live.scenarios]
        shift = round_index % len(targets)
        return targets[shift:] + targets[:shift]

    async def warm_up(self) -> None:
        for live in self.targets:
            load = await run_load(live.target, StreamSpec(n_tokens=10), 4, requests_per_worker=5)
            if load.errors:
                raise StartError(f"warm-up against {live.target.name} failed: {load.errors}")

    async def scenario_ttft(self) -> None:
        profile = self.profile
        levels: list[tuple[int, int, StreamSpec]] = [(1, profile.ttft_single, StreamSpec(n_tokens=20))]
        levels += [(c, per, profile.ttft_spec) for c, per in profile.ttft_levels]
        for concurrency, per_worker, spec in levels:
            # At one client the targets take turns of a few streams each: a drift of the machine over the
            # run (another process's load, its clock) then falls on every target alike, where a whole run per
            # target would put it on one of them. Concurrent runs are whole runs: their ramp is part of them.
            batch = min(SINGLE_TURN, per_worker) if concurrency == 1 else per_worker
            collected: dict[str, list[LoadResult]] = {}
            cpu: dict[str, float] = {}
            for round_index in range(profile.rounds):
                self.log(f"ttft c={concurrency} round {round_index + 1}")
                for turn in range(per_worker // batch):
                    for live in self.order(round_index + turn, "ttft"):
                        load, seconds = await self._ttft_turn(live, spec, concurrency, batch)
                        collected.setdefault(live.target.name, []).append(load)
                        if seconds is not None:
                            cpu[live.target.name] = cpu.get(live.target.name, 0.0) + seconds
            rows = {name: _summary(_merge(loads)) for name, loads in collected.items()}
            for name, seconds in cpu.items():
                # CPU time of the target's processes per stream: robust where latency on a shared machine is not.
                rows[name]["target_cpu_us_per_stream"] = round(seconds / max(1, rows[name]["streams"]) * 1e6, 1)
            self.results["ttft"][str(concurrency)] = rows

    async def _ttft_turn(self, live: LiveTarget, spec: StreamSpec, concurrency: int, per_worker: int
                         ) -> tuple[LoadResult, float | None]:
        """One run of `per_worker` streams per client against `live`, and its processes' CPU seconds (read
        from the scheduler: a one-client turn lasts a few clock ticks)."""
        before = live.sampler.exact_cpu_seconds() if live.sampler else None
        load = await run_load(live.target, spec, concurrency, requests_per_worker=per_worker,
                              ramp_seconds=spec.n_tokens * spec.token_interval)
        if live.sampler is None or before is None:
            return load, None
        return load, live.sampler.exact_cpu_seconds() - before

    async def scenario_throughput(self) -> None:
        profile = self.profile
        spec = StreamSpec(n_tokens=profile.throughput_tokens)
        collected: dict[str, list[dict[str, Any]]] = {}
        for round_index in range(profile.rounds):
            for live in self.order(round_index, "throughput"):
                self.log(f"throughput round {round_index + 1}: {live.target.name}")
                fake_before = self.fake_sampler.sample() if self.fake_sampler else None
                target_before = live.sampler.sample() if live.sampler else None
                client_before = _client_cpu()
                load = await run_load(
                    live.target, spec, profile.throughput_concurrency, duration=profile.throughput_seconds
                )
                client_cpu = _client_cpu() - client_before
                row = _summary(load)
                row["client_cpu_seconds"] = round(client_cpu, 3)
                if fake_before is not None and self.fake_sampler is not None:
                    row["fake_cpu_seconds"] = round(self.fake_sampler.sample().cpu_seconds - fake_before.cpu_seconds, 3)
                if target_before is not None and live.sampler is not None:
                    row["target_cpu_seconds"] = round(live.sampler.sample().cpu_seconds - target_before.cpu_seconds, 3)
                collected.setdefault(live.target.name, []).append(row)
        for name, rows in collected.items():
            tokens = sum(r["tokens"] for r in rows)
            wall = sum(r["wall_seconds"] for r in rows)
            streams = sum(r["ok"] for r in rows)
            merged: dict[str, Any] = {
                "rounds": rows,
                "tokens": tokens,
                "streams_ok": streams,
                "errors": _sum_errors(rows),
                "tokens_per_second": round(tokens / wall, 1) if wall else None,
                "streams_per_second": round(streams / wall, 2) if wall else None,
                "client_cpu_us_per_token": _per_token(sum(r["client_cpu_seconds"] for r in rows), tokens),
            }
            if all("target_cpu_seconds" in r for r in rows):
                cpu = sum(r["target_cpu_seconds"] for r in rows)
                merged["target_cpu_seconds"] = round(cpu, 3)
                merged["target_cpu_us_per_token"] = _per_token(cpu, tokens)
                merged["target_cpu_cores_busy"] = round(cpu / wall, 2) if wall else None
            if all("fake_cpu_seconds" in r for r in rows):
                merged["fake_cpu_us_per_token"] = _per_token(sum(r["fake_cpu_seconds"] for r in rows), tokens)
            self.results["throughput"][name] = merged

    async def scenario_capacity(self) -> None:
        profile = self.profile
        spec = profile.capacity_spec
        failed: set[str] = set()
        top = max(profile.capacity_levels)
        for level_index, level in enumerate(profile.capacity_levels):
            for live in self.order(level_index, "capacity"):
                name = live.target.name
                if name in failed:
                    self.log(f"capacity {level}: {name} skipped (failed at a lower level)")
                    continue
                if live.sampler is None and level != top:
                    continue  # the direct upstream only needs to show it holds the top level
                self.log(f"capacity {level}: {name} ({spec.n_tokens} tokens, one per {spec.token_interval:g} s)")
                row = await self._capacity_run(live, level)
                self.results["capacity"].setdefault(name, {})[str(level)] = row
                if row["errors"] or row["ok"] < level:
                    failed.add(name)

    async def _capacity_run(self, live: LiveTarget, level: int) -> dict[str, Any]:
        profile = self.profile
        spec = profile.capacity_spec
        sampler = live.sampler
        baseline = sampler.sample() if sampler else None
        began = time.perf_counter()
        interval = max(0.2, min(1.0, spec.token_interval))
        if sampler is not None:
            sampler.interval = interval
            with sampler.running():
                load = await run_load(
                    live.target,
                    spec,
                    level,
                    requests_per_worker=1,
                    ramp_seconds=profile.capacity_ramp,
                    stream_timeout=spec.n_tokens * spec.token_interval + 60,
                )
            samples = sampler.samples
        else:
            load = await run_load(
                live.target,
                spec,
                level,
                requests_per_worker=1,
                ramp_seconds=profile.capacity_ramp,
                stream_timeout=spec.n_tokens * spec.token_interval + 60,
            )
            samples = []
        row = _summary(load)
        row.pop("ttft_ms")
        if sampler is not None:
            row["process_pid"] = sampler.root_pid  # targets sharing a process share its memory history
        # "Every token in order" is checked per stream by the load generator (wrong_text otherwise).
        if baseline is not None and samples:
            plateau = [s for s in samples if s.at >= began + profile.capacity_ramp]
            peak = max(plateau or samples, key=lambda s: s.pss)
            row["memory"] = {
                "baseline_pss_mib": _mib(baseline.pss),
                "peak_pss_mib": _mib(peak.pss),
                "baseline_rss_mib": _mib(baseline.rss),
                "peak_rss_mib": _mib(max(s.rss for s in (plateau or samples))),
                "pss_kib_per_stream": round((peak.pss - baseline.pss) / 1024 / level, 2),
            }
            cpu = samples[-1].cpu_seconds - baseline.cpu_seconds
            row["target_cpu_seconds"] = round(cpu, 3)
            row["target_cpu_percent_of_one_core"] = round(100 * cpu / load.wall_seconds, 1)
            row["series"] = [_sample_row(s, began, baseline) for s in samples]
        return row

    def write_raw(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        document = {"meta": meta, **self.results}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
        return document


def _sample_row(sample: Sample, began: float, baseline: Sample) -> dict[str, float]:
    return {
        "t": round(sample.at - began, 2),
        "pss_mib": _mib(sample.pss),
        "cpu_seconds": round(sample.cpu_seconds - baseline.cpu_seconds, 3),
    }


def _mib(value: int) -> float:
    return round(value / 1024 / 1024, 2)


def _per_token(cpu_seconds: float, tokens: int) -> float | None:
    return round(cpu_seconds / tokens * 1e6, 2) if tokens else None


def _sum_errors(rows: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in rows:
        for kind, count in row["errors"].items():
            total[kind] = total.get(kind, 0) + count
    return total


def _route_exists(host: str, port: int, path: str, authorization: str) -> bool:
    """True unless the server answers 404/405 for `path` (an unfinished route is skipped, not failed)."""
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": '#fake {"n_tokens":1}'}], "stream": True}
    ).encode()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(
            "POST", path, body=body, headers={"Authorization": authorization, "Content-Type": "application/json"}
        )
        answer = connection.getresponse()
        answer.read()
        return answer.status not in (404, 405)
    finally:
        connection.close()


def _versions() -> dict[str, str]:
    import importlib.metadata

    found = {}
    for package in ("gunicorn", "gevent", "flask", "openai", "httpx2", "orjson", "uvloop"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


async def run(args: argparse.Namespace) -> int:
    profile = PROFILES[args.profile]
    out_dir = Path(args.out).resolve()
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def log(message: str) -> None:
        print(f"bench: {message}", flush=True)

    limit = raise_open_file_limit()
    log(f"open-file limit {limit}")
    servers: list[Server] = []
    bench = Benchmark(profile, log)
    meta: dict[str, Any] = {
        "profile": profile.name,
        "started": started_at,
        "machine": _machine(),
        "versions": _versions(),
        "open_file_limit": limit,
        "skipped": {},
        "settings": {},
    }
    try:
        fake = start_fake_upstream(use_uvloop=not args.no_uvloop)
        servers.append(fake)
        bench.fake_sampler = ProcessSampler(fake.process.pid)
        fake_url = f"http://{fake.host}:{fake.port}/v1"
        log(f"fake upstream at {fake_url}")
        bench.targets.append(
            LiveTarget(
                Target("direct", fake.host, fake.port, "/v1/chat/completions", "sse", f"Bearer {FAKE_KEY}", MODEL), None
            )
        )
        bench.targets.append(
            LiveTarget(
                Target("direct responses", fake.host, fake.port, "/v1/responses", "responses", f"Bearer {FAKE_KEY}",
                       MODEL),
                None,
                frozenset({"ttft"}),
            )
        )
        forwarder = start_forwarder(fake_url, FAKE_KEY, args.relay_workers)
        servers.append(forwarder)
        meta["settings"]["bare forwarder"] = (
            "bench/forwarder.py: a Flask view forwarding through a pooled urllib3 connection, one JSON record per "
            "token, no batching, no checks (its `/v1/responses` view: the upstream's events passed on as they are, "
            "one write per event); gunicorn with deploy/gunicorn.conf.py's server settings "
            f"(bench/forwarder_gunicorn.py), GUNICORN_WORKERS={args.relay_workers}"
        )
        log(f"bare forwarder at http://{forwarder.host}:{forwarder.port}")
        forwarder_sampler = ProcessSampler(forwarder.process.pid)
        bench.targets.append(
            LiveTarget(
                Target("bare forwarder", forwarder.host, forwarder.port, "/chat", "ndjson", "none", MODEL),
                forwarder_sampler,
            )
        )
        bench.targets.append(
            LiveTarget(
                Target("bare forwarder /v1/responses", forwarder.host, forwarder.port, "/v1/responses", "responses",
                       "none", MODEL),
                forwarder_sampler,
                frozenset({"ttft"}),
            )
        )

        relay_key = "bench-" + secrets.token_hex(8)
        relay_env = {
            "AUTHORIZATION_KEY": relay_key,
            "OPENAI_API_KEY": FAKE_KEY,
            "OPENAI_BASE_URL": fake_url,
            "DEFAULT_MODEL": MODEL,
            "GUNICORN_WORKERS": str(args.relay_workers),
        }
        relay = start_relay(relay_env)
        servers.append(relay)
        meta["settings"]["relay"] = (
            "gunicorn -c deploy/gunicorn.conf.py wsgi:app (production config), "
            f"GUNICORN_WORKERS={args.relay_workers}, access log on (INFO)"
        )
        log(f"relay (gunicorn, {args.relay_workers} workers) at http://{relay.host}:{relay.port}")
        relay_sampler = ProcessSampler(relay.process.pid)
        bench.targets.append(
            LiveTarget(
                Target("relay /chat", relay.host, relay.port, "/chat", "ndjson", relay_key, MODEL), relay_sampler
            )
        )
        if _route_exists(relay.host, relay.port, "/v1/chat/completions", f"Bearer {relay_key}"):
            bench.targets.append(
                LiveTarget(
                    Target(
                        "relay /v1", relay.host, relay.port, "/v1/chat/completions", "sse", f"Bearer {relay_key}", MODEL
                    ),
                    relay_sampler,
                )
            )
        else:
            meta["skipped"]["relay /v1"] = "the relay has no /v1/chat/completions route yet"
            log("relay /v1/chat/completions: not there yet, skipped")
        if _route_exists(relay.host, relay.port, "/v1/responses", f"Bearer {relay_key}"):
            bench.targets.append(
                LiveTarget(
                    Target("relay /v1/responses", relay.host, relay.port, "/v1/responses", "responses",
                           f"Bearer {relay_key}", MODEL),
                    relay_sampler,
                    frozenset({"ttft", "throughput"}),
                )
            )
        else:
            meta["skipped"]["relay /v1/responses"] = "the relay has no /v1/responses route yet"

        if args.compare:
            servers.append(_add_compared_relay(bench, meta, args, relay_env, relay_key, log))

        if args.no_litellm:
            meta["skipped"]["litellm"] = "not requested (--no-litellm)"
        else:
            try:
                version = litellm_target.ensure_installed()
                litellm = litellm_target.start_litellm(
                    fake_url, REPO_ROOT / "bench" / "results" / "litellm", workers=args.relay_workers
                )
                servers.append(litellm)
                meta["versions"]["litellm"] = version
                meta["settings"]["litellm"] = (
                    f"litellm[proxy]=={version} --num_workers {args.relay_workers}, LITELLM_MODE=PRODUCTION, "
                    "LITELLM_LOG=ERROR, master key, no database, spend/error logs off, request_timeout 600"
                )
                bench.targets.append(
                    LiveTarget(
                        Target(
                            "litellm",
                            litellm.host,
                            litellm.port,
                            "/v1/chat/completions",
                            "sse",
                            f"Bearer {litellm_target.MASTER_KEY}",
                            litellm_target.MODEL,
                        ),
                        ProcessSampler(litellm.process.pid),
                    )
                )
                log(f"litellm {version} at http://{litellm.host}:{litellm.port}")
            except (StartError, OSError) as error:
                meta["skipped"]["litellm"] = str(error).splitlines()[0]
                log(f"LiteLLM skipped: {error}")

        await bench.warm_up()
        scenarios = args.scenarios.split(",")
        if "ttft" in scenarios:
            await bench.scenario_ttft()
        if "throughput" in scenarios:
            await bench.scenario_throughput()
        if "capacity" in scenarios:
            await bench.scenario_capacity()
    finally:
        for server in reversed(servers):
            server.stop()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta["profile_settings"] = {**dataclasses.asdict(profile), "ttft_single_turn": SINGLE_TURN}
    document = bench.write_raw(out_dir / "benchmarks" / "results.json", meta)
    from bench import report

    report.write(document, out_dir, charts=profile.charts and not args.no_charts)
    log(f"wrote {out_dir / 'benchmarks.md'}")
    failures = report.correctness_failures(document)
    if failures:
        log("FAILED correctness: " + "; ".join(failures))
        return 1
    return 0


def _add_compared_relay(bench: Benchmark, meta: dict[str, Any], args: argparse.Namespace,
                        relay_env: dict[str, str], relay_key: str, log: Callable[[str], None]) -> Server:
    """A second relay, from an earlier revision of this checkout, as targets named `<rev> /chat` etc. beside
    the current one's (TTFT and throughput only): a change measured before/after in one run."""
    import tempfile

    checkout = export_revision(args.compare, Path(tempfile.mkdtemp(prefix="bench-compare-")))
    other = start_relay(relay_env, checkout=checkout)
    meta["settings"][f"relay {args.compare}"] = f"the same relay settings, source from git revision {args.compare}"
    log(f"relay at {args.compare} on http://{other.host}:{other.port}")
    sampler = ProcessSampler(other.process.pid)
    for name, path, protocol in (("/chat", "/chat", "ndjson"), ("/v1", "/v1/chat/completions", "sse"),
                                 ("/v1/responses", "/v1/responses", "responses")):
        authorization = relay_key if protocol == "ndjson" else f"Bearer {relay_key}"
        if _route_exists(other.host, other.port, path, f"Bearer {relay_key}"):
            target = Target(f"{args.compare} {name}", other.host, other.port, path, protocol, authorization, MODEL)
            bench.targets.append(LiveTarget(target, sampler, frozenset({"ttft", "throughput"})))
    return other


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs"), help="where benchmarks.md and charts go")
    parser.add_argument("--scenarios", default="ttft,throughput,capacity")
    parser.add_argument("--relay-workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--compare", metavar="GIT_REV",
                        help="also run the relay as of this git revision, beside the current one (before/after)")
    parser.add_argument("--ttft-single", type=int, help="override the profile's sequential streams at c=1")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument(
        "--rewrite-report",
        metavar="RESULTS_JSON",
        help="only rewrite benchmarks.md and the charts from an earlier run's results.json",
    )
    args = parser.parse_args(argv)
    if args.ttft_single:
        PROFILES[args.profile] = dataclasses.replace(PROFILES[args.profile], ttft_single=args.ttft_single)
    if args.rewrite_report:
        from bench import report

        document = json.loads(Path(args.rewrite_report).read_text())
        report.write(document, Path(args.out).resolve(), charts=not args.no_charts)
        return 0
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            args.no_uvloop = True
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(run(args))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
