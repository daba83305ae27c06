"""The built-in chat page at ``GET /`` and its assets.

The page is static HTML plus one JavaScript and one CSS bundle that esbuild builds from ``src/`` and
npm packages (pinned in ``package-lock.json``) into ``static/dist/`` (gitignored; ``make assets``).
Everything is served by the relay itself: the page works with no internet access at run time.

The page talks to ``POST /chat`` and ``GET /v1/models`` with the access key the person types in; the
page itself needs no key, and nothing secret is written into it.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, render_template, url_for

from proxy.pipeline import endpoint
from proxy.relay import current_relay

STATIC_DIRECTORY = Path(__file__).resolve().parent / "static"
BUNDLE_FILES = ("app.js", "app.css")

# Model output is rendered as HTML in this page, so the page allows nothing it does not need: scripts,
# styles and connections only from this origin (no inline script, no remote origins), images only from
# this origin, no plugins, no frames, no form posts, no <base> rewriting.
PAGE_CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    )
)

PAGE_SECURITY_HEADERS = {
    "Content-Security-Policy": PAGE_CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

ASSETS_MISSING_MESSAGE = (
    "The chat page's assets are not built yet. In the relay's directory run `make install` (needs npm: "
    "apt install nodejs npm), or `make run`, which builds them, and reload. The API (POST /chat, /v1) "
    "works without them."
)


def create_web_blueprint(static_directory: Path = STATIC_DIRECTORY) -> Blueprint:
    """Return the blueprint serving the chat page at ``/`` and its files under ``/static/web/``.

    ``static_directory`` holds ``icon.svg`` and the built ``dist/`` bundle.
    """
    blueprint = Blueprint(
        "web",
        __name__,
        static_folder=str(static_directory),
        static_url_path="/static/web",
        template_folder="templates",
    )
    dist_directory = static_directory / "dist"

    def bundle_url(filename: str) -> str:
        # Versioned by modification time, so a rebuilt bundle is never served stale from a cache.
        version = int((dist_directory / filename).stat().st_mtime)
        return url_for("web.static", filename=f"dist/{filename}", v=version)

    @blueprint.get("/")
    @endpoint("json", access="public")
    def chat_page() -> Response:
        """Serve the chat page, or a plain 503 naming the fix when the bundle has not been built."""
        if not all((dist_directory / name).is_file() for name in BUNDLE_FILES):
            response = Response(ASSETS_MISSING_MESSAGE + "\n", status=503, mimetype="text/plain")
        else:
            html = render_template(
                "chat.html",
                script_url=bundle_url("app.js"),
                style_url=bundle_url("app.css"),
                icon_url=url_for("web.static", filename="icon.svg"),
                default_model=current_relay().config.default_model,
                demo=current_relay().config.demo,
            )
            response = Response(html, mimetype="text/html")
        response.headers.update(PAGE_SECURITY_HEADERS)
        return response

    return blueprint


