"""End to end, as a user: ``launch.py serve`` with the real embedded model, driven in headless
Debian Chromium through the real Gradio UI; then the rows in SQLite are checked."""

from __future__ import annotations

import json
import re

import pytest

from conftest import seed_models
from helpers import Server, db_rows, open_page, sign_up, wait_for

pytestmark = pytest.mark.slow
@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_models_dir):
    data = tmp_path_factory.mktemp("browser") / "data"
    seed_models(data, embedded_models_dir)
    with Server(data, "--max-new-tokens", "24", "--temperature", "0") as srv:
        srv.data = data
        yield srv


def test_chat_feedback_correction_retry_land_in_sqlite(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    expect(page.locator("#first-run")).to_be_visible()  # first run: invites creating an account
    sign_up(page, "alice", "correct horse")
    chat = page.locator("#chatbot")

    # Empty message: a clear message, nothing stored.
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#notice")).to_contain_text("empty", timeout=10_000)

    box = page.get_by_label("Message", exact=True)
    box.fill("What is the capital of France?")
    page.get_by_role("button", name="Send").click()
    expect(chat.get_by_test_id("user").last).to_contain_text("capital of France")
    expect(chat.get_by_test_id("bot").last).to_contain_text("Paris", timeout=60_000)
    answer = wait_for(lambda: db_rows(server, "SELECT * FROM messages WHERE role = 'assistant'"),
                      what="the answer row")[0]
    assert "Paris" in answer["content"] and answer["status"] == "complete" and answer["completion_tokens"] > 0
    user = db_rows(server, "SELECT * FROM users WHERE name = 'alice'")[0]
    question = db_rows(server, "SELECT * FROM messages WHERE role = 'user'")
    assert [q["content"] for q in question] == ["What is the capital of France?"]
    assert question[0]["user_id"] == answer["user_id"] == user["id"]
    assert user["password_hash"].startswith("scrypt$")

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
    expect(chat.get_by_test_id("bot").last.locator("strong")).to_have_text("France")

    # A second turn streams into the same conversation; then retry it.
    box.fill("And of Italy?")
    page.get_by_role("button", name="Send").click()
    wait_for(lambda: len(db_rows(server, "SELECT * FROM messages WHERE role = 'assistant'")) == 2,
             what="the second answer")
    expect(chat.get_by_test_id("bot")).to_have_count(2)
    chat.locator(".message-buttons-left").last.get_by_role("button", name="Retry", exact=True).click()
    replaced = wait_for(lambda: db_rows(server, "SELECT * FROM messages WHERE replaced_by IS NOT NULL"),
                        what="the retried answer")
    assert len(replaced) == 1
    convs = db_rows(server, "SELECT * FROM conversations")
    assert len(convs) == 1 and convs[0]["title"] == "What is the capital of France?"

    expect(page.locator("#notice")).to_contain_text("with the base model")

    # Compare: base and personalized answers side by side (logged, but not in the conversation list).
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-q textarea").fill("What is the capital of France?")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#compare-base")).to_contain_text("Paris", timeout=60_000)
    expect(page.locator("#compare-personal")).to_contain_text("Paris", timeout=60_000)
    wait_for(lambda: len(db_rows(server, "SELECT * FROM conversations WHERE source = 'compare'")) == 2,
             what="the compare conversations")

    # Account: an API key, shown once, stored hashed.
    page.get_by_role("tab", name="Account").click()
    page.get_by_role("button", name="Create API key").click()
    expect(page.locator("#api-key textarea, #api-key input")).to_have_value(re.compile(r"^att-"), timeout=10_000)
    assert len(db_rows(server, "SELECT * FROM api_keys")) == 1
    page.get_by_role("tab", name="Chat").click()

    # Everything stayed on this machine.
    assert page.requests and all(u.startswith(server.base) or u.startswith("data:") for u in page.requests), \
        [u for u in page.requests if not u.startswith(server.base)]

    # Sign out and back in: the conversation is resumed from SQLite.
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("User name").fill("alice")
    page.get_by_label("Password").fill("correct horse")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(chat.get_by_test_id("bot").first).to_contain_text("capital of France", timeout=15_000)
    page.context.close()


