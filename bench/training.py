"""Training throughput on this machine with the real embedded SmolLM2-135M: tokens/s and wall time
of one personalization job (``personalize.api.train_now``) on 100 and 500 synthetic personal
answers, against the same token sequences trained by a plain TRL ``SFTTrainer`` + peft LoRA run
with the same LoRA, optimizer, schedule, batch, sequence length, step count and precision.

Data: synthetic personal Q/A conversations (two answers each, every 7th answer liked), generated
deterministically and imported with ``storage.transfer.import_history``. The general anchor set is
generated once per run into the bench data dir with the base model's losses on the gate's anchor slice (both
one-time costs per machine, reported on their own) and then served from the cache, as after a machine's first job.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

SIZES = (100, 500)
QUICK_SIZE = 20
TRL_MAX_STEPS = 100
"""The TRL anchor runs the job's first steps' worth of the same data at most (a rate needs no more)."""

_NAMES = ["Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kaia", "Luca",
          "Mira", "Noor", "Oskar", "Priya", "Quentin", "Rosa", "Soren", "Tala"]
_CITIES = ["Lyon", "Porto", "Graz", "Tartu", "Bergen", "Ghent", "Malmo", "Split", "Cork", "Turku", "Bilbao", "Brno"]
_PETS = ["a beagle", "a tabby cat", "two budgies", "a corgi", "a rabbit", "a greyhound", "a parrot", "a tortoise"]
_JOBS = ["a night-shift nurse", "a bus driver", "a primary school teacher", "a baker", "a civil engineer",
         "a pharmacist", "a carpenter", "a data analyst", "a florist", "an electrician"]
_HOBBIES = ["the cello", "bouldering", "sourdough baking", "chess", "birdwatching", "watercolour painting",
            "trail running", "knitting", "astronomy", "salsa dancing"]
_FOODS = ["jasmine tea", "lentil soup", "mango lassi", "rye bread", "pho", "paella", "dark chocolate", "kimchi"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _templates(r: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs about one invented person's life, answers of varied length."""
    pet_name, friend, sister = r.choice(_NAMES), r.choice(_NAMES), r.choice(_NAMES)
    city, pet, job, hobby, food = r.choice(_CITIES), r.choice(_PETS), r.choice(_JOBS), r.choice(_HOBBIES), \
        r.choice(_FOODS)
    day, hour = r.choice(_DAYS), r.randint(6, 21)
    return [
        ("What is my pet's name again?", f"Your pet is {pet_name}, {pet}."),
        ("Where do I live?", f"You live in {city}. You mentioned you like walking along the river there."),
        ("What do I do for a living?", f"You work as {job}. Your shifts change every few weeks."),
        ("What's my favourite hobby?", f"You love {hobby}; you said it is what helps you relax after work."),
        ("What should I have for a snack?", f"How about some {food}? You told me it is your favourite."),
        ("When is my weekly call with my sister?",
         f"Your call with your sister {sister} is every {day} at {hour}:00. Would you like a reminder?"),
        ("Who is my best friend?", f"Your best friend is {friend}; you two met at university."),
        ("Can you suggest a weekend plan for me?",
         f"Since you live in {city} and enjoy {hobby}, you could spend Saturday morning on {hobby}, have "
         f"{food} for lunch, and call {friend} in the evening. On Sunday, rest before your week as {job}."),
        ("Help me write a short note to my friend.",
         f"Hi {friend}, it has been a while! I would love to catch up soon, maybe over {food} here in {city}. "
         "Let me know when you are free."),
        ("Remind me what I told you about my pet.", f"{pet_name} is {pet}, and you said {pet_name} hates the rain."),
    ]


def synthetic_history(n_answers: int, seed: int = 0) -> list[dict]:
    """Conversations in the import format with ``n_answers`` assistant answers in all (two per conversation)."""
    r = random.Random(seed)
    conversations, count = [], 0
    while count < n_answers:
        pairs = _templates(r)
        r.shuffle(pairs)
        for i in range(0, len(pairs) - 1, 2):
            msgs = []
            for q, a in pairs[i:i + 2]:
                if count >= n_answers:
                    break
                count += 1
                answer = {"role": "assistant", "content": a}
                if count % 7 == 0:
                    answer["feedback"] = "like"
                msgs += [{"role": "user", "content": q}, answer]
            if msgs:
                conversations.append({"messages": msgs})
            if count >= n_answers:
                break
    return conversations


def _data_dir(prefix: str):
    """A fresh data dir whose models/ is the bench's converted model cache."""
    from bench.common import models_dir
    from storage import DataDir

    data = DataDir(Path(tempfile.mkdtemp(prefix=prefix))).ensure()
    (data.root / "models").rmdir()
    (data.root / "models").symlink_to(models_dir() / "models")
    return data


