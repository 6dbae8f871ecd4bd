"""End to end, as a user: ``launch.py serve`` with the real embedded model, driven in headless
Debian Chromium through the real Gradio UI; then the rows in SQLite are checked."""

from __future__ import annotations

import json
import re

import pytest

from helpers import (
    Server,
    ask,
    bot,
    create_key_in_tab,
    db_rows,
    long_answers,
    n_answers,
    open_page,
    pick_memory,
    remember_in_tab,
    send,
    sign_in,
    sign_up,
    wait_for,
)

pytestmark = pytest.mark.slow  # `server` (conftest): a real Attune server for this module


def test_chat_feedback_correction_retry_land_in_sqlite(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    expect(page.locator("#first-run")).to_be_visible()  # first run: invites creating an account
    sign_up(page, "alice", "correct horse")
    chat = page.locator("#chatbot")

    box = page.locator("#msg textarea")
    box.fill("What is the capital of France?")
    page.get_by_role("button", name="Send").click()
    expect(chat.get_by_test_id("user").last).to_contain_text("capital of France")
    expect(bot(page).last).to_contain_text("Paris", timeout=60_000)
    answer = wait_for(lambda: db_rows(server, "SELECT * FROM messages WHERE role = 'assistant'"),
                      what="the answer row")[0]
    assert "Paris" in answer["content"] and answer["status"] == "complete" and answer["completion_tokens"] > 0
    user = db_rows(server, "SELECT * FROM users WHERE name = 'alice'")[0]
    question = db_rows(server, "SELECT * FROM messages WHERE role = 'user'")
    assert [q["content"] for q in question] == ["What is the capital of France?"]
    assert question[0]["user_id"] == answer["user_id"] == user["id"]
    assert user["password_hash"].startswith("scrypt$")
    # Each answer says who answered (and survives a reload: it is rendered from SQLite).
    expect(bot(page).last.locator(".turn-info summary")).to_contain_text("base model")
    expect(page.locator("#send-btn")).to_be_visible(timeout=30_000)

    bar = chat.locator(".message-buttons-left").last
    bar.get_by_role("button", name="Like", exact=True).click()
    wait_for(lambda: db_rows(server, "SELECT * FROM feedback WHERE kind = 'like'"), what="the like row")

    bar.get_by_role("button", name="Edit", exact=True).click()
    chat.locator("textarea.edit-textarea").fill("Paris is the capital of **France**.")
    bar.get_by_role("button", name="Submit", exact=True).click()
    correction = wait_for(lambda: db_rows(server, "SELECT * FROM feedback WHERE kind = 'correction'"),
                          what="the correction row")[0]
    assert correction["correction"] == "Paris is the capital of **France**."
    assert correction["message_id"] == answer["id"] and correction["user_id"] == user["id"]
    expect(bot(page).last.locator("strong").first).to_have_text("France")

    # A second turn streams into the same conversation; then retry it: both answers stay browsable.
    ask(page, server, "And of Italy?")
    expect(bot(page)).to_have_count(2)
    chat.locator(".message-buttons-left").last.get_by_role("button", name="Retry", exact=True).click()
    replaced = wait_for(lambda: db_rows(server, "SELECT * FROM messages WHERE replaced_by IS NOT NULL"),
                        what="the retried answer")
    assert len(replaced) == 1
    expect(bot(page).last.locator(".turn-info")).to_contain_text("Earlier answers (1)", timeout=30_000)
    convs = db_rows(server, "SELECT * FROM conversations")
    assert len(convs) == 1 and convs[0]["title"] == "What is the capital of France?"

    # Compare before any personal version: it says there is nothing to compare instead of answering twice
    # with the same base model (tests/test_ui_personal.py runs it with a version).
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-q textarea").fill("What is the capital of France?")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#compare-note")).to_contain_text("You have no personal version yet", timeout=30_000)
    expect(page.locator("#compare-base")).not_to_contain_text("Paris")
    assert not db_rows(server, "SELECT * FROM conversations WHERE source = 'compare'")

    # Everything stayed on this machine.
    assert page.requests and all(u.startswith(server.base) or u.startswith("data:") for u in page.requests), \
        [u for u in page.requests if not u.startswith(server.base)]

    # Sign out and back in: the conversation is resumed from SQLite, with its details.
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, "alice", "correct horse")
    expect(bot(page).first).to_contain_text("capital of France", timeout=15_000)
    expect(bot(page).first.locator(".turn-info summary")).to_contain_text("base model")
    page.context.close()


