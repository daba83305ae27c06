"""The README's deployment, followed to the letter in a fresh copy of the repository.

The commands come from the README's own code blocks, so the README and this test cannot drift apart: a
command this test does not know fails it. What a machine without systemd, Docker or DNS cannot do is
stood in for, as closely as it allows:
- the copy is made from the checkout's files (the README's `git clone`), without .venv, node_modules or
  the built bundle, and the README's install command builds everything;
- the unit's process runs as this user (there is no `relay` system user here), with the environment
  systemd would give it: its `Environment=` lines, then the secrets file read by `EnvironmentFile=` rules
  (a blank `NAME=` line is set and empty), and a minimal PATH;
- everything runs in a private network and mount namespace, so the relay really listens on the unit's
  default `127.0.0.1:8000`, nginx on 80 and 443, and the domain resolves there (a private /etc/hosts);
- the only edits are the ones the README asks for (the secrets, the domain) plus certbot's certificate,
  which is a throwaway one here, and the upstream, which is the tests' fake OpenAI-compatible server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import ACCESS_KEY, UPSTREAM_KEY
from tests.readme_steps import (
    SYSTEMD_DEFAULT_PATH,
    Namespace,
    compose_env_file,
    dockerfile_environment,
    fill_settings,
    namespaces_available,
    numbered_steps,
    private_namespace,
    readme_section,
    sh_blocks,
    shell_commands,
    started_in,
    stop_group,
    systemd_environment_file,
    unit_service,
)
from tests.servers import REPO, find_program, nginx_main_config, wait_until

DOMAIN = "relay.test"  # what the person types for YOUR.DOMAIN
README_DOMAIN = "relay.example.com"
DOCTOR_FLAGS = ["--records", "3", "--interval", "0.2", "--gap", "2", "--after", "1"]  # the README's: ~80 s

pytestmark = pytest.mark.skipif(not namespaces_available(), reason="needs unshare --net --mount (root)")


@dataclass
class Machine:
    """The stand-in VPS: where /opt/relay, /etc/relay, /run/relay and /etc/nginx are for this test."""

    root: Path

    @property
    def opt(self) -> Path:
        return self.root / "opt" / "relay"

    def path(self, system_path: str) -> Path:
        return self.root / system_path.lstrip("/")

    def translate(self, command: str) -> str:
        """A README command as it runs here: no sudo, no chown to the absent relay user, paths moved."""
        command = re.sub(r"\bsudo\s+", "", command)
        command = re.sub(r"\s-o\s+root\s+-g\s+relay\b", "", command)
        for system in ("/opt/relay", "/etc/relay", "/etc/nginx", "/etc/systemd", "/run/relay"):
            command = command.replace(system, str(self.path(system)))
        return command.replace("YOUR.DOMAIN", DOMAIN)

    def sh(self, command: str, cwd: Path | None = None, timeout: float = 600) -> None:
        result = subprocess.run(["sh", "-c", command], cwd=cwd or self.root, capture_output=True, text=True,
                                timeout=timeout, check=False)
        assert result.returncode == 0, f"{command!r} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def fresh_copy(destination: Path) -> None:
    """The repository as `git clone` gives it: tracked (and new, unignored) files, nothing built."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def vps_steps() -> dict[int, str]:
    return numbered_steps(readme_section("From a fresh VPS to an HTTPS relay"))


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Machine:
    """Step 1 of the README's VPS section, in a fresh copy: the packages it installs, then its install."""
    machine = Machine(tmp_path_factory.mktemp("vps"))
    (block,) = sh_blocks(vps_steps()[1])
    for command, _comment in shell_commands(block):
        if command.startswith("sudo apt"):
            packages = set(command.split("install -y", 1)[1].split())
            # What `make install` needs on a bare Debian: make, venv, and npm for the chat page's bundle.
            assert {"make", "python3-venv", "npm", "nginx"} <= packages, command
        elif command.startswith("sudo useradd"):
            continue  # no system users are made by the tests; the relay runs as this user below
        elif command.startswith("sudo git clone"):
            assert command.split()[-1] == "/opt/relay", command
            fresh_copy(machine.opt)
        else:
            assert command.startswith("cd /opt/relay && sudo make "), f"unknown step 1 command: {command}"
            machine.sh(machine.translate(command))
    assert (machine.opt / ".venv" / "bin" / "gunicorn").exists()
    assert (machine.opt / "proxy" / "web" / "static" / "dist" / "app.js").exists(), "the chat page is not built"
    return machine


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[Namespace]:
    with private_namespace(tmp_path / "namespace", (DOMAIN, "redis")) as private:
        yield private


