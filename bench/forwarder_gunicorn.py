"""gunicorn settings for the bare forwarder (bench/forwarder.py): exactly the relay's production server
settings from deploy/gunicorn.conf.py (worker class, workers, connections, keep-alive, backlog, timeouts),
without its hooks, which start the relay's own configuration, metrics and drain."""

import runpy
from pathlib import Path

_relay = runpy.run_path(str(Path(__file__).resolve().parent.parent / "deploy" / "gunicorn.conf.py"))
bind = _relay["bind"]
workers = _relay["workers"]
worker_class = _relay["worker_class"]
worker_connections = _relay["worker_connections"]
timeout = _relay["timeout"]
graceful_timeout = _relay["graceful_timeout"]
keepalive = _relay["keepalive"]
backlog = _relay["backlog"]
accesslog = _relay["accesslog"]
errorlog = _relay["errorlog"]
loglevel = _relay["loglevel"]
control_socket_disable = _relay["control_socket_disable"]
proc_name = "bare-forwarder"
