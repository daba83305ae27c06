"""The built-in chat page at `GET /`, in headless Chromium, against the relay under gunicorn and the fake upstream."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import BrowserContext, Locator, Page, expect

from tests.browser.conftest import (
    BROWSER_MODELS,
    BROWSER_SYSTEM_PROMPT,
    PHONE_VIEWPORT,
    DialogWatcher,
    OtherSite,
    save_screenshot,
)
from tests.conftest import ACCESS_KEY, RelayProcess
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.browser

FAKE_ANSWER = "Hello from the fake upstream."
MARKDOWN_ANSWER = (
    "Here is **bold** advice and a function:\n\n"
    "```python\n"
    "def greet(name):\n"
    "    return f\"Hello, {name}!\"\n"
    "```\n\n"
    "Call `greet` with a name."
)
CODE_IN_ANSWER = 'def greet(name):\n    return f"Hello, {name}!"\n'


def word_tokens(text: str) -> list[str]:
    """Split text the way a model streams it: words with their leading whitespace."""
    return re.findall(r"\s*\S+|\s+", text)


def open_chat(page: Page, relay: RelayProcess, key: str = ACCESS_KEY) -> None:
    page.goto(f"{relay.url}/")
    expect(page.locator("body[data-ready=true]")).to_be_attached()
    key_field = page.get_by_label("Access key")
    expect(key_field).to_be_visible()
    key_field.fill(key)
    key_field.press("Enter")


def send(page: Page, text: str) -> None:
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")


def messages(page: Page) -> Locator:
    return page.get_by_role("region", name="Conversation").locator("ol.messages > li")


def last_answer(page: Page) -> Locator:
    return page.locator("ol.messages > li.assistant").last


def wait_for_answer(page: Page, status: str = "done") -> Locator:
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-status", status)
    return answer


def test_answer_streams_in_as_markdown_with_highlighted_code_and_a_working_copy_button(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_context: BrowserContext, browser_page: Page
) -> None:
    """Tokens appear while the answer streams (after keep-alive lines), render as Markdown with a highlighted
    code block, and the code's copy button puts exactly the code on the clipboard. Saves the screenshots."""
    fake.behave(tokens=word_tokens(MARKDOWN_ANSWER), first_token_delay=1.2, token_interval=0.08)
    browser_context.grant_permissions(["clipboard-read", "clipboard-write"], origin=browser_relay.url)
    page = browser_page
    open_chat(page, browser_relay)
    send(page, "How do I greet someone in Python?")

    answer = last_answer(page)
    expect(answer.locator(".body")).to_contain_text("Here is", timeout=5000)
    assert answer.get_attribute("data-status") == "streaming"  # visible long before the last token exists
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    wait_for_answer(page)

    expect(answer.locator(".body strong")).to_have_text("bold")
    expect(answer.locator(".body :not(pre) > code")).to_have_text("greet")
    code = answer.locator("pre code")
    expect(code).to_have_text(CODE_IN_ANSWER)
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(code.locator(".hljs-string").first).to_be_visible()

    answer.get_by_role("button", name="Copy code").click()
    expect(answer.locator(".copy-button")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == CODE_IN_ANSWER

    desktop = save_screenshot(page, "chat-desktop.png")
    page.set_viewport_size(PHONE_VIEWPORT)  # type: ignore[arg-type]
    expect(page.get_by_role("button", name="Show conversations")).to_be_visible()
    save_screenshot(page, "chat-phone.png")
    assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE_VIEWPORT["width"]
    assert desktop.stat().st_size > 10_000  # docs/screenshot-desktop.png in the README is a copy of this one


def test_stop_aborts_mid_answer_and_the_upstream_connection_closes(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page
) -> None:
    """Stop ends the fetch mid-answer; the fake upstream sees its stream closed, incomplete, within 2 s."""
    fake.behave(n_tokens=200, token_interval=0.1)
    page = browser_page
    open_chat(page, browser_relay)
    send(page, "Tell me a very long story")
    answer = last_answer(page)
    expect(answer.locator(".body")).not_to_be_empty()
    page.get_by_role("button", name="Stop").click()
    stopped_at = time.monotonic()
    wait_for_answer(page, "stopped")
    expect(answer).to_contain_text("Stopped.")
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    assert fake.wait_for(lambda: fake.streams_closed, timeout=5)
    closed = fake.streams_closed[0]
    assert not closed.completed and closed.tokens_sent < 200
    assert closed.at - stopped_at < 2.0


def test_second_turn_carries_the_first_and_reload_keeps_the_conversations(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page
) -> None:
    """The page sends the whole history with each turn, keeps it across a reload, and New chat starts a second
    conversation while the first stays in the side list."""
    page = browser_page
    open_chat(page, browser_relay)
    send(page, "first question")
    wait_for_answer(page)
    send(page, "second question")
    expect(messages(page)).to_have_count(4)
    wait_for_answer(page)
    assert fake.requests[-1].json["messages"] == [
        {"role": "system", "content": BROWSER_SYSTEM_PROMPT},  # added by the relay: the page sent none
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": FAKE_ANSWER},
        {"role": "user", "content": "second question"},
    ]

    page.reload()
    expect(messages(page)).to_have_count(4)
    expect(messages(page).nth(0)).to_contain_text("first question")
    expect(messages(page).nth(3)).to_contain_text(FAKE_ANSWER)
    expect(page.get_by_label("Access key")).to_have_value(ACCESS_KEY)

    page.get_by_role("button", name="New chat").click()
    expect(messages(page)).to_have_count(0)
    send(page, "a new topic")
    wait_for_answer(page)
    assert [m["content"] for m in fake.requests[-1].json["messages"][1:]] == ["a new topic"]
    saved = page.get_by_role("navigation", name="Saved conversations").get_by_role("listitem")
    expect(saved).to_have_count(2)
    saved.filter(has_text="first question").get_by_role("button", name="first question").click()
    expect(messages(page)).to_have_count(4)


def test_injected_markup_in_answers_never_runs_or_loads_anything(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page, dialogs: DialogWatcher,
    unlisted_site: OtherSite
) -> None:
    """`<img onerror>`, `<script>`, `javascript:` links and Markdown images in a reply show as text or dead links:
    no dialog opens and no request reaches the injected URLs."""
    canary = unlisted_site.origin
    injection = (
        f"<img src={canary}/pwned-img onerror=alert('img')> "
        f"<script>alert('script');fetch('{canary}/pwned-script')</script> "
        "[click me](javascript:alert('link')) "
        f"<a href=\"javascript:alert('raw')\">raw link</a> "
        f"![tracker]({canary}/pwned-markdown-image) "
        f"<iframe src=\"{canary}/pwned-frame\"></iframe> "
        f"<svg onload=alert('svg')></svg> "
        f"<style>@import '{canary}/pwned-style';</style>"
    )
    fake.behave(tokens=word_tokens(injection), token_interval=0.01)
    page = browser_page
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    open_chat(page, browser_relay)
    unlisted_site.paths.clear()
    send(page, "say something nasty")
    answer = wait_for_answer(page)
    page.wait_for_timeout(500)  # give any (wrongly) injected loader a moment to fire

    body = answer.locator(".body")
    expect(body).to_contain_text("<img src=")
    expect(body).to_contain_text("<script>")
    for tag in ("img", "script", "iframe", "svg", "style", "a[href^='javascript']", "[onerror]", "[onload]"):
        assert body.locator(tag).count() == 0, tag
    assert dialogs.messages == []
    assert [url for url in requested if "pwned" in url] == []
    assert [path for path in unlisted_site.paths if "pwned" in path] == []


def test_errors_are_shown_in_words_and_a_rejected_key_is_asked_for_again(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page
) -> None:
    """A wrong key (401) asks for the key again; upstream rate limiting and outages read as sentences; Retry
    repeats the last turn once things are fixed."""
    page = browser_page
    open_chat(page, browser_relay, key="not-the-key")
    send(page, "hello?")
    answer = wait_for_answer(page, "error")
    expect(answer).to_contain_text("did not accept your access key")
    key_field = page.get_by_label("Access key")
    expect(key_field).to_be_visible()
    expect(key_field).to_be_focused()
    assert fake.requests == []

    key_field.fill(ACCESS_KEY)
    key_field.press("Enter")
    fake.behave(status=429, retry_after="7")
    page.get_by_role("button", name="Retry").click()
    expect(wait_for_answer(page, "error")).to_contain_text("Too many requests")
    expect(last_answer(page)).to_contain_text("Wait 7 seconds")

    fake.behave(status=503)
    page.get_by_role("button", name="Retry").click()
    expect(wait_for_answer(page, "error")).to_contain_text("not reachable right now")

    fake.reset()
    page.get_by_role("button", name="Retry").click()
    expect(wait_for_answer(page)).to_contain_text(FAKE_ANSWER)
    expect(messages(page)).to_have_count(2)  # retries replaced the failed answers


def test_first_visit_asks_for_the_key_and_saves_it_on_enter_or_blur(
    browser_relay: RelayProcess, browser_page: Page
) -> None:
    """The Access key field is visible before any message; the key is kept on Enter and on leaving the field."""
    page = browser_page
    page.goto(f"{browser_relay.url}/")
    key_field = page.get_by_label("Access key")
    expect(key_field).to_be_visible()
    expect(key_field).to_be_focused()
    expect(messages(page)).to_have_count(0)

    key_field.fill("typed-then-left")
    page.get_by_role("textbox", name="System prompt").focus()  # blur saves
    page.reload()
    expect(page.get_by_label("Access key")).to_have_value("typed-then-left")
    expect(page.get_by_label("Access key")).to_be_hidden()  # settings stay folded once a key is saved

    page.get_by_text("Settings").click()
    page.get_by_label("Access key").fill(ACCESS_KEY)
    page.get_by_label("Access key").press("Enter")
    expect(page.get_by_role("textbox", name="Message")).to_be_focused()
    page.reload()
    expect(page.get_by_label("Access key")).to_have_value(ACCESS_KEY)


def test_enter_sends_shift_enter_breaks_lines_and_composing_enter_never_sends(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page
) -> None:
    """Enter while an input method composes (isComposing / keyCode 229) keeps the text; Shift+Enter adds a line;
    Enter sends the multi-line message as typed."""
    page = browser_page
    open_chat(page, browser_relay)
    box = page.get_by_role("textbox", name="Message")
    box.fill("你好")
    box.dispatch_event("keydown", {"key": "Enter", "keyCode": 229, "isComposing": True})
    box.dispatch_event("keydown", {"key": "Enter", "keyCode": 13, "isComposing": True})
    page.wait_for_timeout(200)
    expect(box).to_have_value("你好")
    expect(messages(page)).to_have_count(0)

    box.press("Shift+Enter")
    box.type("second line")
    expect(box).to_have_value("你好\nsecond line")
    box.press("Enter")
    wait_for_answer(page)
    expect(box).to_have_value("")
    assert fake.requests[-1].json["messages"][-1] == {"role": "user", "content": "你好\nsecond line"}


def test_system_prompt_and_model_apply_to_the_conversation(
    browser_relay: RelayProcess, fake: FakeUpstream, browser_page: Page
) -> None:
    """The picker lists GET /v1/models; the conversation's system prompt replaces the relay's persona and the
    request names the picked model; both are kept with the conversation across a reload."""
    page = browser_page
    open_chat(page, browser_relay)
    page.get_by_text("Settings").click()
    page.get_by_role("textbox", name="System prompt").fill("Answer like a pirate.")
    model = page.get_by_role("combobox", name="Model")
    expect(model.locator("option")).to_have_text(list(BROWSER_MODELS))  # from GET /v1/models
    expect(model).to_have_value("gpt-4o-mini")  # DEFAULT_MODEL until the person picks another
    model.select_option("fake-model")
    send(page, "Ahoy?")
    wait_for_answer(page)
    sent = fake.requests[-1].json
    assert sent["messages"][0] == {"role": "system", "content": "Answer like a pirate."}
    assert sent["model"] == "fake-model"
    page.reload()
    expect(page.get_by_label("System prompt")).to_have_value("Answer like a pirate.")
    expect(page.get_by_role("combobox", name="Model")).to_have_value("fake-model")


def test_phone_width_keeps_every_control_reachable(
    browser_relay: RelayProcess, browser_context: BrowserContext
) -> None:
    """At 390 px the conversation list slides in from a button, nothing scrolls sideways, and chatting works."""
    page = browser_context.new_page()
    page.set_viewport_size(PHONE_VIEWPORT)  # type: ignore[arg-type]
    open_chat(page, browser_relay)
    expect(page.get_by_role("button", name="New chat")).to_be_hidden()
    page.get_by_role("button", name="Show conversations").click()
    page.get_by_role("button", name="New chat").click()
    expect(page.get_by_role("button", name="New chat")).to_be_hidden()
    send(page, "hi from a phone")
    wait_for_answer(page)
    expect(page.get_by_role("button", name="Send")).to_be_in_viewport()
    expect(page.get_by_role("combobox", name="Model")).to_be_in_viewport()
    assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE_VIEWPORT["width"]
