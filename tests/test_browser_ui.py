"""Issue 16 end to end, as a user in headless Chromium on ``launch.py serve`` with the real embedded model:
browsing the answers of a retried turn, Continue, editing a question, renaming and deleting a
conversation, deleting a memory, the Account tab, and the phone layout; then the rows in SQLite."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from helpers import (
    ask,
    bot,
    create_key_in_tab,
    db_rows,
    long_answers,
    open_page,
    pick_memory,
    remember_in_tab,
    sign_in,
    sign_up,
    wait_for,
)

pytestmark = pytest.mark.slow  # `server` (conftest): a real Attune server for this module


def answers(server, user, live_only=True):
    sql = ("SELECT m.* FROM messages m JOIN users u ON u.id = m.user_id WHERE u.name = ? AND m.role = 'assistant'"
           + (" AND m.replaced_by IS NULL" if live_only else "") + " ORDER BY m.id")
    return db_rows(server, sql, [user])


def answer_text(page) -> str:
    """What the last answer says, without its ℹ️ details."""
    return bot(page).last.evaluate(
        "e => { const c = e.cloneNode(true); c.querySelectorAll('.turn-info').forEach(d => d.remove());"
        " return c.innerText.trim(); }")


def shows(page, check, what):
    """Wait until the last answer's text (details left out) passes ``check``."""
    wait_for(lambda: check(answer_text(page)), timeout=15, what=what)


def last_bar(page, who="left"):
    """The buttons under the last answer (left) or the last question (right)."""
    return page.locator("#chatbot").locator(f".message-buttons-{who}").last


def test_retried_answers_are_browsable_and_corrections_stay_on_their_version(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "uma", "correct horse")
    ask(page, server, "What is the capital of France?", user="uma")
    versions = page.locator("#versions")
    expect(versions).to_be_hidden()  # one answer: nothing to browse
    first = answers(server, "uma")[0]
    long_answers(page, 3)  # the retry is cut after 3 tokens: a different, shorter answer
    last_bar(page).get_by_role("button", name="Retry", exact=True).click()
    wait_for(lambda: len(answers(server, "uma", live_only=False)) == 2, what="the second answer")
    second = answers(server, "uma")[0]
    assert "Paris" in first["content"] and "Paris" not in second["content"] and second["completion_tokens"] == 3
    assert db_rows(server, "SELECT replaced_by FROM messages WHERE id = ?", [first["id"]])[0]["replaced_by"] == \
        second["id"]

    expect(versions).to_be_visible(timeout=30_000)
    expect(versions.get_by_label("2/2")).to_be_checked()
    shows(page, lambda text: "Paris" not in text and text.startswith(second["content"].strip()), "the retried answer")
    expect(page.locator("#continue-btn")).to_be_visible()  # the newest one is cut: it can be continued
    versions.get_by_text("1/2").click()
    shows(page, lambda text: "Paris" in text, "the first answer")
    expect(bot(page)).to_have_count(1)
    expect(page.locator("#continue-btn")).to_be_hidden()
    expect(bot(page).last.locator(".turn-info summary")).not_to_contain_text("cut at the token limit")

    # A correction made while reading 1/2 belongs to 1/2.
    last_bar(page).get_by_role("button", name="Edit", exact=True).click()
    page.locator("#chatbot textarea.edit-textarea").fill("Paris, on the Seine.")
    last_bar(page).get_by_role("button", name="Submit", exact=True).click()
    row = wait_for(lambda: db_rows(server, "SELECT * FROM feedback WHERE kind = 'correction' AND message_id IN "
                                           "(?, ?)", [first["id"], second["id"]]), what="the correction")[0]
    assert row["message_id"] == first["id"] and row["correction"] == "Paris, on the Seine."
    shows(page, lambda text: text == "Paris, on the Seine.", "the correction")
    expect(versions.get_by_label("1/2")).to_be_checked()
    versions.get_by_text("2/2").click()
    shows(page, lambda text: "Paris" not in text and text.startswith(second["content"].strip()), "the second answer")
    versions.get_by_text("1/2").click()
    shows(page, lambda text: text == "Paris, on the Seine.", "the corrected first answer")

    page.reload()  # a fresh page shows the newest answer, still browsable
    expect(page.locator("#versions").get_by_label("2/2")).to_be_checked(timeout=30_000)
    shows(page, lambda text: "Paris" not in text and text.startswith(second["content"].strip()), "the newest answer")
    page.context.close()


