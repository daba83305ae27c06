"""The real Codex CLI (Responses API only) through the relay to an upstream that speaks only chat completions:
`codex exec` -> the relay under gunicorn (bridging Responses -> chat) -> the fake upstream declared
`protocols = ["chat"]`, which first asks for one shell command (Codex's `exec_command` tool) and, once the
command's output comes back, answers.

Codex runs with its default configuration apart from pointing it at the relay: the provider, its key, a model
name the relay maps to the upstream's own (`gpt-5-codex`), and a non-interactive run (approvals never,
read-only sandbox). Its tools stay as they are by default (the shell, sub-agents, goals, web search...), so
the bridge must carry what Codex really sends. Only what would reach the internet (update checks, analytics,
feedback, telemetry, plugins and apps fetched online) is off, and the HTTP(S) proxy variables point at a
loopback trap that fails the test if anything tries to leave the machine anyway.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import UPSTREAM_KEY, ProxyTrap, RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until
from tests.test_codex_cli import CODEX, CODEX_KEY, KEY_NAME, RELAY_PROVIDER_TOML, run_codex

MODEL = "gpt-5-codex"
# Codex 0.171.0's own default model when the configuration names none. For it, Codex offers its tools through
# an `additional_tools` input item: a namespace `functions` holding `exec`, a custom (free-form) tool taking
# JavaScript that calls the other tools.
CODEX_DEFAULT_MODEL = "gpt-6.2-sol"
JS_MARKER = "custom-tool-ran-5d2a"
JS_ARGUMENTS = ('{"input":', f'"text(\\"{JS_MARKER}\\")"', "}")
UPSTREAM_MODEL = "gpt-4o-mini"
MARKER = "bridged-tool-ran-7c1e"
COMMAND_ARGUMENTS = ('{"cmd":', f'"echo {MARKER}"', "}")
ANSWER_TOKENS = ("The", " command", " ran", " through", " the", " bridge", ".")
ANSWER = "".join(ANSWER_TOKENS)
PROMPT = "Run a harmless echo, then say what happened in one short sentence."

CONFIG_TOML = f"""\
model = "{MODEL}"
model_provider = "relay"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false

""" + RELAY_PROVIDER_TOML + """\

# Only what would fetch from the internet; every tool keeps its default.
[features]
apps = false
plugins = false
remote_plugin = false
plugin_sharing = false
in_app_updates = false
"""

pytestmark = pytest.mark.skipif(not CODEX.exists(),
                                reason="needs the Codex CLI (scripts/install-test-clients.sh, run by `make test`)")


@pytest.fixture(scope="module")
def relay(relay_factory: Callable[..., RelayProcess], tmp_path_factory: pytest.TempPathFactory,
          fake: FakeUpstream) -> RelayProcess:
    """The relay whose only upstream speaks chat completions and maps Codex's model name to its own."""
    folder = tmp_path_factory.mktemp("codex-bridge")
    keys = folder / "keys.toml"
    keys.write_text(f'[keys.{KEY_NAME}]\nkey = "{CODEX_KEY}"\n')
    upstreams = folder / "upstreams.toml"
    upstreams.write_text(f'[[upstreams]]\nname = "chat-only"\nbase_url = "{fake.base_url}"\n'
                         f'api_key_env = "CHAT_KEY"\nmodels = ["gpt-4o*"]\nprotocols = ["chat"]\n'
                         f'model_map = {{ "{MODEL}" = "{UPSTREAM_MODEL}", '
                         f'"{CODEX_DEFAULT_MODEL}" = "{UPSTREAM_MODEL}" }}\n')
    return relay_factory(KEYS_FILE=str(keys), UPSTREAMS_FILE=str(upstreams), CHAT_KEY=UPSTREAM_KEY,
                         OPENAI_API_KEY="", KEEPALIVE_SECONDS="0.3")


