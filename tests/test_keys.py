"""`python -m proxy keys create|list|revoke|hash` as an operator runs it (a subprocess) against the KEYS_FILE of a
running relay (gunicorn, 2 workers): every worker picks each change up within a second, a revoked key's open
WebSocket is closed with 1008, and `keys list` shows last use and spend from Redis or, with the default storage,
from the host's DATA_DIR/limits.db."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import pytest
import simple_websocket

from tests.conftest import ROOT, RelayProcess, relay_env, start_relay
from tests.fake_upstream import FakeUpstream
from tests.servers import find_program, running_redis, wait_until
from tests.test_websocket import ask, closed_with, error_code

LEGACY = "legacy-clear-key-0123456789"
HELLO = {"messages": [{"role": "user", "content": "hi"}]}
PRICES = '[[prices]]\nmodel = "gpt-4o*"\ninput = 1000\noutput = 1000\n'


def keys_cli(path: Path, *argv: str, **env: str) -> str:
    """Run the command as an operator would; its output (it must succeed)."""
    done = subprocess.run([sys.executable, "-m", "proxy", "keys", "--file", str(path), *argv], cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env}, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def created_key(output: str) -> str:
    found = re.search(r"^\s+(rk-\S+)$", output, re.MULTILINE)
    assert found is not None, output
    return found.group(1)


def status(relay: RelayProcess, key: str) -> int:
    return httpx2.post(f"{relay.url}/chat", json=HELLO, headers={"Authorization": f"Bearer {key}"},
                       timeout=20).status_code


def every_worker_answers(relay: RelayProcess, key: str, expected: int, timeout: float) -> bool:
    """Eight requests in a row (spread over both workers by the kernel) get `expected`, within `timeout`."""
    return wait_until(lambda: all(status(relay, key) == expected for _ in range(8)), timeout=timeout, interval=0.1)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    keys, prices = tmp_path / "keys.toml", tmp_path / "prices.toml"
    keys.write_text(f'# the team\n[keys.legacy]\nkey = "{LEGACY}"\n')
    prices.write_text(PRICES)
    return keys, prices


@pytest.fixture
def relay(tmp_path: Path, fake: FakeUpstream, files: tuple[Path, Path]) -> Iterator[RelayProcess]:
    keys, prices = files
    started = start_relay(tmp_path / "relay", relay_env(fake.base_url, GUNICORN_WORKERS="2", KEYS_FILE=str(keys),
                                                        PRICES_FILE=str(prices)))
    yield started
    started.stop()


def test_create_hash_and_revoke_reach_every_worker(relay: RelayProcess, fake: FakeUpstream,
                                                   files: tuple[Path, Path]) -> None:
    """A created key works on every worker within a second and is nowhere in the file or the log; `keys hash`
    converts the clear-text key in place and it keeps working; a revoked key is refused everywhere."""
    keys, _ = files
    key = created_key(keys_cli(keys, "create", "alice", "--daily-spend", "5", "--requests-per-minute", "100"))
    assert every_worker_answers(relay, key, 200, timeout=3)
    assert key not in keys.read_text()
    assert "legacy" in keys_cli(keys, "hash") and LEGACY not in keys.read_text()
    assert "# the team" in keys.read_text()
    assert every_worker_answers(relay, LEGACY, 200, timeout=3)
    listed = keys_cli(keys, "list")
    assert re.search(rf"^alice\s+{re.escape(key[:10])}\s+100/min; 5 spend/day", listed, re.MULTILINE), listed
    assert re.search(r"^legacy\s+lega\s+defaults", listed, re.MULTILINE), listed
    keys_cli(keys, "revoke", "alice")
    revoked_at = time.monotonic()
    assert every_worker_answers(relay, key, 401, timeout=3)
    assert time.monotonic() - revoked_at < 2.5
    assert status(relay, LEGACY) == 200
    log = relay.log_text()
    assert key not in log and LEGACY not in log


def test_revocation_closes_open_websockets(relay: RelayProcess, fake: FakeUpstream, files: tuple[Path, Path]
                                           ) -> None:
    """An idle WebSocket on a revoked key is closed with 1008 about a second after `keys revoke` returns; one
    that keeps talking is refused at its first message after its worker has seen the file; another key's
    connection goes on."""
    keys, _ = files
    key = created_key(keys_cli(keys, "create", "wsuser"))
    assert every_worker_answers(relay, key, 200, timeout=3)
    url = relay.url.replace("http://", "ws://", 1) + "/ws?key="
    idle, chatty = (simple_websocket.Client.connect(url + key) for _ in range(2))
    other = simple_websocket.Client.connect(url + LEGACY)
    try:
        assert error_code(ask(chatty, "hello")) is None
        keys_cli(keys, "revoke", "wsuser")
        revoked_at = time.monotonic()
        assert closed_with(idle, timeout=3) == (1008, "this access key is no longer valid")
        idle_closed_after = time.monotonic() - revoked_at
        # Each worker looks at the file at most every RELOAD_CHECK_SECONDS: the chatty socket's worker may see
        # the revocation up to that much later than the idle socket's, so it asks until refused (bounded).
        refused_by = time.monotonic() + 3.0
        with pytest.raises(simple_websocket.ConnectionClosed) as chatty_closed:
            while time.monotonic() < refused_by:
                ask(chatty, "still me?")
        assert chatty_closed.value.reason == 1008
        assert idle_closed_after < 2.0, f"closed {idle_closed_after:.2f} s after the revocation"
        assert error_code(ask(other, "fine?")) is None
    finally:
        for ws in (idle, chatty, other):
            if ws.connected:
                ws.close()


@pytest.mark.skipif(find_program("redis-server") is None, reason="redis-server is not installed")
def test_list_shows_last_use_and_spend_from_redis(tmp_path: Path, fake: FakeUpstream, files: tuple[Path, Path]
                                                  ) -> None:
    """With Redis storage, `keys list` reads what the workers recorded: today's last use and this month's spend
    (the fake's usage priced by PRICES_FILE), for the key that was used only."""
    keys, prices = files
    with running_redis(tmp_path / "redis") as redis:
        relay = start_relay(tmp_path / "relay", relay_env(
            fake.base_url, GUNICORN_WORKERS="2", KEYS_FILE=str(keys), PRICES_FILE=str(prices),
            RATE_LIMIT_STORAGE_URI=redis.url))
        try:
            key = created_key(keys_cli(keys, "create", "bob", "--monthly-spend", "10"))
            assert every_worker_answers(relay, key, 200, timeout=3)
            today = datetime.now(UTC).strftime("%Y-%m-%d")
            listed = keys_cli(keys, "list", RATE_LIMIT_STORAGE_URI=redis.url)
        finally:
            relay.stop()
    bob = re.search(rf"^bob\s+rk-\S+\s+10 spend/month\s+{today} \d\d:\d\d\s+(\d+\.\d+)$", listed, re.MULTILINE)
    assert bob is not None and float(bob.group(1)) > 0, listed
    assert re.search(r"^legacy\s+\(clear text\)\s+defaults\s+never\s+0\.0000$", listed, re.MULTILINE), listed


def test_list_shows_last_use_and_spend_from_the_host_file(relay: RelayProcess, files: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    """With the default storage, `keys list` reads DATA_DIR/limits.db, which both workers write: today's last
    use and this month's spend of the key with a budget that was used."""
    keys, _ = files
    key = created_key(keys_cli(keys, "create", "dora", "--monthly-spend", "10"))
    assert every_worker_answers(relay, key, 200, timeout=3)
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    listed = keys_cli(keys, "list", DATA_DIR=str(tmp_path / "relay" / "data"))
    dora = re.search(rf"^dora\s+rk-\S+\s+10 spend/month\s+{today} \d\d:\d\d\s+(\d+\.\d+)$", listed, re.MULTILINE)
    assert dora is not None and float(dora.group(1)) > 0, listed
    assert "limits.db" in listed
