"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright) against the
real chat_web server. Screenshots go to $NANOCHAT_TEST_ARTIFACTS (default: .test_artifacts/)."""

import json
import os
import shutil

import pytest

from conftest import REPO, missing, serve_chat

ARTIFACTS = os.environ.get("NANOCHAT_TEST_ARTIFACTS", os.path.join(REPO, ".test_artifacts"))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        missing("Chromium (chromium on PATH)", "apt-get install chromium (or your system's package)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def ui_server(chat_dir, tmp_path_factory):
    """chat_web with answers of up to 1000 tokens (about 2-3 s on 2 CPU cores): long enough that
    the browser sees every answer while it streams, however fast the engine (at 200 tokens a busy
    browser could receive a whole answer in one read, and never show it streaming)."""
    with serve_chat(chat_dir, tmp_path_factory.mktemp("chat_ui") / "server.log", "-n", "1", "-m", "1000") as url:
        yield url


def wait_idle(page):
    """Until the answer has finished streaming (the Stop button is Send again)."""
    page.wait_for_function("document.getElementById('send').textContent === 'Send'", timeout=60_000)


def bubbles(page, role):
    return page.locator(f".message.{role} .bubble").all_inner_texts()


def test_chat_stream_regenerate_edit_and_new_chat(browser, ui_server):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.goto(ui_server)
    page.fill("#input", "Hello there!")
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.streaming", timeout=30_000)  # the answer appears while it streams
    # (text, streaming or done: a short answer can finish between two polls and lose .streaming)
    page.wait_for_function("(document.querySelector('.message.assistant .bubble') || {}).textContent?.trim().length > 0")
    wait_idle(page)
    assert bubbles(page, "user") == ["Hello there!"]
    first = bubbles(page, "assistant")
    assert len(first) == 1 and first[0].strip()
    page.screenshot(path=os.path.join(ARTIFACTS, "chat_ui.png"), full_page=True)

    page.click(".message.assistant .regenerate")
    wait_idle(page)
    second = bubbles(page, "assistant")
    assert len(second) == 1 and second != first  # a new sample replaced the old answer

    page.click(".message.user .edit")
    page.fill(".edit-box", "Something else entirely")
    page.click(".actions .save")
    wait_idle(page)
    assert bubbles(page, "user") == ["Something else entirely"]
    assert len(bubbles(page, "assistant")) == 1

    page.fill("#input", "And a follow-up")
    page.click("#send")
    wait_idle(page)
    assert bubbles(page, "user") == ["Something else entirely", "And a follow-up"]
    assert len(bubbles(page, "assistant")) == 2

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.close()


def test_a_calculator_call_shows_as_a_block_and_goes_back_as_the_model_made_it(browser, ui_server):
    """The first answer holds a call and its result, streamed as the server streams them (pieces
    with their parts; a tiny model rarely calls the calculator, so the page's network layer serves
    this one); the follow-up goes to the real server, which gets the answer's parts and answers."""
    pieces = [("text", "It is "), ("python", ""), ("python", "42"), ("python", "-3"), ("text", ""), ("python_output", ""),
              ("python_output", "39"), ("text", ""), ("text", " apples.")]
    stream = "".join(f"data: {json.dumps({'token': text, 'part': part})}\n\n" for part, text in pieces)
    sent = []

    def handle(route):
        sent.append(json.loads(route.request.post_data))
        if len(sent) == 1:
            route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=stream + 'data: {"done": true}\n\n')
        else:
            route.continue_()

    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.route("**/chat/completions", handle)
    page.goto(ui_server)
    page.fill("#input", "What is 42-3?")
    page.keyboard.press("Enter")
    wait_idle(page)
    answer = page.locator(".message.assistant .bubble")
    assert page.locator(".tool .call").all_inner_texts() == ["42-3"] and page.locator(".tool .result").all_inner_texts() == ["39"]
    assert answer.inner_text().startswith("It is ") and answer.inner_text().endswith(" apples.") and "<|" not in answer.inner_text()
    page.screenshot(path=os.path.join(ARTIFACTS, "chat_ui_tool_call.png"), full_page=True)

    page.fill("#input", "And 5 more?")
    page.click("#send")
    wait_idle(page)
    assert sent[1]["messages"][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "It is "}, {"type": "python", "text": "42-3"}, {"type": "python_output", "text": "39"},
        {"type": "text", "text": " apples."}]}
    assert page.locator(".message.error").count() == 0 and len(bubbles(page, "assistant")) == 2
    page.close()


def test_bad_request_shows_an_error_and_phone_width_fits(browser, ui_server):
    page = browser.new_page(viewport={"width": 375, "height": 720})
    page.goto(ui_server)
    page.fill("#input", "x" * 8001)  # over the server's per-message limit
    page.click("#send")
    page.wait_for_selector(".message.error", timeout=30_000)
    assert "8000" in page.locator(".message.error").inner_text()
    page.fill("#input", "short " * 60)
    page.click("#send")
    wait_idle(page)
    assert page.locator(".message.error").count() == 0 and len(bubbles(page, "user")) == 1
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # nothing wider than the phone
    page.screenshot(path=os.path.join(ARTIFACTS, "chat_ui_phone.png"), full_page=True)
    page.close()
