"""Start-up: configuration validation, refusing to run open, demo mode and the run command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest

from proxy.__main__ import demo_banner
from proxy.config import Config, ConfigError, ServerSettings, run_environment
from tests.conftest import ACCESS_KEY, ROOT, UPSTREAM_KEY, RelayProcess, free_port, relay_env, start_relay

BASE = {"AUTHORIZATION_KEY": ACCESS_KEY, "OPENAI_API_KEY": UPSTREAM_KEY}


@pytest.mark.parametrize(("env", "variable"), [
    ({"OPENAI_API_KEY": UPSTREAM_KEY}, "AUTHORIZATION_KEY"),
    ({"AUTHORIZATION_KEY": " , ", "OPENAI_API_KEY": UPSTREAM_KEY}, "AUTHORIZATION_KEY"),
    ({"AUTHORIZATION_KEY": ACCESS_KEY}, "OPENAI_API_KEY"),
    ({**BASE, "OPENAI_API_KEY": "   "}, "OPENAI_API_KEY"),
    ({**BASE, "KEEPALIVE_SECONDS": "soon"}, "KEEPALIVE_SECONDS"),
    ({**BASE, "UPSTREAM_TIMEOUT": "-1"}, "UPSTREAM_TIMEOUT"),
    ({**BASE, "FIRST_TOKEN_TIMEOUT": "nan"}, "FIRST_TOKEN_TIMEOUT"),
    ({**BASE, "MAX_BODY_BYTES": "1.5"}, "MAX_BODY_BYTES"),
    ({**BASE, "MAX_TOKENS": "0"}, "MAX_TOKENS"),
    ({**BASE, "OPENAI_BASE_URL": "api.openai.com/v1"}, "OPENAI_BASE_URL"),
    ({**BASE, "OPENAI_BASE_URL": "http://host:notaport/v1"}, "OPENAI_BASE_URL"),
    ({**BASE, "CORS_ORIGINS": "https://ok.example,not an origin"}, "CORS_ORIGINS"),
    ({**BASE, "LOG_CONTENT": "maybe"}, "LOG_CONTENT"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    """A missing key or a malformed value stops start-up with a message naming the variable, never a key."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env)
    assert str(caught.value).startswith(variable)
    assert ACCESS_KEY not in str(caught.value) and UPSTREAM_KEY not in str(caught.value)


def test_settings_are_parsed() -> None:
    """Every documented setting is read, with lists split on commas and defaults filled in."""
    config = Config.from_env({**BASE, "AUTHORIZATION_KEY": "a-0123456789abcdef, b-0123456789abcdef",
                              "ALLOWED_MODELS": "gpt-4o*, kimi-k2",
                              "KEEPALIVE_SECONDS": "5", "MAX_TOKENS": "256", "LOG_CONTENT": "true",
                              "OPENAI_BASE_URL": "https://api.moonshot.cn/v1/"})
    assert config.authorization_keys == ("a-0123456789abcdef", "b-0123456789abcdef")
    assert config.allowed_models == ("gpt-4o*", "kimi-k2")
    assert (config.keepalive_seconds, config.max_tokens, config.log_content) == (5.0, 256, True)
    assert config.openai_base_url == "https://api.moonshot.cn/v1"
    assert config.first_token_timeout > config.upstream_timeout
    assert UPSTREAM_KEY not in repr(config)