def test_wrong_password_shows_an_error(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    page.get_by_label("User name").fill("nobody")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.locator("#login-msg")).to_contain_text("Wrong user name or password", timeout=10_000)
    expect(page.locator("#chatbot")).to_have_count(0)
    page.context.close()


def test_chinese_browser_gets_chinese_ui(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server, locale="zh-CN")
    expect(page.get_by_role("button", name="创建账户")).to_be_visible()
    expect(page.get_by_label("密码")).to_be_visible()
    page.get_by_label("用户名").fill("nobody")
    page.get_by_label("密码").fill("not the password")
    page.get_by_role("button", name="登录", exact=True).click()
    expect(page.locator("#login-msg")).to_contain_text("用户名或密码错误", timeout=10_000)
    page.context.close()


def visible_text(page) -> str:
    return page.evaluate("document.body.innerText")


def test_shared_computer_nothing_of_the_first_user_reaches_the_second(browser, server):
    """Issue 16, item 1: alice makes a key, runs Compare, chats, signs out; bob signs in in the same tab."""
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "erin", "correct horse")
    ask(page, server, "Secret plan: my dog Zanzibar hides the spare key.", user="erin")
    page.get_by_role("tab", name="Account").click()
    erin_key = create_key_in_tab(page, "kitchen-tablet")
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-q textarea").fill("Where does Zanzibar hide the key?")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#compare-note")).to_contain_text("no personal version yet", timeout=60_000)
    page.get_by_role("tab", name="Memory").click()
    expect(page.locator("#memory-table")).to_contain_text("Zanzibar", timeout=15_000)
    cookie = next(c for c in page.context.cookies() if c["name"] == "attune_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("User name").wait_for(timeout=15_000)
    assert "Zanzibar" not in visible_text(page) and erin_key not in page.content()
    # The old session id is dead on the server, not only forgotten by the browser.
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server.base + "/gradio_api/info",
                                 headers={"Cookie": f"attune_session={cookie['value']}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401

    sign_up(page, "frank", "battery staple")
    for tab in ("Chat", "Memory", "My assistant", "Compare", "Account"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(1500)
        text, html = visible_text(page), page.content()
        # a word, not a substring: "Answering" contains "erin"
        assert "Zanzibar" not in text and not re.search(r"\berin\b", text), f"{tab} tab shows erin's data"
        assert erin_key not in html, f"{tab} tab shows erin's API key"
        assert "kitchen-tablet" not in text, f"{tab} tab lists erin's API keys"
    expect(page.locator("#api-key textarea, #api-key input")).to_have_count(0)
    page.context.close()


def test_reload_and_a_second_tab_keep_the_session(browser, server):
    """Item 2: a reload keeps you signed in; the sign-in page no longer claims no accounts exist."""
    from playwright.sync_api import expect

    page = open_page(browser, server)
    expect(page.locator("#first-run")).to_have_count(0)  # accounts exist by now
    sign_up(page, "grace", "correct horse")
    ask(page, server, "Remember the word pineapple.", user="grace")
    page.reload()
    expect(page.locator("#who")).to_contain_text("grace", timeout=30_000)
    expect(page.locator("#chatbot")).to_contain_text("pineapple", timeout=15_000)
    second = page.context.new_page()
    second.goto(server.base + "/")
    expect(second.locator("#who")).to_contain_text("grace", timeout=30_000)
    second.close()
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("User name").wait_for(timeout=15_000)
    page.goto(server.base + "/")  # signed out: the app page sends you to sign in
    expect(page.get_by_label("User name")).to_be_visible(timeout=15_000)
    expect(page.locator("#first-run")).to_have_count(0)
    page.context.close()


def test_enter_sends_and_shift_enter_adds_a_line(browser, server):
    """Item 3: what the placeholder promises."""
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "heidi", "correct horse")
    box = page.locator("#msg textarea")
    box.click()
    box.type("first line")
    box.press("Shift+Enter")
    box.type("second line")
    page.wait_for_timeout(500)
    assert box.input_value() == "first line\nsecond line"
    assert n_answers(server, "heidi") == 0 and not db_rows(
        server, "SELECT 1 FROM messages m JOIN users u ON u.id = m.user_id WHERE u.name = 'heidi'")
    box.press("Enter")
    expect(page.locator("#chatbot").get_by_test_id("user").last).to_contain_text("second line", timeout=15_000)
    wait_for(lambda: n_answers(server, "heidi") == 1, what="heidi's answer")
    rows = db_rows(server, "SELECT content FROM messages m JOIN users u ON u.id = m.user_id "
                           "WHERE u.name = 'heidi' AND role = 'user'")
    assert [r["content"] for r in rows] == ["first line\nsecond line"]
    page.context.close()


def test_streaming_locks_sending_and_switching(browser, server):
    """Items 4 and 5: while an answer streams, Send is Stop and the conversation list is locked; what the
    sidebar selects is what the chat shows, and the next message lands there."""
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "ivan", "correct horse")
    ask(page, server, "Conversation B: hello.", user="ivan")
    page.get_by_role("button", name="New conversation").click()
    long_answers(page)
    send(page, "Conversation A: write a very long story about a lighthouse keeper.")
    expect(page.locator("#stop-btn")).to_be_visible(timeout=15_000)
    expect(page.locator("#send-btn")).to_have_count(0)
    send(page, "A second question sent while streaming.")  # Enter while streaming: not sent
    page.locator("#conv-list label", has_text="Conversation B").click(force=True)  # locked: no switch
    page.wait_for_timeout(1000)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#send-btn")).to_be_visible(timeout=30_000)
    rows = db_rows(server, "SELECT role, content, status FROM messages m JOIN users u ON u.id = m.user_id "
                           "WHERE u.name = 'ivan' ORDER BY m.id")
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"], rows
    assert rows[3]["status"] == "stopped"
    expect(bot(page).last.locator(".turn-info summary")).to_contain_text("stopped")
    selected = page.locator("#conv-list label.selected")
    expect(selected).to_contain_text("Conversation A")
    expect(page.locator("#chatbot").get_by_test_id("user").first).to_contain_text("Conversation A")

    # Now switching works, and the next message lands in the conversation on screen.
    page.locator("#conv-list label", has_text="Conversation B").click()
    expect(page.locator("#chatbot").get_by_test_id("user").first).to_contain_text("Conversation B")
    long_answers(page, 8)
    ask(page, server, "Follow-up for B.", user="ivan")
    conv_b = db_rows(server, "SELECT id FROM conversations WHERE title LIKE 'Conversation B%'")[0]["id"]
    last = db_rows(server, "SELECT conversation_id FROM messages WHERE content = 'Follow-up for B.'")[0]
    assert last["conversation_id"] == conv_b
    page.context.close()


def test_empty_message_keeps_the_chat_and_says_why(browser, server):
    """Item 6: an empty send leaves the conversation on screen and the warning stays."""
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "judy", "correct horse")
    ask(page, server, "Say hello.", user="judy")
    page.locator("#msg textarea").fill("   ")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#notice")).to_contain_text("empty", timeout=10_000)
    page.wait_for_timeout(2000)
    expect(page.locator("#notice")).to_contain_text("empty")
    expect(page.locator("#chatbot").get_by_test_id("user")).to_contain_text("Say hello.")
    expect(bot(page)).to_have_count(1)
    page.context.close()