@pytest.fixture
def upstream_url(namespace: Namespace, tmp_path: Path) -> Iterator[str]:
    """The tests' fake OpenAI-compatible upstream, inside the namespace."""
    process = namespace.popen([sys.executable, "-m", "tests.fake_upstream", "--tokens", "5"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    assert process.stdout is not None
    ready = process.stdout.readline().decode().strip()
    assert ready.startswith("READY "), ready
    try:
        yield ready.split(" ", 1)[1]
    finally:
        stop_group(process)


def filled_secrets(template: str, upstream_url: str) -> str:
    """The secrets file after the edit step 2 asks for: the settings it names, and nothing else."""
    step = vps_steps()[2]
    asked = re.findall(r"`([A-Z_]+)(?:=[^`]*)?`", step.split("Optional:")[0])
    assert asked == ["AUTHORIZATION_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "TRUSTED_PROXIES"], asked
    return fill_settings(template, {"AUTHORIZATION_KEY": ACCESS_KEY, "OPENAI_API_KEY": UPSTREAM_KEY,
                                    "OPENAI_BASE_URL": upstream_url, "TRUSTED_PROXIES": "127.0.0.1,::1"})


def throwaway_certificate(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    f"/CN={DOMAIN}", "-addext", f"subjectAltName=DNS:{DOMAIN}", "-keyout", str(key),
                    "-out", str(cert)], capture_output=True, check=True, timeout=60)
    return cert, key


def start_unit(machine: Machine, namespace: Namespace, log: Path) -> subprocess.Popen[bytes]:
    """`systemctl enable --now relay`: the unit's ExecStart with the environment systemd would give it."""
    unit = unit_service((machine.opt / "deploy" / "relay.service").read_text())
    env = {"PATH": SYSTEMD_DEFAULT_PATH, "LANG": "C.UTF-8", **unit.environment}
    for env_file in unit.environment_files:  # systemd: the files' settings override Environment= lines
        env.update(systemd_environment_file(Path(machine.translate(env_file)).read_text()))
    env = {name: machine.translate(value) for name, value in env.items()}
    # systemd makes the unit's RuntimeDirectory= and StateDirectory= and names them in the environment.
    made = {"RUNTIME_DIRECTORY": [machine.path(f"/run/{name}") for name in unit.runtime_directories],
            "STATE_DIRECTORY": [machine.path(f"/var/lib/{name}") for name in unit.state_directories]}
    for variable, directories in made.items():
        for directory in directories:
            directory.mkdir(parents=True, exist_ok=True)
        env[variable] = ":".join(str(directory) for directory in directories)
    argv = shlex.split(machine.translate(unit.exec_start))
    return started_in(namespace, argv, log, 8000, Path(machine.translate(unit.working_directory)), env)


def start_nginx_site(machine: Machine, namespace: Namespace, step: str, certificate: tuple[Path, Path]
                     ) -> subprocess.Popen[bytes]:
    """Step 5's commands, then nginx with the enabled site (Debian's nginx.conf includes sites-enabled)."""
    (block,) = sh_blocks(step)
    for directory in ("sites-available", "sites-enabled"):
        machine.path(f"/etc/nginx/{directory}").mkdir(parents=True, exist_ok=True)
    for command, _comment in shell_commands(block):
        if command.startswith(("sudo cp ", "sudo sed ", "sudo ln ")):
            machine.sh(machine.translate(command))
        elif command == "sudo rm /etc/nginx/sites-enabled/default":
            continue  # this stand-in has no default site
        else:
            assert command == "sudo nginx -t && sudo systemctl reload nginx", f"unknown step 5 command: {command}"
    site = machine.path("/etc/nginx/sites-enabled/relay")
    text = site.read_text()
    assert f"server_name {DOMAIN};" in text and README_DOMAIN not in text, "the README's sed did not apply"
    # certbot's files (step 4) are a throwaway certificate here.
    text = text.replace(f"/etc/letsencrypt/live/{DOMAIN}/fullchain.pem", str(certificate[0]))
    text = text.replace(f"/etc/letsencrypt/live/{DOMAIN}/privkey.pem", str(certificate[1]))
    prefix = machine.path("/var/lib/nginx-test")
    prefix.mkdir(parents=True, exist_ok=True)
    # Debian's /var/log/nginx, as nginx's own files here, in the stand-in's directory.
    text = text.replace("access_log /var/log/nginx/", f"access_log {prefix}/")
    text = text.replace("error_log /var/log/nginx/", f"error_log {prefix}/")
    site.write_text(text)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_main_config(prefix, site))
    nginx = find_program("nginx")
    assert nginx is not None, "nginx is not installed (scripts/install-system-deps.sh installs it)"
    checked = namespace.run([nginx, "-t", "-p", str(prefix), "-c", str(conf)])
    assert checked.returncode == 0, checked.stderr
    return started_in(namespace, [nginx, "-p", str(prefix), "-c", str(conf)], prefix / "error.log", 443,
                      prefix, {"PATH": SYSTEMD_DEFAULT_PATH})


def test_vps_section_followed_to_the_letter(machine: Machine, namespace: Namespace, upstream_url: str,
                                            tmp_path: Path) -> None:
    """Steps 2, 3, 5 and 7 as written: secrets from .env.example with only the asked-for values, the unit,
    nginx in front; then /healthz, the chat page and its script, POST /chat and the doctor through nginx."""
    steps = vps_steps()
    for command, _comment in shell_commands(sh_blocks(steps[2])[0]):
        if command.startswith("sudo install "):
            machine.sh(machine.translate(command))
        else:
            assert command == "sudo nano /etc/relay/relay.env", f"unknown step 2 command: {command}"
            secrets = machine.path("/etc/relay/relay.env")
            secrets.write_text(filled_secrets(secrets.read_text(), upstream_url))
    relay = None
    nginx = None
    try:
        for command, comment in shell_commands(sh_blocks(steps[3])[0]):
            if command.startswith("sudo systemctl daemon-reload && sudo systemctl enable --now relay"):
                relay = start_unit(machine, namespace, tmp_path / "relay.log")
            elif command.startswith(("sudo cp ", "systemctl status")):
                continue  # the unit is read from the copy; the process is watched below
            else:
                assert command.startswith("curl "), f"unknown step 3 command: {command}"
                answer = namespace.run(shlex.split(command))
                assert json.loads(answer.stdout) == json.loads(comment), answer
        assert relay is not None and relay.poll() is None
        log = (tmp_path / "relay.log").read_text()
        assert "listening on 127.0.0.1:8000" in log and ACCESS_KEY not in log
        assert list(machine.path("/run/relay/metrics").glob("*.db")), "metrics are not in the unit's /run/relay"
        certificate = throwaway_certificate(tmp_path / "certificate")
        nginx = start_nginx_site(machine, namespace, steps[5], certificate)
        check_from_outside(machine, namespace, steps[7], certificate[0])
        # The usage ledger is in the unit's StateDirectory (the code's directory is read-only under the unit).
        assert (machine.path("/var/lib/relay") / "ledger.db").is_file(), "the ledger is not in /var/lib/relay"
    finally:
        for process in (nginx, relay):
            if process is not None:
                stop_group(process, signal.SIGQUIT if process is nginx else signal.SIGTERM)


def check_from_outside(machine: Machine, namespace: Namespace, step: str, certificate: Path) -> None:
    """Step 7's commands through nginx over TLS, plus the chat page a browser would load."""
    tls = {"PATH": SYSTEMD_DEFAULT_PATH, "CURL_CA_BUNDLE": str(certificate), "SSL_CERT_FILE": str(certificate)}
    commands = [command for command, _comment in shell_commands(sh_blocks(step)[0])]
    assert len(commands) == 2, commands
    chat, doctor = (machine.translate(command).replace(README_DOMAIN, DOMAIN).replace("YOUR_ACCESS_KEY", ACCESS_KEY)
                    for command in commands)
    answer = namespace.run(shlex.split(chat), env=tls)
    records = [json.loads(line) for line in answer.stdout.splitlines() if line.strip()]
    assert records and records[-1]["done"] is True and not any(record["error"] for record in records), answer
    assert "".join(record["content"] for record in records[:-1]).strip(), "no answer came through nginx"
    page = namespace.run(["curl", "-sS", "--fail", f"https://{DOMAIN}/"], env=tls)
    assert page.returncode == 0 and "<title>Relay chat</title>" in page.stdout, page
    script = re.search(r'<script src="([^"]+)"', page.stdout)
    assert script is not None
    bundle = namespace.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{http_code} %{content_type}",
                            f"https://{DOMAIN}{script.group(1).replace('&amp;', '&')}"], env=tls)
    assert bundle.stdout.split()[0] == "200" and "javascript" in bundle.stdout, bundle
    result = namespace.run([*shlex.split(doctor), *DOCTOR_FLAGS], cwd=machine.opt, env=tls)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict: this path streams the relay's answers properly." in result.stdout


