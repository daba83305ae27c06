"""The chat page shows the current key's usage (today and this month) from the relay's ledger, in headless
Chromium against the relay under gunicorn and the fake upstream."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import save_screenshot
from tests.browser.test_chat_page import open_chat, send, wait_for_answer
from tests.conftest import SECOND_ACCESS_KEY, RelayProcess

pytestmark = pytest.mark.browser


def test_the_page_shows_this_keys_usage_and_updates_it_after_an_answer(
    relay_factory: Callable[..., RelayProcess], browser_page: Page
) -> None:
    """Settings show today's and this month's requests and tokens for the key in use, refreshed after each answer."""
    relay = relay_factory(fresh=True)  # a ledger of its own: no other test's requests in it
    page = browser_page
    open_chat(page, relay, key=SECOND_ACCESS_KEY)
    usage = page.locator("#usage")
    expect(usage).to_contain_text("today: 0 requests, 0 tokens; this month: 0 requests, 0 tokens")
    send(page, "Hello")
    wait_for_answer(page)
    expect(usage).to_contain_text("today: 1 request, ", timeout=10_000)
    expect(usage).to_contain_text("this month: 1 request, ")
    page.get_by_text("Settings").click()
    expect(usage).to_be_visible()
    save_screenshot(page, "usage-in-settings.png")