def blank_settings_of_env_example() -> dict[str, str]:
    """Every `NAME=` line of .env.example as systemd's EnvironmentFile and Docker's env_file pass it: set, empty."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {name: value for name, _, value in (line.partition("=") for line in lines
                                               if line and not line.startswith("#"))}


def test_env_example_copied_with_only_the_keys_filled_gives_every_default() -> None:
    """An empty setting means its default, for the app's settings and gunicorn's alike."""
    blanks = blank_settings_of_env_example()
    assert len(blanks) > 30 and set(blanks.values()) == {""}
    assert {"GUNICORN_BIND", "GUNICORN_WORKERS", "GUNICORN_LOG_LEVEL"} <= set(blanks)
    env = {**blanks, **BASE}
    assert Config.from_env(env) == Config.from_env(BASE)
    assert ServerSettings.from_env(env) == ServerSettings.from_env({})
    assert ServerSettings.from_env(env).bind == "127.0.0.1:8000"
    assert ServerSettings.from_env(env).workers == (os.cpu_count() or 1)


@pytest.mark.parametrize(("variable", "value"), [
    ("GUNICORN_BIND", "8000"), ("GUNICORN_BIND", "127.0.0.1:http"), ("GUNICORN_BIND", ":8000"),
    ("GUNICORN_WORKERS", "two"), ("GUNICORN_WORKERS", "0"), ("GUNICORN_WORKER_CONNECTIONS", "-5"),
    ("GUNICORN_GRACEFUL_TIMEOUT", "1.5"), ("GUNICORN_LOG_LEVEL", "loud"),
])
def test_bad_server_settings_name_the_variable(variable: str, value: str) -> None:
    """gunicorn's settings are validated like the app's: one line naming the variable."""
    with pytest.raises(ConfigError) as caught:
        ServerSettings.from_env({variable: value})
    assert str(caught.value).startswith(f"{variable}: ") and "\n" not in str(caught.value)


def test_server_settings_are_parsed() -> None:
    """Set values are used as given; the banner's URL is one a browser on this host can open."""
    settings = ServerSettings.from_env({"GUNICORN_BIND": "0.0.0.0:9001", "GUNICORN_WORKERS": "3",
                                        "GUNICORN_LOG_LEVEL": "WARNING"})
    assert (settings.bind, settings.workers, settings.log_level) == ("0.0.0.0:9001", 3, "warning")
    assert settings.url == "http://127.0.0.1:9001/"
    banner = demo_banner(settings, "the-key")
    assert "http://127.0.0.1:9001/" in banner and "the-key" in banner


def test_run_command_reads_dotenv_under_real_variables(tmp_path: Path) -> None:
    """`make run` passes .env's settings (GUNICORN_* included) to gunicorn; a real variable wins."""
    env_file = tmp_path / ".env"
    env_file.write_text("GUNICORN_BIND=127.0.0.1:9123\nGUNICORN_WORKERS=3\nDEFAULT_MODEL=from-file\n")
    env = run_environment({"DEFAULT_MODEL": "from-environment", "PATH": "/bin"}, env_file)
    assert ServerSettings.from_env(env).bind == "127.0.0.1:9123"
    assert ServerSettings.from_env(env).workers == 3
    assert env["DEFAULT_MODEL"] == "from-environment"
    assert run_environment({"PATH": "/bin"}, tmp_path / "missing") == {"PATH": "/bin"}


@pytest.mark.parametrize(("variable", "value"), [("GUNICORN_WORKERS", "two"), ("GUNICORN_LOG_LEVEL", "loud")])
def test_gunicorn_refuses_a_bad_server_setting_in_one_line(tmp_path: Path, variable: str, value: str) -> None:
    """A malformed GUNICORN_* value stops gunicorn with the relay's one-line reason, not a traceback."""
    relay = start_relay(tmp_path, relay_env("http://127.0.0.1:9/v1", **{variable: value}), wait=False)
    assert relay.process.wait(20) != 0
    log = relay.log_text()
    reason = [line for line in log.splitlines() if line.startswith("relay: refusing to start")]
    assert len(reason) == 1 and variable in reason[0], log
    assert "Traceback" not in log


@pytest.mark.parametrize(("drop", "variable"), [("AUTHORIZATION_KEY", "AUTHORIZATION_KEY"),
                                                ("OPENAI_API_KEY", "OPENAI_API_KEY")])