def test_continue_makes_a_cut_answer_longer(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "vera", "correct horse")
    long_answers(page, 4)
    ask(page, server, "Write a long story about a lighthouse keeper.", user="vera")
    cut = answers(server, "vera")[0]
    assert cut["completion_tokens"] == 4 and json.loads(cut["gen_settings"])["finish_reason"] == "length"
    expect(bot(page).last.locator(".turn-info summary")).to_contain_text("cut at the token limit")
    before = answer_text(page)
    long_answers(page, 12)
    page.get_by_role("button", name="Continue the answer").click()
    wait_for(lambda: answers(server, "vera")[-1]["id"] != cut["id"], what="the continued answer")
    expect(page.locator("#send-btn")).to_be_visible(timeout=30_000)
    longer = answers(server, "vera")
    assert len(longer) == 1 and longer[0]["content"].startswith(cut["content"])
    assert len(longer[0]["content"]) > len(cut["content"])
    assert db_rows(server, "SELECT replaced_by FROM messages WHERE id = ?", [cut["id"]])[0]["replaced_by"] == \
        longer[0]["id"]
    wait_for(lambda: len(answer_text(page)) > len(before), what="the longer answer on screen")
    assert answer_text(page).startswith(before.rstrip("…").strip())
    expect(bot(page)).to_have_count(1)
    page.context.close()


def test_edit_a_question_answers_it_again_and_keeps_the_old_branch(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "walt", "correct horse")
    ask(page, server, "What is the capital of France?", user="walt")
    old_q = db_rows(server, "SELECT m.* FROM messages m JOIN users u ON u.id = m.user_id "
                            "WHERE u.name = 'walt' AND role = 'user'")[0]
    old_a = answers(server, "walt")[0]
    last_bar(page, "right").get_by_role("button", name="Edit", exact=True).click()
    page.locator("#chatbot textarea.edit-textarea").fill("What is the capital of Italy?")
    last_bar(page, "right").get_by_role("button", name="Submit", exact=True).click()
    wait_for(lambda: len(answers(server, "walt", live_only=False)) == 2, what="the new answer")
    expect(page.locator("#send-btn")).to_be_visible(timeout=30_000)
    chat = page.locator("#chatbot")
    expect(chat.get_by_test_id("user")).to_have_count(1)
    expect(chat.get_by_test_id("user")).to_contain_text("Italy")
    expect(chat).not_to_contain_text("France")
    rows = db_rows(server, "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", [old_q["conversation_id"]])
    assert [r["id"] for r in rows[:2]] == [old_q["id"], old_a["id"]]
    assert rows[0]["content"] == "What is the capital of France?"
    new_q = rows[2]
    assert new_q["role"] == "user" and new_q["content"] == "What is the capital of Italy?"
    assert rows[0]["replaced_by"] == rows[1]["replaced_by"] == new_q["id"]  # the old branch stays in the log
    assert rows[3]["role"] == "assistant" and rows[3]["replaced_by"] is None and len(rows) == 4
    page.context.close()


