"""The chat page at `GET /` as HTTP sees it: served by the app, locked down by its headers, no secrets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from flask import Flask

from proxy import create_app
from proxy.config import Config
from proxy.pipeline import install_pipeline
from proxy.relay import build_relay
from proxy.web import STATIC_DIRECTORY, create_web_blueprint
from tests.conftest import ACCESS_KEY, ROOT, UPSTREAM_KEY


@pytest.fixture(scope="module")
def built_bundle() -> Path:
    build = subprocess.run(["sh", str(ROOT / "scripts" / "build-web.sh")], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr
    return STATIC_DIRECTORY / "dist"


@pytest.fixture
def app(built_bundle: Path) -> Flask:
    config = Config(authorization_keys=(ACCESS_KEY,), openai_api_key=UPSTREAM_KEY,
                    openai_base_url="http://127.0.0.1:9/v1", default_model="page-default-model")
    return create_app(config)


def test_page_is_served_with_a_strict_content_security_policy(app: Flask) -> None:
    """GET / is HTML whose CSP allows only this origin: no inline script, no eval, no remote hosts."""
    response = app.test_client().get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    policy = dict(part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["img-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in response.headers["Content-Security-Policy"]
    assert "http" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_page_has_no_inline_script_no_remote_assets_and_no_secret(app: Flask) -> None:
    """The HTML loads only same-origin assets, carries the default model, and never a key."""
    html = app.test_client().get("/").get_data(as_text=True)
    assert "<script>" not in html and "<script src=\"/static/web/dist/app.js" in html
    assert "https://" not in html and "http://" not in html
    assert 'data-default-model="page-default-model"' in html
    assert ACCESS_KEY not in html and UPSTREAM_KEY not in html
    for label in ('<label for="message"', '<label for="access-key">Access key</label>',
                  '<label for="system-prompt">System prompt</label>', 'aria-label="Model"',
                  'aria-label="Conversation"', ">New chat</button>", ">Send</button>", ">Stop</button>"):
        assert label in html


def test_bundle_is_served_by_the_app(app: Flask) -> None:
    """The built script and stylesheet come from the app itself, with proper content types."""
    client = app.test_client()
    script = client.get("/static/web/dist/app.js")
    style = client.get("/static/web/dist/app.css")
    icon = client.get("/static/web/icon.svg")
    assert script.status_code == style.status_code == icon.status_code == 200
    assert script.mimetype in ("text/javascript", "application/javascript")
    assert style.mimetype == "text/css"
    assert b"hljs" in style.data  # the highlight.js theme is bundled in


def test_missing_bundle_gives_a_503_that_names_the_fix(tmp_path: Path) -> None:
    """Without a built bundle the page says how to build it instead of serving a broken page."""
    (tmp_path / "dist").mkdir()
    app = Flask(__name__, static_folder=None)
    app.extensions["relay"] = build_relay(
        Config(authorization_keys=(ACCESS_KEY,), openai_api_key=UPSTREAM_KEY, openai_base_url="http://127.0.0.1:9/v1")
    )
    install_pipeline(app)
    app.register_blueprint(create_web_blueprint(tmp_path))
    response = app.test_client().get("/")
    assert response.status_code == 503
    assert "make install" in response.get_data(as_text=True)


@pytest.mark.parametrize("demo", [True, False])
def test_page_says_when_it_is_a_demo(built_bundle: Path, demo: bool) -> None:
    """In demo mode the page says so before any answer arrives; a real relay's page never does."""
    config = Config(authorization_keys=(ACCESS_KEY,), openai_api_key=UPSTREAM_KEY,
                    openai_base_url="http://127.0.0.1:9/v1", demo=demo)
    page = create_app(config).test_client().get("/").get_data(as_text=True)
    assert ('id="demo-notice"' in page) is demo