def test_codex_runs_a_tool_round_trip_over_a_chat_only_upstream(relay: RelayProcess, fake: FakeUpstream,
                                                                 trap: ProxyTrap, tmp_path: Path) -> None:
    """Codex gets the fake's exec_command call as a function_call (after keep-alives), runs it, sends its
    output back (a tool message upstream), and prints the fake's final answer; the upstream only ever saw
    chat completions under its own model name; the access log says both turns were bridged; nothing left
    loopback."""
    # Silent before each first token for longer than two keep-alive periods: Codex reads past the comments.
    fake.behave(tool_call_once=True, tool_name="exec_command", tool_arguments=COMMAND_ARGUMENTS,
                tokens=ANSWER_TOKENS, first_token_delay=0.7)
    done = run_codex(relay, trap, tmp_path / "home", PROMPT, CONFIG_TOML)
    report = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}\nlog:\n{relay.log_text()}"
    assert done.returncode == 0, report
    assert done.stdout.strip() == ANSWER, report

    assert {r.path for r in fake.requests} == {"/v1/chat/completions"}, [r.path for r in fake.requests]
    first, second = (r.json for r in fake.requests)
    assert first["model"] == second["model"] == UPSTREAM_MODEL and first["stream"] is True
    assert PROMPT in json.dumps(first["messages"])
    assert "exec_command" in [tool["function"]["name"] for tool in first["tools"]]
    [call] = [m for m in second["messages"] if m.get("tool_calls")]
    assert call["tool_calls"][0]["function"] == {"name": "exec_command", "arguments": "".join(COMMAND_ARGUMENTS)}
    [result] = [m for m in second["messages"] if m["role"] == "tool"]
    assert result["tool_call_id"] == call["tool_calls"][0]["id"]
    # The command really ran (in Codex's sandbox) and its output went back: not merely echoed in an error.
    assert "exited with code 0" in result["content"] and f"\n{MARKER}\n" in result["content"], result
    assert fake.wait_for(lambda: len(fake.streams_closed) == 2)
    assert all(closed.completed for closed in fake.streams_closed)

    def bridged() -> list[str]:
        return [line for line in relay.log_text().splitlines()
                if "path=/v1/responses status=200" in line and "bridge=responses->chat" in line]
    assert wait_until(lambda: len(bridged()) == 2), relay.log_text()
    assert all(f"key={KEY_NAME} " in line and "outcome=ok" in line and "dropped_tools=web_search" in line
               for line in bridged())
    assert CODEX_KEY not in relay.log_text() and UPSTREAM_KEY not in relay.log_text()
    assert trap.caught == [], trap.caught


def test_codex_default_model_runs_a_custom_tool_round_trip(relay: RelayProcess, fake: FakeUpstream,
                                                           trap: ProxyTrap, tmp_path: Path) -> None:
    """With no model configured, Codex uses its own default model and offers its tools the way it does for
    it (`additional_tools`, a namespaced custom `exec` tool taking JavaScript): the fake calls that tool
    through the function the bridge made of it, Codex gets a custom_tool_call, runs the script, sends its
    output back, and prints the final answer. The upstream reasons first (reasoning_content): Codex keeps the
    reasoning item and sends it back next turn, where it goes upstream again as the tool-calling assistant
    message's reasoning_content (as DeepSeek's thinking mode requires)."""
    fake.behave(tool_call_once=True, tool_name="functions__exec", tool_arguments=JS_ARGUMENTS, tokens=ANSWER_TOKENS,
                reasoning=["Run the ", "script first."])
    config = CONFIG_TOML.replace(f'model = "{MODEL}"\n', "")
    done = run_codex(relay, trap, tmp_path / "home", PROMPT, config)
    report = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}\nlog:\n{relay.log_text()}"
    assert done.returncode == 0, report
    assert done.stdout.strip() == ANSWER, report

    first, second = (r.json for r in fake.requests)
    assert first["model"] == UPSTREAM_MODEL and "functions__exec" in [t["function"]["name"] for t in first["tools"]]
    assert first.get("reasoning_effort") == "low"  # Codex asks its default model for low effort
    [call] = [m for m in second["messages"] if m.get("tool_calls")]
    assert call["tool_calls"][0]["function"] == {"name": "functions__exec", "arguments": "".join(JS_ARGUMENTS)}
    [result] = [m for m in second["messages"] if m["role"] == "tool"]
    assert result["tool_call_id"] == call["tool_calls"][0]["id"] and JS_MARKER in result["content"], result
    assert "text(" not in result["content"], result  # the script's output, not the script
    assert call["reasoning_content"] == "Run the script first."  # the reasoning item Codex sent back
    assert trap.caught == [], trap.caught
