"""Turns the benchmark's raw results into docs/benchmarks.md and PNG charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NOTES = Path(__file__).resolve().parent / "notes.md"
RELAY_TARGETS = ("relay /chat", "relay /v1", "relay /v1/responses")
FORWARDER = "bare forwarder"
RESPONSES_FORWARDER = "bare forwarder /v1/responses"  # the same floor, forwarding the same Responses stream


def correctness_failures(document: dict[str, Any]) -> list[str]:
    """Streams that lost, reordered or broke tokens, in any scenario but capacity levels above the one
    a target failed at (capacity finds the limit; errors there are a measurement, not a defect)."""
    failures = []
    for level, rows in document["ttft"].items():
        for name, row in rows.items():
            if row["errors"]:
                failures.append(f"ttft c={level} {name}: {row['errors']}")
    for name, row in document["throughput"].items():
        if row["errors"]:
            failures.append(f"throughput {name}: {row['errors']}")
    for name, levels in document["capacity"].items():
        for level, row in levels.items():
            wrong = {k: v for k, v in row["errors"].items() if k in ("wrong_text", "bad_record")}
            if wrong:
                failures.append(f"capacity {level} {name}: {wrong}")
    return [f for f in failures if not f.split(":")[0].endswith("litellm")]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"


def baseline_name(name: str, rows: dict[str, Any]) -> str:
    """The direct-upstream row a target's added latency is measured against: the fake's Responses stream
    for Responses targets (when measured), its chat stream for the rest."""
    return "direct responses" if "responses" in name and "direct responses" in rows else "direct"


def added_ms(rows: dict[str, Any], name: str, key: str) -> float | None:
    """A target's TTFT percentile minus its direct upstream's, in one scenario's rows."""
    base = rows.get(baseline_name(name, rows))
    if name not in rows or base is None:
        return None
    return _diff(rows[name]["ttft_ms"][key], base["ttft_ms"][key])


