"""GET /chat in a real browser: headless Chromium's own EventSource against the relay under gunicorn.

A loopback page server serves a page running the EventSource tutorial's handler code; the page reports what
the browser saw (text shown, error events and readyState) back by `fetch`. No browser driver is needed.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ACCESS_KEY, RelayProcess
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE_TIMEOUT_SECONDS = 30

# Each scenario opens one EventSource. onmessage is the tutorial's handler (JSON.parse(data).choices[0]);
# what it throws is recorded, as are the error events and the readyState each one saw.
PAGE = """<!doctype html><html><body><script>
const params = new URLSearchParams(location.search);
const relay = params.get("relay"), key = params.get("key");
function scenario(prompt, keyToUse) {
  return new Promise((resolve) => {
    const url = new URL("/chat", relay);
    url.searchParams.set("prompt", prompt);
    url.searchParams.set("key", keyToUse);
    const seen = {text: "", done: false, errors: [], exceptions: [], lastEventId: ""};
    const es = new EventSource(url);
    es.onmessage = (event) => {
      if (event.data === "[DONE]") {
        seen.done = true; seen.lastEventId = event.lastEventId; es.close(); resolve(seen); return;
      }
      try {
        const content = JSON.parse(event.data).choices[0].delta.content;
        if (content) seen.text += content;
      } catch (err) { seen.exceptions.push(String(err)); }
    };
    es.addEventListener("error", (event) => {
      seen.errors.push({data: event.data === undefined ? null : event.data, readyState: es.readyState});
      // A failed connection is CLOSED for good; wait long enough to see a reconnection if one happened.
      if (es.readyState === EventSource.CLOSED) setTimeout(() => resolve(seen), 4000);
    });
  });
}
(async () => {
  // Side by side (each its own connection): the refusals' 4 s watches for a reconnection overlap.
  const [ok, wrongKey, midStream, rateLimited] = await Promise.all([
    scenario("Hello", key),
    scenario("probe-wrong-key", key + "-wrong"),
    scenario('#fake {"disconnect_after": 2}', key),
    scenario('#fake {"status": 429, "retry_after": "30"}', key),
  ]);
  const results = {ok, wrongKey, midStream, rateLimited};
  await fetch("/result", {method: "POST", body: JSON.stringify(results)});
})();
</script></body></html>"""


class PageServer:
    """Serves PAGE at /page.html and collects the one result the page POSTs to /result."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = PAGE.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                owner.results.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def page_server() -> Iterator[PageServer]:
    with PageServer() as server:
        yield server


def run_page(page: PageServer, relay: RelayProcess, profile: Path) -> dict[str, Any]:
    """Open the page in headless Chromium and return what it reported."""
    url = f"{page.origin}/page.html?relay={relay.url}&key={ACCESS_KEY}"
    browser = subprocess.Popen(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", f"--user-data-dir={profile}", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + PAGE_TIMEOUT_SECONDS
        while not page.results and time.monotonic() < deadline and browser.poll() is None:
            time.sleep(0.1)
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(5)
    assert page.results, "the page reported nothing"
    return page.results[-1]


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (installed by `make test`)")
def test_browser_eventsource_against_get_chat(relay_factory: Callable[..., RelayProcess], fake: FakeUpstream,
                                             page_server: PageServer, tmp_path: Path) -> None:
    """In Chromium: the tutorial's page shows the answer and closes on [DONE]; a wrong key or an upstream
    429 fails the EventSource for good (CLOSED, no reconnection); a mid-stream failure reaches the page as
    an error event with the message while onmessage never throws, then [DONE] closes it."""
    relay = relay_factory(CORS_ORIGINS=page_server.origin, KEEPALIVE_SECONDS="0.3")
    seen = run_page(page_server, relay, tmp_path / "profile")

    ok = seen["ok"]
    assert (ok["text"], ok["done"], ok["errors"], ok["exceptions"]) == ("Hello from the fake upstream.", True, [], [])
    assert ok["lastEventId"], "chunks carry an id, so a reconnection would say Last-Event-ID"

    for refused in (seen["wrongKey"], seen["rateLimited"]):
        assert refused["errors"] == [{"data": None, "readyState": 2}], "failed for good: CLOSED, no retry"
        assert not refused["done"] and not refused["text"]
    log = relay.log_text()
    refusals = [line for line in log.splitlines() if "method=GET path=/chat?" in line and "status=401" in line]
    assert len(refusals) == 1, "the browser did not reconnect after a 401"
    assert ACCESS_KEY not in log

    broken = seen["midStream"]
    assert broken["text"] == "Hello from" and broken["done"] is True and broken["exceptions"] == []
    assert len(broken["errors"]) == 1 and broken["errors"][0]["readyState"] == 1
    assert json.loads(broken["errors"][0]["data"])["error"]["code"] == "upstream_disconnected"
