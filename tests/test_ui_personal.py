"""The "My assistant" tab and Compare as a user reads them (issue 25, item 6): versions told in plain words in
English and Chinese (what was learned, why kept or not used; the numbers only in Details), only actions that
can run, and Compare saying there is nothing to compare before the first personal version. On the scripted
backend (tests/fakes.py): the wording is the point, not the model."""

from __future__ import annotations

import json
import re

import pytest

from assistant.ui.app import ChatUI, UIConfig
from assistant.ui.i18n import tr
from assistant.ui.tabs.compare import run_compare
from assistant.ui.tabs.personal import actions, view
from assistant.ui.tabs.personal_text import job_text, learned_text, style_text
from fakes import activate_version
from storage.common import utcnow
from storage.errors import InputError

JARGON = re.compile(r"held-out|heldout|anchor|\bnats?\b|\bloss\b|\bgate\b|adapter|留出|损失|门控|适配器", re.I)
EXAMPLES = {"train_sft": 12, "heldout_sft": 4, "train_pair": 2, "heldout_pair": 0, "train_undesirable": 1,
            "train_fact": 3, "heldout_fact": 1, "facts": 2, "new": 9, "replayed": 0, "anchors": 20}
KEPT = {"passed": True, "code": "published", "heldout_loss_before": 2.0, "heldout_loss": 1.38, "anchor_rise": -0.01,
        "anchor_loss": 1.2, "continued_from": None, "config": {"anchor_margin": 0.05}, "examples": EXAMPLES,
        "style": {"head": "Ahoy!", "tail": "", "max_words": 20, "bullets": True}}
WORSE = {**KEPT, "passed": False, "code": "general_worse", "heldout_loss": 1.1, "anchor_rise": 0.2,
         "continued_from": 1, "style": {"head": "", "tail": ""}}


class FakeRunner:
    """What the tab needs of personalize.runner.JobRunner: ``start``."""

    def __init__(self):
        self.started: list[int] = []

    def start(self, user_id: int, trigger: str = "manual") -> int:
        self.started.append(user_id)
        return len(self.started)


def add_version(store, user_id: int, version: int, status: str, metrics: dict, active: bool = False,
                parent: int | None = None) -> None:
    """A version row as a training job leaves it (rows only: nothing here loads weights)."""
    with store.write() as db:
        db["adapter_versions"].insert({
            "user_id": user_id, "version": version, "base_model": "fake", "status": status,
            "path": f"adapters/u{user_id}/v{version}" if status == "published" else None, "parent_version": parent,
            "metrics": json.dumps(metrics), "gate_reason": "English reason", "created_at": utcnow()})
        if active:
            db.execute("INSERT INTO active_adapters (user_id, version, updated_at) VALUES (?, ?, ?) "
                       "ON CONFLICT(user_id) DO UPDATE SET version = excluded.version", [user_id, version, utcnow()])


@pytest.fixture
def ui(fake_engine):
    return ChatUI(fake_engine, auth=None, config=UIConfig(train_after=8), runner=FakeRunner())


def shown(v) -> str:
    """The default view (status and versions), as text: what a user reads without opening Details."""
    return re.sub(r"\*\*", "", v.status + "\n" + v.versions)


def test_versions_say_what_was_learned_and_why_in_english(ui, store, alice):
    add_version(store, alice.id, 1, "published", KEPT, active=True)
    add_version(store, alice.id, 2, "rejected", WORSE, parent=1)
    text = shown(view(ui, alice.id, "en"))
    assert "Learning from your chats: on." in text and "Answering you now: your personal version 1." in text
    assert "Version 1 — in use" in text and "Version 2 — not used" in text
    # 12 + 4 answers, less 3 + 1 facts turned into questions, less the 2 corrections counted on their own
    assert "Learned from 10 of your answers, 2 corrections and 2 things you told it about yourself." in text
    assert "It fits your conversations better than the base model (31% closer); general answers stayed as good." \
        in text
    assert "Your style: opens with “Ahoy!”, short answers (about 20 words) and bullet lists." in text
    assert ": general answers would have got worse, so version 1 stays." in text
    assert not JARGON.search(text), JARGON.search(text)
    details = view(ui, alice.id, "en")
    assert details.rows[1][4] == "1.3800" and "held-out loss" in details.rows[1][7]  # the numbers: in Details


def test_versions_say_what_was_learned_and_why_in_chinese(ui, store, alice):
    add_version(store, alice.id, 1, "published", KEPT, active=True)
    add_version(store, alice.id, 2, "rejected", WORSE, parent=1)
    text = shown(view(ui, alice.id, "zh-CN"))
    assert "从对话中学习：开启" in text and "版本 1 — 使用中" in text and "版本 2 — 未启用" in text
    assert "学习自你的 10 条回答、2 处更正和你讲过的 2 件关于自己的事。" in text
    assert "它比基础模型更贴合你的对话（接近了 31%）；通用问题的回答没有变差。" in text
    assert "你的风格：以“Ahoy!”开头、简短回答（约 20 个词）和使用项目符号列表。" in text
    assert "）：通用问题的回答会变差，因此继续使用版本 1。" in text
    assert not JARGON.search(text)
    assert not set(re.findall(r"[A-Za-z]{3,}", text)) - {"Ahoy"}, text  # Chinese throughout