def test_rename_and_delete_a_conversation(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "xena", "correct horse")
    ask(page, server, "Tell me about green tea.", user="xena")
    conv = db_rows(server, "SELECT c.* FROM conversations c JOIN users u ON u.id = c.user_id WHERE u.name = 'xena'")[0]
    page.get_by_role("button", name="Rename").click()
    page.locator("#rename-box input, #rename-box textarea").fill("Tea notes")
    page.locator("#rename-box input, #rename-box textarea").press("Enter")
    expect(page.locator("#conv-list")).to_contain_text("Tea notes", timeout=10_000)
    expect(page.locator("#conv-list")).not_to_contain_text("green tea")
    assert db_rows(server, "SELECT title FROM conversations WHERE id = ?", [conv["id"]])[0]["title"] == "Tea notes"

    page.locator("#del-btn").click()
    confirm = page.locator("#delete-confirm").first
    expect(confirm).to_be_visible(timeout=10_000)
    expect(confirm).to_contain_text("Delete “Tea notes”?")
    page.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    page.wait_for_timeout(500)
    assert db_rows(server, "SELECT id FROM conversations WHERE id = ?", [conv["id"]])
    expect(page.locator("#conv-list")).to_contain_text("Tea notes")

    page.locator("#del-btn").click()
    page.get_by_role("button", name="Yes, delete it").click()
    expect(page.locator("#conv-list")).not_to_contain_text("Tea notes", timeout=10_000)
    expect(page.locator("#chatbot").get_by_test_id("user")).to_have_count(0)
    assert not db_rows(server, "SELECT id FROM conversations WHERE id = ?", [conv["id"]])
    assert not db_rows(server, "SELECT id FROM messages WHERE conversation_id = ?", [conv["id"]])
    page.context.close()


def test_deleting_a_memory_asks_first_and_it_is_never_used_again(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "zoe", "correct horse")
    remember_in_tab(page, "My cat is called Pumpkin.")
    expect(page.locator("#memory-table")).to_contain_text("Pumpkin")
    page.get_by_role("tab", name="Chat").click()
    ask(page, server, "What is the name of my cat?", user="zoe")
    expect(bot(page).last.locator(".turn-info")).to_contain_text("Pumpkin", timeout=20_000)  # used before

    def pumpkin():
        return db_rows(server, "SELECT m.id FROM memories m JOIN users u ON u.id = m.user_id "
                               "WHERE u.name = 'zoe' AND m.text LIKE '%Pumpkin%'")

    mid = pumpkin()[0]["id"]
    page.get_by_role("tab", name="Memory").click()
    pick_memory(page, "Pumpkin")  # a click on the row: its text, Save edit and Delete right there
    expect(page.locator("#memory-about")).to_contain_text(f"Memory {mid}")
    page.get_by_role("button", name="Delete memory").click()
    confirm = page.locator("#memory-confirm").first
    expect(confirm).to_contain_text("My cat is called Pumpkin.", timeout=10_000)
    page.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    page.wait_for_timeout(500)
    assert pumpkin(), "Cancel deleted the memory"
    page.get_by_role("button", name="Delete memory").click()
    page.get_by_role("button", name="Yes, delete this memory").click()
    expect(page.locator("#memory-status")).to_contain_text(f"Memory {mid} deleted", timeout=10_000)
    expect(page.locator("#memory-table")).not_to_contain_text("Pumpkin")
    expect(page.locator("#memory-selected").first).to_be_hidden()
    assert not pumpkin()

    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("button", name="New conversation").click()
    ask(page, server, "What is the name of my cat?", user="zoe")
    expect(bot(page).last.locator(".turn-info summary")).to_contain_text("SmolLM2", timeout=20_000)
    expect(bot(page).last.locator(".turn-info")).not_to_contain_text("Pumpkin")
    assert mid not in json.loads(answers(server, "zoe")[-1]["memory_ids"])
    page.context.close()


