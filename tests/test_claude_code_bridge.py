"""The real Claude Code through the Messages bridge: `claude -p` (the pinned 2.1.332) -> the relay under
gunicorn -> the fake upstream speaking chat completions only (`protocols = ["chat"]`), which serves Claude
Code's model name through `model_map`, asks for one tool call (Claude Code's own Read tool, on a file in
the run's working directory) and, once the tool result comes back, answers.

Claude Code runs with its default configuration (its default tools, system prompt, thinking and
streaming) apart from what points it at the relay and keeps it quiet and on loopback, as in
tests/test_claude_code.py, and `--allowedTools Read` so that `-p` may run the one tool without asking.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import UPSTREAM_KEY, ProxyTrap, RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until
from tests.test_claude_code import CLAUDE, CLAUDE_KEY, KEY_NAME, MODEL, QUIET

UPSTREAM_MODEL = "fake-model"
SECRET = "apricot-7d41"
ANSWER_TOKENS = ("The", " note", " says", " the", " word", " is", f" {SECRET}", ".")
ANSWER = "".join(ANSWER_TOKENS)

pytestmark = pytest.mark.skipif(not CLAUDE.exists(),
                                reason="needs Claude Code (scripts/install-test-clients.sh, run by `make test`)")


@pytest.fixture(scope="module")
def relay(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
          tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    """The relay with the fake as its one upstream, chat completions only, Claude Code's model mapped."""
    folder = tmp_path_factory.mktemp("claude-code-bridge")
    keys = folder / "keys.toml"
    keys.write_text(f'[keys.{KEY_NAME}]\nkey = "{CLAUDE_KEY}"\n')
    upstreams = folder / "upstreams.toml"
    upstreams.write_text(f"""
[[upstreams]]
name = "chat-only"
base_url = "{fake.base_url}"
api_key_env = "OPENAI_UPSTREAM_KEY"
models = ["gpt-4o-mini"]
protocols = ["chat"]
model_map = {{ "{MODEL}" = "{UPSTREAM_MODEL}" }}
""")
    return relay_factory(KEYS_FILE=str(keys), UPSTREAMS_FILE=str(upstreams), OPENAI_UPSTREAM_KEY=UPSTREAM_KEY,
                         OPENAI_API_KEY="", KEEPALIVE_SECONDS="0.3")


def run_claude(relay: RelayProcess, trap: ProxyTrap, home: Path, workdir: Path, prompt: str
               ) -> subprocess.CompletedProcess[str]:
    """`claude -p` with a fresh HOME, the relay as its API, a trap as its proxy, Read allowed."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb",
        "ANTHROPIC_BASE_URL": relay.url, "ANTHROPIC_API_KEY": CLAUDE_KEY, **QUIET,
        "HTTP_PROXY": trap.url, "HTTPS_PROXY": trap.url, "ALL_PROXY": trap.url,
        "http_proxy": trap.url, "https_proxy": trap.url, "all_proxy": trap.url,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    command = [str(CLAUDE), "-p", prompt, "--model", MODEL, "--output-format", "text", "--allowedTools", "Read",
               "--no-session-persistence"]
    return subprocess.run(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.parametrize("reasoning", [(), ("Let me", " read the note.")], ids=["plain", "reasoning"])
def test_claude_code_runs_a_tool_round_trip_over_chat(relay: RelayProcess, fake: FakeUpstream, trap: ProxyTrap,
                                                      tmp_path: Path, reasoning: tuple[str, ...]) -> None:
    """Claude Code completes the turn over the bridge: the model's Read call (streamed as chat tool-call
    deltas) runs, its result (the file's text) goes back up as a chat `tool` message, and Claude Code
    prints the final answer; the relay logged both requests as bridged; nothing left loopback. With a
    reasoning model (`reasoning_content` deltas first, as DeepSeek's reasoner sends them) too: Claude Code
    gets them as thinking blocks and carries on."""
    home = tmp_path / "home"
    workdir = home / "work"
    workdir.mkdir(parents=True)
    note = workdir / "note.txt"
    note.write_text(f"The word is {SECRET}.\n")
    arguments = ('{"file_path": ', json.dumps(str(note))[:-4], json.dumps(str(note))[-4:], "}")
    fake.behave(tool_call_once=True, tool_name="Read", tool_arguments=arguments, tokens=ANSWER_TOKENS,
                reasoning=reasoning)
    earlier = len(relay.log_text().splitlines())
    done = run_claude(relay, trap, home, workdir, "What word does note.txt hold?")
    chats = [request.json for request in fake.requests if request.path == "/v1/chat/completions"]
    report = (f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}\n"
              f"fake saw: {[(r.method, r.path) for r in fake.requests]}")
    assert done.returncode == 0, report
    assert done.stdout.strip() == ANSWER, report

    asked = [chat for chat in chats if not any(message["role"] == "tool" for message in chat["messages"])]
    answered = [chat for chat in chats if any(message["role"] == "tool" for message in chat["messages"])]
    assert asked and len(answered) == 1, report
    assert all(chat["model"] == UPSTREAM_MODEL and chat["stream"] is True for chat in chats)
    assert "Read" in {tool["function"]["name"] for tool in answered[0]["tools"]}
    [result] = [message for message in answered[0]["messages"] if message["role"] == "tool"]
    assert SECRET in result["content"], result  # Claude Code really ran Read on the file
    call = next(message for message in answered[0]["messages"] if message.get("tool_calls"))
    assert call["tool_calls"][0]["id"] == result["tool_call_id"]

    def logged() -> list[str]:
        return [line for line in relay.log_text().splitlines()[earlier:]
                if "path=/v1/messages" in line and "bridge=messages->chat" in line and "status=200" in line]
    assert wait_until(lambda: len(logged()) >= 2), relay.log_text()
    assert all(f"key={KEY_NAME} " in line and "outcome=ok" in line for line in logged()), logged()
    assert CLAUDE_KEY not in relay.log_text() and UPSTREAM_KEY not in relay.log_text()
    assert trap.caught == [], trap.caught