def test_compose_environment_starts_the_relay(machine: Machine, namespace: Namespace, upstream_url: str,
                                              tmp_path: Path) -> None:
    """What `docker compose up` would pass the image's CMD (its ENV, then `.env` by env_file rules, then the
    compose file's `environment:`) starts a relay that answers on the container's published port."""
    compose = yaml.safe_load((machine.opt / "deploy" / "compose.yaml").read_text())
    service = compose["services"]["relay"]
    assert service["env_file"] == ["../.env"]
    dotenv = filled_secrets((machine.opt / ".env.example").read_text(), upstream_url)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
           **dockerfile_environment((machine.opt / "deploy" / "Dockerfile").read_text()),
           **compose_env_file(dotenv), **{name: str(value) for name, value in service["environment"].items()}}
    published = int(service["ports"][0].rsplit(":", 1)[1])
    redis_server = find_program("redis-server")
    assert redis_server is not None
    redis = started_in(namespace, [redis_server, "--port", "6379", "--save", "", "--appendonly", "no"],
                       tmp_path / "redis.log", 6379, tmp_path, {"PATH": SYSTEMD_DEFAULT_PATH})
    gunicorn = machine.opt / ".venv" / "bin" / "gunicorn"
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", (machine.opt / "deploy" / "Dockerfile").read_text(),
                               re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert cmd[0] == "gunicorn"
    relay = started_in(namespace, [str(gunicorn), *cmd[1:]], tmp_path / "relay.log", published, machine.opt, env)
    try:
        assert f"listening on 0.0.0.0:{published}" in (tmp_path / "relay.log").read_text()
        health = namespace.run(["curl", "-sS", f"http://127.0.0.1:{published}/healthz"])
        assert json.loads(health.stdout) == {"demo": False, "status": "ok"}
        chat = namespace.run(["curl", "-sS", "-N", f"http://127.0.0.1:{published}/chat", "-H",
                              f"Authorization: Bearer {ACCESS_KEY}", "-d",
                              '{"messages":[{"role":"user","content":"Hello!"}]}'])
        assert json.loads(chat.stdout.splitlines()[-1])["done"] is True, chat
        page = namespace.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://127.0.0.1:{published}/"])
        assert page.stdout == "200"
    finally:
        stop_group(relay)
        stop_group(redis)


