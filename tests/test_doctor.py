"""The stream doctor: GET /doctor and `python -m proxy doctor`, read directly, through the shipped nginx site,
through a deliberately buffering nginx, and through an nginx whose read timeout beats the keep-alive."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx2
import pytest

from proxy.doctor import diagnose, read_doctor, report
from tests.conftest import ACCESS_KEY, ROOT, RelayProcess
from tests.servers import NGINX_SITE, running_nginx

# Timing tests (records must arrive one by one, 0.3 s apart): run alone, after the parallel run.
pytestmark = pytest.mark.serial

# Short enough for a test, long enough to see bunching and to outlast a 1 s proxy read timeout.
PLAN = {"records": 5, "interval": 0.3, "gap": 2.5, "after": 2}


@pytest.fixture(scope="module")
def doctor_relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    return relay_factory(KEEPALIVE_SECONDS="0.4")


def address(relay: RelayProcess) -> str:
    return relay.url.removeprefix("http://")


def run_doctor(url: str) -> tuple[bool, str]:
    reading = read_doctor(url, ACCESS_KEY, **PLAN)
    findings = diagnose(reading, PLAN["records"], PLAN["interval"], PLAN["gap"])
    text = report(url, findings, **PLAN)
    print(text)  # shown with pytest -s: the doctor's own words for each path
    return all(finding.ok for finding in findings), text


def buffering_site() -> str:
    """A common real-world mistake: gzip for JSON-ish types, buffering on, the relay's header ignored."""
    text = NGINX_SITE.read_text()
    for shipped, broken in (
        ("gzip off;", "gzip on; gzip_types application/x-ndjson; gzip_min_length 1;"),
        ("proxy_buffering off;", "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;"),
    ):
        assert text.count(shipped) == 1
        text = text.replace(shipped, broken)
    return text


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory, doctor_relay: RelayProcess,
             relay_factory: Callable[..., RelayProcess]) -> dict[str, tuple[bool, str]]:
    """The doctor's verdict on each path, read side by side (each reading is mostly waiting: its records'
    rhythm and a 2.5 s silence): straight from the relay, through the shipped nginx site, through a
    buffering nginx, and through an nginx whose read timeout (1 s) is shorter than the relay's keep-alive
    interval (5 s)."""
    rare_keepalive = relay_factory(KEEPALIVE_SECONDS="5")
    cut_site = NGINX_SITE.read_text().replace("proxy_read_timeout 600s;", "proxy_read_timeout 1s;")
    with ExitStack() as servers:
        urls = {
            "direct": doctor_relay.url,
            "shipped": servers.enter_context(
                running_nginx(tmp_path_factory.mktemp("shipped"), address(doctor_relay))).url,
            "buffering": servers.enter_context(
                running_nginx(tmp_path_factory.mktemp("buffering"), address(doctor_relay), buffering_site())).url,
            "cut": servers.enter_context(
                running_nginx(tmp_path_factory.mktemp("cut"), address(rare_keepalive), cut_site)).url,
        }
        with ThreadPoolExecutor(len(urls)) as pool:
            readings = {path: pool.submit(run_doctor, url) for path, url in urls.items()}
        return {path: reading.result() for path, reading in readings.items()}


def test_doctor_direct_is_clean(verdicts: dict[str, tuple[bool, str]]) -> None:
    """Read straight from the relay, the doctor finds records on time, keep-alive through the gap and [DONE]."""
    ok, text = verdicts["direct"]
    assert ok, text
    assert "records arrive as they are written" in text
    assert "keep-alive carried the stream through 2.5 s of silence" in text


def test_doctor_through_shipped_nginx_is_clean(verdicts: dict[str, tuple[bool, str]]) -> None:
    """Through the shipped nginx site the path streams properly, in the doctor's words."""
    ok, text = verdicts["shipped"]
    assert ok, text
    assert "verdict: this path streams the relay's answers properly" in text


def test_doctor_catches_a_buffering_nginx(verdicts: dict[str, tuple[bool, str]]) -> None:
    """Through an nginx that compresses and buffers, the doctor reports records held back and names compression."""
    ok, text = verdicts["buffering"]
    assert not ok, text
    assert "PROBLEM records are held back" in text
    assert "Content-Encoding: gzip" in text


def test_doctor_catches_a_cut_during_silence(verdicts: dict[str, tuple[bool, str]]) -> None:
    """When nginx's read timeout (1 s) is shorter than the keep-alive interval (5 s), the doctor reports the cut."""
    ok, text = verdicts["cut"]
    assert not ok, text
    assert "PROBLEM the stream was cut 1 s into a 2.5 s silence" in text


def test_doctor_endpoint_needs_a_key_and_sane_parameters(doctor_relay: RelayProcess) -> None:
    """GET /doctor is authenticated, and refuses a gap the relay's own idle timer would cut, in NDJSON."""
    assert httpx2.get(f"{doctor_relay.url}/doctor", timeout=10).status_code == 401
    refused = httpx2.get(f"{doctor_relay.url}/doctor", params={"gap": "500"}, headers=doctor_relay.headers(),
                         timeout=10)
    assert refused.status_code == 400
    assert "IDLE_TIMEOUT" in refused.text and refused.text.rstrip().endswith('"content":"[DONE]"}')


def test_doctor_command_line(doctor_relay: RelayProcess) -> None:
    """`python -m proxy doctor URL KEY` prints the verdict and exits 0 on a good path, 2 on a wrong key."""
    command = [sys.executable, "-m", "proxy", "doctor", doctor_relay.url]
    flags = ["--records", "3", "--interval", "0.2", "--gap", "1", "--after", "1"]
    good = subprocess.run([*command, ACCESS_KEY, *flags], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "verdict: this path streams the relay's answers properly." in good.stdout
    wrong = subprocess.run([*command, "not-a-key", *flags], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert wrong.returncode == 2
    assert "verdict: could not test this path: the relay refused the key" in wrong.stdout
    assert "does not stream properly" not in wrong.stdout  # a wrong key says nothing about the path
