"""Real nginx, redis-server and Caddy for the tests: free loopback ports, one temporary directory each,
no system daemon touched, every process stopped when its `with` block ends.

The shipped configs (deploy/nginx/relay.conf, deploy/Caddyfile) are run as they are, with only the
documented loopback rewrites applied (see the comments at the top of each file).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NGINX_SITE = REPO / "deploy" / "nginx" / "relay.conf"
CADDYFILE = REPO / "deploy" / "Caddyfile"
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0
# A port picked free can be taken by a concurrent test run before our server binds it: try again.
START_ATTEMPTS = 3


class ServerStartError(RuntimeError):
    """A test server did not come up; the message carries its log."""


def find_program(name: str) -> str | None:
    """Path of a system program, also in the sbin directories a non-root PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], object], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll `condition` until it is true or `timeout` seconds pass; whether it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"{process.args!r} exited with {process.returncode}:\n{_tail(log)}")
        if _port_open(port):
            return
        time.sleep(0.05)
    stop_process(process)
    raise ServerStartError(f"{process.args!r} did not listen on {port}:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Ask a server to stop; kill it if it has not gone within STOP_TIMEOUT_SECONDS."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_SECONDS)


def _start_on_free_port(
    command_for_port: Callable[[int], list[str]], log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `command_for_port(port)` on a free port, retrying when another process took the port."""
    last_error: ServerStartError | None = None
    for _attempt in range(START_ATTEMPTS):
        port = free_port()
        with log.open("ab") as log_file:
            process = subprocess.Popen(
                command_for_port(port),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            _wait_until_listening(process, port, log)
        except ServerStartError as error:
            stop_process(process)
            if "in use" not in str(error):
                raise
            last_error = error
            continue
        return process, port
    assert last_error is not None
    raise last_error


# ---------------------------------------------------------------- nginx


def nginx_site_for_loopback(site_text: str, listen_port: int, relay_address: str, redirect_port: int,
                            log_directory: Path | None = None) -> str:
    """The shipped nginx site rewritten for plain HTTP on loopback, exactly as its header documents.

    Each rewrite must match, so an edit of the shipped file that the tests no longer understand fails
    loudly instead of silently testing something else. Its access and error logs go to
    `log_directory`/access.log and error.log (the files `nginx_main_config` names) when given.
    """
    access_log = "access_log /var/log/nginx/access.log relay_noquery;"
    rewrites = {
        "listen 443 ssl http2;": f"listen 127.0.0.1:{listen_port};",
        "listen 80;": f"listen 127.0.0.1:{redirect_port};",
        "server 127.0.0.1:8000;": f"server {relay_address};",
    }
    expected = dict.fromkeys(rewrites, 1)
    error_log = "error_log /var/log/nginx/error.log crit;"
    if log_directory is not None:
        rewrites[access_log] = f"access_log {log_directory}/access.log relay_noquery;"
        rewrites[error_log] = f"error_log {log_directory}/error.log crit;"
        expected[access_log] = expected[error_log] = 2  # one per server block
    seen = dict.fromkeys(rewrites, 0)
    out: list[str] = []
    for line in site_text.splitlines():
        stripped = line.strip()
        if stripped in rewrites:
            out.append(line.replace(stripped, rewrites[stripped]))
            seen[stripped] += 1
        elif stripped.startswith(("listen [::]:", "ssl_")):
            continue  # IPv6 listeners and TLS settings have no place on a plain loopback port
        else:
            out.append(line)
    if seen != expected:
        raise AssertionError(f"deploy/nginx/relay.conf no longer has the lines the tests rewrite: {seen}")
    return "\n".join(out) + "\n"


def nginx_main_config(prefix: Path, site: Path) -> str:
    """A minimal nginx.conf that keeps every file nginx writes inside `prefix`."""
    return f"""
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {site};
}}
"""


@dataclass
class Nginx:
    url: str
    prefix: Path
    process: subprocess.Popen[bytes]

    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text(errors="replace")


@contextmanager
def running_nginx_site(prefix: Path, site_for_port: Callable[[int], str]) -> Iterator[Nginx]:
    """nginx in the foreground serving `site_for_port(port)` on a free port, every file under `prefix`."""
    nginx = find_program("nginx")
    if nginx is None:
        raise ServerStartError("nginx is not installed (scripts/install-test-deps.sh installs it)")
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    site = prefix / "site.conf"

    def command(port: int) -> list[str]:
        site.write_text(site_for_port(port))
        conf.write_text(nginx_main_config(prefix, site))
        return [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]

    process, port = _start_on_free_port(command, prefix / "error.log")
    try:
        yield Nginx(url=f"http://127.0.0.1:{port}", prefix=prefix, process=process)
    finally:
        # QUIT: graceful, lets nginx close its connections to the relay before exiting.
        stop_process(process, signal.SIGQUIT)


@contextmanager
def running_nginx(prefix: Path, relay_address: str, site_text: str | None = None) -> Iterator[Nginx]:
    """nginx with the shipped site (or `site_text`, a site with the same rewrite points) on plain
    HTTP in front of `relay_address` ("127.0.0.1:PORT")."""
    text = site_text if site_text is not None else NGINX_SITE.read_text()
    with running_nginx_site(
        prefix, lambda port: nginx_site_for_loopback(text, port, relay_address, redirect_port=free_port(),
                                                     log_directory=prefix)
    ) as nginx:
        yield nginx


# ---------------------------------------------------------------- redis


@dataclass
class Redis:
    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_process(self.process)

    def start(self) -> None:
        """Start again on the same port (after stop()), as a Redis restart looks to its clients."""
        self.process = _launch_redis(self.directory, self.port)
        _wait_until_listening(self.process, self.port, self.directory / "redis.log")


def _redis_command(directory: Path, port: int) -> list[str]:
    program = find_program("redis-server")
    if program is None:
        raise ServerStartError("redis-server is not installed (scripts/install-test-deps.sh installs it)")
    return [
        program,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]


def _launch_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    with (directory / "redis.log").open("ab") as log_file:
        return subprocess.Popen(
            _redis_command(directory, port),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextmanager
def running_redis(directory: Path) -> Iterator[Redis]:
    """A throwaway redis-server on a free loopback port: no persistence, files under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    process, port = _start_on_free_port(lambda port: _redis_command(directory, port), directory / "redis.log")
    redis = Redis(port=port, directory=directory, process=process)
    try:
        yield redis
    finally:
        redis.stop()


