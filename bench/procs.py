"""Starting and stopping the benchmark's servers, and sampling their CPU and memory from /proc."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class StartError(RuntimeError):
    """A server of the benchmark did not come up; the message says which and shows its output."""


def raise_open_file_limit(wanted: int = 65536) -> int:
    """Raise this process's (and so its children's) open-file limit as far as allowed; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A currently free loopback port, for servers that cannot report the port they bound to."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OutputTail:
    """Drains a child's pipe in a thread, keeps the last lines, and lets us wait for a line."""

    def __init__(self, stream: object, keep: int = 200) -> None:
        self.lines: list[str] = []
        self.keep = keep
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self.thread.start()

    def _drain(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                del self.lines[: -self.keep]
                self.changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        deadline = time.monotonic() + timeout
        seen = 0
        with self.changed:
            while True:
                for line in self.lines[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (not self.thread.is_alive() and seen == len(self.lines)):
                    return None
                self.changed.wait(min(remaining, 0.2))

    def text(self) -> str:
        with self.changed:
            return "\n".join(self.lines)


@dataclasses.dataclass
class Server:
    """A child process we started, and what we learned when it came up."""

    name: str
    process: subprocess.Popen[str]
    output: OutputTail
    host: str
    port: int

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn(command: list[str], env: Mapping[str, str] | None, cwd: Path) -> tuple[subprocess.Popen[str], OutputTail]:
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # a Ctrl-C in the terminal reaches the driver, which stops children in order
    )
    assert process.stdout is not None
    return process, OutputTail(process.stdout)


def start_fake_upstream(use_uvloop: bool = True, timeout: float = 20.0) -> Server:
    command = [sys.executable, "-m", "tests.fake_upstream", "--port", "0"]
    if use_uvloop:
        command.append("--uvloop")
    process, output = spawn(command, None, REPO_ROOT)
    match = output.wait_for(re.compile(r"READY http://127\.0\.0\.1:(\d+)/v1"), timeout)
    if match is None:
        process.kill()
        raise StartError(f"the fake upstream did not start:\n{output.text()}")
    return Server("fake upstream", process, output, "127.0.0.1", int(match.group(1)))


def start_relay(env: Mapping[str, str], timeout: float = 30.0, checkout: Path = REPO_ROOT) -> Server:
    """The relay under real gunicorn with the production config, bound to a free loopback port.

    `checkout` is the source tree to run (another checkout makes before/after comparisons easy)."""
    return _start_gunicorn("relay", "deploy/gunicorn.conf.py", "wsgi:app", env, timeout, checkout)


def start_forwarder(upstream_url: str, upstream_key: str, workers: int, timeout: float = 30.0) -> Server:
    """The bare forwarder (bench/forwarder.py) under gunicorn with the relay's production server settings."""
    env = {"FORWARD_UPSTREAM": upstream_url, "FORWARD_KEY": upstream_key, "GUNICORN_WORKERS": str(workers)}
    return _start_gunicorn("bare forwarder", "bench/forwarder_gunicorn.py", "bench.forwarder:app", env, timeout,
                           REPO_ROOT)


def _start_gunicorn(name: str, config: str, app: str, env: Mapping[str, str], timeout: float,
                    checkout: Path) -> Server:
    full_env = {**os.environ, **env, "GUNICORN_BIND": "127.0.0.1:0"}
    command = [sys.executable, "-m", "gunicorn", "-c", config, app]
    process, output = spawn(command, full_env, checkout)
    match = output.wait_for(re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)"), timeout)
    booted = output.wait_for(re.compile(r"Booting worker"), timeout) if match else None
    if match is None or booted is None:
        process.kill()
        raise StartError(f"the {name} did not start under gunicorn:\n{output.text()}")
    return Server(name, process, output, "127.0.0.1", int(match.group(1)))


def export_revision(revision: str, into: Path) -> Path:
    """The source tree of `revision` (any git revision of this checkout) exported into `into`, to run a
    second relay from it beside this one (`--compare`): before/after in one run."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=REPO_ROOT, capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise StartError(f"git archive {revision} failed: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


# --- sampling ------------------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """`root` and every process below it (by parent pid, read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    found = [root]
    index = 0
    while index < len(found):
        found.extend(children.get(found[index], []))
        index += 1
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes (live ones only)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def cpu_seconds_exact(pids: list[int]) -> float:
    """CPU time of these processes' live threads, in nanoseconds from the scheduler (`schedstat`): a run of a
    few milliseconds reads right, where `cpu_seconds` moves in clock ticks (10 ms). A thread that ended is
    not counted, so it is for short runs of long-lived processes (the one-client TTFT turns)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as handle:
                    total += int(handle.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def memory_bytes(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) summed over these processes; PSS shares pages between forked workers fairly."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
                for line in handle:
                    if line.startswith(b"Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith(b"Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


@dataclasses.dataclass
class Sample:
    at: float
    cpu_seconds: float
    rss: int
    pss: int


class ProcessSampler:
    """Samples a process tree's CPU time and memory in a thread, at a fixed interval."""

    def __init__(self, root_pid: int, interval: float = 1.0) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> Sample:
        pids = descendants(self.root_pid)
        rss, pss = memory_bytes(pids)
        return Sample(time.perf_counter(), cpu_seconds(pids), rss, pss)

    def exact_cpu_seconds(self) -> float:
        """The tree's CPU time now, to the nanosecond (`cpu_seconds_exact`)."""
        return cpu_seconds_exact(descendants(self.root_pid))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def running(self) -> Iterator[ProcessSampler]:
        self.samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.samples.append(self.sample())
