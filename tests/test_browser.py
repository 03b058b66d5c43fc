"""The chat page in real headless Chromium, on a real cluster behind the round-robin proxy."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from chorus.devcluster import LocalCluster

# Never fetch a browser: the tests drive the system Chromium from the OS packages.
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

from playwright.sync_api import Browser, Dialog, Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
TIMEOUT_MS = 20_000
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def open_chat(browser: Browser, url: str, name: str, room: str) -> Page:
    """A page in its own context (own storage), joined with the keyboard only."""
    page = browser.new_context(viewport={"width": 900, "height": 640}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.dialogs = dialogs  # type: ignore[attr-defined]
    page.goto(url + "/")
    page.get_by_label("Your name").fill(name)
    page.get_by_label("Room").fill(room)
    page.get_by_label("Room").press("Enter")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=TIMEOUT_MS)
    assert page.url.endswith(f"#{room}"), "the room is in the URL fragment, so the link can be shared"
    return page


def replica_of(page: Page) -> str:
    return page.locator("#replica").inner_text()


def rejoin(page: Page) -> None:
    page.get_by_role("button", name="Join").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=TIMEOUT_MS)


def move_apart(page: Page, other: Page) -> None:
    """Re-join `page` until it sits on another replica than `other` (round robin, no affinity).

    A join makes a fixed number of requests (socket, presence, rooms); a stray request now and
    then shifts the rotation so that the socket can land anywhere.
    """
    for attempt in range(9):
        if replica_of(page) != replica_of(other):
            return
        if attempt % 2:
            page.evaluate("fetch('/livez', {cache: 'no-store'})")
        rejoin(page)
    assert replica_of(page) != replica_of(other)


def say(page: Page, text: str) -> None:
    box = page.get_by_role("textbox", name="Message", exact=True)
    box.fill(text)
    box.press("Enter")
    # Acknowledged by the server: the page drops the "unconfirmed" mark.
    expect(page.locator("#messages li.mine.unconfirmed")).to_have_count(0, timeout=TIMEOUT_MS)


def shown_texts(page: Page) -> list[str]:
    return page.locator("#messages li .text").all_inner_texts()


def expect_online(page: Page, users: list[str]) -> None:
    expect(page.locator("#online-count")).to_have_text(str(len(users)), timeout=TIMEOUT_MS)
    expect(page.locator("#users li")).to_have_text(users, timeout=TIMEOUT_MS)


@pytest.mark.slow
def test_two_pages_on_two_replicas_chat_and_survive_a_replica_kill(
    browser: Browser, cluster: LocalCluster
) -> None:
    alice = open_chat(browser, cluster.url, "alice", "lobby")
    bob = open_chat(browser, cluster.url, "bob", "lobby")
    move_apart(bob, alice)

    expect_online(alice, ["alice (you)", "bob"])
    expect_online(bob, ["alice", "bob (you)"])

    say(alice, "hello from alice")
    expect(bob.locator("#messages li .text").last).to_have_text("hello from alice")
    say(bob, XSS)
    expect(alice.locator("#messages li .text").last).to_have_text(XSS)
    assert alice.locator("#messages img").count() == 0, "message text is rendered as text"
    assert alice.dialogs == [], "no script from a message ran"  # type: ignore[attr-defined]

    doomed = replica_of(bob)
    cluster.replicas[int(doomed.rsplit("-", 1)[1])].signal(signal.SIGKILL)
    expect(bob.locator("#status")).not_to_have_attribute("data-state", "connected", timeout=TIMEOUT_MS)
    missed = [f"while bob was away {i}" for i in range(3)]
    for text in missed:
        say(alice, text)

    expect(bob.locator("#status")).to_have_attribute("data-state", "connected", timeout=TIMEOUT_MS)
    assert replica_of(bob) not in (doomed, "—")
    expect(bob.locator("#messages li .text").last).to_have_text(missed[-1], timeout=TIMEOUT_MS)
    assert shown_texts(bob) == ["hello from alice", XSS, *missed], "nothing lost, nothing twice"

    say(bob, "back again")
    expect(alice.locator("#messages li .text").last).to_have_text("back again")
    assert shown_texts(alice) == ["hello from alice", XSS, *missed, "back again"]
    # bob's old connection dies with the replica, his new one keeps him online: no leave.
    expect_online(alice, ["alice (you)", "bob"])

    Path("artifacts").mkdir(exist_ok=True)
    alice.screenshot(path="artifacts/chat.png", full_page=True)

    # Phone width: everything still fits without sideways scrolling.
    alice.set_viewport_size({"width": 375, "height": 740})
    assert alice.evaluate("document.documentElement.scrollWidth") <= 375
    alice.screenshot(path="artifacts/chat-phone.png", full_page=True)
    for page in (alice, bob):
        page.context.close()


@pytest.mark.slow
def test_typing_edit_delete_reactions_and_unread_across_two_replicas(
    browser: Browser, cluster: LocalCluster
) -> None:
    alice = open_chat(browser, cluster.url, "alice", "lobby")
    bob = open_chat(browser, cluster.url, "bob", "lobby")
    move_apart(bob, alice)

    # Typing: bob types, alice sees it (and not her own).
    bob.get_by_role("textbox", name="Message", exact=True).press_sequentially("hi", delay=50)
    expect(alice.locator("#typing")).to_have_text("bob is typing", timeout=TIMEOUT_MS)
    expect(bob.locator("#typing")).to_have_text("")
    bob.get_by_role("textbox", name="Message", exact=True).fill("")

    # Edit by keyboard: Up in an empty box edits your last message.
    say(alice, "teh typo")
    expect(bob.locator("#messages li .text").last).to_have_text("teh typo")
    box = alice.get_by_role("textbox", name="Message", exact=True)
    box.press("ArrowUp")
    expect(box).to_have_value("teh typo")
    box.fill("the typo")
    box.press("Enter")
    expect(bob.locator("#messages li .text").last).to_have_text("the typo", timeout=TIMEOUT_MS)
    expect(bob.locator("#messages li .edited")).to_have_count(1)

    # Reactions: bob reacts, alice sees the count.
    bob.get_by_role("button", name="React 👍").last.click()
    expect(alice.locator("#messages li button.reaction").last).to_have_text("👍 1", timeout=TIMEOUT_MS)

    # Delete by keyboard: Tab to the button, Enter twice (ask, then delete).
    say(alice, "take it back")
    expect(bob.locator("#messages li .text").last).to_have_text("take it back")
    delete = alice.get_by_role("button", name="Delete message").last
    delete.focus()
    alice.keyboard.press("Enter")
    alice.get_by_role("button", name="Confirm delete").focus()
    alice.keyboard.press("Enter")
    expect(bob.locator("#messages li.deleted .text")).to_have_text(["message deleted"], timeout=TIMEOUT_MS)

    # Unread: bob leaves for another room; alice posts; bob sees a badge, then the divider.
    bob.goto(cluster.url + "/#elsewhere")
    expect(bob.locator("#status")).to_have_attribute("data-state", "connected", timeout=TIMEOUT_MS)
    say(alice, "while you were away")
    expect(bob.locator("#rooms li", has_text="lobby").locator(".badge")).to_have_text("1", timeout=TIMEOUT_MS)
    bob.goto(cluster.url + "/#lobby")
    expect(bob.locator("#status")).to_have_attribute("data-state", "connected", timeout=TIMEOUT_MS)
    divider = bob.locator("#messages li.divider")
    expect(divider).to_have_text("new since you left", timeout=TIMEOUT_MS)
    expect(divider.locator("xpath=following-sibling::li[1]").locator(".text")).to_have_text(
        "while you were away"
    )
    history = bob.locator("#messages li .text").all_inner_texts()
    assert history[-3:] == ["the typo", "message deleted", "while you were away"], history
    Path("artifacts").mkdir(exist_ok=True)
    bob.screenshot(path="artifacts/chat-features.png", full_page=True)
    for page in (alice, bob):
        page.context.close()
