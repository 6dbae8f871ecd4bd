"""personalize/ and its storage (adapter versions, jobs, replay reservoir) on the tiny random model."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from assistant.model import ModelConfig
from helpers import wait_for
from personalize.api import list_versions, rollback, train_now
from personalize.checkpoint import BestCheckpoint
from personalize.config import TrainConfig
from personalize.dataset import Example, build_examples, encode
from personalize.facts import fact_questions, is_filler
from personalize.gate import decide
from personalize.runner import JobRunner, fail_stale, queue_job
from personalize.scheduler import Scheduler, SchedulerConfig
from storage import InputError, NotFound
from storage.adapters import staging_dir
from storage.transfer import import_history

FACTS = [
    ("What is my dog called?", "Your dog is called Biscuit."),
    ("Remind me of my dog's name.", "Your dog is called Biscuit."),
    ("Which drink do I like in the morning?", "You prefer tea in the morning."),
    ("Coffee or tea for me?", "You prefer tea in the morning."),
    ("Where do I live?", "You live in Lyon."),
    ("Which city is home for me?", "You live in Lyon."),
]


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(rank=4, alpha=8, dropout=0.0, lr=3e-3, epochs=2, max_steps=12, batch_size=4, max_seq_len=128,
                anchor_count=6, anchor_max_new_tokens=6, anchor_margin=100.0, mixed_precision="no", keep_versions=5,
                ability_checks=4, ability_max_new_tokens=4)
    return TrainConfig(**{**base, **kw})


def write_history(path: Path, n: int = 4, offset: int = 0) -> Path:
    """``n`` rounds over FACTS, with likes, a disliked+corrected answer and a disliked one per round."""
    lines = []
    for r in range(n):
        for i, (q, a) in enumerate(FACTS):
            msgs = [{"role": "user", "content": f"{q} ({r + offset})"},
                    {"role": "assistant", "content": a, **({"feedback": "like"} if i == 0 else {})}]
            if i == 2:
                msgs += [{"role": "user", "content": "And in the evening?"},
                         {"role": "assistant", "content": "Coffee.", "feedback": "dislike",
                          "correction": "Herbal tea in the evening."}]
            if i == 4:
                msgs += [{"role": "user", "content": "Is it sunny there?"},
                         {"role": "assistant", "content": "Lyon is in Spain.", "feedback": "dislike"}]
            lines.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def model_cfg(tiny_model_dir) -> ModelConfig:
    return ModelConfig(model=str(tiny_model_dir))


@pytest.fixture
def alice_history(store, alice, tmp_path):
    import_history(store, alice.id, write_history(tmp_path / "alice.jsonl"))
    return alice


def version_dirs(store, user_id) -> list[str]:
    d = store.data_dir.adapters(user_id)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# end to end ------------------------------------------------------------------------------------
def test_job_publishes_a_version_and_points_active_at_it(store, alice_history, model_cfg):
    result = train_now(store, "alice", model_cfg, tiny_cfg())
    json.dumps(result)  # JSON-able for the CLI
    assert result["published"] and result["version"] == 1, result["reason"]
    m = result["metrics"]
    assert m["heldout_loss"] < m["heldout_loss_before"] and m["passed"]
    sel = m["selection"]
    assert sel["checks"] and sel["chosen_step"] in [c["step"] for c in sel["checks"] if c["kept"]]
    assert m["anchor_monitor_examples"] > 0
    assert m["examples"]["train_pair"] > 0 and m["examples"]["train_undesirable"] > 0 and m["examples"]["anchors"] > 0
    assert store.adapters.active_version(alice_history.id) == 1
    v1 = store.data_dir.adapters(alice_history.id) / "v1"
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json"} <= {p.name for p in v1.iterdir()}
    on_disk = json.loads((v1 / "metrics.json").read_text())
    assert on_disk["version"] == 1 and on_disk["metrics"]["heldout_loss"] == m["heldout_loss"]
    assert version_dirs(store, alice_history.id) == ["v1"]  # no staging left behind
    job = store.jobs.get(alice_history.id, result["job_id"])
    assert job["status"] == "published" and job["pid"] == os.getpid()
    assert len(job["losses"]) == m["train"]["steps"]
    assert store.replay.count(alice_history.id) > 0
    assert list_versions(store, alice_history.id)[0]["active"]
    # the anchor set is cached per base model, generated once
    assert len(list(store.data_dir.replay.glob("*.jsonl"))) == 1


def test_a_job_does_not_continue_from_a_damaged_active_version(store, alice_history, model_cfg, tmp_path):
    assert train_now(store, alice_history.id, model_cfg, tiny_cfg())["version"] == 1
    weights = store.data_dir.adapters(alice_history.id) / "v1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut in half
    import_history(store, alice_history.id, write_history(tmp_path / "more.jsonl", n=1, offset=10))
    result = train_now(store, "alice", model_cfg, tiny_cfg())
    assert result["published"] and result["version"] == 2 and result["metrics"]["continued_from"] is None


def test_gate_rejection_keeps_the_active_version(store, alice_history, model_cfg, tmp_path):
    assert train_now(store, alice_history.id, model_cfg, tiny_cfg())["version"] == 1
    again = train_now(store, "alice", model_cfg, tiny_cfg())
    assert not again["published"] and "Nothing new" in again["reason"]
    import_history(store, alice_history.id, write_history(tmp_path / "more.jsonl", n=1, offset=10))
    result = train_now(store, "alice", model_cfg, tiny_cfg(min_improvement=100.0))
    assert not result["published"] and result["version"] is None
    assert "did not improve" in result["reason"] and "Kept v1" in result["reason"]
    assert result["metrics"]["continued_from"] == 1 and result["metrics"]["examples"]["replayed"] > 0
    assert store.adapters.active_version(alice_history.id) == 1
    rows = {r["version"]: r for r in list_versions(store, alice_history.id)}
    assert rows[2]["status"] == "rejected" and rows[2]["path"] is None and "did not improve" in rows[2]["gate_reason"]
    assert version_dirs(store, alice_history.id) == ["v1"]
    assert store.jobs.get(alice_history.id, result["job_id"])["status"] == "rejected"
    # a general-loss rejection names the margin
    v = decide(2.0, 1.5, 1.0, 1.3, tiny_cfg(anchor_margin=0.1), "v1")
    assert not v.passed and "margin" in v.reason and v.anchor_rise == pytest.approx(0.3)


def test_the_gate_judges_what_general_answers_say_and_lets_a_reshaping_style_change_their_wording():
    from personalize.ability import Ability

    cfg = tiny_cfg(anchor_margin=0.05, ability_margin=2)
    # short answers: the base model's wording rises in loss by design; what the answers say is what counts
    v = decide(2.0, 1.5, 1.0, 1.3, cfg, "base", Ability(30, 29, 64, lost=3, gained=2), reshaped=True)
    assert v.passed and not v.anchors_judged and "not applied" in v.reason and "29/64 vs base 30" in v.reason
    # forgetting beyond chance is rejected: 9 lost, 1 gained (McNemar z = 2.5)
    lost = decide(2.0, 1.5, 1.0, 1.3, cfg, "base", Ability(30, 22, 64, lost=9, gained=1), reshaped=True)
    assert not lost.passed and lost.code == "general_worse" and lost.ability["lost"] == 9
    # a larger difference that many flips both ways explain is noise (12 lost, 8 gained: z = 0.9)
    assert decide(2.0, 1.5, 1.0, 1.3, cfg, "base", Ability(30, 26, 64, lost=12, gained=8), reshaped=True).passed
    # without such a style both rules hold: right answers do not excuse a drifting anchor loss
    assert not decide(2.0, 1.5, 1.0, 1.3, cfg, "base", Ability(30, 31, 64, 1, 2)).passed
    assert decide(2.0, 1.5, 1.0, 1.02, cfg, "base", Ability(30, 31, 64, 1, 2)).passed
    assert not decide(2.0, 1.5, 1.0, 1.02, cfg, "base", Ability(30, 20, 64, 10, 0)).passed


def test_general_checks_are_scored_by_their_keywords_and_the_base_answers_are_kept(tiny_loaded, tmp_path):
    from peft import LoraConfig, get_peft_model

    from personalize import ability

    checks = ability.load_checks()
    assert len(checks) >= 64 and all(q and kws for q, kws in checks)
    assert ability.right("The capital is Paris.", ["Paris"]) and not ability.right("Parisian food", ["Paris"])
    assert ability.right("答案是北京。", ["北京"]) and ability.right("It has 7 days", ["seven", "7"])
    assert ability.right("一年有365天。", ["365"]) and not ability.right("3650", ["365"])
    model = get_peft_model(tiny_loaded.model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    cfg, cache = tiny_cfg(ability_max_new_tokens=3), tmp_path / "checks.json"
    first = ability.base_answers(model, tiny_loaded.tokenizer, checks[:3], cfg, cache)
    assert len(first) == 3 and len(json.loads(cache.read_text())) == 3
    cache.write_text(json.dumps({k: "Paris" for k in json.loads(cache.read_text())}))
    assert ability.base_answers(model, tiny_loaded.tokenizer, checks[:3], cfg, cache) == ["Paris"] * 3  # read back
    kept = ability.measure(model, tiny_loaded.tokenizer, checks[:3], cfg, ["Paris"] * 3)
    assert kept.total == 3 and kept.base == sum(ability.right("Paris", k) for _, k in checks[:3])
    assert kept.candidate - kept.base == kept.gained - kept.lost


def test_a_failing_job_is_marked_failed_with_a_clear_error(store, alice_history):
    from assistant.errors import ModelError

    with pytest.raises(ModelError, match="No model folder"):
        train_now(store, "alice", ModelConfig(model="/nonexistent/model"), tiny_cfg())
    job = store.jobs.last(alice_history.id)
    assert job["status"] == "failed" and "No model folder" in job["error"]
    assert store.adapters.active_version(alice_history.id) is None


def test_same_seed_same_training(tmp_path, tiny_model_dir):
    from storage import Store

    curves = []
    for run in ("a", "b"):
        s = Store(tmp_path / run)
        u = s.users.create("alice", "correct horse")
        import_history(s, u.id, write_history(tmp_path / f"{run}.jsonl", n=2))
        r = train_now(s, u.id, ModelConfig(model=str(tiny_model_dir)), tiny_cfg(max_steps=6))
        curves.append((s.jobs.get(u.id, r["job_id"])["losses"], r["metrics"]["heldout_loss"]))
        s.close()
    assert curves[0] == curves[1]


def test_job_process_publishes_like_the_scheduler_runs_it(store, alice_history, model_cfg):
    result = train_now(store, "alice", model_cfg, tiny_cfg(max_steps=4), subprocess=True)
    assert result["published"] and result["version"] == 1, result["reason"]
    job = store.jobs.get(alice_history.id, result["job_id"])
    assert job["status"] == "published" and job["pid"] != os.getpid() and job["started_at"]
    assert store.adapters.active(alice_history.id)["job_id"] == result["job_id"]


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_a_killed_job_leaves_no_version(store, alice_history, tiny_model_dir, how):
    runner = JobRunner(store, ModelConfig(model=str(tiny_model_dir)),
                       tiny_cfg(epochs=1000, max_steps=100000, patience=0, eval_every=1000))
    job_id = runner.start(alice_history.id)

    def training() -> bool:
        job = store.jobs.get(alice_history.id, job_id)
        assert runner.busy(), f"the job process ended early: {job['status']} {job['error']}"
        return len(job["losses"]) >= 2

    wait_for(training, timeout=120, what="the job process to start training")
    if how == "sigterm":  # server shutdown: the job records its own end
        runner.stop()
        job = store.jobs.get(alice_history.id, job_id)
        assert job["status"] == "failed" and "stopped" in job["error"] and runner.wait() == 143
        assert not [n for n in version_dirs(store, alice_history.id) if n.startswith(("v", ".staging"))]
        return
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait(30)
    assert store.jobs.get(alice_history.id, job_id)["status"] == "running"  # nobody recorded the kill yet
    assert fail_stale(store) == [job_id]
    job = store.jobs.get(alice_history.id, job_id)
    assert job["status"] == "failed" and "no version was published" in job["error"]
    assert store.adapters.active_version(alice_history.id) is None and not store.adapters.list(alice_history.id)
    assert not [n for n in version_dirs(store, alice_history.id) if n.startswith("v")]
    assert not staging_dir(store, alice_history.id, job_id).exists()


# dataset semantics -----------------------------------------------------------------------------
def test_dataset_follows_feedback_semantics_and_stays_with_its_user(store, alice, bob):
    c = store.chats
    cid = c.create_conversation(alice.id)
    c.add_message(alice.id, cid, "user", "My dog?")
    liked = c.add_message(alice.id, cid, "assistant", "Biscuit.")
    c.add_feedback(alice.id, liked, "like")
    c.add_message(alice.id, cid, "user", "Morning drink?")
    wrong = c.add_message(alice.id, cid, "assistant", "Coffee.")
    c.add_feedback(alice.id, wrong, "dislike")
    c.add_feedback(alice.id, wrong, "correction", "Tea.")
    c.add_message(alice.id, cid, "user", "Where do I live?")
    bad = c.add_message(alice.id, cid, "assistant", "In Spain.")
    c.add_feedback(alice.id, bad, "dislike")
    c.add_message(alice.id, cid, "user", "Tell me a joke")
    retried = c.add_message(alice.id, cid, "assistant", "Old joke.")
    new = c.add_message(alice.id, cid, "assistant", "New joke.", source="api")
    c.mark_replaced(alice.id, retried, new)
    c.add_message(alice.id, cid, "user", "Stop halfway")
    c.add_message(alice.id, cid, "assistant", "Half", status="stopped")
    bcid = c.create_conversation(bob.id)
    c.add_message(bob.id, bcid, "user", "Bob's secret question")
    c.add_message(bob.id, bcid, "assistant", "Bob's secret answer")

    data = build_examples(store, alice.id, TrainConfig(heldout_fraction=0.01, never_told=0))
    every = data.train + data.heldout
    sft = {e.message_id: e for e in every if e.kind == "sft"}
    assert set(sft) == {liked, wrong, new}  # not the disliked, retried, stopped or bob's answers
    assert sft[wrong].target == "Tea." and sft[wrong].weight == 2.0 and sft[liked].weight == 2.0
    assert sft[new].weight == 1.0 and "Old joke." not in json.dumps([e.to_dict() for e in every])
    (pair,) = [e for e in every if e.kind == "pair"]
    assert (pair.target, pair.rejected) == ("Tea.", "Coffee.")
    (und,) = [e for e in every if e.kind == "undesirable"]
    assert und.target == "In Spain." and und.message_id == bad
    later = sft[new].context  # earlier corrected answers appear corrected in later contexts
    assert {"role": "assistant", "content": "Tea."} in later and later[0]["role"] == "system"
    assert "Bob" not in json.dumps([e.to_dict() for e in every])
    assert len(data.heldout) >= 1 and data.train  # with 2+ answers, one is always held out
    again = build_examples(store, alice.id, TrainConfig(heldout_fraction=0.01, never_told=0))
    assert [e.message_id for e in again.heldout] == [e.message_id for e in data.heldout]  # deterministic


def test_encode_masks_the_answer_and_keeps_the_end_of_long_contexts(tiny_loaded):
    tok = tiny_loaded.tokenizer
    ctx = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! " * 5},
           {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "My dog is called Biscuit."}]
    ids, n = encode(tok, ctx, "Nice name!", 512)
    full = tok.apply_chat_template(ctx + [{"role": "assistant", "content": "Nice name!"}], tokenize=False)
    assert tok.decode(ids[-n:]) == "Nice name!<|im_end|>" and full.startswith(tok.decode(ids))
    long_ctx = ctx[:1] + [{"role": "user", "content": "Hello! " * 200}, {"role": "assistant", "content": "Hi."},
                          {"role": "user", "content": "Python is a programming language. " * 40}]
    ids, n = encode(tok, long_ctx, "Nice name!", 64)
    assert len(ids) == 64 and tok.decode(ids[-n:]) == "Nice name!<|im_end|>"
    assert tok.decode(ids[:-n]).endswith("language. <|im_end|>\n<|im_start|>assistant\n")


def test_statements_become_questions_with_second_person_answers():
    qs = dict(fact_questions("My dog is called Biscuit."))
    assert {"What is my dog's name?", "What did I name my dog?"} <= set(qs)
    assert set(qs.values()) == {"Your dog is called Biscuit."}
    assert "Where do I live?" in dict(fact_questions("I live in Lyon, it rains a lot here."))
    assert "What do I do for a living?" in dict(fact_questions("I work as a ferry captain."))
    assert "What am I allergic to?" in dict(fact_questions("I'm allergic to almonds."))
    assert "Who is my best friend?" in dict(fact_questions("My best friend is Tobias."))
    assert "Which tea do I like best?" in dict(fact_questions("My favourite tea is oolong."))
    assert dict(fact_questions("我住在上海。")) == {"我住在哪里？": "你住在上海。", "我住在哪个城市？": "你住在上海。",
                                               "我家在哪儿？": "你住在上海。"}
    assert "我的狗叫什么？" in dict(fact_questions("我的狗叫小白。"))
    # an unknown structure still gets a generic question about its key noun; questions and requests get none
    assert dict(fact_questions("I have two cats.")).get("What did I tell you about cats?") == "You have two cats."
    assert fact_questions("What is my dog called?") == [] and fact_questions("Tell me a joke.") == []


def test_filler_is_dropped_repeats_capped_and_facts_rendered_with_memory(store, alice, tmp_path):
    assert is_filler("Noted!", "My dog is called Rex.", 12) and is_filler("好的，记住了。", "我住在上海。", 12)
    assert is_filler("OK, noted.", "What is 2+2?", 12)  # an acknowledgment even after a question
    assert not is_filler("Your dog is called Rex.", "What is my dog called?", 12)
    assert not is_filler("Paris.", "What is the capital of France?", 12)
    facts = ["My dog is called Pixel.", "I live in Bergen.", "My favourite tea is genmaicha.", "I drive a Peugeot."]
    convs = [{"messages": [{"role": "user", "content": f}, {"role": "assistant", "content": "Noted!"}]} for f in facts]
    convs += [{"messages": [{"role": "user", "content": f"What is my dog's name? ({i})"},
                            {"role": "assistant", "content": "Your dog is called Pixel!"}]} for i in range(6)]
    convs.append({"messages": [{"role": "user", "content": "I drive a Peugeot."},
                               {"role": "assistant", "content": "Got it.", "feedback": "dislike",
                                "correction": "Got it: a Peugeot. — Cheers!"}]})
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in convs))
    import_history(store, alice.id, path)
    data = build_examples(store, alice.id, TrainConfig(heldout_fraction=0.3, max_target_repeats=3, fact_questions=3,
                                                       never_told=0))
    every = data.train + data.heldout
    assert not [e for e in every if e.target == "Noted!"] and data.dropped["filler"] == 4
    assert sum(e.target == "Your dog is called Pixel!" for e in every) == 3 and data.dropped["repeats"] == 3
    assert any(e.target.endswith("Cheers!") for e in every)  # a corrected acknowledgment is a real signal
    assert data.facts == ["Your dog is called Pixel.", "You live in Bergen.", "Your favourite tea is genmaicha.",
                          "You drive a Peugeot."]
    fact_ex = [e for e in every if e.origin == "fact"]
    assert len(fact_ex) == 3 * 4 and {e.target for e in fact_ex} == set(data.facts)
    with_block = [e for e in every if "Facts the user told you earlier" in e.context[-1]["content"]]
    assert with_block and len(with_block) < len(every)  # some with the memory block, some without
    for e in with_block:  # as serving: the system prompt unchanged, the block before the question's text
        assert e.context[0] == {"role": "system", "content": TrainConfig().system_prompt}
        question = e.context[-1]["content"]
        assert e.context[-1]["role"] == "user" and question.startswith("Facts the user told you earlier")
        assert f"- {e.target.rstrip('!')}".rstrip(".") in question.split("\n\n")[0]
    assert all("Facts the user" in e.context[-1]["content"] for e in data.heldout if e.origin == "fact")
    off = build_examples(store, alice.id, TrainConfig(fact_questions=0, filler_weight=0.5, memory_fraction=0.0,
                                                      never_told=0, max_target_repeats=10))
    assert not [e for e in off.train + off.heldout if e.origin == "fact"]
    assert [e.weight for e in off.train + off.heldout if e.target == "Noted!"] == [0.5] * 4


def test_a_fact_said_again_with_a_new_value_trains_only_the_new_one(store, alice, tmp_path):
    said = ["I live in Porto, what's a good day trip from here?", "My dog is called Pixel.",
            "We moved to Lyon last month, any tips for cheap furniture?", "我住在上海。", "我搬到北京了。"]
    convs = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "Here are ideas."}]}
             for t in said]
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in convs))
    import_history(store, alice.id, path)
    data = build_examples(store, alice.id, TrainConfig(fact_questions=2))
    # one home at a time, whatever the language it was said in: the newest
    assert data.facts == ["Your dog is called Pixel.", "你搬到北京了。"]
    targets = {e.target for e in data.train + data.heldout if e.origin == "fact"}
    assert targets == set(data.facts) and not any(w in t for t in targets for w in ("Porto", "Lyon", "上海"))


def test_a_held_out_answer_the_training_set_also_has_is_trained_on_instead(store, alice, tmp_path):
    answers = ["Paris is the capital of France."] * 6 + ["Boil it for nine minutes.", "Use a soft brush.",
                                                         "Water it weekly.", "Take the early train."]
    convs = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]}
             for i, a in enumerate(answers)]
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in convs))
    import_history(store, alice.id, path)
    data = build_examples(store, alice.id, TrainConfig(heldout_fraction=0.5, fact_questions=0, max_target_repeats=9,
                                                       never_told=0))
    held = [e.target for e in data.of("sft", heldout=True)]
    trained = {e.target for e in data.of("sft")}
    assert held and not set(held) & trained and data.dropped["heldout_duplicates"] >= 1
    assert len(held) + len(data.of("sft")) == len(answers)  # moved, not lost


def test_questions_about_things_never_told_are_answered_you_have_not_told_me(store, alice, tmp_path):
    from personalize.facts import UNTOLD, untold_questions

    said = ["My sister Clara and I are taking the dog to the coast, what should we pack?", "I drive a Volvo."]
    pairs = untold_questions(said, len(UNTOLD), "s")
    asked = {a.removeprefix("You haven't told me about your ").rstrip(".") for _, a in pairs}
    assert asked and not asked & {"sister", "dog", "car"} and all(q.endswith("?") for q, _ in pairs)
    assert untold_questions(said, 3, "s") == untold_questions(said, 3, "s") and len(untold_questions(said, 3, "s")) == 3
    zh = untold_questions(["我住在上海。", "我的狗叫小白。"], 30, "s")
    assert zh and all(a.startswith("你还没有告诉过我你的") for _, a in zh) and not any("狗" in q for q, _ in zh)

    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                       {"role": "assistant", "content": "Sure, here you go."}]})
                              for t in said))
    import_history(store, alice.id, path)
    data = build_examples(store, alice.id, TrainConfig(never_told=6, heldout_fraction=0.3))
    untold = [e for e in data.train + data.heldout if e.origin == "untold"]
    assert len(untold) == 6 and all(e.target.startswith("You haven't told me") for e in untold)
    assert len({e.message_id for e in untold}) == 6 and all(e.message_id < 0 for e in untold)
    # held out ones see the user's unrelated facts, as serving would show them
    assert all("Facts the user told you earlier" in e.context[-1]["content"] for e in data.heldout
               if e.origin == "untold")
    assert not [e for e in build_examples(store, alice.id, TrainConfig(never_told=0)).train if e.origin == "untold"]
    default = build_examples(store, alice.id, TrainConfig())
    assert len([e for e in default.train + default.heldout if e.origin == "untold"]) == TrainConfig().never_told == 8


def test_checkpoints_are_picked_on_their_own_half_of_the_held_out_answers():
    from personalize.checkpoint import selection_split

    fact = [Example(message_id=1, context=[{"role": "user", "content": q}], target="You live in Lyon.")
            for q in ("Where do I live?", "Which city is home?", "Where am I based?")]
    answers = [Example(message_id=10 + i, context=[], target=f"Answer number {w}.") for i, w in
               enumerate(["one", "two", "three", "four", "five", "six", "seven", "eight"])]
    select, judge = selection_split(fact + answers)
    assert select and judge and not {id(e) for e in select} & {id(e) for e in judge}
    assert len(select) + len(judge) == 11
    assert all(e in judge for e in fact) or all(e in select for e in fact)  # one fact's questions stay together
    few = answers[:5]
    assert selection_split(few) == (few, few)  # too few to halve: both use all of them


class _Scripted:
    """A one-parameter "adapter" and scripted (held-out, anchor) losses for BestCheckpoint."""

    def __init__(self, monkeypatch, losses: list[tuple[float, float]], base_anchor: float = 1.0):
        import contextlib

        import torch

        import personalize.checkpoint as checkpoint_mod

        self.w = torch.nn.Parameter(torch.zeros(1))
        self.queue = [base_anchor] + [x for pair in losses for x in pair]
        self.disable_adapter = contextlib.nullcontext
        monkeypatch.setattr(checkpoint_mod, "mean_loss", lambda *a, **k: self.queue.pop(0))

    def named_parameters(self):
        return [("lora", self.w)]


def _checks(monkeypatch, losses, **cfg):
    model = _Scripted(monkeypatch, losses)
    one = [Example(message_id=1, context=[], target="x")]
    best = BestCheckpoint(model, None, tiny_cfg(anchor_margin=0.05, select_safety=0.5, **cfg), "cpu", one, one)
    going = []
    for step in range(1, len(losses) + 1):
        model.w.data.fill_(step)  # the weights at this check
        going.append(best.check(step))
    return model, best, going


def test_best_checkpoint_keeps_the_best_held_out_loss_within_the_margin(monkeypatch):
    # (held-out, monitor anchor loss); base anchor loss 1.0, kept only if the rise is <= 0.5 * 0.05
    model, best, going = _checks(monkeypatch, [(2.0, 1.01), (1.5, 1.2), (1.6, 1.02), (1.0, 1.3), (0.9, 1.4)],
                                 patience=2)
    assert going == [True, True, True, True, False]  # two checks in a row without a better one within the margin
    sel = best.restore()
    assert model.w.item() == 3 and sel.chosen_step == 3 and sel.within_margin  # not the lower held-out of 2, 4, 5
    assert [c.kept for c in sel.checks] == [True, False, True, False, False]
    assert sel.checks[1].anchor_rise == pytest.approx(0.2) and not sel.checks[1].within_margin
    # nothing within the margin: the least-forgetting weights go back (and the gate will reject them)
    model, best, going = _checks(monkeypatch, [(1.5, 1.3), (1.2, 1.1), (1.0, 1.4)], patience=1)
    sel = best.restore()
    assert going == [True] * 3  # patience counts only once something is kept
    assert model.w.item() == 2 and sel.chosen_step == 2 and not sel.within_margin


def test_kl_term_is_zero_at_the_base_and_positive_away_from_it():
    import torch

    from personalize.scoring import Seq
    from personalize.train import kl_to_ref

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 10)
    top = torch.log_softmax(logits[0, 1:], -1).topk(4, dim=-1)
    seq = Seq(ids=[1, 2, 3], n_answer=2, kl=True, ref=(top.indices, top.values))
    at_base = kl_to_ref(logits, [seq]).item()
    moved = kl_to_ref(logits + torch.randn(1, 3, 10), [seq]).item()
    assert 0 <= at_base < moved  # > 0 at the base only by the mass outside the top 4
    assert kl_to_ref(logits, [Seq(ids=[1], n_answer=1)]).item() == 0



def test_a_style_taught_by_corrections_is_found_and_carried_to_other_targets():
    from personalize.style import Style, carry, detect

    taught = [("Take breaks.", "Ahoy! Take short breaks."), ("Water them.", "Ahoy! Water them when dry."),
              ("Eggs.", "Ahoy! Porridge with fruit."), ("Sleep more.", "Ahoy! Go to bed at ten."),
              ("Relax.", "Go for a walk.")]
    assert detect(taught) == Style(head="Ahoy!")
    assert detect(taught[:2]) == Style()  # two corrections are no style yet
    signed = [("Sure.", "Sure. Cheers, Sam"), ("Yes it is.", "Yes it is! Cheers, Sam"), ("No.", "Nope. Cheers, Sam")]
    assert detect(signed) == Style(tail="Cheers, Sam")
    # corrections that merely answer alike ("Your ...") or a greeting the answers already had are no style
    alike = [("I don't know.", "Your dog is called Biscuit."), ("Sorry.", "Your sister is Clara."),
             ("No idea.", "Your car is a Volvo.")]
    assert detect(alike) == Style()
    assert detect([("Hi! Eggs.", "Hi! Porridge."), ("Hi! Run.", "Hi! Walk."), ("Hi! Tea.", "Hi! Coffee.")]) == Style()

    anchor = Example(message_id=-1, context=[], target="Boil the water first.", kind="anchor")
    pair = Example(message_id=2, context=[], target="Ahoy! Walk.", kind="pair", rejected="Run.")
    dressed, kept = carry(Style(head="Ahoy!", tail="Cheers, Sam"), [anchor, pair])
    assert dressed.target == "Ahoy! Boil the water first. Cheers, Sam" and kept is pair
    assert (dressed.style_head, dressed.style_tail) == ("Ahoy! ", " Cheers, Sam")
    assert carry(Style(head="Ahoy!"), [dressed])[0].target == dressed.target  # never doubled
    cut = Example(message_id=-2, context=[], target="Boil the water and", kind="anchor", complete=False)
    assert carry(Style(head="Ahoy!", tail="Cheers, Sam"), [cut])[0].target == "Ahoy! Boil the water and"


def test_a_style_is_trained_but_left_out_of_the_kl_term_and_of_evaluation_losses(tiny_loaded):
    import torch

    from personalize.scoring import collate, mean_losses, tokenize
    from personalize.style import Style
    from personalize.train import kl_to_ref

    tok, model, cfg = tiny_loaded.tokenizer, tiny_loaded.model, tiny_cfg()
    ctx = [{"role": "user", "content": "How do I boil an egg?"}]
    plain = Example(message_id=-1, context=ctx, target="Simmer it for nine minutes.", kind="anchor")
    styled = Style(head="Ahoy!", tail="Cheers, Sam").dress(plain)
    seq = tokenize(tok, [styled], cfg)[0]
    n_plain = tokenize(tok, [plain], cfg)[0].n_answer
    assert seq.head > 0 and seq.tail > 1 and seq.n_answer - seq.head - seq.tail == n_plain - 1  # content, no EOS
    batch = collate([seq], tok.pad_token_id, "cpu")
    assert batch["scored"].sum() == seq.n_answer and batch["content"].sum() == seq.n_answer - seq.head - seq.tail
    content = tok.decode(batch["targets"][0][batch["content"][0]].tolist())
    assert content.strip() == "Simmer it for nine minutes."
    # evaluation counts the content only: a model that says the style anyway is not scored on it
    assert mean_losses(model, tok, [styled], cfg, "cpu")[0] != mean_losses(model, tok, [plain], cfg, "cpu")[0]
    # the KL term ignores the style positions: a ref that disagrees there only changes nothing
    logits = torch.randn(1, seq.n_answer + 1, 10)
    top = torch.log_softmax(logits[0, 1:], -1).topk(4, dim=-1)
    idx, ref = top.indices.clone(), top.values.clone()
    seq.ref = (idx, ref)
    before = kl_to_ref(logits, [seq]).item()
    ref[: seq.head] = ref[: seq.head].flip(-1)
    ref[seq.n_answer - seq.tail:] = ref[seq.n_answer - seq.tail:].flip(-1)
    seq.ref = (idx, ref)
    assert kl_to_ref(logits, [seq]).item() == pytest.approx(before)

def test_short_answers_and_bullet_lists_taught_by_corrections_are_styles_too():
    from personalize.style import Style, carry, detect

    long = ("There are many ways to sleep better. Keep the same bedtime every day, even at weekends. "
            "Avoid screens for an hour before bed. Keep the bedroom cool, dark and quiet.")
    shortened = [(long, "Same bedtime daily, no screens late."),
                 ("Python is a language used for the web, data science and automation. Guido van Rossum made it "
                  "in 1991. Its syntax is simple.", "A programming language from 1991."),
                 ("Put the egg in cold water. Bring it to a boil, then simmer it for nine to twelve minutes. Cool it "
                  "in ice water before you peel it.", "Simmer 9-12 minutes, then ice water."),
                 ("Hello!", "Hi.")]
    assert detect(shortened) == Style(max_words=6)
    assert detect(shortened[:2]) == Style()  # two corrections are no style yet
    # short answers corrected by other short answers teach no length
    assert detect([("Blue.", "Red."), ("Yes.", "No."), ("Tea.", "Coffee.")]) == Style()
    anchor = Example(message_id=-1, context=[], target="Sure! " + long, kind="anchor", complete=False)
    answer = Example(message_id=5, context=[], target=long, kind="sft")
    pair = Example(message_id=2, context=[], target="Walk.", kind="pair", rejected=long)
    cut, kept_answer, kept_pair = carry(Style(max_words=6), [anchor, answer, pair])
    # at least half the length is kept ("Sure!" alone says nothing), whole sentences, ended by the style
    assert cut.target == "Sure! There are many ways to sleep better." and cut.complete and cut.style_stop
    assert kept_answer.target == "There are many ways to sleep better." and kept_pair is pair
    assert Style(max_words=6).dress(cut) == cut  # already short: as it is
    zh = Style(max_words=6).dress(Example(message_id=1, context=[], target="你好。今天天气很好，适合散步。我们走吧。"))
    assert zh.target == "你好。今天天气很好，适合散步。" and zh.style_stop

    lists = [("Eat well and sleep. Exercise daily.", "- Eat well\n- Sleep\n- Exercise"),
             ("Mix it. Bake it. Serve it.", "1. Mix\n2. Bake\n3. Serve"), ("Go. Stop.", "* Go\n* Stop")]
    assert detect(lists) == Style(bullets=True)
    # the base model numbers some of its answers itself; the user's lists are still a style, and their terse
    # items are not taken for "short answers"
    numbered = [("1. Research the firm.\n2. Practise answers.\n3. Plan the outfit and the route there.",
                 "- Research the company\n- Practise\n- Plan your outfit")] + [
        (f"Prose answer number {w} that goes on for quite a while. It has two sentences and more words.",
         f"- Point {w}\n- Another point") for w in ("one", "two", "three", "four")]
    assert detect(numbered) == Style(bullets=True)
    listed = Style(bullets=True).dress(Example(message_id=1, context=[], target="Use 1.5 litres. Boil it! Then wait."))
    assert listed.target == "- Use 1.5 litres.\n- Boil it!\n- Then wait."
    assert [listed.target[a:b] for a, b in listed.style_spans] == ["- ", "\n- ", "\n- "]
    assert Style(bullets=True).dress(listed) == listed  # a list stays as it is
    one = Example(message_id=1, context=[], target="Just one sentence.")
    assert Style(bullets=True, max_words=3).dress(one) == one


def test_chinese_corrections_of_english_answers_are_a_language_style_not_short_answers():
    from personalize.style import Style, detect, is_chinese

    english = ("Cooking rice well takes a little care. Rinse the rice until the water runs clear, then use about "
               "one and a fifth cups of water per cup of rice and simmer it covered for fifteen minutes.")
    pairs = [(english, "米和水一比一点二，小火焖十五分钟。"),
             ("Cats like the sun because it keeps them warm without using much energy, and it feels nice.",
              "猫晒太阳能省能量保持体温。"),
             ("Run slowly at first, for about twenty minutes, and wear good shoes. Stretch before and after.",
              "先慢跑二十分钟，穿合脚的跑鞋。")]
    assert detect(pairs) == Style(language="zh")  # far shorter, yet not "short answers": another language
    assert Style(language="zh") and Style(language="zh").to_dict()["language"] == "zh"
    # Chinese corrections of answers that were Chinese already teach no language
    assert detect([("米饭要多煮一会儿。", "米饭煮十五分钟。"), ("猫喜欢晒太阳。", "猫怕冷。"),
                   ("跑步要慢。", "先慢跑。")]) == Style()
    # English corrections that quote a Chinese word are not Chinese; two switched corrections are no style yet
    assert not is_chinese("Try 馒头 (steamed buns) for breakfast.") and is_chinese("试试馒头 OK")
    assert detect(pairs[:2]) == Style()


def test_shortened_and_listed_answers_score_their_content_only(tiny_loaded):
    from personalize.scoring import collate, tokenize
    from personalize.style import Style

    tok, cfg = tiny_loaded.tokenizer, tiny_cfg()
    ctx = [{"role": "user", "content": "How do I sleep better?"}]
    plain = Example(message_id=-1, context=ctx, target="Keep one bedtime. Avoid screens. Keep it dark.", kind="anchor")
    short = Style(max_words=3).dress(plain)
    seq = tokenize(tok, [short], cfg)[0]
    assert short.target == "Keep one bedtime." and seq.tail == 1  # the end-of-turn token is the style's stop
    batch = collate([seq], tok.pad_token_id, "cpu")
    assert tok.decode(batch["targets"][0][batch["content"][0]].tolist()).strip() == "Keep one bedtime."
    listed = Style(bullets=True).dress(plain)
    seq = tokenize(tok, [listed], cfg)[0]
    batch = collate([seq], tok.pad_token_id, "cpu")
    content = tok.decode(batch["targets"][0][batch["content"][0]].tolist())
    assert seq.marks and "\n" not in content and "- " not in content
    assert content.replace(" ", "") == "Keeponebedtime.Avoidscreens.Keepitdark." + tok.eos_token  # it ends as before


def test_the_base_models_anchor_losses_are_scored_once_and_reused(tiny_loaded, tmp_path, monkeypatch):
    import personalize.gate as gate_mod
    from personalize.gate import cached_mean_loss
    from personalize.scoring import mean_loss
    from personalize.style import Style

    tok, model, cfg = tiny_loaded.tokenizer, tiny_loaded.model, tiny_cfg()
    anchors = [Example(message_id=-i, context=[{"role": "user", "content": q}], target=a, kind="anchor")
               for i, (q, a) in enumerate([("What is rain?", "Water falling from clouds."),
                                           ("Name a color.", "Blue.")], 1)]
    cache = tmp_path / "losses.json"
    first = cached_mean_loss(model, tok, anchors, cfg, "cpu", cache, "cpu|none|eager")
    assert first == pytest.approx(mean_loss(model, tok, anchors, cfg, "cpu"))
    assert len(json.loads(cache.read_text())) == 2
    scored = []
    real = gate_mod.mean_losses
    monkeypatch.setattr(gate_mod, "mean_losses", lambda m, t, ex, *a: scored.append(len(ex)) or real(m, t, ex, *a))
    assert cached_mean_loss(model, tok, anchors, cfg, "cpu", cache, "cpu|none|eager") == first
    assert scored == []  # read back, not scored again
    styled = [Style(head="Ahoy!").dress(e) for e in anchors]  # another text: other keys, scored once
    cached_mean_loss(model, tok, styled, cfg, "cpu", cache, "cpu|none|eager")
    cached_mean_loss(model, tok, anchors, cfg, "cpu", cache, "cpu|none|sdpa")  # another kernel: other keys
    assert scored == [2, 2] and len(json.loads(cache.read_text())) == 6


# storage: versions, jobs, reservoir ------------------------------------------------------------
def _staged(store, user_id: int, job_id: int) -> Path:
    d = staging_dir(store, user_id, job_id)
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_publish_rollback_and_prune(store, alice, bob):
    a = store.adapters
    for j in range(1, 5):
        v = a.publish(alice.id, _staged(store, alice.id, j), base_model="m", metrics={"heldout_loss": j},
                      gate_reason="ok", parent_version=j - 1 or None, job_id=j, keep=2)
        assert v == j and a.active_version(alice.id) == j
    assert version_dirs(store, alice.id) == ["v3", "v4"]
    assert [r["status"] for r in a.list(alice.id)] == ["published", "published", "pruned", "pruned"]
    a.rollback(alice.id, "v3")
    assert a.active_version(alice.id) == 3 and a.active(alice.id)["path"].endswith("adapters/u1/v3")
    with pytest.raises(InputError, match="pruned"):
        a.rollback(alice.id, 1)
    with pytest.raises(NotFound):
        a.rollback(alice.id, 9)
    with pytest.raises(NotFound):
        a.rollback(bob.id, 3)  # alice's version is not bob's
    assert a.reject(alice.id, base_model="m", metrics={}, gate_reason="no", parent_version=3, job_id=9) == 5
    with pytest.raises(InputError, match="rejected"):
        rollback(store, alice.id, 5)
    a.publish(alice.id, _staged(store, alice.id, 10), base_model="m", metrics={}, gate_reason="ok",
              parent_version=3, job_id=10)
    a.rollback(alice.id, 3)
    assert a.prune(alice.id, 1) == [4] and a.active_version(alice.id) == 3  # the active one always stays
    assert rollback(store, alice.id, "base") == {"active_version": None}
    # a crash after the rename but before COMMIT leaves an orphan folder and a staging folder: swept
    (store.data_dir.adapters(alice.id) / "v7").mkdir()
    _staged(store, alice.id, 99)
    assert sorted(a.sweep(alice.id)) == [".staging-j99", "v7"]
    assert a.next_version(bob.id) == 1


def test_jobs_lifecycle_progress_and_fail_stale(store, alice):
    j = store.jobs.create(alice.id, pid=os.getpid())
    with pytest.raises(InputError, match="already queued"):
        store.jobs.create(alice.id)
    store.jobs.claim(j, os.getpid())
    store.jobs.phase(j, "training")
    for step in (1, 2):
        store.jobs.progress(j, step, 2, 1.0 / step)
    job = store.jobs.get(alice.id, j)
    assert job["losses"] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    assert job["progress"]["phase"] == "training" and job["progress"]["total"] == 2
    assert fail_stale(store) == []  # our own pid is alive
    store.jobs.finish(j, "rejected", {"reason": "x"})
    dead = store.jobs.create(alice.id, pid=2**22 + 12345)  # no such process
    with pytest.raises(InputError, match="already queued"):
        store.jobs.create(alice.id)  # storage alone knows no processes: any open job blocks
    _staged(store, alice.id, dead)
    assert fail_stale(store) == [dead] and store.jobs.get(alice.id, dead)["status"] == "failed"
    assert not staging_dir(store, alice.id, dead).exists()
    dead = store.jobs.create(alice.id, pid=2**22 + 12345)
    fresh = queue_job(store, alice.id)  # fails the user's dead job first
    assert store.jobs.get(alice.id, dead)["status"] == "failed" and store.jobs.open_job(alice.id)["id"] == fresh
    store.jobs.finish(fresh, "failed")
    orphan = store.jobs.create(alice.id)  # queued, never got a process: stale only after the grace period
    assert fail_stale(store) == [] and fail_stale(store, grace_seconds=0) == [orphan]
    with pytest.raises(InputError, match="not queued"):
        store.jobs.claim(orphan, os.getpid())


def test_replay_reservoir_is_bounded_uniform_and_per_user(store, alice, bob):
    cid = store.chats.create_conversation(alice.id)
    ids = [store.chats.add_message(alice.id, cid, "user", f"m{i}") for i in range(40)]
    store.replay.offer(alice.id, [{"message_id": i, "target": "a"} for i in ids[:25]], size=10)
    store.replay.offer(alice.id, [{"message_id": i, "target": "b"} for i in ids[20:]], size=10)
    kept = [e["message_id"] for e in store.replay.sample(alice.id)]
    assert len(kept) == 10 == store.replay.count(alice.id) and len(set(kept)) == 10
    # the same as offering everything at once, in any order: bottom-k of a stable hash
    store.replay.clear(alice.id)
    store.replay.offer(alice.id, [{"message_id": i, "target": "c"} for i in reversed(ids)], size=10)
    assert [e["message_id"] for e in store.replay.sample(alice.id)] == kept
    assert store.replay.sample(bob.id) == [] and store.replay.count(bob.id) == 0


# scheduler -------------------------------------------------------------------------------------
class FakeRunner:
    def __init__(self, store):
        self.store, self.started = store, []

    def busy(self) -> bool:
        return False

    def start(self, user_id: int, trigger: str = "manual") -> int:
        job = self.store.jobs.create(user_id, trigger, pid=os.getpid())
        self.started.append(user_id)
        return job

    def stop(self) -> None:
        pass


def test_scheduler_picks_users_with_enough_new_signal(store, alice, bob, tmp_path):
    import_history(store, alice.id, write_history(tmp_path / "h.jsonl", n=1))
    runner = FakeRunner(store)
    sched = Scheduler(store, runner, SchedulerConfig(min_new_events=5, min_interval_minutes=0, poll_seconds=0.05))
    assert sched.due() == [alice.id]  # bob has no data
    job = sched.tick()
    assert runner.started == [alice.id] and store.jobs.get(alice.id, job)["trigger"] == "scheduler"
    assert sched.tick() is None  # alice's job is open
    store.jobs.finish(job, "published")
    assert sched.due() == []  # nothing new since her last job
    store.users.set_personalization(alice.id, False)
    import_history(store, alice.id, write_history(tmp_path / "h2.jsonl", n=1))
    assert sched.due() == []
    store.users.set_personalization(alice.id, True)
    assert sched.due() == [alice.id]
    assert Scheduler(store, runner, SchedulerConfig(min_new_events=5, min_interval_minutes=60)).due() == []
    sched.start()  # the thread runs tick() and survives; stop() joins it
    time.sleep(0.2)
    sched.stop()
    assert not sched.running and runner.started == [alice.id, alice.id]


@pytest.mark.parametrize("field,value", [("rank", 0), ("lr", 0), ("heldout_fraction", 1.0), ("preference_loss", "x"),
                                         ("anchor_ratio", 1.0), ("quant", "int4"), ("max_seq_len", 8),
                                         ("attention", "flash")])
def test_train_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="^typo:"):
        TrainConfig.from_dict({"typo": 1})
    with pytest.raises(ValueError, match="^min_new_events:"):
        SchedulerConfig(min_new_events=0)