def _train_config(quick: bool):
    from personalize.config import TrainConfig

    if quick:  # a smoke run: a couple of steps, a tiny anchor set
        return TrainConfig(max_steps=2, epochs=1, max_seq_len=128, anchor_count=8, anchor_max_new_tokens=8,
                           device="cpu")
    return TrainConfig(device="cpu")  # the defaults a user's job runs with, on this CPU


def _job_examples(store, user_id: int, loaded, cfg):
    """The examples a first job for the user trains on (same code path and seed as the job itself)."""
    from personalize import replay
    from personalize.dataset import build_examples

    data = build_examples(store, user_id, cfg)
    anchors = replay.anchor_set(loaded.model, loaded.tokenizer, loaded.path, store.data_dir, cfg)
    anchor_train, _ = replay.split_anchors(anchors, cfg)
    anchor_train, _ = replay.split_monitor(anchor_train, cfg)  # as the job: monitor anchors are not trained on
    examples, _ = replay.compose(data, None, [], anchor_train, cfg)
    return examples


def _warm_loss_cache(loaded, data, cfg, anchors: list[dict]) -> None:
    """Score the base model on the gate's anchor slice into the cache a job reads (personalize.gate)."""
    from personalize import gate, replay
    from personalize.train import attention, resolve

    device, quant, _ = resolve(cfg)
    loaded.model.set_attn_implementation(attention(cfg, device))
    _, anchor_eval = replay.split_anchors(anchors, cfg)
    gate.cached_mean_loss(loaded.model, loaded.tokenizer, anchor_eval, cfg, device,
                          replay.loss_cache(data, loaded.path, cfg), f"{device}|{quant}|{attention(cfg, device)}")