def _ttft_table(document: dict[str, Any]) -> list[str]:
    lines = [
        "| concurrency | target | streams | errors | TTFT p50 ms | TTFT p99 ms | added over direct p50 ms "
        "| added over direct p99 ms | added p50 ÷ bare forwarder's | p50 ratio to direct "
        "| target CPU µs per stream |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, rows in document["ttft"].items():
        forwarder = added_ms(rows, FORWARDER, "p50")
        for name, row in rows.items():
            ttft = row["ttft_ms"]
            direct = rows.get(baseline_name(name, rows), {}).get("ttft_ms", {})
            added50 = added_ms(rows, name, "p50")
            added99 = added_ms(rows, name, "p99")
            ratio = ttft["p50"] / direct["p50"] if ttft["p50"] and direct.get("p50") else None
            share = added50 / forwarder if added50 is not None and forwarder and not name.startswith("direct") \
                else None
            lines.append(
                f"| {level} | {name} | {row['streams']} | {_errors(row['errors'])} | {_fmt(ttft['p50'], 3)} "
                f"| {_fmt(ttft['p99'], 3)} | {_fmt(added50, 3)} | {_fmt(added99, 3)} | {_fmt(share)}"
                f"{'×' if share is not None else ''} | {_fmt(ratio)}× "
                f"| {_fmt(row.get('target_cpu_us_per_stream'), 0)} |"
            )
    return lines


def _diff(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def _throughput_table(document: dict[str, Any]) -> list[str]:
    rows = document["throughput"]
    direct = rows.get("direct", {}).get("tokens_per_second")
    forwarder_cpu = rows.get(FORWARDER, {}).get("target_cpu_us_per_token")
    lines = [
        "| target | tokens/s | streams/s | ratio to direct | target CPU µs/token | CPU ÷ bare forwarder's "
        "| target cores busy | load generator CPU µs/token | fake upstream CPU µs/token | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        tps = row["tokens_per_second"]
        ratio = tps / direct if tps and direct else None
        cpu = row.get("target_cpu_us_per_token")
        share = f"{cpu / forwarder_cpu:.2f}×" if cpu and forwarder_cpu else "–"
        lines.append(
            f"| {name} | {_fmt(tps, 0)} | {_fmt(row['streams_per_second'], 1)} | {_fmt(ratio, 3)} "
            f"| {_fmt(cpu, 1)} | {share} | {_fmt(row.get('target_cpu_cores_busy'))} "
            f"| {_fmt(row.get('client_cpu_us_per_token'), 1)} | {_fmt(row.get('fake_cpu_us_per_token'), 1)} "
            f"| {_errors(row['errors'])} |"
        )
    return lines


def _process_baselines(document: dict[str, Any]) -> dict[str, float]:
    """Per process, the PSS before its first capacity run: targets that share a process (the relay's
    /chat and /v1) otherwise hide each other's heap growth, so per-stream memory is also given against it."""
    baselines: dict[str, float] = {}
    for name, levels in document["capacity"].items():
        for row in levels.values():
            memory = row.get("memory")
            if not memory:
                continue
            key = _process_key(name, row)
            baselines[key] = min(baselines.get(key, memory["baseline_pss_mib"]), memory["baseline_pss_mib"])
    return baselines


def _process_key(name: str, row: dict[str, Any]) -> str:
    if "process_pid" in row:
        return str(row["process_pid"])
    return "relay" if name.startswith("relay") else name  # results from before process_pid was recorded


def _kib_per_stream_conservative(document: dict[str, Any], name: str, level: str) -> float | None:
    row = document["capacity"][name][level]
    memory = row.get("memory")
    if not memory:
        return None
    baseline = _process_baselines(document)[_process_key(name, row)]
    return round((memory["peak_pss_mib"] - baseline) * 1024 / int(level), 1)


def _capacity_table(document: dict[str, Any]) -> list[str]:
    lines = [
        "| target | concurrent streams | completed in order | errors | peak open | PSS before → peak MiB "
        "| KiB per open stream (vs. before this run) | KiB per open stream (vs. process before any "
        "capacity run) | CPU % of one core |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for name, levels in document["capacity"].items():
        for level, row in levels.items():
            memory = row.get("memory")
            pss = f"{memory['baseline_pss_mib']:.1f} → {memory['peak_pss_mib']:.1f}" if memory else "–"
            lines.append(
                f"| {name} | {int(level):,} | {row['ok']:,} | {_errors(row['errors'])} "
                f"| {row['peak_open_streams']:,} | {pss} "
                f"| {_fmt(memory['pss_kib_per_stream'], 1) if memory else '–'} "
                f"| {_fmt(_kib_per_stream_conservative(document, name, level), 1)} "
                f"| {_fmt(row.get('target_cpu_percent_of_one_core'), 1)} |"
            )
    return lines


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**not met**")


def _verdicts(document: dict[str, Any]) -> list[str]:
    """Issue 14's targets (which include and tighten issue 6's), each checked against this run's numbers."""
    lines = ["| target (issue 14) | measured | met? |", "|---|---|---|"]
    ttft = document["ttft"]
    throughput = document["throughput"]
    forwarder_cpu = throughput.get(FORWARDER, {}).get("target_cpu_us_per_token")
    for name in RELAY_TARGETS:
        if name not in throughput and not any(name in rows for rows in ttft.values()):
            continue
        single = added_ms(ttft.get("1", {}), name, "p50")
        theirs = added_ms(ttft.get("1", {}), FORWARDER, "p50")
        lines.append(
            f"| {name}: added TTFT p50, 1 client < 1 ms and below the bare forwarder's | {_fmt(single, 3)} ms "
            f"(bare forwarder {_fmt(theirs, 3)} ms) "
            f"| {_verdict(None if single is None or theirs is None else single < 1.0 and single < theirs)} |"
        )
        lines += _same_stream_verdict(ttft.get("1", {}), name)
        checks: list[tuple[str, float | None, float, str]] = [
            ("added TTFT p50, 50 streams < 2 ms", added_ms(ttft.get("50", {}), name, "p50"), 2.0, "ms"),
            ("added TTFT p99, 50 streams < 15 ms", added_ms(ttft.get("50", {}), name, "p99"), 15.0, "ms"),
            ("added TTFT p99, 200 slow streams < 100 ms", added_ms(ttft.get("200", {}), name, "p99"), 100.0, "ms"),
        ]
        for label, value, limit, unit in checks:
            lines.append(f"| {name}: {label} | {_fmt(value, 3)} {unit if value is not None else ''} "
                         f"| {_verdict(None if value is None else value < limit)} |")
        if name in throughput:
            lines += _throughput_verdicts(document, name, forwarder_cpu)
        lines += _capacity_verdicts(document, name)
    return lines


def _same_stream_verdict(single: dict[str, Any], name: str) -> list[str]:
    """For the Responses target, beside the issue's comparison with the chat forwarder: the bare forwarder's
    own Responses view, which forwards the same (larger) stream. Information, not one of the issue's targets."""
    if "responses" not in name or RESPONSES_FORWARDER not in single:
        return []
    ours, theirs = added_ms(single, name, "p50"), added_ms(single, RESPONSES_FORWARDER, "p50")
    below = None if ours is None or theirs is None else ours < theirs
    return [f"| {name}: added TTFT p50, 1 client, beside the bare forwarder's own `/v1/responses` (the same "
            f"stream; for information) | {_fmt(ours, 3)} ms ({RESPONSES_FORWARDER} {_fmt(theirs, 3)} ms) "
            f"| {'below' if below else 'not below' if below is not None else 'not measured'} |"]


def _throughput_verdicts(document: dict[str, Any], name: str, forwarder_cpu: float | None) -> list[str]:
    throughput = document["throughput"]
    cpu = throughput[name].get("target_cpu_us_per_token")
    met = None if cpu is None or forwarder_cpu is None else cpu < 20 and cpu < forwarder_cpu
    lines = [f"| {name}: CPU per relayed token < 20 µs and below the bare forwarder's | {_fmt(cpu, 1)} µs "
             f"(bare forwarder {_fmt(forwarder_cpu, 1)} µs) | {_verdict(met)} |"]
    mine = throughput[name].get("tokens_per_second")
    theirs = throughput.get("litellm", {}).get("tokens_per_second")
    if mine and theirs:
        lines.append(f"| {name}: throughput ≥ 25× LiteLLM | {mine / theirs:,.1f}× | {_verdict(mine / theirs >= 25)} |")
    else:
        lines.append(f"| {name}: throughput ≥ 25× LiteLLM | LiteLLM not measured | not measured |")
    return lines


def _capacity_verdicts(document: dict[str, Any], name: str) -> list[str]:
    levels = document["capacity"].get(name, {})
    if not levels:
        return []
    top = max(levels, key=int)
    row = levels[top]
    held = int(top) >= 5000 and not row["errors"] and row["ok"] == int(top)
    conservative = _kib_per_stream_conservative(document, name, top)
    per_run = (row.get("memory") or {}).get("pss_kib_per_stream")
    return [
        f"| {name}: ≥ 5,000 slow streams, zero errors, all tokens in order | {int(top):,} streams, "
        f"{row['ok']:,} complete, errors {_errors(row['errors'])} | {_verdict(held)} |",
        f"| {name}: < 40 KiB resident memory per open stream | {_fmt(conservative, 1)} KiB against the "
        f"process before any capacity run ({_fmt(per_run, 1)} KiB against the PSS right before this run) "
        f"| {_verdict(conservative is not None and conservative < 40)} |",
    ]


def write(document: dict[str, Any], out_dir: Path, charts: bool = True) -> None:
    meta = document["meta"]
    chart_dir = out_dir / "benchmarks"
    chart_names: list[str] = []
    chart_note = ""
    if charts:
        try:
            chart_names = _charts(document, chart_dir)
        except ImportError:
            chart_note = "(charts skipped: matplotlib is not installed; `make bench` installs it)"
    machine = meta["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    settings = meta["profile_settings"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench`); raw numbers in "
        "[benchmarks/results.json](benchmarks/results.json). Re-running overwrites this file except the "
        "notes at the end, which come from `bench/notes.md`.",
        "",
        f"- Run: {meta['started']} – {meta.get('finished', '?')}, profile `{meta['profile']}`.",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"Python {machine['python']}, Linux {machine['kernel']}. Everything (load generator, fake upstream, "
        "the target) shares these cores, so absolute numbers include contention; ratios are against the "
        "direct upstream measured in the same run.",
        f"- Versions: {versions}.",
    ]
    for name, text in meta["settings"].items():
        lines.append(f"- {name}: {text}.")
    for name, reason in meta["skipped"].items():
        lines.append(f"- **Skipped {name}**: {reason}.")
    lines += [
        "- Targets alternate within each round (rotating order); every stream's text is checked complete "
        "and in order by the load generator (a dropped or reordered token counts as `wrong_text`).",
        "",
        "## Targets (issue 14)",
        "",
        *_verdicts(document),
        "",
        "## (a) Time to first token",
        "",
        f"Concurrency 1: {settings['ttft_single']} sequential streams × {settings['rounds']} rounds, 20 tokens "
        f"each, no delay{_turns(settings)}. Higher concurrency: each worker runs streams of "
        f"{settings['ttft_spec']['n_tokens']} tokens {settings['ttft_spec']['token_interval'] * 1000:g} ms "
        "apart back to back, workers started spread over one stream's length. TTFT is measured from "
        "writing the request to receiving the first content token; *added over direct* is the target's "
        "percentile minus the direct upstream's (its Responses stream for the Responses targets), and the "
        "*÷ bare forwarder's* column divides that by what the bare forwarder adds in the same scenario "
        "(below 1× means the target adds less than the stack's floor for a forwarder). *Target CPU per stream* is "
        "the user+system time of the target's processes during its runs divided by its streams: on a shared "
        "machine it is steadier than latency.",
        "",
        *_ttft_table(document),
        "",
        "## (b) Throughput and (d) CPU per relayed token",
        "",
        f"{settings['throughput_concurrency']} concurrent clients, each requesting "
        f"{settings['throughput_tokens']}-token answers with 0 ms between upstream tokens, back to back for "
        f"{settings['throughput_seconds']:g} s per round. CPU is user+system time of the target's whole "
        "process tree (gunicorn master and workers) from /proc, divided by tokens delivered: request "
        "handling included.",
        "",
        *_throughput_table(document),
        "",
        "## (c) Capacity: slow concurrent streams",
        "",
        f"Each stream: {settings['capacity_spec']['n_tokens']} tokens, one every "
        f"{settings['capacity_spec']['token_interval']:g} s; all streams opened over "
        f"{settings['capacity_ramp']:g} s and held together. Memory is the proportional set size (PSS) of the "
        "target's process tree at the plateau's peak minus before the run, per stream; the second memory column "
        "measures against the process before its first capacity run, since /chat and /v1 share the relay's "
        "processes and the first run's heap growth would otherwise be hidden from the second. A target that "
        "fails a level is not tried at higher levels.",
        "",
        *_capacity_table(document),
        "",
    ]
    if chart_names or chart_note:
        lines += ["## Charts", ""]
        lines += [f"![{name}](benchmarks/{name})" for name in chart_names]
        if chart_note:
            lines.append(chart_note)
        lines.append("")
    if NOTES.exists():
        lines += [NOTES.read_text().rstrip(), ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.md").write_text("\n".join(lines))


def _charts(document: dict[str, Any], chart_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chart_dir.mkdir(parents=True, exist_ok=True)
    written = []

    ttft = document["ttft"]
    if ttft:
        levels = list(ttft)
        names = list(dict.fromkeys(name for rows in ttft.values() for name in rows))
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        width = 0.8 / max(1, len(names))
        for axis, key in zip(axes, ("p50", "p99"), strict=True):
            for index, name in enumerate(names):
                values = [ttft[level].get(name, {}).get("ttft_ms", {}).get(key) or 0 for level in levels]
                positions = [i + index * width for i in range(len(levels))]
                axis.bar(positions, values, width, label=name)
            axis.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(levels))])
            axis.set_xticklabels([f"{level} concurrent" for level in levels])
            axis.set_ylabel(f"time to first token {key} (ms)")
            axis.set_yscale("log")
            axis.set_title(f"TTFT {key} (log scale)")
            axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(chart_dir / "ttft.png", dpi=100)
        plt.close(figure)
        written.append("ttft.png")

    throughput = document["throughput"]
    if throughput:
        names = list(throughput)
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].bar(names, [throughput[n]["tokens_per_second"] or 0 for n in names], color="tab:blue")
        axes[0].set_ylabel("tokens per second delivered")
        axes[0].set_title("Throughput at saturation (200-token answers)")
        cpu_names = [n for n in names if throughput[n].get("target_cpu_us_per_token") is not None]
        axes[1].bar(cpu_names, [throughput[n]["target_cpu_us_per_token"] for n in cpu_names], color="tab:orange")
        axes[1].axhline(20, color="grey", linestyle="--", label="issue 14 target: 20 µs")
        axes[1].set_ylabel("target CPU µs per relayed token")
        axes[1].set_yscale("log")
        axes[1].set_title("CPU per relayed token (log scale)")
        axes[1].legend(fontsize=8)
        for axis in axes:
            axis.tick_params(axis="x", labelrotation=15)
        figure.tight_layout()
        figure.savefig(chart_dir / "throughput.png", dpi=100)
        plt.close(figure)
        written.append("throughput.png")

    capacity = document["capacity"]
    series = {
        (name, level): row["series"]
        for name, levels in capacity.items()
        for level, row in levels.items()
        if row.get("series")
    }
    if series:
        figure, axis = plt.subplots(figsize=(11, 4))
        for (name, level), points in series.items():
            axis.plot([p["t"] for p in points], [p["pss_mib"] for p in points], label=f"{name}, {level} streams")
        axis.set_xlabel("seconds since the first stream opened")
        axis.set_ylabel("target PSS (MiB)")
        axis.set_title("Memory while holding slow streams")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(chart_dir / "capacity.png", dpi=100)
        plt.close(figure)
        written.append("capacity.png")
    return written


def _turns(settings: dict[str, Any]) -> str:
    """How the targets shared the one-client runs (a run made before they took turns ran each whole)."""
    turn = settings.get("ttft_single_turn")
    return f", the targets taking turns of {turn} streams" if turn else ""
