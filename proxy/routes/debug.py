"""`GET /debug/stats`: what one worker holds right now, for leak tests. Off unless `RELAY_DEBUG_STATS=1`.

The fault, client-fault and soak tests count greenlets, threads, file descriptors and open upstream readers
in the gunicorn worker before and after each fault. The endpoint exists only when the setting is on, answers
only loopback callers that present an access key, and reports counts, never configuration or keys.
"""

from __future__ import annotations

import gc
import ipaddress
import os
import threading
from pathlib import Path

from flask import Blueprint, Response, jsonify, request

from proxy.config import Config
from proxy.errors import Unauthorized, unknown_endpoint
from proxy.pipeline import endpoint
from proxy.request_state import RequestState
from proxy.stream_sources import READER_THREAD_PREFIX
from proxy.upstream_body import open_bodies

bp = Blueprint("debug", __name__)

PROC_SELF = Path("/proc/self")


def check_local_caller(state: RequestState, _config: Config) -> None:
    """The guard (proxy/pipeline.py): loopback first, since from elsewhere the endpoint must look like it does
    not exist (the same answer as when it is off); then an access key."""
    if not _from_loopback(request.remote_addr):
        raise unknown_endpoint(request.path)
    if state.caller is None:
        raise Unauthorized()


@bp.get("/debug/stats")
@endpoint("json", access="own", guard=check_local_caller)
def debug_stats() -> Response:
    """Counts of the resources a stream holds, in this worker process."""
    threads = threading.enumerate()
    fds = _fd_targets()
    tcp_ports = _tcp_local_ports()
    socket_ports = [tcp_ports.get(target[len("socket:["):-1]) for target in fds if target.startswith("socket:")]
    served_port = int(request.environ.get("SERVER_PORT") or 0)
    outbound = sum(1 for port in socket_ports if port is not None and port != served_port)
    return jsonify(
        pid=os.getpid(),
        greenlets=_live_greenlets(),
        threads=len(threads),
        os_threads=_count_entries(PROC_SELF / "task"),
        # Reader threads, and the bodies streams read in their own greenlet (proxy/upstream_body.py).
        upstream_readers=sum(1 for thread in threads if thread.name.startswith(READER_THREAD_PREFIX)) + open_bodies(),
        fds=len(fds),
        sockets=len(socket_ports),
        # Connections clients opened to this relay, listener included.
        client_sockets=sum(1 for port in socket_ports if port == served_port),
        # Connections the relay opened (upstreams; kept alive in the pool between streams by design).
        outbound_sockets=outbound,
        fds_without_outbound=len(fds) - outbound,
        rss_kib=_rss_kib(),
        # Start-up objects moved out of the cyclic collector's view (deploy/gunicorn.conf.py).
        gc_frozen_objects=gc.get_freeze_count(),
    )


def _from_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _live_greenlets() -> int:
    try:
        from greenlet import greenlet
    except ImportError:  # not running under gevent: there are no greenlets to count
        return 0
    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet) and not obj.dead)


def _fd_targets() -> list[str]:
    targets = []
    for entry in (PROC_SELF / "fd").iterdir():
        try:
            targets.append(os.readlink(entry))
        except OSError:  # closed between listing and reading (e.g. the listing's own descriptor)
            continue
    return targets


def _tcp_local_ports() -> dict[str, int]:
    """Socket inode -> local TCP port, for this process's network namespace."""
    ports: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC_SELF / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9:
                ports[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return ports


def _count_entries(path: Path) -> int:
    try:
        return sum(1 for _ in path.iterdir())
    except OSError:
        return 0


def _rss_kib() -> int:
    try:
        for line in (PROC_SELF / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0