def test_gunicorn_refuses_to_start_in_one_line(tmp_path: Path, drop: str, variable: str) -> None:
    """The production start refuses to run open, with a one-line reason and no traceback."""
    env = relay_env("http://127.0.0.1:9/v1")
    del env[drop]
    relay = start_relay(tmp_path, env, wait=False)
    assert relay.process.wait(20) != 0
    log = relay.log_text()
    reason = [line for line in log.splitlines() if line.startswith("relay: refusing to start")]
    assert len(reason) == 1 and variable in reason[0]
    assert "Traceback" not in log


@pytest.mark.parametrize("variable", ["METRICS_KEY", "ADMIN_KEY"])
def test_gunicorn_refuses_a_short_bearer_key_without_showing_it(tmp_path: Path, variable: str) -> None:
    """METRICS_KEY or ADMIN_KEY under 16 characters stops the production start with one line naming the
    variable and the rule, never the key."""
    short = "guessable-key15"
    relay = start_relay(tmp_path, relay_env("http://127.0.0.1:9/v1", **{variable: short}), wait=False)
    assert relay.process.wait(20) != 0
    log = relay.log_text()
    reason = [line for line in log.splitlines() if line.startswith("relay: refusing to start")]
    assert len(reason) == 1 and f"{variable}: the key is shorter than 16 characters" in reason[0], log
    assert short not in log and "Traceback" not in log


def test_demo_mode_serves_the_stand_in_model(tmp_path: Path) -> None:
    """RELAY_DEMO=1 needs no upstream key and answers every endpoint family with a labelled stand-in answer."""
    env = relay_env("http://127.0.0.1:9/v1", RELAY_DEMO="1")
    del env["OPENAI_API_KEY"]
    relay = start_relay(tmp_path, env)
    question = {"messages": [{"role": "user", "content": "ping"}]}
    try:
        # The stand-in answers at its own pace (a word every 30 ms): the three streams are asked side by side.
        with ThreadPoolExecutor(3) as pool:
            asked = [
                pool.submit(httpx2.post, f"{relay.url}/chat", headers=relay.headers(), timeout=20, json=question),
                pool.submit(httpx2.post, f"{relay.url}/v1/chat/completions", headers=relay.headers(), timeout=20,
                            json={**question, "stream": True, "stream_options": {"include_usage": True}}),
                pool.submit(httpx2.get, f"{relay.url}/chat", params={"prompt": "ping"}, headers=relay.headers(),
                            timeout=20),
            ]
            response, streamed, sse = (future.result() for future in asked)
        records = [json.loads(line) for line in response.text.splitlines() if line]
        text = "".join(r["content"] for r in records if not r["done"])
        assert "Demo mode" in text and "ping" in text
        assert records[-1]["done"] is True and records[-1]["usage"]["completion_tokens"] > 0
        whole = httpx2.post(f"{relay.url}/v1/chat/completions", headers=relay.headers(), timeout=20,
                            json=question)
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["message"]["content"] == text
        assert whole.json()["usage"]["total_tokens"] > 0
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == text
        assert events[-1]["usage"]["completion_tokens"] > 0
        assert sse.status_code == 200 and "Demo" in sse.text
        models = httpx2.get(f"{relay.url}/v1/models", headers=relay.headers(), timeout=5).json()
        assert [model["id"] for model in models["data"]] == ["gpt-4o-mini", "relay-demo"]  # default, stand-in
        assert httpx2.get(f"{relay.url}/healthz", timeout=5).json()["demo"] is True
        page = httpx2.get(f"{relay.url}/", timeout=5)  # the bundle is built by make test
        assert page.status_code == 200 and 'id="demo-notice"' in page.text
        assert_demo_answers_responses_and_embeddings(relay)
    finally:
        relay.stop()