def test_uploads_are_refused(server, tmp_path):
    """Item 7: no file reaches the server, with or without a session."""
    import tempfile
    import urllib.error
    import urllib.request

    body = b'--x\r\nContent-Disposition: form-data; name="files"; filename="evil.txt"\r\n\r\nhello\r\n--x--\r\n'
    before = {p.name for p in __import__("pathlib").Path(tempfile.gettempdir()).rglob("evil.txt")}
    for path in ("/gradio_api/upload", "/gradio_api/upload?upload_id=abc"):
        req = urllib.request.Request(server.base + path, data=body, method="POST",
                                     headers={"Content-Type": "multipart/form-data; boundary=x"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code in (401, 403)
    after = {p.name for p in __import__("pathlib").Path(tempfile.gettempdir()).rglob("evil.txt")}
    assert after == before


def test_memory_recalls_a_fact_in_a_new_conversation_only_for_its_user(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "carol", "correct horse")
    ask(page, server, "My dog is called Biscuit and he is a beagle.", user="carol")
    page.get_by_role("button", name="New conversation").click()
    ask(page, server, "What is the name of my pet?", user="carol")
    info = bot(page).last.locator(".turn-info")
    expect(info).to_contain_text("1 memory used", timeout=20_000)
    expect(info).to_contain_text("Biscuit")
    carol = db_rows(server, "SELECT id FROM users WHERE name = 'carol'")[0]["id"]
    last = db_rows(server, "SELECT * FROM messages WHERE user_id = ? AND role = 'assistant' ORDER BY id DESC",
                   [carol])[0]
    used = json.loads(last["memory_ids"])
    assert used and all(db_rows(server, "SELECT user_id FROM memories WHERE id = ?", [m])[0]["user_id"] == carol
                        for m in used)
    texts = [db_rows(server, "SELECT text FROM memories WHERE id = ?", [m])[0]["text"] for m in used]
    assert texts == ["My dog is called Biscuit and he is a beagle."]  # a clean statement, not a turn dump
    expect(info).not_to_contain_text("Assistant:")
    ask(page, server, "How many legs does a spider have?", user="carol")  # a general question: no memory
    expect(bot(page).last.locator(".turn-info summary")).to_contain_text("SmolLM2", timeout=20_000)
    expect(bot(page).last.locator(".turn-info")).to_contain_text("no memories used")
    expect(bot(page).last.locator(".turn-info")).not_to_contain_text("Biscuit")

    # The Memory tab shows where it came from and lets carol edit it.
    page.get_by_role("tab", name="Memory").click()
    expect(page.locator("#memory-table")).to_contain_text("you said", timeout=15_000)
    pick_memory(page, "Biscuit")
    expect(page.locator("#memory-about")).to_contain_text(f"Memory {used[0]}")
    page.locator("#memory-edit-text textarea").fill("My dog is called Biscuit and he is a beagle mix.")
    page.get_by_role("button", name="Save edit").click()
    expect(page.locator("#memory-table")).to_contain_text("beagle mix", timeout=10_000)
    page.get_by_role("tab", name="Chat").click()

    # The Memory tab lists it; deleting it means it is never retrieved again.
    page.get_by_role("tab", name="Memory").click()
    table = page.locator("#memory-table")
    expect(table).to_contain_text("Biscuit", timeout=15_000)
    def biscuit():
        return db_rows(server, "SELECT id FROM memories WHERE user_id = ? AND text LIKE '%Biscuit%'", [carol])

    for left in range(len(biscuit()) - 1, -1, -1):
        pick_memory(page, "Biscuit")
        page.get_by_role("button", name="Delete memory").click()
        page.get_by_role("button", name="Yes, delete this memory").click()
        wait_for(lambda: len(biscuit()) == left, what="the memory deleted")  # noqa: B023
        expect(page.locator("#memory-selected").first).to_be_hidden()
    expect(page.locator("#memory-status")).to_contain_text("deleted")
    expect(table).not_to_contain_text("Biscuit")
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="New conversation").click()
    ask(page, server, "What is the name of my pet?", user="carol")
    expect(bot(page).last.locator(".turn-info summary")).to_contain_text("SmolLM2", timeout=20_000)
    expect(bot(page).last.locator(".turn-info")).not_to_contain_text("Biscuit")

    # Another user asking the same question sees nothing of carol's.
    page.get_by_role("button", name="Sign out").click()
    sign_up(page, "dave", "battery staple")
    ask(page, server, "My dog is called Rex and he is a beagle.", user="dave")
    page.get_by_role("button", name="New conversation").click()
    ask(page, server, "What is the name of my pet?", user="dave")
    expect(bot(page).last.locator(".turn-info summary")).to_contain_text("SmolLM2", timeout=20_000)
    expect(bot(page).last.locator(".turn-info")).not_to_contain_text("Biscuit")
    page.context.close()


def test_facts_said_in_passing_are_found_corrections_stay_with_their_question(browser, server):
    """Issue 24, item 5, as a new user tries it: an introduction inside a greeting is three facts found again in
    a new conversation; a correction shows in the Memory tab with its question; a move replaces the old city."""
    import re

    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "nina", "correct horse")
    ask(page, server, "Hi! I'm Nina, I live in Porto and I work as a nurse.", user="nina")
    nina = db_rows(server, "SELECT id FROM users WHERE name = 'nina'")[0]["id"]
    texts = {r["text"] for r in db_rows(server, "SELECT text FROM memories WHERE user_id = ?", [nina])}
    assert {"I'm Nina.", "I live in Porto.", "I work as a nurse."} <= texts  # one fact per memory
    page.get_by_role("button", name="New conversation").click()
    ask(page, server, "Where do I live?", user="nina")
    info = bot(page).last.locator(".turn-info")
    expect(info).to_contain_text(re.compile(r"\d+ memor(y|ies) used"), timeout=20_000)
    expect(info).to_contain_text("I live in Porto.")

    # A correction made with the edit button belongs to its question: listed with it, not served as a fact.
    ask(page, server, "What is the capital of Portugal?", user="nina")
    chat = page.locator("#chatbot")
    bar = chat.locator(".message-buttons-left").last
    bar.get_by_role("button", name="Edit", exact=True).click()
    chat.locator("textarea.edit-textarea").fill("Lisbon, on the Tagus.")
    bar.get_by_role("button", name="Submit", exact=True).click()
    wait_for(lambda: db_rows(server, "SELECT * FROM memories WHERE user_id = ? AND kind = 'correction'", [nina]),
             what="the correction's memory")
    page.get_by_role("tab", name="Memory").click()
    table = page.locator("#memory-table")
    expect(table).to_contain_text("your correction", timeout=15_000)
    expect(table).to_contain_text("What is the capital of Portugal?")
    expect(table).to_contain_text("Lisbon, on the Tagus.")

    # Moving replaces the old city: the Memory tab shows it as replaced, and it is not served any more.
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="New conversation").click()
    ask(page, server, "We moved to Lyon last month, any tips for the first winter?", user="nina")
    page.get_by_role("tab", name="Memory").click()
    expect(table).to_contain_text("replaced by", timeout=15_000)
    rows = db_rows(server, "SELECT * FROM memories WHERE user_id = ? AND text = 'I live in Porto.'", [nina])
    assert rows[0]["replaced_by"] is not None
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="New conversation").click()
    ask(page, server, "Where do I live?", user="nina")
    expect(bot(page).last.locator(".turn-info summary")).to_contain_text("SmolLM2", timeout=20_000)
    expect(bot(page).last.locator(".turn-info")).not_to_contain_text("I live in Porto.")
    page.context.close()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signals_stop_the_server_in_seconds_with_everything_saved(browser, tmp_path, tiny_model_dir, sig):
    """Item 8: with a browser connected and an answer streaming, SIGTERM and SIGINT both exit within 5 s;
    the streamed answer is stored (as stopped) and the memory index is saved."""
    import os
    import signal
    import sqlite3
    import time

    from playwright.sync_api import expect

    data = tmp_path / "data"
    srv = Server(data, "--model", str(tiny_model_dir), "--quant", "none", "--max-new-tokens", "4000",
                 "--temperature", "1")
    srv.data = data
    try:
        page = open_page(browser, srv)
        sign_up(page, "kim", "correct horse")
        remember_in_tab(page, "My favourite colour is teal.")
        page.get_by_role("tab", name="Chat").click()
        send(page, "Tell me everything.")
        expect(page.locator("#stop-btn")).to_be_visible(timeout=15_000)
        wait_for(lambda: len(db_rows(srv, "SELECT * FROM messages WHERE role = 'user'")) == 1, what="the question")
        time.sleep(1)
        # a random tiny model may reach EOS early; an answer is stored once it ends, so the database says whether
        # it was still streaming (the Stop button lags the server by a UI round trip: it said so after the end)
        streaming = not db_rows(srv, "SELECT * FROM messages WHERE role = 'assistant'")
        started = time.monotonic()
        os.kill(srv.proc.pid, getattr(signal, sig))
        srv.proc.wait(timeout=15)
        took = time.monotonic() - started
        page.context.close()
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    assert took < 5, f"{sig}: exit took {took:.1f} s\n{log[-2000:]}"
    assert "attune: stopped" in log, log[-2000:]
    con = sqlite3.connect(data / "attune.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    answers = con.execute("SELECT status FROM messages WHERE role = 'assistant'").fetchall()
    con.close()
    assert answers == [("stopped",)] if streaming else answers == [("complete",)]
    assert list((data / "memory").glob("u*.faiss")), "the memory index was not saved"