def test_try_it_make_run_honours_dotenv(machine: Machine, namespace: Namespace, upstream_url: str,
                                        tmp_path: Path) -> None:
    """"Try it": `cp .env.example .env`, the keys filled, `make run`; every GUNICORN_* and the relay's own
    settings set in .env count, the banner names the address and the chat page, which is served, and the
    README's curl answers."""
    (block, curl_block) = sh_blocks(readme_section("Try it"))[:2]
    commands = [command for command, _comment in shell_commands(block)]
    assert commands == ["cp .env.example .env", "make run"], commands
    workdir = machine.opt
    machine.sh(commands[0], cwd=workdir)
    dotenv = workdir / ".env"
    try:
        dotenv.write_text(fill_settings(dotenv.read_text(), {
            "AUTHORIZATION_KEY": ACCESS_KEY, "OPENAI_API_KEY": UPSTREAM_KEY, "OPENAI_BASE_URL": upstream_url,
            "GUNICORN_BIND": "127.0.0.1:8011", "GUNICORN_WORKERS": "1", "GUNICORN_WORKER_CONNECTIONS": "321",
            "GUNICORN_GRACEFUL_TIMEOUT": "7", "GUNICORN_LOG_LEVEL": "debug", "DEFAULT_MODEL": "model-from-dotenv"}))
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"}
        log = tmp_path / "make-run.log"
        relay = started_in(namespace, ["make", "run"], log, 8011, workdir, env)
        try:
            banner = log.read_text()
            assert "listening on 127.0.0.1:8011; the chat page is at http://127.0.0.1:8011/" in banner
            curl = [machine.translate(command) for command, _comment in shell_commands(curl_block)]
            assert curl[0].startswith("ACCESS_KEY=")
            script = f"ACCESS_KEY={shlex.quote(ACCESS_KEY)}; " + curl[1].replace("8000", "8011")
            answer = namespace.run(["sh", "-c", script])
            assert json.loads(answer.stdout.splitlines()[-1])["done"] is True, answer
            page = namespace.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8011/"])
            assert page.stdout == "200", page
            text = log.read_text()
            assert len(re.findall(r"Booting worker", text)) == 1  # GUNICORN_WORKERS=1 from .env
            # gunicorn's configuration dump (GUNICORN_LOG_LEVEL=debug from .env) shows the other two.
            assert "worker_connections: 321" in text and "graceful_timeout: 7" in text
            # The access line, written within LOG_FLUSH_SECONDS (default 0.1 s) of the answer's end.
            assert wait_until(lambda: "model=model-from-dotenv" in log.read_text(), timeout=10), log.read_text()
            assert ACCESS_KEY not in log.read_text()
        finally:
            stop_group(relay)
    finally:
        dotenv.unlink()