def assert_demo_answers_responses_and_embeddings(relay: RelayProcess) -> None:
    """Codex-style clients (the Responses API, whole and streamed), legacy completions, embeddings and
    moderations work in demo mode through the official SDK; a family it has no stand-in for is a clear 404."""
    sdk = openai.OpenAI(base_url=f"{relay.url}/v1", api_key=relay.headers()["Authorization"][7:], max_retries=0)
    whole = sdk.responses.create(model="gpt-4o-mini", input="ping")
    assert "Demo mode" in whole.output_text and whole.usage is not None and whole.usage.output_tokens > 0
    events = list(sdk.responses.create(model="gpt-4o-mini", input=[{"role": "user", "content": "ping"}],
                                       stream=True))
    streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert streamed == whole.output_text and events[-1].type == "response.completed"
    vectors = sdk.embeddings.create(model="text-embedding-3-small", input=["same", "same", "other"]).data
    assert vectors[0].embedding == vectors[1].embedding != vectors[2].embedding
    completion = sdk.completions.create(model="gpt-4o-mini", prompt="ping")
    pieces = sdk.completions.create(model="gpt-4o-mini", prompt="ping", stream=True)
    assert "".join(piece.choices[0].text for piece in pieces if piece.choices) == completion.choices[0].text
    assert "Demo mode" in completion.choices[0].text
    assert sdk.moderations.create(input="ping").results[0].flagged is False
    with pytest.raises(openai.NotFoundError, match=r"Demo mode: .* does not serve POST /v1/images/generations"):
        sdk.images.generate(model="gpt-image-1", prompt="a cat")


def test_missing_keys_never_fall_back_to_demo(tmp_path: Path) -> None:
    """Without RELAY_DEMO the app refuses to start when the upstream key is missing, .env or not."""
    env = relay_env("http://127.0.0.1:9/v1")
    del env["OPENAI_API_KEY"]
    (tmp_path / ".env").write_text("# an .env without keys\nDEFAULT_MODEL=x\n")
    relay = start_relay(tmp_path, env, wait=False)
    assert relay.process.wait(20) != 0


def test_env_file_is_read_but_real_variables_win(tmp_path: Path) -> None:
    """Settings come from .env in the working directory; a variable set in the environment overrides it."""
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={UPSTREAM_KEY}\nDEFAULT_MODEL=from-dotenv\n"
                                   "SYSTEM_PROMPT=from dotenv\n")
    env = relay_env("http://127.0.0.1:9/v1", SYSTEM_PROMPT="from environment")
    del env["OPENAI_API_KEY"], env["DEFAULT_MODEL"]
    script = ("from proxy import create_app; from proxy.relay import current_relay\n"
              "app = create_app()\n"
              "with app.app_context():\n"
              "    c = current_relay().config; print(c.default_model, '|', c.system_prompt)")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=30, check=True)
    assert result.stdout.strip() == "from-dotenv | from environment"


@pytest.mark.skipif((ROOT / ".env").exists(), reason="a developer .env exists in the checkout")
def test_run_command_enters_demo_mode_without_configuration() -> None:
    """`python -m proxy run` with no .env and no variables starts demo mode; its banner names the address, the
    chat page's URL, the key and a curl line."""
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
           "GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_WORKERS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "proxy", "run"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = ""
        assert process.stdout is not None
        while "curl" not in banner:
            line = process.stdout.readline()
            assert line, f"run command ended early: {banner}"
            banner += line
        assert "DEMO MODE" in banner and f"Listening on 127.0.0.1:{port}." in banner
        assert f"Chat page: open http://127.0.0.1:{port}/ in a browser" in banner
        key = re.search(r"Access key for this run: (\S+)", banner)
        assert key is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                response = httpx2.post(f"http://127.0.0.1:{port}/chat", timeout=20,
                                       headers={"Authorization": f"Bearer {key.group(1)}"},
                                       json={"messages": [{"role": "user", "content": "hi"}]})
                break
            except httpx2.TransportError:
                time.sleep(0.1)
        assert response.status_code == 200
        text = "".join(json.loads(line)["content"] for line in response.text.splitlines() if line)
        assert "Demo mode" in text
    finally:
        process.terminate()
        process.wait(15)
