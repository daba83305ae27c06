"""Production gunicorn settings for the relay: `gunicorn -c deploy/gunicorn.conf.py wsgi:app`.

Worker model: gevent. A relay spends nearly all its time waiting on two sockets per stream, so each open
stream costs a greenlet (a few KiB) instead of a thread or a process; one worker per core holds thousands of
streams. Sync workers hold one stream each; eventlet workers are gone from gunicorn since 26.0.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

# The checkout this file belongs to, importable whatever the working directory (systemd, Docker, make run).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gunicorn import util

from proxy.config import Config, ConfigError, ServerSettings, load_env_file, loggable_url
from proxy.redaction import Redactor
from proxy.server_errors import RelayServerLogger, write_server_error

# Requests gunicorn refuses itself (400, 414, 431...) get JSON with the relay's security headers, not HTML.
util.write_error = write_server_error
# gunicorn's own warnings quote request lines: they go through the relay's redaction too.
logger_class = RelayServerLogger


def _refuse(exc: ConfigError) -> NoReturn:
    print(f"relay: refusing to start: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)


# `.env` first (real variables win), so that GUNICORN_* set there count too; an empty value means the default.
load_env_file()
try:
    settings = ServerSettings.from_env(os.environ)
except ConfigError as exc:
    _refuse(exc)

bind = settings.bind
workers = settings.workers
worker_class = "gevent"
worker_connections = settings.worker_connections
timeout = 30  # worker heartbeat, not a request timeout: gevent workers keep beating while streams wait
# On SIGTERM (and for old workers on a SIGHUP reload) open streams get this long to finish; any still
# open STREAM_END_MARGIN seconds before it ends with an error record and the proper end of its protocol.
graceful_timeout = settings.graceful_timeout
STREAM_END_MARGIN = 2.0
# gunicorn waits this long for a request on a connection, the first one included (a burst of new
# connections on a busy box needs the time), and idle keep-alive connections hold a graceful shutdown open
# this long. The shipped nginx site closes its idle upstream connections sooner (keepalive_timeout 15s),
# so nginx never sends a request (a POST it would not retry) on a connection gunicorn has just closed.
keepalive = 20
backlog = 4096
accesslog = None  # the relay writes its own access log, with keys redacted and stream timings
errorlog = "-"
loglevel = settings.log_level
proc_name = "relay"
# gunicorn 27's control socket lives at one path per user: several relays on a host would fight over it.
control_socket_disable = True


def post_worker_init(worker):
    """Tell the app when this worker is asked to stop, before gunicorn's own SIGTERM handling runs."""
    import signal

    relay = worker.wsgi.extensions["relay"]
    grace = max(0.5, worker.cfg.graceful_timeout - STREAM_END_MARGIN)
    stop = signal.getsignal(signal.SIGTERM)

    def drain_then_stop(signum, frame):
        relay.draining.begin(grace)
        stop(signum, frame)

    signal.signal(signal.SIGTERM, drain_then_stop)
    freeze_start_up_objects()


def freeze_start_up_objects():
    """The objects the app's start-up made (modules, the SDK's and pydantic's classes, routes) live as long
    as the worker: moved out of the cyclic collector's view, a full collection scans only what requests
    made. Without it each one scanned them all, 13-70 ms during which no stream in the worker moved
    (bench/notes.md: the 50-stream p99)."""
    import gc

    gc.collect()
    gc.freeze()


def on_starting(server):
    """Refuse to start, in one line, when the configuration is unusable (before any worker forks)."""
    prepare_metrics_dir()
    try:
        config = Config.from_env(os.environ)
    except ConfigError as exc:
        _refuse(exc)
    if isinstance(server.log, RelayServerLogger):
        server.log.redact_with(Redactor(config.secrets))
    keys = ", ".join(f"…{key[-4:]}" for key in config.authorization_keys) or "none"
    if config.keys_file is not None:
        keys += f"; keys file {config.keys_file}: " + ", ".join(p.name for p in config.keyring.policies)
    # URLs without user:password@ and query: either may hold a credential, and this line goes to the journal.
    mode = "DEMO (local stand-in model)" if config.demo else loggable_url(config.openai_base_url)
    if config.upstreams and not config.demo:
        mode = f"s from {config.upstreams_file}: " + ", ".join(f"{u.name} {loggable_url(u.base_url)}"
                                                                 for u in config.upstreams)
    print(f"relay: upstream {mode}, default model {config.default_model}, access keys {keys}",
          file=sys.stderr, flush=True)
    print(f"relay: listening on {settings.bind}; the chat page is at {settings.url}", file=sys.stderr, flush=True)
    if config.limits_configured and not config.rate_limit_storage_uri and server.cfg.workers > 1:
        print(f"relay: note: request rates and stream slots count in each of the {server.cfg.workers} worker "
              "processes on its own, so a key gets up to that many times those limits (budgets are shared by "
              "the workers in DATA_DIR/limits.db); set RATE_LIMIT_STORAGE_URI=redis://... (or "
              "GUNICORN_WORKERS=1) for exact limits", file=sys.stderr, flush=True)


# Metrics: every worker writes its values under PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess
# mode) and a scrape of /metrics, whichever worker answers, adds them all up. systemd's unit points it at
# /run/relay/metrics; without it, a private temporary directory is made for this run.
TEMPORARY_METRICS_PREFIX = "relay-metrics-"


def prepare_metrics_dir():
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if not directory:
        directory = tempfile.mkdtemp(prefix=TEMPORARY_METRICS_PREFIX)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # the workers inherit it
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):  # values of a previous run would be added to this one's
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


LEDGER_FLUSH_SECONDS = 10


def worker_exit(server, worker):
    """Graceful stop: the ledger rows still queued in this worker are written before it exits. (The ledger's
    schema needs no hook: each worker's ledger thread runs the migrations under a lock, proxy/ledger/database.py.)"""
    relay = worker.wsgi.extensions.get("relay") if hasattr(worker, "wsgi") else None
    if relay is not None:
        relay.reports.flush()  # the last requests' log lines, metrics and ledger rows (proxy/reports.py)
        relay.ledger.close(relay.metrics, timeout=LEDGER_FLUSH_SECONDS)



def child_exit(server, worker):
    """A worker is gone (restart, HUP, crash): its open-streams gauge must stop counting."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, directory)


def on_exit(server):
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(directory).startswith(TEMPORARY_METRICS_PREFIX):
        shutil.rmtree(directory, ignore_errors=True)