def test_wrong_password_shows_an_error(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    page.get_by_label("User name").fill("nobody")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.locator("#login-msg")).to_contain_text("Wrong user name or password", timeout=10_000)
    expect(page.locator("#app-col")).to_be_hidden()
    page.context.close()


def test_chinese_browser_gets_chinese_ui(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server, locale="zh-CN")
    expect(page.get_by_role("button", name="创建账户")).to_be_visible()
    expect(page.get_by_label("密码")).to_be_visible()
    page.context.close()


def ask(page, server, text, n_answers_before):
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_role("button", name="Send").click()
    wait_for(lambda: len(db_rows(server, "SELECT * FROM messages WHERE role = 'assistant'")) > n_answers_before,
             what=f"an answer to {text!r}")


def n_answers(server):
    return len(db_rows(server, "SELECT * FROM messages WHERE role = 'assistant'"))


def test_memory_recalls_a_fact_in_a_new_conversation_only_for_its_user(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "carol", "correct horse")
    ask(page, server, "My dog is called Biscuit and he is a beagle.", n_answers(server))
    page.get_by_role("button", name="New conversation").click()
    ask(page, server, "What is the name of my pet?", n_answers(server))
    notice = page.locator("#notice")
    expect(notice).to_contain_text("Memories used", timeout=20_000)
    expect(notice).to_contain_text("Biscuit")
    carol = db_rows(server, "SELECT id FROM users WHERE name = 'carol'")[0]["id"]
    last = db_rows(server, "SELECT * FROM messages WHERE user_id = ? AND role = 'assistant' ORDER BY id DESC",
                   [carol])[0]
    used = json.loads(last["memory_ids"])
    assert used and all(db_rows(server, "SELECT user_id FROM memories WHERE id = ?", [m])[0]["user_id"] == carol
                        for m in used)
    texts = [db_rows(server, "SELECT text FROM memories WHERE id = ?", [m])[0]["text"] for m in used]
    assert texts == ["My dog is called Biscuit and he is a beagle."]  # a clean statement, not a turn dump
    expect(notice).not_to_contain_text("Assistant:")
    ask(page, server, "How many legs does a spider have?", n_answers(server))  # general: no memory
    expect(notice).to_contain_text("Answered by", timeout=20_000)
    expect(notice).not_to_contain_text("Memories used")

    # The Memory tab shows where it came from and lets carol edit it.
    page.get_by_role("tab", name="Memory").click()
    expect(page.locator("#memory-table")).to_contain_text("you said", timeout=15_000)
    page.locator("#memory-id input").fill(str(used[0]))
    page.locator("#memory-edit-text textarea").fill("My dog is called Biscuit and he is a beagle mix.")
    page.get_by_role("button", name="Save edit").click()
    expect(page.locator("#memory-table")).to_contain_text("beagle mix", timeout=10_000)
    page.get_by_role("tab", name="Chat").click()

    # The Memory tab lists it; deleting it means it is never retrieved again.
    page.get_by_role("tab", name="Memory").click()
    table = page.locator("#memory-table")
    expect(table).to_contain_text("Biscuit", timeout=15_000)
    biscuit = db_rows(server, "SELECT id FROM memories WHERE user_id = ? AND text LIKE '%Biscuit%'", [carol])
    for row in biscuit:
        page.locator("#memory-id input").fill(str(row["id"]))
        page.get_by_role("button", name="Delete memory").click()
        expect(page.locator("#memory-status")).to_contain_text(f"Memory {row['id']} deleted", timeout=10_000)
    expect(table).not_to_contain_text("Biscuit")
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="New conversation").click()
    ask(page, server, "What is the name of my pet?", n_answers(server))
    expect(notice).to_contain_text("Answered by", timeout=20_000)
    expect(notice).not_to_contain_text("Biscuit")

    # Another user asking the same question sees nothing of carol's.
    page.get_by_role("button", name="Sign out").click()
    sign_up(page, "dave", "battery staple")
    ask(page, server, "My dog is called Biscuit and he is a beagle.".replace("Biscuit", "Rex"), n_answers(server))
    page.get_by_role("button", name="New conversation").click()
    ask(page, server, "What is the name of my pet?", n_answers(server))
    expect(notice).to_contain_text("Answered by", timeout=20_000)
    expect(notice).not_to_contain_text("Biscuit")
    page.context.close()
