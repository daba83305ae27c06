"""What the README tells a person to do, read from the README itself, and the pieces of a machine that the
README-following test (tests/test_readme_deploy.py) stands in for: systemd's `EnvironmentFile` rules, a
unit's `[Service]` lines, a private network namespace where `127.0.0.1:8000`, ports 80 and 443 and the
domain's name are the test's own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import REPO, stop_process, wait_until

README = REPO / "README.md"
SYSTEMD_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def readme_section(title: str, readme: str | None = None) -> str:
    """The text of the README's `## title` section, up to the next `## ` heading."""
    text = readme if readme is not None else README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def sh_blocks(text: str) -> list[str]:
    """The ```sh code blocks of `text`, in order."""
    return re.findall(r"```sh\n(.*?)```", text, re.DOTALL)


def numbered_steps(section: str) -> dict[int, str]:
    """`**1. Title.** ...` paragraphs of a section, by number, each with its text up to the next step."""
    parts = re.split(r"\n\*\*(\d+)\. ", section)
    return {int(number): body for number, body in zip(parts[1::2], parts[2::2], strict=True)}


def shell_commands(block: str) -> list[tuple[str, str]]:
    """Each command line of a shell block as (command, trailing comment), continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        commented = re.match(r"(.*?)\s+#\s?(.*)$", line)
        command, comment = (commented.group(1), commented.group(2)) if commented else (line, "")
        commands.append((command.strip(), comment.strip()))
    return commands


def systemd_environment_file(text: str) -> dict[str, str]:
    """Variables as systemd's `EnvironmentFile=` reads them: `#`/`;` lines are comments, a line `NAME=` sets
    NAME to the empty string (it does not leave it unset), surrounding quotes are removed."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name.strip()] = value
    return env


@dataclass
class UnitService:
    """The `[Service]` lines of a systemd unit that decide how its process starts."""

    exec_start: str
    working_directory: str
    environment: dict[str, str] = field(default_factory=dict)
    environment_files: list[str] = field(default_factory=list)
    runtime_directories: list[str] = field(default_factory=list)
    state_directories: list[str] = field(default_factory=list)


def unit_service(text: str) -> UnitService:
    service = text.split("[Service]", 1)[1].split("\n[", 1)[0]
    values: dict[str, list[str]] = {}
    for line in service.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values.setdefault(name.strip(), []).append(value.strip())
    environment = dict(assignment.split("=", 1) for assignment in values.get("Environment", []))
    return UnitService(
        exec_start=values["ExecStart"][0],
        working_directory=values["WorkingDirectory"][0],
        environment=environment,
        environment_files=values.get("EnvironmentFile", []),
        runtime_directories=" ".join(values.get("RuntimeDirectory", [])).split(),
        state_directories=" ".join(values.get("StateDirectory", [])).split(),
    )


def dockerfile_environment(text: str) -> dict[str, str]:
    """The `ENV NAME=value ...` settings of a Dockerfile (continuation lines joined)."""
    env: dict[str, str] = {}
    for statement in re.sub(r"\\\n\s*", " ", text).splitlines():
        if statement.startswith("ENV "):
            for assignment in statement[4:].split():
                name, _, value = assignment.partition("=")
                env[name] = value
    return env


def compose_env_file(text: str) -> dict[str, str]:
    """An `env_file` as Docker compose reads it: `NAME=` is the empty string, `#` lines are comments."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            env[name.strip()] = value
    return env


def fill_settings(text: str, values: dict[str, str]) -> str:
    """What a person does in an editor: put a value on each named `NAME=` line, leave the rest as it is."""
    for name, value in values.items():
        text, count = re.subn(rf"^{name}=.*$", f"{name}={value}", text, count=1, flags=re.MULTILINE)
        assert count == 1, f".env.example has no {name}= line to fill in"
    return text


@dataclass
class Namespace:
    """A private network and mount namespace: its own loopback (so 127.0.0.1:8000, :80 and :443 are free
    whatever this machine runs) and its own /etc/hosts (so the README's domain names resolve to it)."""

    holder: subprocess.Popen[bytes]

    def command(self, argv: list[str], cwd: object = None) -> list[str]:
        # nsenter moves into the target's root and working directory unless told where to work.
        where = [f"--wd={cwd}"] if cwd is not None else []
        return ["nsenter", "--target", str(self.holder.pid), "--net", "--mount", *where, "--", *argv]

    def popen(self, argv: list[str], cwd: object = None, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(argv, cwd), **kwargs)  # type: ignore[call-overload,no-any-return]

    def run(self, argv: list[str], cwd: object = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
        options: dict[str, object] = {"capture_output": True, "text": True, "timeout": 120, **kwargs}
        return subprocess.run(self.command(argv, cwd), check=False, **options)  # type: ignore[call-overload,no-any-return]

    def port_open(self, port: int) -> bool:
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
        return self.run(["python3", "-c", probe], timeout=10).returncode == 0


def namespaces_available() -> bool:
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@contextmanager
def private_namespace(directory: Path, host_names: tuple[str, ...]) -> Iterator[Namespace]:
    directory.mkdir(parents=True, exist_ok=True)
    hosts = directory / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {' '.join(host_names)}\n::1 localhost ip6-localhost\n")
    ready = directory / "namespace-ready"
    script = (f"ip link set lo up && mount --bind {hosts} /etc/hosts && touch {ready} && exec sleep 900")
    holder = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
                              start_new_session=True)
    try:
        assert wait_until(ready.exists, timeout=10), "the private network namespace did not come up"
        yield Namespace(holder)
    finally:
        stop_process(holder, signal.SIGKILL)


def started_in(namespace: Namespace, argv: list[str], log: Path, port: int, cwd: Path,
               env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a server in the namespace and wait until it listens on `port` (its log in the failure)."""
    with log.open("ab") as log_file:
        process = namespace.popen(argv, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    listening = wait_until(lambda: process.poll() is not None or namespace.port_open(port), timeout=30,
                           interval=0.2)
    assert listening and process.poll() is None, f"{argv[0]} did not listen on {port}:\n{log.read_text()}"
    return process


def stop_group(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a server started in its own session, children included."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
