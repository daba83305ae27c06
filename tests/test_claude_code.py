"""Anthropic's Claude Code through the relay: the real `claude -p` (pinned in tests/clients/package-lock.json,
installed by scripts/install-test-clients.sh, run by `make test`) -> the relay under gunicorn with the
production config -> the fake upstream speaking Anthropic's Messages API, all on loopback.

Claude Code runs with a temporary HOME and its own environment only: ANTHROPIC_BASE_URL is the relay, the
access key one of the relay's named keys, and every option this version has for telemetry, error reporting,
feature flags, updates and other non-essential traffic is off (the names below are read from the 2.1.332
binary). It runs with no tools, no MCP servers, no settings files and no session saved, so it neither asks
anything nor acts. Its HTTP(S) proxy variables point at a loopback trap, so anything it tried to send anywhere
but the relay would be caught and fail the test, never leave the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ACCESS_KEY, ROOT, UPSTREAM_KEY, ProxyTrap, RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until

CLAUDE = ROOT / "tests" / "clients" / "node_modules" / ".bin" / "claude"
CLAUDE_VERSION = "2.1.332"
KEY_NAME = "claude-code"
CLAUDE_KEY = "claude-code-access-key-8e1f5a24c7"
ANTHROPIC_KEY = "sk-ant-upstream-key-for-claude-code-6a0b9d"
MODEL = "claude-sonnet-5"  # one this version knows (it warns about claude-sonnet-4-5: retired)
PROMPT = "Say which way this request went, in one short sentence."
ANSWER_TOKENS = ("Claude", " Code", " reached", " the", " fake", " upstream", " through", " the", " relay", ".")
ANSWER = "".join(ANSWER_TOKENS)

# Every switch Claude Code 2.1.332 has for traffic that is not the conversation itself.
QUIET = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",  # implies no telemetry, no auto-update, no error reports
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_UPDATES": "1",
    "DISABLE_INSTALLATION_CHECKS": "1",
    "CLAUDE_CODE_DISABLE_FEATURE_FLAGS": "1",
    "DISABLE_GROWTHBOOK": "1",
    "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1",
    "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL": "1",
    "DISABLE_BUG_COMMAND": "1",
    "DISABLE_COST_WARNINGS": "1",
}

pytestmark = pytest.mark.skipif(not CLAUDE.exists(),
                                reason="needs Claude Code (scripts/install-test-clients.sh, run by `make test`)")


@pytest.fixture(scope="module")
def relay(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
          tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    """The relay with the fake as its one Anthropic upstream and one named key for Claude Code."""
    folder = tmp_path_factory.mktemp("claude-code")
    keys = folder / "keys.toml"
    keys.write_text(f'[keys.{KEY_NAME}]\nkey = "{CLAUDE_KEY}"\n')
    upstreams = folder / "upstreams.toml"
    upstreams.write_text(f"""
[[upstreams]]
name = "openai"
base_url = "{fake.base_url}"
api_key_env = "OPENAI_UPSTREAM_KEY"
models = ["gpt-4o-mini"]

