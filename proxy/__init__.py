"""The relay: an authenticated streaming proxy in front of OpenAI-compatible chat APIs."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.config import Config, load_env_file

if TYPE_CHECKING:
    from flask import Flask


def create_app(config: Config | None = None) -> Flask:
    """Wire configuration, services, hooks, error handlers and endpoints into a Flask app."""
    # Imported here rather than at the top: gunicorn's master imports proxy.config for its start-up check
    # before the gevent worker patches the standard library, and must not pull in ssl (via openai) early.
    from flask import Flask

    from proxy.access import TrustedProxies
    from proxy.errors import register_error_handlers
    from proxy.pipeline import check_every_view_declared, install_pipeline
    from proxy.relay import build_relay
    from proxy.routes import anthropic, chat, docs, doctor, health, metrics, openai_api, passthrough, sse, usage
    from proxy.routes.websocket import register_websocket
    from proxy.web import create_web_blueprint

    if config is None:
        load_env_file()
        config = Config.from_env(os.environ)
    relay = build_relay(config)
    configure_logging(config.log_format, relay.redact)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["relay"] = relay
    register_error_handlers(app)
    install_pipeline(app)  # its steps in order, the limits included
    app.register_blueprint(chat.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(doctor.bp)
    app.register_blueprint(docs.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(passthrough.bp)
    app.register_blueprint(anthropic.bp)
    app.register_blueprint(sse.bp)
    app.register_blueprint(usage.bp)
    register_websocket(app)
    app.register_blueprint(create_web_blueprint())
    if config.trusted_proxies:
        app.wsgi_app = TrustedProxies(app.wsgi_app, config.trusted_proxies)  # type: ignore[method-assign]
    if config.debug_stats:
        from proxy.routes import debug  # leak-test counters; never registered unless asked for

        app.register_blueprint(debug.bp)
    check_every_view_declared(app)
    relay.ledger.start()  # this process' ledger thread (each gunicorn worker builds its own app)
    return app


def configure_logging(log_format: str = "text", redact: Callable[[str], str] | None = None) -> None:
    """Point the `relay` loggers at stderr in `log_format`, every record redacted by `redact` (the
    configuration's secrets) and on one line. Logging is the process's, so each app applies its own setting
    when it is built (the handler of an earlier app is replaced, not kept)."""
    from proxy.accesslog import TEXT_FORMAT, DirectWriter, JsonLogFormatter, write_directly
    from proxy.redaction import RedactingFilter, escape_control, redact_secret_like

    logger = logging.getLogger("relay")
    for handler in [h for h in logger.handlers if getattr(h, "relay_handler", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.relay_handler = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactingFilter(redact or redact_secret_like))
    logger.addHandler(handler)
    # The text access line skips the record machinery while these loggers stay as set here (proxy/accesslog.py).
    write_directly(DirectWriter(handler, redact or redact_secret_like, escape_control) if log_format == "text"
                   else None)
    logger.setLevel(logging.INFO)
    logger.propagate = False
