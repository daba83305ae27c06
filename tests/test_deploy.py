"""The shipped deploy/ files: systemd unit, nginx site, Caddyfile, Dockerfile and compose file.

nginx and Caddy run for real (system packages, scripts/install-test-deps.sh) with the shipped files,
in front of a small loopback backend that streams records with pauses, so that what is measured is the
proxy configuration alone. The relay itself behind them is tested in test_proxies.py.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from proxy.web import STATIC_DIRECTORY
from tests.servers import (
    CADDYFILE,
    NGINX_SITE,
    REPO,
    find_program,
    free_port,
    running_caddy,
    running_nginx,
    running_nginx_site,
)

RECORD_GAP_SECONDS = 0.4
RECORD_COUNT = 4


@dataclass
class Backend:
    """What the streaming backend saw: request headers, and when a client went away mid-stream."""

    address: str
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    client_gone: threading.Event = field(default_factory=threading.Event)


def _streaming_handler(backend: Backend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the tests read what they need from Backend."""

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            backend.seen_headers.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if url.path == "/records":
                count = int(parse_qs(url.query)["count"][0])
                for number in range(count):
                    if number:
                        time.sleep(RECORD_GAP_SECONDS)
                    self._chunk(json.dumps({"n": number, "written": time.time()}).encode() + b"\n")
                self.wfile.write(b"0\r\n\r\n")
            elif url.path == "/forever":
                try:
                    for number in range(600):
                        self._chunk(json.dumps({"n": number}).encode() + b"\n")
                        time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    backend.client_gone.set()
                self.close_connection = True
            else:
                self._chunk(b"{}\n")
                self.wfile.write(b"0\r\n\r\n")

    return Handler


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.daemon_threads = True
    seen = Backend(address=f"127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _streaming_handler(seen)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield seen
    server.shutdown()
    server.server_close()


def _arrival_times(url: str) -> list[tuple[float, float]]:
    """(written, arrived) wall-clock pairs for each record streamed from `url`."""
    pairs = []
    with httpx2.Client(timeout=10) as client, client.stream("GET", url) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                pairs.append((json.loads(line)["written"], time.time()))
    return pairs


def _assert_streamed(pairs: list[tuple[float, float]]) -> None:
    assert len(pairs) == RECORD_COUNT
    for written, arrived in pairs:
        assert arrived - written < RECORD_GAP_SECONDS / 2, f"a record arrived {arrived - written:.2f}s late"


def _assert_disconnect_reaches_backend(url: str, backend: Backend) -> None:
    with httpx2.Client(timeout=10) as client, client.stream("GET", url) as response:
        for line in response.iter_lines():
            if line:
                break
    assert backend.client_gone.wait(2.0), "the backend never learned that the client left"


# ---------------------------------------------------------------- systemd


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """deploy/relay.service passes systemd-analyze verify without a single warning."""
    analyze = find_program("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    # verify insists that ExecStart's program exists: point it at this checkout's gunicorn.
    unit = tmp_path / "relay.service"
    shipped = (REPO / "deploy" / "relay.service").read_text()
    unit.write_text(shipped.replace("/opt/relay/.venv/bin/gunicorn", gunicorn))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_unit_hardening() -> None:
    """The unit runs unprivileged, reads secrets from a file and stops within its graceful window."""
    unit = (REPO / "deploy" / "relay.service").read_text()
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, value)
    assert settings["User"] == "relay"
    assert settings["EnvironmentFile"].startswith("/etc/relay/")
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["Restart"] == "on-failure"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["KillSignal"] == "SIGTERM"
    assert int(settings["TimeoutStopSec"]) > 30, "systemd would SIGKILL before the relay's grace period ends"
    assert "KEY" not in "".join(v for k, v in settings.items() if k == "Environment")


# ---------------------------------------------------------------- nginx


def test_nginx_streams_each_record_as_written(tmp_path: Path, backend: Backend) -> None:
    """Through the shipped nginx site, every record reaches the client as soon as it is written."""
    with running_nginx(tmp_path / "nginx", backend.address) as nginx:
        _assert_streamed(_arrival_times(f"{nginx.url}/records?count={RECORD_COUNT}"))


def test_nginx_forwards_client_address(tmp_path: Path, backend: Backend) -> None:
    """nginx appends the peer's address to X-Forwarded-For (rightmost) and sets X-Real-IP and the scheme."""
    with running_nginx(tmp_path / "nginx", backend.address) as nginx:
        httpx2.get(f"{nginx.url}/headers", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
    seen = backend.seen_headers[-1]
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-real-ip"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"


def test_nginx_passes_client_disconnect(tmp_path: Path, backend: Backend) -> None:
    """When the client leaves mid-stream, nginx closes its connection to the relay at once."""
    with running_nginx(tmp_path / "nginx", backend.address) as nginx:
        _assert_disconnect_reaches_backend(f"{nginx.url}/forever", backend)


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=relay.example.com",
            "-addext",
            "subjectAltName=DNS:relay.example.com,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def test_nginx_tls_site_serves_http2(tmp_path: Path, backend: Backend) -> None:
    """The shipped site, TLS included, runs with a test certificate: h2 by ALPN, HSTS, port 80 redirects."""
    prefix = tmp_path / "nginx-tls"
    prefix.mkdir()
    cert, key = _self_signed_certificate(prefix)
    http_port = free_port()

    def tls_site(tls_port: int) -> str:
        return (
            NGINX_SITE.read_text()
            .replace("listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;")
            .replace("listen 80;", f"listen 127.0.0.1:{http_port};")
            .replace("listen [::]:443 ssl http2;", "")
            .replace("listen [::]:80;", "")
            .replace("/etc/letsencrypt/live/relay.example.com/fullchain.pem", str(cert))
            .replace("/etc/letsencrypt/live/relay.example.com/privkey.pem", str(key))
            .replace("server 127.0.0.1:8000;", f"server {backend.address};")
        )

    with running_nginx_site(prefix, tls_site) as nginx:
        tls_url = nginx.url.replace("http://", "https://")
        tls_port = int(tls_url.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=str(cert))
        context.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="relay.example.com") as tls,
        ):
            assert tls.selected_alpn_protocol() == "h2"
        with httpx2.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=10) as client:
            response = client.get(f"{tls_url}/headers", headers={"Host": "relay.example.com"})
            assert response.status_code == 200
            assert response.headers["strict-transport-security"].startswith("max-age=")
            assert backend.seen_headers[-1]["x-forwarded-proto"] == "https"
            redirect = client.get(f"http://127.0.0.1:{http_port}/chat", headers={"Host": "relay.example.com"})
            assert redirect.status_code == 308
            assert redirect.headers["location"] == "https://relay.example.com/chat"


