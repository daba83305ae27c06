"""The relay under gunicorn behind the shipped nginx site and Caddyfile (real servers, plain HTTP on
loopback): records stream through unbuffered, keep-alive lines carry a stream past a short proxy read
timeout, a client leaving reaches the upstream, and X-Forwarded-For is believed only from trusted proxies."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.servers import NGINX_SITE, Caddy, Nginx, find_program, running_caddy, running_nginx, wait_until

HELLO = {"messages": [{"role": "user", "content": "Hello"}]}


def address(relay: RelayProcess) -> str:
    return relay.url.removeprefix("http://")


def timed_records(url: str, headers: dict[str, str], body: Any = HELLO) -> list[tuple[float, bytes]]:
    """Each line of a /chat answer with the seconds since the request went out."""
    out: list[tuple[float, bytes]] = []
    start = time.monotonic()
    with httpx2.stream("POST", f"{url}/chat", json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        pending = b""
        for block in response.iter_raw():
            pending += block
            *lines, pending = pending.split(b"\n")
            out += [(time.monotonic() - start, line) for line in lines]
    return out


@pytest.fixture(scope="module")
def proxied_relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    return relay_factory(KEEPALIVE_SECONDS="0.3", TRUSTED_PROXIES="127.0.0.1")


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, proxied_relay: RelayProcess) -> Iterator[Nginx]:
    with running_nginx(tmp_path_factory.mktemp("nginx"), address(proxied_relay)) as server:
        yield server


@pytest.fixture(scope="module")
def caddy(tmp_path_factory: pytest.TempPathFactory, proxied_relay: RelayProcess) -> Iterator[Caddy]:
    if find_program("caddy") is None:
        pytest.skip("caddy is not packaged for this system")
    with running_caddy(tmp_path_factory.mktemp("caddy"), address(proxied_relay)) as server:
        yield server


def assert_flushed(lines: list[tuple[float, bytes]]) -> None:
    records = [(at, line) for at, line in lines if line]
    first_at, last_at = records[0][0], records[-1][0]
    assert first_at < 1.0, f"first record after {first_at:.2f}s"  # the upstream's last token comes at 1.5 s
    assert last_at - first_at > 1.3, "the records came together at the end: something buffered them"
    assert json.loads(records[-1][1])["content"] == "[DONE]"


@pytest.mark.parametrize("proxy", ["nginx", "caddy"])
def test_records_stream_through_the_proxy(proxy: str, request: pytest.FixtureRequest,
                                          proxied_relay: RelayProcess, fake: FakeUpstream) -> None:
    """Behind the shipped nginx site and Caddyfile, each record reaches the client as the upstream sends it."""
    server: Nginx | Caddy = request.getfixturevalue(proxy)
    fake.behave(tokens=["a", "b", "c", "d"], token_interval=0.5)
    assert_flushed(timed_records(server.url, proxied_relay.headers()))


def short_read_timeout_site() -> str:
    text = NGINX_SITE.read_text()
    assert text.count("proxy_read_timeout 600s;") == 1
    return text.replace("proxy_read_timeout 600s;", "proxy_read_timeout 1s;")


def test_keepalive_carries_a_stream_past_nginx_read_timeout(tmp_path: Path, relay_factory: Callable[..., RelayProcess],
                                                            proxied_relay: RelayProcess, fake: FakeUpstream) -> None:
    """With nginx's read timeout cut to 1 s, a 2.5 s silent first token still arrives: keep-alive lines
    keep the connection busy. With keep-alives rarer than the timeout, nginx cuts the same stream."""
    fake.behave(tokens=["late"], first_token_delay=2.5)
    with_keepalive = proxied_relay  # KEEPALIVE_SECONDS=0.3
    with running_nginx(tmp_path / "kept", address(with_keepalive), short_read_timeout_site()) as nginx:
        lines = timed_records(nginx.url, with_keepalive.headers())
    contents = [json.loads(line)["content"] for _, line in lines if line]
    assert contents == ["late", "[DONE]"]

    fake.behave(tokens=["late"], first_token_delay=2.5)
    rare_keepalive = relay_factory(KEEPALIVE_SECONDS="5")
    with running_nginx(tmp_path / "cut", address(rare_keepalive), short_read_timeout_site()) as nginx:
        try:
            response = httpx2.post(f"{nginx.url}/chat", json=HELLO, headers=rare_keepalive.headers(), timeout=30)
            cut = response.status_code == 504 or "[DONE]" not in response.text
        except httpx2.RemoteProtocolError:  # nginx gave up mid-body: the chunked answer just stops
            cut = True
        assert cut
        # nginx's read timeout ended it (its error log, at crit in the shipped site, no longer says so): the
        # request took about the 1 s timeout, less than the 2.5 s the first token would have taken.
        access_log = nginx.prefix / "access.log"
        assert wait_until(lambda: access_log.exists() and '"POST /chat ' in access_log.read_text())
        line = next(line for line in access_log.read_text().splitlines() if '"POST /chat ' in line)
        assert 0.9 <= float(line.rsplit(" ", 1)[1]) < 2.4, line


@pytest.mark.parametrize("proxy", ["nginx", "caddy"])
def test_client_leaving_through_the_proxy_closes_the_upstream(proxy: str, request: pytest.FixtureRequest,
                                                              proxied_relay: RelayProcess,
                                                              fake: FakeUpstream) -> None:
    """A client hanging up on nginx or Caddy mid-answer closes the upstream request within 2 s."""
    server: Nginx | Caddy = request.getfixturevalue(proxy)
    fake.behave(n_tokens=500, token_interval=0.1)
    with httpx2.stream("POST", f"{server.url}/chat", json=HELLO, headers=proxied_relay.headers(),
                       timeout=30) as response:
        for line in response.iter_lines():
            if line:
                break
        left_at = time.monotonic()
    assert fake.wait_for(lambda: fake.streams_closed, timeout=5)
    closed = fake.streams_closed[0]
    assert not closed.completed and closed.at - left_at < 2.0


# ---------------------------------------------------------------- X-Forwarded-For


def logged_client(relay: RelayProcess, request_id: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in relay.log_text().splitlines():
            if f"request_id={request_id}" in line:
                return line.split(" client=", 1)[1].split(" ", 1)[0]
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {request_id}")


def healthz_client(url: str, relay: RelayProcess, request_id: str, forwarded_for: str) -> str:
    httpx2.get(f"{url}/healthz", headers={"X-Request-ID": request_id, "X-Forwarded-For": forwarded_for},
               timeout=10)
    return logged_client(relay, request_id)


def test_forwarded_for_is_believed_only_from_trusted_proxies(relay_factory: Callable[..., RelayProcess],
                                                              proxied_relay: RelayProcess, nginx: Nginx) -> None:
    """X-Forwarded-For names the client only when the peer is in TRUSTED_PROXIES; otherwise it is ignored."""
    untrusted = relay_factory()
    assert healthz_client(untrusted.url, untrusted, "xff-untrusted", "203.0.113.9") == "127.0.0.1"
    elsewhere = relay_factory(TRUSTED_PROXIES="10.0.0.0/8")
    assert healthz_client(elsewhere.url, elsewhere, "xff-other-net", "203.0.113.9") == "127.0.0.1"
    # The peer (127.0.0.1) is trusted: the last address it added is the client.
    assert healthz_client(proxied_relay.url, proxied_relay, "xff-trusted", "198.51.100.7, 203.0.113.9") == (
        "203.0.113.9"
    )
    # Through nginx, a forged header is kept but nginx appends the real peer, which is what the relay uses.
    assert healthz_client(nginx.url, proxied_relay, "xff-forged", "203.0.113.66") == "127.0.0.1"
