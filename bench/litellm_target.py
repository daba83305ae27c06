"""The LiteLLM proxy as a benchmark target: installed into its own venv, pointed at the fake upstream.

Settings, chosen to be what LiteLLM's "best practices for production" page recommends for a box
without a database: `LITELLM_MODE=PRODUCTION`, `LITELLM_LOG=ERROR`, one uvicorn worker per core
(`--num_workers 2` on the 2-core machine), a master key, no database, no spend logs, no callbacks,
`request_timeout: 600`. Everything else is LiteLLM's default.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.procs import REPO_ROOT, Server, StartError, free_port, spawn

LITELLM_VERSION = "1.106.0"  # newer 1.106.x / 1.109 need a certifi newer than the package index offers
VENV = REPO_ROOT / "bench" / ".venv-litellm"
MASTER_KEY = "sk-bench-litellm-master"
MODEL = "bench-model"

CONFIG_TEMPLATE = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {api_base}
      api_key: sk-fake-upstream
general_settings:
  master_key: {master_key}
  disable_spend_logs: true
  disable_error_logs: true
litellm_settings:
  request_timeout: 600
  set_verbose: false
  json_logs: true
  drop_params: true
"""


def installed_version() -> str | None:
    python = VENV / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_installed() -> str:
    """Install LiteLLM's proxy into its own venv if needed; returns the installed version or raises."""
    version = installed_version()
    if version == LITELLM_VERSION:
        return version
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    print(f"bench: installing litellm[proxy]=={LITELLM_VERSION} into {VENV} (once) ...", flush=True)
    result = subprocess.run(
        [str(VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
        capture_output=True,
        text=True,
        check=False,
    )
    version = installed_version()
    if result.returncode != 0 or version is None:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise StartError(f"could not install litellm[proxy]=={LITELLM_VERSION}:\n{tail}")
    return version


def start_litellm(upstream_base_url: str, workdir: Path, workers: int = 2, timeout: float = 120.0) -> Server:
    """Start `litellm --config ...` on a free port and wait until it answers its liveness probe."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "litellm-config.yaml"
    config.write_text(CONFIG_TEMPLATE.format(model=MODEL, api_base=upstream_base_url, master_key=MASTER_KEY))
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_SCHEMA_UPDATE": "true",
        "NO_DOCS": "True",
    }
    env.pop("DATABASE_URL", None)
    command = [
        str(VENV / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        str(workers),
    ]
    process, output = spawn(command, env, workdir)
    server = Server("litellm", process, output, "127.0.0.1", port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartError(f"litellm exited during start-up:\n{output.text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    server.stop()
    raise StartError(f"litellm did not answer within {timeout:.0f} s:\n{output.text()}")
