"""Pages on other origins, in headless Chromium: the old relay's cross-origin fetch client and a WebSocket page
speaking the tutorials' protocol, against the relay under gunicorn and the fake upstream."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Page

from tests.browser.conftest import BROWSER_SYSTEM_PROMPT, OtherSite
from tests.conftest import RelayProcess
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.browser

FAKE_ANSWER = "Hello from the fake upstream."


def run_cross_origin_chat(page: Page, site: OtherSite, relay: RelayProcess, question: str) -> dict[str, Any]:
    page.goto(site.page_url("cors_fetch.html", relay))
    result: dict[str, Any] = page.evaluate("question => runChat(question)", question)
    return result


def test_listed_origin_streams_with_credentialed_cors_fetch(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page, listed_site: OtherSite
) -> None:
    """A page on an origin in CORS_ORIGINS, using fetch with mode 'cors' and credentials 'include' like the old
    relay's README, gets the records as they stream and ends on the [DONE] record."""
    fake.behave(tokens=["Streaming", " across", " origins", "."], token_interval=0.3)
    result = run_cross_origin_chat(browser_page, listed_site, browser_relay, "hello from another site")
    assert result["ok"], result
    assert result["httpStatus"] == 200
    assert result["answer"] == "Streaming across origins."
    arrivals = result["arrivals"]
    assert arrivals[-1]["done"] is True and not any(record["error"] for record in arrivals)
    assert arrivals[-1]["at"] - arrivals[0]["at"] > 600  # the first record came well before the last one
    assert fake.requests[-1].json["messages"][-1] == {"role": "user", "content": "hello from another site"}


def test_unlisted_origin_is_blocked_by_the_browser(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page, unlisted_site: OtherSite
) -> None:
    """The same page on an origin not in CORS_ORIGINS fails its preflight: fetch rejects, nothing goes upstream."""
    result = run_cross_origin_chat(browser_page, unlisted_site, browser_relay, "let me in")
    assert not result["ok"]
    assert "Failed to fetch" in result["error"]
    assert result["answer"] == ""
    assert fake.requests == []


def test_tutorial_websocket_page_streams_a_two_turn_conversation_the_server_remembers(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page, listed_site: OtherSite
) -> None:
    """A page speaking the tutorials' WebSocket protocol gets both answers streamed in deltas; the second upstream
    request carries SYSTEM_PROMPT and the first exchange, kept by the server for that connection."""
    fake.behave(token_interval=0.05)
    browser_page.goto(listed_site.page_url("ws_chat.html", browser_relay))
    result = browser_page.evaluate("questions => converse(questions)", ["first question", "second question"])
    assert result["answers"] == [FAKE_ANSWER, FAKE_ANSWER]
    assert len(result["deltas"]) > 4  # streamed in pieces as the tokens came, not as one message per answer
    assert result["closeCode"] == 1000
    assert fake.requests[-1].json["messages"] == [
        {"role": "system", "content": BROWSER_SYSTEM_PROMPT},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": FAKE_ANSWER},
        {"role": "user", "content": "second question"},
    ]


def test_websocket_page_with_a_wrong_key_sees_close_code_1008(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page, listed_site: OtherSite
) -> None:
    """With a wrong key the browser's WebSocket opens, then closes with 1008 and a reason the page can show."""
    browser_page.goto(listed_site.page_url("ws_chat.html", browser_relay, key="wrong-key"))
    result = browser_page.evaluate("questions => converse(questions)", ["anyone?"])
    assert result["closeCode"] == 1008
    assert "access key" in result["closeReason"]
    assert result["answers"] == []
    assert fake.requests == []