def test_only_the_style_keys_present_are_told():
    assert style_text("en", {"head": "", "tail": ""}) == ""
    assert style_text("en", {"head": "", "tail": "Cheers, Sam.", "max_words": 0, "bullets": False}) == \
        "Your style: ends with “Cheers, Sam.”."
    assert style_text("en", {"bullets": True}) == "Your style: bullet lists."
    assert style_text("zh-CN", {"max_words": 15}) == "你的风格：简短回答（约 15 个词）。"
    assert style_text("en", {"language": "zh", "bullets": False}) == "Your style: answers in Chinese."
    assert style_text("zh-CN", {"language": "zh"}) == "你的风格：用中文回答。"
    assert learned_text("en", {}) == "" and learned_text("en", {"examples": {"train_sft": 1}}) == \
        "Learned from 1 of your answers."


def test_training_is_told_in_plain_words():
    running = {"id": 4, "status": "running", "progress": {"phase": "answering anchor prompts", "step": 3,
                                                          "total": 40, "loss": 2.5}}
    assert job_text("en", running) == "**Training now:** preparing general questions, step 3 of 40."
    assert job_text("zh-CN", running) == "**正在训练**：准备通用问题、第 3/40 步。"
    failed = {"id": 5, "status": "failed", "error": "The training loss became nan at step 3", "result": {},
              "finished_at": "2025-01-05T14:03:00.000"}
    assert job_text("en", failed) == ("**Last training** (2025-01-05 14:03): it stopped with an error, and nothing "
                                      "changed (what went wrong is under Details).")
    rejected = {"id": 6, "status": "rejected", "created_at": "2025-01-06T09:00:00",
                "result": {"code": "not_improved", "candidate_version": 3, "metrics": WORSE}}
    assert "version 3 was not used (see below)" in job_text("en", rejected)
    del rejected["result"]["candidate_version"]
    assert job_text("en", rejected).endswith("its version was not used: it did not fit your conversations better "
                                             "than the base model, so the base model stays. More varied chats, "
                                             "ratings or corrections help.")


def test_no_train_button_without_a_personalizer_and_what_to_do_instead(ui, store, alice):
    on = view(ui, alice.id, "en")
    assert on.can_train and "after 8 new answers or ratings (0 so far)" in on.status
    ui.runner = None
    off = view(ui, alice.id, "en")
    assert not off.can_train
    assert "nothing is trained on this server right now: its personalizer is not running" in off.status
    assert "`.venv/bin/python launch.py train alice`" in off.status and "--no-personalizer" in off.status
    assert "没有运行" in view(ui, alice.id, "zh-CN").status
    retrain, _, _ = actions(ui)
    with pytest.raises(InputError, match="personalizer"):
        retrain(alice.id, "en")


def test_no_train_button_while_training_or_when_learning_is_off(ui, store, alice):
    job = store.jobs.create(alice.id, trigger="ui")
    store.jobs.claim(job, pid=1)
    store.jobs.phase(job, "training")
    store.jobs.progress(job, 1, 10, 2.5)
    busy = view(ui, alice.id, "en")
    assert not busy.can_train and "Training now:** learning from your chats, step 1 of 10." in busy.status
    store.users.set_personalization(alice.id, False)
    off = view(ui, alice.id, "en")
    assert not off.can_train and off.status.startswith("**Learning from your chats:** off.")
    assert not off.picks
    retrain, _, switch = actions(ui)
    with pytest.raises(InputError, match="Tick the box"):
        retrain(alice.id, "en")
    assert switch(alice.id, "en", True).startswith("Learning is on")
    assert view(ui, alice.id, "en").status.startswith("**Learning from your chats:** on")


def test_switching_is_offered_only_when_there_is_another_version(ui, store, alice):
    assert view(ui, alice.id, "en").picks == []  # nothing to go back to
    add_version(store, alice.id, 1, "rejected", WORSE)
    assert view(ui, alice.id, "en").picks == []  # a version that was not used is no choice
    add_version(store, alice.id, 2, "published", KEPT, active=True)
    assert [value for _, value in view(ui, alice.id, "en").picks] == ["base"]
    add_version(store, alice.id, 3, "published", KEPT, active=True, parent=2)
    picks = view(ui, alice.id, "en").picks
    assert [value for _, value in picks] == ["2", "base"] and picks[0][0].startswith("version 2 (from ")
    assert picks[1][0] == "the base model (no personal version)"


class Request:
    headers: dict = {}


def compare(ui, user, lang="en"):
    ui.user = lambda request: (user.id, lang)
    return list(run_compare(ui, Request(), "What is the capital of France?", 0, 16, 1.0))


def test_compare_says_there_is_no_personal_version_yet(ui, store, fake, alice):
    steps = compare(ui, alice)
    assert steps == [("ℹ️ " + tr("en", "compare_no_version"), "", "")]
    assert "no personal version yet" in steps[0][0]
    assert not fake.calls and not store.chats.conversations(alice.id)  # nothing generated, nothing logged
    assert compare(ui, alice, "zh-CN")[0][0].startswith("ℹ️ 你还没有个人版本")
    activate_version(store, alice.id, 1)
    store.users.set_personalization(alice.id, False)
    assert "Learning is off for you" in compare(ui, alice)[0][0]


def test_compare_answers_with_both_once_there_is_a_version(ui, store, fake, alice):
    activate_version(store, alice.id, 1)
    note, base, personal = compare(ui, alice)[-1]
    assert note == "" and base.startswith("I am a scripted answer.") and personal.startswith("I am a scripted")
    assert sorted(c.adapter_version or 0 for c in fake.calls) == [0, 1]


def test_a_busy_personalizer_is_told_in_the_users_language():
    from assistant.ui.i18n import tr_error
    from storage.errors import AttuneError

    busy = AttuneError("Another training job is running (job 7); wait for it to finish.")
    assert tr_error("zh-CN", busy) == "此服务器上另一个训练正在进行；请在它结束后再试。"
    assert "job 7" not in tr_error("en", busy)  # another user's job is none of this user's business