def models_status(server, key) -> int:
    req = urllib.request.Request(server.base + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def open_accordion(page, elem_id):
    page.locator(f"#{elem_id} .label-wrap").first.click()


def test_account_named_keys_and_password_change(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "yuri", "correct horse")
    page.get_by_role("tab", name="Account").click()
    expect(page.locator("#base-url input, #base-url textarea")).to_have_value(server.base + "/v1", timeout=10_000)

    # A named key: shown once, listed by name, working until revoked.
    key = create_key_in_tab(page, "phone")
    assert models_status(server, key) == 200
    page.locator("#revoke-pick input").click()
    page.get_by_role("option", name=re.compile(r"^phone \(")).click()
    page.get_by_role("button", name="Revoke key").click()
    expect(page.locator("#key-msg")).to_contain_text("revoked", timeout=10_000)
    expect(page.locator("#keys")).not_to_contain_text("phone")
    assert models_status(server, key) == 401

    # Change the password; the new one signs in, the old one no longer does.
    open_accordion(page, "password-box")
    page.locator("#old-password input").fill("correct horse")
    page.locator("#new-password input").fill("purple monkey dishwasher")
    page.locator("#again-password input").fill("purple monkey dishwasher")
    page.locator("#change-password-btn").click()
    expect(page.locator("#password-msg")).to_contain_text("Password changed", timeout=10_000)

    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("User name").fill("yuri")
    page.get_by_label("Password").fill("correct horse")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.locator("#login-msg")).to_contain_text("Wrong user name or password", timeout=10_000)
    sign_in(page, "yuri", "purple monkey dishwasher")
    page.context.close()


def test_export_my_data_and_delete_my_account(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "yves", "purple monkey dishwasher")
    ask(page, server, "My favourite fruit is mango.", user="yves")
    page.get_by_role("tab", name="Account").click()
    open_accordion(page, "data-box")
    with page.expect_download(timeout=30_000) as download:  # a JSON file with the user's conversation
        page.locator("#export-link").click()
    exported = open(download.value.path(), encoding="utf-8").read()
    assert "My favourite fruit is mango." in exported and json.loads(exported)

    # Deleting the account asks first (tick box + password), then signs out and removes everything.
    page.locator("#delete-password input").fill("purple monkey dishwasher")
    page.get_by_role("button", name="Delete my account").click()
    expect(page.get_by_text("Tick the box and enter your password").first).to_be_visible(timeout=10_000)
    assert db_rows(server, "SELECT id FROM users WHERE name = 'yves'")
    uid = db_rows(server, "SELECT id FROM users WHERE name = 'yves'")[0]["id"]
    page.locator("#delete-sure input").check()
    page.get_by_role("button", name="Delete my account").click()
    expect(page.get_by_label("User name")).to_be_visible(timeout=15_000)
    assert not db_rows(server, "SELECT id FROM users WHERE name = 'yves'")
    assert not db_rows(server, "SELECT id FROM messages WHERE user_id = ?", [uid])
    page.get_by_label("User name").fill("yves")
    page.get_by_label("Password").fill("purple monkey dishwasher")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.locator("#login-msg")).to_contain_text("Wrong user name or password", timeout=10_000)
    page.context.close()


PHONE = {"width": 390, "height": 844}


def in_view(locator) -> bool:
    b = locator.bounding_box()
    return bool(b) and b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["width"] <= PHONE["width"] + 0.5 \
        and b["y"] + b["height"] <= PHONE["height"] + 0.5


