"""Shared fixtures: the fake upstream, and the relay under real gunicorn with the production config."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.servers import free_port  # one helper for every test server; re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent
ACCESS_KEY = "test-access-key-7f3a9c"
SECOND_ACCESS_KEY = "second-access-key-51be02"
UPSTREAM_KEY = "sk-upstream-secret-for-tests-4d2e8b6a"
SECRETS = (ACCESS_KEY, SECOND_ACCESS_KEY, UPSTREAM_KEY)


# The test files that take longest, longest first (measured: `pytest --junitxml` summed per file). `make test`
# hands whole files to three workers in collection order, each taking the next file as it finishes one, so
# a long file that starts last keeps the run going alone at the end; started first, the short files fill
# the gaps around it. A file missing here only runs later, in its place among the rest; nothing is skipped.
LONGEST_FIRST = (
    "test_readme_deploy.py", "test_limits.py", "test_keys.py", "test_websocket.py", "test_budgets.py",
    "test_chat.py", "test_restarts.py", "unit/test_key_fuzz.py", "test_startup.py", "test_proxies.py",
    "test_security.py", "test_anthropic.py", "test_openai_api.py", "browser/test_chat_page.py",
    "test_fuzz.py", "test_claude_code.py", "test_upstreams.py", "test_codex_cli.py", "test_bench_smoke.py",
    "test_passthrough.py",
)


# The serial tests (`make test`'s second run) take two workers: the upstream fault matrix and the ledger's
# stalled-database tests, which wait on the relays' timers with a few streams at a time, beside the load and
# timing tests, which run one after another. The load tests never run beside each other, and never beside
# the parallel run.
SERIAL_GROUP_OF_FILE = {"test_faults.py": "timers", "test_ledger.py": "timers"}
SERIAL_GROUP = "load"


def _relative(item: pytest.Item) -> str:
    tests = ROOT / "tests"
    return item.path.relative_to(tests).as_posix() if item.path.is_relative_to(tests) else ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest files first (see LONGEST_FIRST; the order within a file, and of the rest, is kept),
    and put each serial test in its group of the serial run (`--dist loadgroup`)."""
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_relative(item), len(LONGEST_FIRST)))
    for item in items:
        if item.get_closest_marker("serial") is not None:
            group = SERIAL_GROUP_OF_FILE.get(_relative(item), SERIAL_GROUP)
            item.add_marker(pytest.mark.xdist_group(group))


@dataclass
class RelayProcess:
    """The relay running under gunicorn (deploy/gunicorn.conf.py) in a subprocess on a free port."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self, key: str = ACCESS_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def relay_env(upstream_url: str, **overrides: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "AUTHORIZATION_KEY": f"{ACCESS_KEY},{SECOND_ACCESS_KEY}",
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "OPENAI_BASE_URL": upstream_url,
        "DEFAULT_MODEL": "gpt-4o-mini",
        "GUNICORN_WORKERS": "1",
        # Each access line as its request ends: tests read the log right after a response. The batched
        # default is tested on its own (tests/test_reports.py).
        "LOG_FLUSH_SECONDS": "0",
    }
    env.update(overrides)
    return {name: value for name, value in env.items() if value is not None}


def start_relay(workdir: Path, env: dict[str, str], wait: bool = True) -> RelayProcess:
    """Start gunicorn with the production config; `workdir` holds its log (and is its cwd, so no .env)."""
    port = free_port()
    env = {**env, "GUNICORN_BIND": f"127.0.0.1:{port}"}
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"relay-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py"), "wsgi:app"],
            cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    relay = RelayProcess(f"http://127.0.0.1:{port}", process, log_path)
    if wait:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"relay exited early:\n{relay.log_text()}")
            try:
                if httpx2.get(f"{relay.url}/healthz", timeout=1).status_code == 200:
                    return relay
            except httpx2.TransportError:
                time.sleep(0.05)
        relay.stop()
        raise RuntimeError(f"relay did not become healthy:\n{relay.log_text()}")
    return relay


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


@pytest.fixture(scope="session")
def relay_factory(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream
                  ) -> Iterator[Callable[..., RelayProcess]]:
    """A relay per distinct set of extra settings (environment variables), reused across tests and
    stopped at the end of the session. Pass `fresh=True` for a relay of your own (e.g. to stop it)."""
    started: dict[tuple[tuple[str, str], ...], RelayProcess] = {}
    extra: list[RelayProcess] = []

    def make(fresh: bool = False, **overrides: str) -> RelayProcess:
        wanted = tuple(sorted(overrides.items()))
        if not fresh and wanted in started and started[wanted].process.poll() is None:
            return started[wanted]
        relay = start_relay(tmp_path_factory.mktemp("relay"), relay_env(fake.base_url, **overrides))
        if fresh:
            extra.append(relay)
        else:
            started[wanted] = relay
        return relay

    yield make
    stop_all([*started.values(), *extra])


def stop_all(relays: list[RelayProcess]) -> None:
    """Quick shutdown (SIGINT) of every relay at once: graceful stops are tested where they matter, and one
    after another they would each wait out idle keep-alive connections."""
    for relay in relays:
        if relay.process.poll() is None:
            relay.process.send_signal(signal.SIGINT)
    for relay in relays:
        relay.stop(signal.SIGKILL, timeout=10)


@pytest.fixture(scope="session")
def relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    """The relay with default settings and short timers, shared by the tests that do not need others."""
    return relay_factory(KEEPALIVE_SECONDS="0.3", CORS_ORIGINS="https://app.example.com")


Sdk = Callable[..., openai.OpenAI]


@pytest.fixture
def sdk() -> Iterator[Sdk]:
    """The real openai SDK pointed at a relay; its clients are closed after the test, so no idle keep-alive
    connection holds up the relay's graceful stop."""
    clients: list[openai.OpenAI] = []

    def make(relay: RelayProcess, key: str = ACCESS_KEY) -> openai.OpenAI:
        client = openai.OpenAI(base_url=f"{relay.url}/v1", api_key=key, max_retries=0, timeout=20)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


class ProxyTrap:
    """A loopback listener standing in for an HTTP(S) proxy: records the first bytes of every connection."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.caught: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                connection, _address = self.server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                try:
                    self.caught.append(connection.recv(4096))
                except OSError as error:
                    self.caught.append(repr(error).encode())

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def trap() -> Iterator[ProxyTrap]:
    proxy = ProxyTrap()
    yield proxy
    proxy.close()