[[upstreams]]
name = "anthropic"
api = "anthropic"
base_url = "http://{fake.host}:{fake.port}"
api_key_env = "ANTHROPIC_KEY"
models = ["claude-*"]
""")
    return relay_factory(KEYS_FILE=str(keys), UPSTREAMS_FILE=str(upstreams), OPENAI_UPSTREAM_KEY=UPSTREAM_KEY,
                         ANTHROPIC_KEY=ANTHROPIC_KEY, OPENAI_API_KEY="", KEEPALIVE_SECONDS="0.3")


def run_claude(relay: RelayProcess, trap: ProxyTrap, home: Path, key_variable: str,
               prompt: str) -> subprocess.CompletedProcess[str]:
    """`claude -p` with a fresh HOME, the relay as its API and a trap as its proxy."""
    home.mkdir(parents=True)
    workdir = home / "work"
    workdir.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "ANTHROPIC_BASE_URL": relay.url,
        key_variable: CLAUDE_KEY,
        **QUIET,
        "HTTP_PROXY": trap.url, "HTTPS_PROXY": trap.url, "ALL_PROXY": trap.url,
        "http_proxy": trap.url, "https_proxy": trap.url, "all_proxy": trap.url,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    command = [str(CLAUDE), "-p", prompt, "--model", MODEL, "--output-format", "text",
               "--tools", "", "--permission-mode", "dontAsk", "--strict-mcp-config", "--setting-sources", "",
               "--no-session-persistence"]
    return subprocess.run(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)


def test_claude_version_is_the_pinned_one(tmp_path: Path) -> None:
    """The installed CLI is the version package-lock.json pins."""
    version = subprocess.run([str(CLAUDE), "--version"], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **QUIET})
    assert version.returncode == 0 and version.stdout.strip() == f"{CLAUDE_VERSION} (Claude Code)", version


@pytest.mark.parametrize("key_variable", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])
def test_claude_print_completes_a_prompt_through_the_relay(relay: RelayProcess, fake: FakeUpstream,
                                                           trap: ProxyTrap, tmp_path: Path,
                                                           key_variable: str) -> None:
    """`claude -p` prints the fake's answer; the relay logged POST /v1/messages under the key's name; the
    fake got Claude Code's request with the upstream key as x-api-key, never the access key; nothing tried
    to leave loopback."""
    fake.behave(tokens=ANSWER_TOKENS)
    earlier = len(relay.log_text().splitlines())  # the relay serves both runs: look at this run's lines only
    done = run_claude(relay, trap, tmp_path / "home", key_variable, PROMPT)
    seen = [(r.method, r.path, r.json.get("model") if isinstance(r.json, dict) else None) for r in fake.requests]
    report = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}\nfake saw: {seen}"
    assert done.returncode == 0, report
    assert done.stdout.strip() == ANSWER, report

    messages = [r for r in fake.requests if r.path.split("?")[0] == "/v1/messages"]
    assert messages and all(r.method == "POST" for r in messages), report
    answered = [r for r in messages if PROMPT in json.dumps(r.json.get("messages"))]
    assert len(answered) == 1, report
    assert answered[0].json["model"] == MODEL and answered[0].json["stream"] is True
    for request in fake.requests:
        assert request.headers.get("x-api-key") == ANTHROPIC_KEY, (request.method, request.path)
        assert "authorization" not in request.headers
        assert CLAUDE_KEY not in json.dumps(request.headers) and CLAUDE_KEY.encode() not in request.body
    assert fake.wait_for(lambda: any(closed.completed for closed in fake.streams_closed))

    def logged() -> list[str]:
        return [line for line in relay.log_text().splitlines()[earlier:]
                if "method=POST path=/v1/messages" in line and "status=200" in line and f"key={KEY_NAME} " in line]
    assert wait_until(logged), relay.log_text()
    assert any(f"model={MODEL}" in line and "outcome=ok" in line for line in logged()), logged()
    log = relay.log_text()
    assert CLAUDE_KEY not in log and ACCESS_KEY not in log and ANTHROPIC_KEY not in log

    assert trap.caught == [], trap.caught


def test_claude_print_works_against_the_demo(relay_factory: Callable[..., RelayProcess], trap: ProxyTrap,
                                             tmp_path: Path) -> None:
    """Without any upstream key (demo mode, what `make run` starts), `claude -p` gets the stand-in's answer
    through the relay's Anthropic Messages API, and nothing tried to leave loopback."""
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.{KEY_NAME}]\nkey = "{CLAUDE_KEY}"\n')
    demo = relay_factory(RELAY_DEMO="1", OPENAI_API_KEY="", KEYS_FILE=str(keys), KEEPALIVE_SECONDS="0.3")
    done = run_claude(demo, trap, tmp_path / "home", "ANTHROPIC_API_KEY", PROMPT)
    report = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert "Demo mode" in done.stdout and PROMPT in done.stdout, report
    assert wait_until(lambda: "method=POST path=/v1/messages" in demo.log_text()), demo.log_text()
    assert trap.caught == [], trap.caught
