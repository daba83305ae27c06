"""The official OpenAI JS SDK (`openai` on npm, pinned in tests/browser/jssdk/package-lock.json) in a browser page
on another origin, in headless Chromium, against the relay under gunicorn and the fake upstream.

The SDK adds its own `x-stainless-*` request headers (runtime, version, retry count, timeout), so every call
from a page is preflighted; the relay's allow-list must admit them (proxy/access.py). The page's script is
bundled by esbuild at install time (scripts/install-test-clients.sh) into the gitignored tests/browser/pages/dist/;
nothing is fetched at run time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Request, expect

from tests.browser.conftest import BROWSER_MODELS, PAGES_DIRECTORY, OtherSite
from tests.conftest import RelayProcess
from tests.fake_upstream import FakeUpstream
from tests.servers import wait_until

pytestmark = pytest.mark.browser

SDK_VERSION = "7.60.0"
BUNDLE = PAGES_DIRECTORY / "dist" / "js_sdk.js"
MODEL = BROWSER_MODELS[0]
TOKENS = ["The", " SDK", " reached", " the", " fake", " upstream", "."]
ANSWER = "".join(TOKENS)
SDK_PATHS = ("/v1/chat/completions", "/v1/models", "/v1/responses")
STEPS = ("streamed", "whole", "models", "response")


@pytest.fixture(scope="module")
def sdk_bundle() -> Path:
    if not BUNDLE.is_file():
        pytest.fail(f"{BUNDLE} is missing: run scripts/install-test-clients.sh (make test does)")
    assert f'VERSION = "{SDK_VERSION}"' in BUNDLE.read_text(errors="replace")
    return BUNDLE


def access_lines(log: str, method: str) -> list[tuple[str, int]]:
    """(path, status) of the relay's access-log lines for `method` on the SDK's paths (a line for another page's
    request that ended late, in a test run before this one, is not ours)."""
    return [(path, int(status)) for path, status in
            re.findall(rf"method={method} path=(\S+) status=(\d+)", log) if path in SDK_PATHS]


def all_logged(log: str, requests: bool) -> bool:
    """Every SDK path's preflight is in the log, and (`requests`) the four requests themselves: a line is
    written as the server closes its response, which can be just after the page saw the answer."""
    preflighted = {path for path, _ in access_lines(log, "OPTIONS")} == set(SDK_PATHS)
    return preflighted and (not requests or len(access_lines(log, "POST")) + len(access_lines(log, "GET")) >= 4)


def run_sdk(
    page: Page, site: OtherSite, relay: RelayProcess, requests: bool
) -> tuple[dict[str, Any], list[Request], str]:
    """Open the page on `site`, run the SDK's four calls; returns the page's results, the browser's requests to
    the relay and the relay's access-log lines written meanwhile, once they are all there (`all_logged`)."""
    log_start = len(relay.log_text())
    sent: list[Request] = []
    page.on("request", lambda request: sent.append(request) if request.url.startswith(relay.url) else None)
    page.goto(site.page_url("js_sdk.html", relay))
    expect(page.locator("body[data-ready=true]")).to_be_attached()
    result: dict[str, Any] = page.evaluate("model => runSdk(model)", MODEL)
    wait_until(lambda: all_logged(relay.log_text()[log_start:], requests), timeout=10)
    return result, sent, relay.log_text()[log_start:]


def test_sdk_on_a_listed_origin_streams_answers_and_lists_through_the_relay(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page, listed_site: OtherSite, sdk_bundle: Path
) -> None:
    """Every call is preflighted (the SDK's x-stainless-* headers), the preflights are answered 204, the browser
    then sends those headers, and the SDK returns the fake upstream's answers: a streamed chat completion in
    deltas, a whole one, the model list and a Responses API answer."""
    fake.behave(tokens=TOKENS)
    result, sent, log = run_sdk(browser_page, listed_site, browser_relay, requests=True)
    steps = result["results"]
    assert all(steps[name]["ok"] for name in STEPS), steps
    assert steps["streamed"]["value"]["deltas"] == TOKENS
    assert steps["whole"]["value"] == {"content": ANSWER, "finishReason": "stop"}
    assert steps["models"]["value"]["ids"] == list(BROWSER_MODELS)
    assert steps["response"]["value"] == {"id": "resp_fake", "status": "completed", "outputText": ANSWER}

    # The upstream got both chat requests and the Responses request, as the page sent them.
    chats = [r.json for r in fake.requests if r.path.endswith("/chat/completions")]
    assert [(c.get("stream") is True, c["messages"][-1]["content"]) for c in chats] == [
        (True, "stream to the page"), (False, "answer the page at once")]
    responses = [r.json for r in fake.requests if r.path.endswith("/responses")]
    assert responses == [{"model": MODEL, "input": "respond to the page"}]

    # A preflight for each path, answered 204, then the requests themselves.
    preflights = access_lines(log, "OPTIONS")
    assert {path for path, _ in preflights} == set(SDK_PATHS)
    assert all(status == 204 for _, status in preflights), preflights
    assert sorted(access_lines(log, "POST")) == sorted([("/v1/chat/completions", 200)] * 2 + [("/v1/responses", 200)])
    assert access_lines(log, "GET") == [("/v1/models", 200)]
    # ...and the browser sent the SDK's own headers on them, which it does only after a preflight allowed them.
    api_requests = [request for request in sent if request.method != "OPTIONS"]
    assert len(api_requests) == 4
    for request in api_requests:
        headers = request.all_headers()
        assert headers["x-stainless-lang"] == "js", headers
        assert headers["x-stainless-package-version"] == SDK_VERSION, headers
        assert headers["x-stainless-retry-count"] == "0", headers
        assert headers["origin"] == listed_site.origin


def test_sdk_on_an_unlisted_origin_fails_its_preflights_and_nothing_goes_upstream(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page, unlisted_site: OtherSite, sdk_bundle: Path
) -> None:
    """The same page on an origin not in CORS_ORIGINS: the relay refuses each preflight, the browser never sends
    the request, every SDK call throws its connection error, and the upstream sees nothing."""
    result, _sent, log = run_sdk(browser_page, unlisted_site, browser_relay, requests=False)
    for name in STEPS:
        step = result["results"][name]
        assert not step["ok"], step
        assert step["error"]["name"] == "APIConnectionError", step
        assert step["error"]["message"] == "Connection error.", step
    assert fake.requests == []
    preflights = access_lines(log, "OPTIONS")
    assert {path for path, _ in preflights} == set(SDK_PATHS)
    assert all(status == 403 for _, status in preflights), preflights
    assert access_lines(log, "POST") == [] and access_lines(log, "GET") == []