# ---------------------------------------------------------------- caddy


def caddyfile_for_loopback(caddyfile_text: str, listen_port: int, relay_address: str) -> str:
    """The shipped Caddyfile rewritten for plain HTTP on loopback, exactly as its header documents."""
    rewrites = {
        "{": "{\n\tadmin off\n\tauto_https off",  # the global options block
        "relay.example.com {": f"http://127.0.0.1:{listen_port} {{",
        "reverse_proxy 127.0.0.1:8000 {": f"reverse_proxy {relay_address} {{",
    }
    seen = dict.fromkeys(rewrites, 0)
    out = []
    for line in caddyfile_text.splitlines():
        stripped = line.strip()
        if stripped in rewrites:
            line = line.replace(stripped, rewrites[stripped])
            seen[stripped] += 1
        out.append(line)
    if any(count != 1 for count in seen.values()):
        raise AssertionError(f"deploy/Caddyfile no longer has the lines the tests rewrite: {seen}")
    return "\n".join(out) + "\n"


@dataclass
class Caddy:
    url: str
    directory: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return (self.directory / "caddy.log").read_text(errors="replace")


@contextmanager
def running_caddy(directory: Path, relay_address: str) -> Iterator[Caddy]:
    """Caddy with the shipped Caddyfile in front of `relay_address`, state kept under `directory`."""
    caddy = find_program("caddy")
    if caddy is None:
        raise ServerStartError("caddy is not installed (scripts/install-test-deps.sh installs it)")
    directory.mkdir(parents=True, exist_ok=True)
    caddyfile = directory / "Caddyfile"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "XDG_CONFIG_HOME": str(directory / "config"),
        "XDG_DATA_HOME": str(directory / "data"),
    }

    def command(port: int) -> list[str]:
        caddyfile.write_text(caddyfile_for_loopback(CADDYFILE.read_text(), port, relay_address))
        return [caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"]

    process, port = _start_on_free_port(command, directory / "caddy.log", env=env)
    try:
        yield Caddy(url=f"http://127.0.0.1:{port}", directory=directory, process=process)
    finally:
        stop_process(process)


# ---------------------------------------------------------------- postgresql


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster (the usage ledger's server), trust authentication on loopback only."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"postgresql://relay@127.0.0.1:{self.port}/postgres"

    def pause(self) -> None:
        """SIGSTOP the postmaster and its backends: a database that accepts connections and never answers."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, number: signal.Signals) -> None:
        children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True,
                                  check=False).stdout.split()
        os.kill(self.process.pid, number)
        for pid in children:
            # A backend whose session ended between pgrep and here is gone, which is what a signal wanted.
            with suppress(ProcessLookupError):
                os.kill(int(pid), number)


def postgres_program(name: str) -> str | None:
    """initdb and postgres live in /usr/lib/postgresql/<version>/bin on Debian, not on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else shutil.which(name)


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    """initdb in a fresh /tmp directory and postgres on a free loopback port; as the `postgres` system user
    when the tests run as root (PostgreSQL refuses to run as root). No fsync: nothing here must survive."""
    import pwd
    import tempfile

    initdb, postgres = postgres_program("initdb"), postgres_program("postgres")
    if initdb is None or postgres is None:
        raise ServerStartError("PostgreSQL is not installed (scripts/install-system-deps.sh installs it)")
    directory = Path(tempfile.mkdtemp(prefix="relay-postgres-"))
    user = "postgres" if os.geteuid() == 0 else None
    if user is not None:
        account = pwd.getpwnam(user)
        os.chown(directory, account.pw_uid, account.pw_gid)
    data, log = directory / "data", directory / "postgres.log"
    try:
        subprocess.run([initdb, "-D", str(data), "-U", "relay", "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, user=user, cwd=directory)
        for _attempt in range(START_ATTEMPTS):
            port = free_port()
            with log.open("ab") as log_file:
                process = subprocess.Popen(
                    [postgres, "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                     "-c", f"unix_socket_directories={directory}", "-c", "fsync=off",
                     "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                    stdout=log_file, stderr=subprocess.STDOUT, user=user, cwd=directory, start_new_session=True)
            try:
                _wait_until_listening(process, port, log)
                break
            except ServerStartError as error:
                stop_process(process)
                if "in use" not in str(error):
                    raise
        server = Postgres(port, directory, process)
        try:
            yield server
        finally:
            server.resume()
            stop_process(process, signal.SIGINT)  # "fast" shutdown: ends the relays' sessions at once
    finally:
        shutil.rmtree(directory, ignore_errors=True)
