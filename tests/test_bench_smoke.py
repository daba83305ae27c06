"""A seconds-long smoke of the benchmark (issue 6), so that `make bench` cannot rot unnoticed in CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_streams_correctly_through_every_target(tmp_path: Path) -> None:
    """The driver starts the fake upstream, the bare forwarder and the relay under gunicorn, every stream's
    text arrives complete and in order through each target (the relay's /chat, /v1/chat/completions and
    /v1/responses included), and the report and raw JSON are written."""
    finished = subprocess.run(
        [sys.executable, "-m", "bench", "--profile", "smoke", "--out", str(tmp_path), "--no-litellm", "--no-charts"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    results = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    for level_rows in results["ttft"].values():
        for name in ("direct", "direct responses", "bare forwarder", "relay /chat", "relay /v1",
                     "relay /v1/responses"):
            row = level_rows[name]
            assert row["ok"] == row["streams"] > 0 and not row["errors"], (name, row)
    for name in ("bare forwarder", "relay /chat", "relay /v1/responses"):
        throughput = results["throughput"][name]
        assert throughput["tokens"] > 0 and not throughput["errors"], (name, throughput)
        assert throughput["target_cpu_us_per_token"] is not None
    for name in ("bare forwarder", "relay /chat"):
        capacity = results["capacity"][name]
        assert all(not row["errors"] for row in capacity.values()), (name, capacity)
    report = (tmp_path / "benchmarks.md").read_text()
    assert "## Targets (issue 14)" in report and "| 1 | bare forwarder |" in report