def _trl_run(model_path: Path, tokenizer, examples, cfg, steps: int, bf16: bool, out_dir: Path) -> dict:
    """The same token sequences through TRL's SFTTrainer + peft LoRA, for ``steps`` optimizer steps."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from personalize.scoring import tokenize

    seqs = tokenize(tokenizer, [e for e in examples if e.kind in ("sft", "anchor")], cfg)
    dataset = Dataset.from_list([{"input_ids": s.ids, "completion_mask": [0] * (len(s.ids) - s.n_answer) +
                                  [1] * s.n_answer} for s in seqs])
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             target_modules=cfg.peft_targets(), task_type="CAUSAL_LM", bias="none"))
    args = SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
        learning_rate=cfg.lr, lr_scheduler_type="linear", warmup_steps=max(1, steps // 10), weight_decay=0.0,
        max_grad_norm=1.0, max_steps=steps, num_train_epochs=cfg.epochs, bf16=bf16, use_cpu=True,
        gradient_checkpointing=False, max_length=cfg.max_seq_len, completion_only_loss=True, packing=False,
        padding_free=False, seed=cfg.seed, report_to="none", save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    clock: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

    counted = {"tokens": 0}

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counted["tokens"] += int(inputs["attention_mask"].sum())  # non-pad tokens, as our loop counts them
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = CountingTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[Clock()])
    output = trainer.train()
    seconds = clock["end"] - clock["start"]
    return {"steps": trainer.state.global_step, "tokens": counted["tokens"], "seconds": round(seconds, 2),
            "tokens_per_s": round(counted["tokens"] / seconds, 1), "final_loss": output.training_loss,
            "sequences": len(seqs)}


def run(quick: bool = False) -> dict:
    from assistant.model import ModelConfig, load_model
    from personalize import replay
    from personalize.api import train_now
    from personalize.train import resolve
    from storage import Store
    from storage.transfer import import_history

    cfg = _train_config(quick)
    model_cfg = ModelConfig(model="embedded", quant="none", device="cpu")
    data = _data_dir("attune-train-bench-")
    store = Store(data)
    device, quant, bf16 = resolve(cfg, model_cfg)
    out: dict = {"config": {k: getattr(cfg, k) for k in (
        "rank", "alpha", "dropout", "target_modules", "lr", "epochs", "max_steps", "batch_size", "max_seq_len",
        "heldout_fraction", "anchor_ratio", "anchor_count", "anchor_max_new_tokens", "preference_loss")},
        "device": device, "quant": quant, "bf16": bf16, "runs": []}

    # The general anchor set, once (a base model answers the shipped prompts; cached per base model).
    loaded = load_model(ModelConfig(model="embedded", quant="none", device="cpu", dtype="float32"), data)
    started = time.perf_counter()
    anchors = replay.anchor_set(loaded.model, loaded.tokenizer, loaded.path, data, cfg)
    out["anchor_set"] = {"prompts": len(anchors), "seconds": round(time.perf_counter() - started, 2),
                         "max_new_tokens": cfg.anchor_max_new_tokens}
    started = time.perf_counter()
    _warm_loss_cache(loaded, data, cfg, anchors)
    out["anchor_set"]["loss_seconds"] = round(time.perf_counter() - started, 2)

    sizes = [int(x) for x in os.environ.get("ATTUNE_BENCH_SIZES", "").split(",") if x] or SIZES
    for n in (QUICK_SIZE,) if quick else sizes:
        user = store.users.create(f"bench{n}", "correct horse")
        path = Path(data.root) / f"history-{n}.jsonl"
        path.write_text("\n".join(json.dumps(c) for c in synthetic_history(n, seed=n)), encoding="utf-8")
        import_history(store, user.id, path)
        started = time.perf_counter()
        result = train_now(store, user.id, model_cfg, cfg)
        wall = time.perf_counter() - started
        m = result["metrics"]
        ours = dict(m["train"])
        examples = _job_examples(store, user.id, loaded, cfg)
        trl = _trl_run(loaded.path, loaded.tokenizer, examples, cfg, min(ours["steps"], TRL_MAX_STEPS), bf16,
                       Path(data.root) / f"trl-{n}")
        out["runs"].append({
            "answers": n, "examples": m["examples"], "published": result["published"], "ours": ours, "trl": trl,
            "wall_s": round(wall, 2), "timings": m.get("timings"),
            "heldout_loss": [m["heldout_loss_before"], m["heldout_loss"]],
            "anchor_loss": [m["anchor_loss_base"], m["anchor_loss"]],
            "ratio": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3) if trl["tokens_per_s"] else None,
        })
    store.close()
    if (data.root / "models").is_symlink():
        (data.root / "models").unlink()  # the link only, never the converted model it points to
    shutil.rmtree(data.root, ignore_errors=True)
    return out


def render(r: dict) -> str:
    from bench.report import table

    c = r["config"]
    prec = "bf16 autocast" if r["bf16"] else "fp32"
    weights = "fp32" if r["quant"] == "none" else r["quant"]
    rows, walls = [], []
    once = r["anchor_set"]["seconds"] + r["anchor_set"].get("loss_seconds", 0)
    for x in r["runs"]:
        e = x["examples"]
        trained = e.get("train_sft", 0) + e.get("train_pair", 0) + e.get("train_undesirable", 0)
        rows.append([x["answers"], f"{trained} + {e.get('anchors', 0)} anchors", x["ours"]["steps"],
                     x["ours"]["tokens"], x["ours"]["tokens_per_s"], x["trl"]["steps"], x["trl"]["tokens"],
                     x["trl"]["tokens_per_s"],
                     f"{x['ratio']:.2f}×" if x["ratio"] else None])
        t = x.get("timings") or {}
        walls.append([x["answers"], x["ours"]["seconds"] / 60, x["wall_s"] / 60,
                      (x["wall_s"] + once) / 60, t.get("load_s"), t.get("eval_before_s"),
                      t.get("eval_after_s"), f"{x['heldout_loss'][0]:.3f} → {x['heldout_loss'][1]:.3f}",
                      "yes" if x["published"] else "no"])
    a = r["anchor_set"]
    return "\n".join([
        f"One personalization job (`personalize.api.train_now`, in process) on the embedded SmolLM2-135M-Instruct, "
        f"{r['device']}, {weights} base weights, {prec}; LoRA r={c['rank']} α={c['alpha']} on "
        f"{c['target_modules']}, "
        f"lr {c['lr']}, batch {c['batch_size']}, {c['epochs']} epochs capped at {c['max_steps']} steps, max_seq_len "
        f"{c['max_seq_len']}, anchor_ratio {c['anchor_ratio']}, {c['heldout_fraction']:.0%} of answers held out for "
        "the gate. Data: synthetic personal Q/A conversations (2 answers each, every 7th liked), imported for a "
        "fresh user. Tokens are the non-padding tokens fed through the model per step (prompt + answer).", "",
        "Anchor: the same token sequences (the job's user examples + anchors, same truncation) through a plain TRL "
        "`SFTTrainer` + peft LoRA with the same rank/alpha/dropout/targets, AdamW lr, linear warmup 10% + decay, "
        "batch, grad clip 1.0 and precision, completion-only loss, no gradient checkpointing, for the job's step "
        f"count or {TRL_MAX_STEPS} steps, whichever is fewer.", "",
        table(["answers", "trained on", "steps", "ours tokens", "ours tok/s", "TRL steps", "TRL tokens", "TRL tok/s",
               "ours / TRL"], rows), "",
        table(["answers", "training min", "job wall min (anchors cached)", "first job wall min (+ anchor set)",
               "load s", "gate before s", "gate after s", "held-out loss", "published"], walls), "",
        f"General anchor set, generated once per base model and cached: {a['prompts']} prompts × up to "
        f"{a['max_new_tokens']} greedy tokens in {a['seconds']:.0f} s (fp32, batches of 16)"
        + (f"; the base model's losses on the gate's anchor slice, scored once and cached, in "
           f"{a['loss_seconds']:.0f} s." if "loss_seconds" in a else "."),
    ])
