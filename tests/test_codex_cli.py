"""OpenAI's Codex CLI, which speaks only the Responses API, through the relay: the real `codex exec` (pinned in
tests/clients/package-lock.json, installed by scripts/install-test-clients.sh, run by `make test`) -> the relay
under gunicorn with the production config -> the fake upstream, all on loopback.

Codex runs with a temporary HOME and CODEX_HOME holding the config.toml below: a model provider pointing at
the relay, approvals and sandbox set for a non-interactive run, every telemetry, analytics, update, feedback,
notification and plugin option off, and `--strict-config`, so a key this version does not know fails the test
instead of being ignored. Its HTTP(S) proxy variables point at a loopback trap, so anything it tried to send
anywhere but the relay would be caught and fail the test, never leave the machine.
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

CODEX = ROOT / "tests" / "clients" / "node_modules" / ".bin" / "codex"
CODEX_VERSION = "0.171.0"
KEY_NAME = "codex-cli"
CODEX_KEY = "codex-cli-access-key-3b9e41d07c"
PROMPT = "Say which way this request went, in one short sentence."
ANSWER_TOKENS = ("Codex", " reached", " the", " fake", " upstream", " through", " the", " relay", ".")
ANSWER = "".join(ANSWER_TOKENS)

# What every Codex run here shares: the relay as its provider, and nothing it would send elsewhere.
RELAY_PROVIDER_TOML = """\
[model_providers.relay]
name = "relay"
base_url = "{relay_url}/v1"
wire_api = "responses"
env_key = "RELAY_ACCESS_KEY"
request_max_retries = 0
stream_max_retries = 0
supports_websockets = false

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"
trace_exporter = "none"
metrics_exporter = "none"
log_user_prompt = false

[history]
persistence = "none"

[tui]
notifications = false
"""

CONFIG_TOML = """\
model = "gpt-4o-mini"
model_provider = "relay"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false
web_search = "disabled"

""" + RELAY_PROVIDER_TOML + """\

# No tool the fake would never call, and nothing that fetches plugins, apps or updates from the internet.
[features]
apps = false
plugins = false
remote_plugin = false
plugin_sharing = false
shell_tool = false
shell_snapshot = false
multi_agent = false
goals = false
image_generation = false
tool_suggest = false
in_app_updates = false
browser_use = false
computer_use = false
skill_mcp_dependency_install = false
"""

pytestmark = pytest.mark.skipif(not CODEX.exists(),
                                reason="needs the Codex CLI (scripts/install-test-clients.sh, run by `make test`)")


@pytest.fixture(scope="module")
def relay(relay_factory: Callable[..., RelayProcess], tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    """The relay with one named key for Codex, so that the access log shows whose request it was."""
    keys = tmp_path_factory.mktemp("codex-keys") / "keys.toml"
    keys.write_text(f'[keys.{KEY_NAME}]\nkey = "{CODEX_KEY}"\n')
    return relay_factory(KEYS_FILE=str(keys), KEEPALIVE_SECONDS="0.3")


def run_codex(relay: RelayProcess, trap: ProxyTrap, home: Path, prompt: str, config: str = CONFIG_TOML
              ) -> subprocess.CompletedProcess[str]:
    """`codex exec` with a fresh HOME/CODEX_HOME, the relay as its only provider (`config`, with
    `{relay_url}` in it) and a trap as its proxy."""
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True)
    (codex_home / "config.toml").write_text(config.format(relay_url=relay.url))
    workdir = home / "work"
    workdir.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(codex_home),
        "LANG": "C.UTF-8",
        "RELAY_ACCESS_KEY": CODEX_KEY,
        "HTTP_PROXY": trap.url, "HTTPS_PROXY": trap.url, "ALL_PROXY": trap.url,
        "http_proxy": trap.url, "https_proxy": trap.url, "all_proxy": trap.url,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    return subprocess.run(
        [str(CODEX), "exec", "--strict-config", "--skip-git-repo-check", "--ephemeral", "--color", "never", prompt],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )


def test_codex_version_is_the_pinned_one() -> None:
    """The installed CLI is the version package-lock.json pins."""
    version = subprocess.run([str(CODEX), "--version"], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert version.returncode == 0 and version.stdout.strip() == f"codex-cli {CODEX_VERSION}", version


def test_codex_exec_completes_a_prompt_through_the_relay(relay: RelayProcess, fake: FakeUpstream, trap: ProxyTrap,
                                                         tmp_path: Path) -> None:
    """`codex exec` prints the fake's answer; the relay logged POST /v1/responses under the key's name; the fake
    got Codex's request with the upstream key, never the access key; nothing tried to leave loopback."""
    fake.behave(tokens=ANSWER_TOKENS)
    done = run_codex(relay, trap, tmp_path / "home", PROMPT)
    report = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert done.stdout.strip() == ANSWER, report  # exec prints only the final message on stdout

    responses = [r for r in fake.requests if r.path == "/v1/responses"]
    assert len(responses) == 1 and responses[0].method == "POST", [(r.method, r.path) for r in fake.requests]
    sent = responses[0]
    assert sent.json["model"] == "gpt-4o-mini" and sent.json["stream"] is True
    assert PROMPT in json.dumps(sent.json["input"])
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    for request in fake.requests:
        assert CODEX_KEY not in json.dumps(request.headers) and CODEX_KEY.encode() not in request.body
    assert fake.wait_for(lambda: len(fake.streams_closed) == 1) and fake.streams_closed[0].completed

    def logged() -> list[str]:
        return [line for line in relay.log_text().splitlines()
                if "method=POST path=/v1/responses status=200" in line and f"key={KEY_NAME} " in line]
    assert wait_until(logged), relay.log_text()
    assert "model=gpt-4o-mini" in logged()[0] and "outcome=ok" in logged()[0]
    log = relay.log_text()
    assert CODEX_KEY not in log and ACCESS_KEY not in log and UPSTREAM_KEY not in log

    assert trap.caught == [], trap.caught


def test_codex_exec_works_against_the_demo(relay_factory: Callable[..., RelayProcess], trap: ProxyTrap,
                                           tmp_path: Path) -> None:
    """Without any upstream key (demo mode, what `make run` starts), `codex exec` gets the stand-in's answer
    through the relay's Responses API, and nothing tried to leave loopback."""
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.{KEY_NAME}]\nkey = "{CODEX_KEY}"\n')
    demo = relay_factory(RELAY_DEMO="1", OPENAI_API_KEY="", KEYS_FILE=str(keys), KEEPALIVE_SECONDS="0.3")
    done = run_codex(demo, trap, tmp_path / "home", PROMPT)
    report = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert "Demo mode" in done.stdout, report
    assert wait_until(lambda: "method=POST path=/v1/responses status=200" in demo.log_text()), demo.log_text()
    assert trap.caught == [], trap.caught