def test_phone_layout(browser, server):
    """390x844: the message box is on screen without scrolling, the sidebar starts closed and opens and
    closes again, and Compare's two panes stack."""
    from playwright.sync_api import expect

    page = open_page(browser, server, viewport=PHONE, is_mobile=True, has_touch=True)
    sign_up(page, "pia", "correct horse")
    box, sidebar, opened = page.locator("#msg textarea"), page.locator("#sidebar"), re.compile(r"\bopen\b")
    expect(box).to_be_visible()
    expect(sidebar).not_to_have_class(opened)
    assert page.evaluate("window.scrollY") == 0
    assert in_view(box) and in_view(page.locator("#send-btn")), (box.bounding_box(), PHONE)
    assert not in_view(page.locator("#new-btn"))  # the closed sidebar is off screen

    toggle = page.get_by_role("button", name="Toggle Sidebar")
    toggle.click()
    expect(sidebar).to_have_class(opened)
    wait_for(lambda: in_view(page.locator("#new-btn")), timeout=5, what="the open sidebar")
    toggle.click()
    expect(sidebar).not_to_have_class(opened)
    wait_for(lambda: not in_view(page.locator("#new-btn")), timeout=5, what="the closed sidebar")

    ask(page, server, "Say hello.", user="pia")
    expect(bot(page)).to_have_count(1)
    assert page.evaluate("window.scrollY") == 0 and in_view(box), box.bounding_box()

    page.get_by_role("button", name="More tabs").click()  # the tabs that do not fit are one tap away
    page.locator(".overflow-dropdown").get_by_role("button", name="Compare").click()
    base, personal = page.locator("#compare-base"), page.locator("#compare-personal")
    expect(personal).to_be_visible()
    b, p = base.bounding_box(), personal.bounding_box()
    assert b["y"] + b["height"] <= p["y"] + 1, (b, p)  # one above the other, not side by side
    assert abs(b["x"] - p["x"]) < 2 and b["width"] > 300 and p["width"] > 300, (b, p)
    assert b["x"] >= 0 and b["x"] + b["width"] <= PHONE["width"] + 0.5
    page.context.close()


# issue 25, item 6: the "My assistant" tab in a user's words --------------------------------------------------
JARGON = re.compile(r"held-out|anchor|\bnats?\b|\bloss\b|\bgate\b|adapter", re.I)
KEPT = {"passed": True, "code": "published", "heldout_loss_before": 2.0, "heldout_loss": 1.38, "anchor_rise": -0.01,
        "continued_from": None, "config": {"anchor_margin": 0.05},
        "examples": {"train_sft": 12, "heldout_sft": 4, "train_pair": 2, "heldout_pair": 0, "train_fact": 3,
                     "heldout_fact": 1, "facts": 2},
        "style": {"head": "Ahoy!", "tail": "", "max_words": 20, "bullets": True}}
WORSE = {**KEPT, "passed": False, "code": "general_worse", "anchor_rise": 0.2, "continued_from": 1}


def add_versions(server, user: str) -> None:
    """Version 1 in use and version 2 not used, as training jobs leave their rows (no weights: the test never
    chats as this user)."""
    import sqlite3

    uid = db_rows(server, "SELECT id FROM users WHERE name = ?", [user])[0]["id"]
    con = sqlite3.connect(server.data / "attune.db", timeout=30)
    with con:
        for version, status, metrics, parent in ((1, "published", KEPT, None), (2, "rejected", WORSE, 1)):
            con.execute("INSERT INTO adapter_versions (user_id, version, path, base_model, status, parent_version, "
                        "metrics, gate_reason, created_at) VALUES (?, ?, ?, 'x', ?, ?, ?, 'English reason', "
                        "'2025-01-05T14:03:00.000+00:00')",
                        [uid, version, f"adapters/u{uid}/v1" if status == "published" else None, status, parent,
                         json.dumps(metrics)])
        con.execute("INSERT INTO active_adapters (user_id, version, updated_at) VALUES (?, 1, '2025-01-05')", [uid])
    con.close()