# ---------------------------------------------------------------- caddy


def test_caddyfile_is_valid() -> None:
    """The shipped Caddyfile passes caddy validate as it is, real domain and automatic HTTPS included."""
    caddy = find_program("caddy")
    if caddy is None:
        pytest.skip("caddy is not packaged for this system")
    result = subprocess.run(
        [caddy, "validate", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    formatted = subprocess.run([caddy, "fmt", str(CADDYFILE)], capture_output=True, text=True, timeout=60)
    assert formatted.stdout == CADDYFILE.read_text(), "deploy/Caddyfile is not in caddy fmt's format"


def test_caddy_streams_each_record_as_written(tmp_path: Path, backend: Backend) -> None:
    """Through the shipped Caddyfile, every record reaches the client as soon as it is written."""
    if find_program("caddy") is None:
        pytest.skip("caddy is not packaged for this system")
    with running_caddy(tmp_path / "caddy", backend.address) as caddy:
        _assert_streamed(_arrival_times(f"{caddy.url}/records?count={RECORD_COUNT}"))


def test_caddy_passes_client_disconnect(tmp_path: Path, backend: Backend) -> None:
    """When the client leaves mid-stream, Caddy closes its connection to the relay at once."""
    if find_program("caddy") is None:
        pytest.skip("caddy is not packaged for this system")
    with running_caddy(tmp_path / "caddy", backend.address) as caddy:
        _assert_disconnect_reaches_backend(f"{caddy.url}/forever", backend)


# ---------------------------------------------------------------- containers (no engine here: static checks)


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    joined = dockerfile.replace("\\\n", " ")
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_dockerfile_is_slim_unprivileged_and_secret_free() -> None:
    """The Dockerfile uses a slim base, runs as a non-root user, checks /healthz and copies no secret."""
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    instructions = _instructions(dockerfile)
    words = [word for word, _ in instructions]
    assert instructions[0][0] == "FROM" and "-slim" in instructions[0][1]
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert words.index("USER") < words.index("CMD")
    assert any(word == "HEALTHCHECK" and "/healthz" in rest for word, rest in instructions)
    for word, rest in instructions:
        if word in ("COPY", "ADD"):
            assert ".env" not in rest and rest.split()[0] not in (".", "./")
        if word in ("ENV", "ARG"):
            assert "API_KEY" not in rest and "AUTHORIZATION_KEY" not in rest
    ignore = [
        line
        for line in (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*", "the build context must be an allow-list, so that .env never gets in"


def test_compose_file_runs_relay_with_redis() -> None:
    """compose.yaml runs the relay from the Dockerfile with Redis as its limit storage, secrets from .env."""
    compose = (REPO / "deploy" / "compose.yaml").read_text()
    assert "dockerfile: deploy/Dockerfile" in compose
    assert "RATE_LIMIT_STORAGE_URI: redis://redis:6379/0" in compose
    assert "- ../.env" in compose
    assert "image: redis:" in compose and '"--appendonly", "no"' in compose
    assert not re.search(r"^\s*-?\s*\w*(API_KEY|AUTHORIZATION_KEY|METRICS_KEY)\b", compose, re.MULTILINE)
    assert '"127.0.0.1:8000:8000"' in compose, "the relay's port must not be published on every interface"


def _stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """A multi-stage Dockerfile's instructions by stage name (`FROM image AS name`; unnamed: its number)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in instructions:
        if word == "FROM":
            named = re.search(r"\s+AS\s+(\S+)$", rest, re.IGNORECASE)
            current = stages.setdefault(named.group(1) if named else str(len(stages)), [])
        current.append((word, rest))
    return stages


def test_dockerfile_builds_the_chat_page_where_the_app_serves_it(tmp_path: Path) -> None:
    """The image's web stage builds the bundle from only the files it copies in (its commands run here, the
    packages from make's own `npm ci` of the same lockfile), and the final stage puts it where the app serves
    the page from, so a container never answers / with 503. (No engine here to build the image itself.)"""
    node_modules = REPO / "proxy" / "web" / "node_modules"
    if find_program("npm") is None or not node_modules.is_dir():
        pytest.skip("the chat page's packages are not installed (make assets)")
    stages = _stages(_instructions((REPO / "deploy" / "Dockerfile").read_text()))
    workdir = ""
    for word, rest in stages["web"][1:]:
        if word == "WORKDIR":
            workdir = rest
        elif word == "COPY":
            *sources, destination = rest.split()
            target = tmp_path / Path(workdir, destination).relative_to(workdir)
            for source in sources:
                copied = target / Path(source).name if destination.endswith("/") else target
                copy = shutil.copytree if (REPO / source).is_dir() else shutil.copy2
                copied.parent.mkdir(parents=True, exist_ok=True)
                copy(REPO / source, copied)
        elif rest.startswith("npm ci"):
            (tmp_path / "node_modules").symlink_to(node_modules)  # the lockfile's packages, as npm ci installs them
        else:
            assert word == "RUN", f"unexpected instruction in the web stage: {word} {rest}"
            subprocess.run(["sh", "-c", rest], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    copied_out = [rest.split()[1:] for word, rest in stages["1"] if word == "COPY" and rest.startswith("--from=web")]
    assert len(copied_out) == 1, copied_out
    built, destination = copied_out[0]
    assert (tmp_path / Path(built).relative_to(workdir) / "app.js").is_file(), "the web stage built no app.js"
    final_workdir = next(rest for word, rest in stages["1"] if word == "WORKDIR")
    served = STATIC_DIRECTORY / "dist"
    assert Path(final_workdir, destination) == Path(final_workdir) / served.relative_to(REPO)
