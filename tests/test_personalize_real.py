"""personalize/ on the real embedded SmolLM2-135M (CPU): one job on a user's personal facts must
lower that user's held-out loss while the general anchor loss stays within the margin, with the
default gate; facts stated in passing become question/answer examples and their acknowledgments
are not learned."""

from __future__ import annotations

import json
import time

import pytest

from assistant.model import ModelConfig
from conftest import seed_models
from personalize.api import train_now
from personalize.config import TrainConfig
from storage import Store
from storage.transfer import import_history

FACTS = {
    "Your dog is Biscuit, a beagle.": ["What is my dog's name?", "Remind me what my dog is called.",
                                       "What kind of dog do I have?"],
    "You live in Lyon, in France.": ["Where do I live?", "Which city am I from?", "What city is home for me?"],
    "You work as a night-shift nurse.": ["What is my job?", "What do I do for work?", "Remind me of my work."],
    "You like jasmine tea best.": ["What is my favourite tea?", "Which tea should you offer me?",
                                   "What drink do I enjoy most?"],
    "Your sister is called Clara.": ["What is my sister's name?", "Who is my sister?", "Remind me of my sister."],
    "You play the cello.": ["Which instrument do I play?", "What music do I make?", "What is my instrument?"],
    "You are allergic to peanuts.": ["What am I allergic to?", "Which food must I avoid?",
                                     "Do I have a food allergy?"],
}
FACT_HISTORY = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                for a, qs in FACTS.items() for q in qs]
IN_PASSING = [("By the way, my cat is called Marmalade.", "Noted!"), ("I drive a Saab.", "Got it, you drive a Saab."),
              ("My favourite board game is Azul.", "Noted: Azul is your favourite board game.")]
FACT_HISTORY += [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in IN_PASSING]


def real_cfg(**kw) -> TrainConfig:
    """Sized for a 2-core CPU: short sequences, a small anchor set, a few epochs."""
    base = dict(max_seq_len=96, epochs=4, batch_size=4, anchor_count=32, anchor_max_new_tokens=32,
                anchor_eval_fraction=0.25)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_one_job_learns_the_users_facts_without_forgetting(tmp_path, embedded_models_dir):
    seed_models(tmp_path / "data", embedded_models_dir)
    store = Store(tmp_path / "data")
    user = store.users.create("alice", "correct horse")
    (tmp_path / "h.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in FACT_HISTORY))
    import_history(store, user.id, tmp_path / "h.jsonl")
    cfg = real_cfg()
    started = time.perf_counter()
    result = train_now(store, "alice", ModelConfig(model="embedded"), cfg)
    wall = time.perf_counter() - started
    m = result["metrics"]
    print(f"\nreal-model job: {wall:.1f} s wall, training {m['train']['tokens']} tokens in {m['train']['seconds']} s "
          f"({m['train']['tokens_per_s']} tok/s), held-out {m['heldout_loss_before']:.3f} -> {m['heldout_loss']:.3f},"
          f" anchor {m['anchor_loss_base']:.3f} -> {m['anchor_loss']:.3f}; timings {m['timings']}")
    assert m["heldout_examples"] >= 2 and m["anchor_eval_examples"] >= 4
    assert m["heldout_loss"] < m["heldout_loss_before"] - 0.3  # the user's facts were learned
    assert m["anchor_rise"] <= cfg.anchor_margin  # general answers kept
    assert m["examples"]["dropped_filler"] == len(IN_PASSING) and m["examples"]["facts"] == len(IN_PASSING)
    assert m["examples"]["train_fact"] + m["examples"]["heldout_fact"] >= 2 * len(IN_PASSING)
    assert m["selection"]["within_margin"] and m["selection"]["checks"]
    assert result["published"] and result["version"] == 1, result["reason"]
    assert store.adapters.active(user.id)["path"].endswith("v1")
