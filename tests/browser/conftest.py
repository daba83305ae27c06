"""Fixtures for the browser tests: headless Debian Chromium (one per test module), driven by Playwright.

The browser is the system's ``/usr/bin/chromium`` (``scripts/install-test-deps.sh`` installs it; ``make
test`` runs that script), never a browser downloaded by ``playwright install``. Playwright gives every
``launch`` a fresh temporary profile (user-data-dir) and every context its own storage, so tests never
see each other's keys or conversations.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, Playwright, sync_playwright

from proxy.web import BUNDLE_FILES, STATIC_DIRECTORY
from tests.conftest import ACCESS_KEY, RelayProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIRECTORY = REPO_ROOT / "test-artifacts"
CHROMIUM_EXECUTABLE = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP_VIEWPORT = {"width": 1280, "height": 800}
PHONE_VIEWPORT = {"width": 390, "height": 844}
PAGES_DIRECTORY = Path(__file__).parent / "pages"
BROWSER_SYSTEM_PROMPT = "You are the relay's browser-test persona."
BROWSER_MODELS = ("gpt-4o-mini", "gpt-4o", "fake-model")  # DEFAULT_MODEL first; GET /v1/models lists them


class OtherSite:
    """Another web site on loopback (its own origin) serving tests/browser/pages/ and recording every path
    asked of it, so tests can also use it as a canary that no injected URL was ever fetched."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        site = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(PAGES_DIRECTORY), **kwargs)

            def send_head(self) -> Any:
                site.paths.append(self.path)
                return super().send_head()

            def log_message(self, format: str, *args: Any) -> None:
                return  # keep the test output quiet; `paths` records what was asked

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="other-site")
        self.thread.start()

    def page_url(self, name: str, relay: RelayProcess, key: str = ACCESS_KEY) -> str:
        return f"{self.origin}/{name}?relay={relay.url}&key={key}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def listed_site() -> Iterator[OtherSite]:
    """A second origin that the browser tests' relay lists in CORS_ORIGINS."""
    site = OtherSite()
    yield site
    site.stop()


@pytest.fixture(scope="session")
def unlisted_site() -> Iterator[OtherSite]:
    """A third origin that is not in CORS_ORIGINS (and serves as the canary for injected URLs)."""
    site = OtherSite()
    yield site
    site.stop()


@pytest.fixture(scope="session")
def browser_relay(relay_factory: Callable[..., RelayProcess], listed_site: OtherSite) -> RelayProcess:
    """The relay under gunicorn for every browser test; keep-alive lines every 0.5 s exercise the page's reader."""
    return relay_factory(CORS_ORIGINS=listed_site.origin, SYSTEM_PROMPT=BROWSER_SYSTEM_PROMPT,
                         KEEPALIVE_SECONDS="0.5", ALLOWED_MODELS=",".join(BROWSER_MODELS))


@pytest.fixture(scope="session")
def page_bundle() -> Path:
    """The chat page's built bundle, built now (quick when up to date) if it is missing or stale."""
    build = subprocess.run(
        ["sh", str(REPO_ROOT / "scripts" / "build-web.sh")], capture_output=True, text=True, timeout=300
    )
    if build.returncode != 0:
        pytest.fail(f"building the chat page failed (scripts/build-web.sh):\n{build.stderr[-2000:]}")
    dist = STATIC_DIRECTORY / "dist"
    assert all((dist / name).is_file() for name in BUNDLE_FILES)
    return dist


# Module scope, not session: Playwright's sync API keeps an asyncio loop running in the main thread while
# it is open, which would break later tests that call asyncio.run(). One browser per browser-test module.
@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def chromium(playwright_driver: Playwright, page_bundle: Path) -> Iterator[Browser]:
    """One headless system Chromium per test module."""
    if not CHROMIUM_EXECUTABLE.exists():
        pytest.fail(
            f"{CHROMIUM_EXECUTABLE} is missing: run scripts/install-test-deps.sh (make test does), "
            "or deselect the browser tests with -m 'not browser'"
        )
    browser = playwright_driver.chromium.launch(
        executable_path=str(CHROMIUM_EXECUTABLE), args=CHROMIUM_ARGS, headless=True
    )
    yield browser
    browser.close()


class DialogWatcher:
    """Records every JavaScript dialog (alert/confirm/prompt) a page opens, and dismisses it."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, dialog: Dialog) -> None:
        self.messages.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def browser_context(chromium: Browser) -> Iterator[BrowserContext]:
    """A fresh, isolated browser context (own storage, own cookies) at desktop size."""
    context = chromium.new_context(viewport=DESKTOP_VIEWPORT)  # type: ignore[arg-type]
    context.set_default_timeout(10_000)
    yield context
    context.close()


@pytest.fixture
def dialogs() -> DialogWatcher:
    return DialogWatcher()


@pytest.fixture
def browser_page(browser_context: BrowserContext, dialogs: DialogWatcher) -> Page:
    """A page in a fresh context; any dialog it opens is recorded in ``dialogs`` and dismissed."""
    page = browser_context.new_page()
    page.on("dialog", dialogs)
    return page


def save_screenshot(page: Page, name: str) -> Path:
    """Save a screenshot under test-artifacts/ (gitignored; CI keeps the folder as an artifact)."""
    ARTIFACTS_DIRECTORY.mkdir(exist_ok=True)
    path = ARTIFACTS_DIRECTORY / name
    page.screenshot(path=str(path))
    return path