def test_my_assistant_tells_what_was_learned_in_plain_words(browser, server):
    from playwright.sync_api import expect

    page = open_page(browser, server)
    sign_up(page, "quinn", "correct horse")
    add_versions(server, "quinn")
    page.get_by_role("tab", name="My assistant").click()
    tab, status, versions = page.locator("#personal-tab"), page.locator("#personal-status"), \
        page.locator("#personal-versions")
    expect(status).to_contain_text("Learning from your chats: on.", timeout=15_000)
    expect(status).to_contain_text("Answering you now: your personal version 1.")
    expect(versions).to_contain_text("Version 1 — in use")
    expect(versions).to_contain_text("Learned from 10 of your answers, 2 corrections and 2 things you told it about "
                                     "yourself.")
    expect(versions).to_contain_text("better than the base model (31% closer); general answers stayed as good.")
    expect(versions).to_contain_text("Your style: opens with “Ahoy!”, short answers (about 20 words) and bullet lists.")
    expect(versions).to_contain_text("Version 2 — not used")
    expect(versions).to_contain_text("Version 2 — not used (2025-01-05 14:03): general answers would have got worse, "
                                     "so version 1 stays.")
    expect(page.locator("#retrain-btn")).to_be_enabled()  # this server runs the personalizer
    assert not JARGON.search(tab.inner_text()), JARGON.search(tab.inner_text())
    page.locator("#personal-details").get_by_text("Details").click()  # the numbers, for whoever asks
    expect(page.locator("#version-details")).to_contain_text("held-out loss")
    expect(page.locator("#version-details")).to_contain_text("1.3800")

    # Switching back: the base model is the one other choice (version 2 was not used); then Compare has nothing
    page.locator("#rollback-version input").click()
    expect(page.get_by_role("option")).to_have_count(1)
    page.get_by_role("option", name="the base model (no personal version)").click()
    page.locator("#rollback-btn").click()
    expect(page.locator("#personal-msg")).to_contain_text("Now the base model answers you", timeout=15_000)
    expect(status).to_contain_text("the base model (you switched to it)")
    expect(versions).to_contain_text("Version 1 — kept, you can switch back to it")
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-q textarea").fill("Hello?")
    page.locator("#compare-btn").click()
    expect(page.locator("#compare-note")).to_contain_text("You have no personal version yet", timeout=15_000)
    page.context.close()

    zh = open_page(browser, server, locale="zh-CN")
    zh.get_by_label("用户名").fill("quinn")
    zh.get_by_label("密码").fill("correct horse")
    zh.get_by_role("button", name="登录", exact=True).click()
    zh.get_by_role("tab", name="我的助手").click()
    expect(zh.locator("#personal-status")).to_contain_text("从对话中学习：开启", timeout=15_000)
    zh_versions = zh.locator("#personal-versions")
    expect(zh_versions).to_contain_text("版本 1 — 已保留，可以切换回去")
    expect(zh_versions).to_contain_text("学习自你的 10 条回答、2 处更正和你讲过的 2 件关于自己的事。")
    expect(zh_versions).to_contain_text("）：通用问题的回答会变差，因此继续使用版本 1。")
    expect(zh.get_by_role("button", name="立即训练新版本")).to_be_enabled()
    assert not re.search(r"损失|留出|门控|适配器", zh.locator("#personal-tab").inner_text())
    zh.get_by_role("tab", name="对比").click()
    zh.locator("#compare-btn").click()
    expect(zh.locator("#compare-note")).to_contain_text("你还没有个人版本", timeout=15_000)
    zh.context.close()


def test_my_assistant_without_a_personalizer_offers_no_training(browser, tmp_path, tiny_model_dir):
    """Served with --no-personalizer: no Train button, and the tab says what the person running Attune can do."""
    from playwright.sync_api import expect

    from helpers import Server

    data = tmp_path / "data"
    with Server(data, "--model", str(tiny_model_dir), "--quant", "none", "--no-personalizer", "--no-memory") as srv:
        srv.data = data
        page = open_page(browser, srv)
        sign_up(page, "rosa", "correct horse")
        page.get_by_role("tab", name="My assistant").click()
        status = page.locator("#personal-status")
        expect(status).to_contain_text("nothing is trained on this server right now", timeout=15_000)
        expect(status).to_contain_text(".venv/bin/python launch.py train rosa")
        expect(status).to_contain_text("No personal version yet.")
        expect(page.locator("#retrain-btn")).to_be_hidden()
        expect(page.get_by_role("button", name="Train a new version now")).to_have_count(0)
        expect(page.locator("#rollback-btn")).to_be_hidden()  # nothing to switch to
        page.locator("#personalization input").uncheck()
        expect(page.locator("#personal-msg")).to_contain_text("Learning is off", timeout=15_000)
        expect(status).to_contain_text("Learning from your chats: off.")
        page.context.close()
