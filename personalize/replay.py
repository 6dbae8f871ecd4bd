"""Replay, so a user's adapter keeps what it learned and the model keeps what it knew.

(a) The per-user reservoir (:class:`storage.replay.Replay`): a uniform sample of the message ids
    already learned; each run mixes up to ``reservoir_mix`` of them back in, with their current
    content from the log (a deleted conversation is never replayed).
(b) The general anchor set: ``anchor_prompts.txt`` (shipped, diverse everyday prompts) answered
    once by the base model itself, greedy, under the training system prompt, and cached per base
    model in ``<data-dir>/replay/<model-key>.jsonl``. A hashed slice is held out for the gate's
    general loss, another (``monitor_anchors``) is watched during training to pick the checkpoint, and
    the rest is mixed into training at ``anchor_ratio`` (pseudo-rehearsal, with a KL term to the base
    model's own distributions). An ``anchor_memory_fraction`` share of the training anchors carry a
    memory block of the user's unrelated facts, as serving may show one for a general question.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.model import render_chat
from personalize.config import TrainConfig
from personalize.dataset import Example, UserData, _with_system, is_new, memory_context, with_distractors
from storage.paths import atomic_write_bytes

if TYPE_CHECKING:
    from storage.db import Store
    from storage.paths import DataDir

PROMPTS_FILE = Path(__file__).with_name("anchor_prompts.txt")
GENERATION_BATCH = 16


def load_anchor_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def model_key(model_path: Path, cfg: TrainConfig) -> str:
    """Names the cache: the model folder, its config and weight sizes, and how anchors are generated."""
    model_path = Path(model_path)
    h = hashlib.sha256()
    for p in sorted(model_path.glob("*.json")) + sorted(model_path.glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(p.read_bytes() if p.suffix == ".json" else str(p.stat().st_size).encode())
    h.update(f"{cfg.anchor_max_new_tokens}|{cfg.system_prompt}".encode())
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_path.name)[:60] or "model"
    return f"{name}-{h.hexdigest()[:10]}"


def anchor_set(model, tokenizer, model_path: Path, data_dir: DataDir, cfg: TrainConfig,
               prompts: list[str] | None = None) -> list[dict]:
    """The first ``anchor_count`` prompts with the base model's answers; only missing ones are generated.

    ``model`` must be the base model (no adapter). The cache is rewritten atomically.
    """
    prompts = (prompts if prompts is not None else load_anchor_prompts())[: cfg.anchor_count]
    if not prompts:
        return []
    path = data_dir.replay / f"{model_key(model_path, cfg)}.jsonl"
    cached: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                cached[row["prompt"]] = row
    missing = [p for p in prompts if p not in cached]
    if missing:
        answers = generate_answers(model, tokenizer, missing, cfg.system_prompt, cfg.anchor_max_new_tokens)
        for p, (answer, complete) in zip(missing, answers, strict=True):
            cached[p] = {"prompt": p, "answer": answer, "complete": complete}
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in cached.values())
        atomic_write_bytes(path, body.encode("utf-8"))
    return [cached[p] for p in prompts]


def loss_cache(data_dir: DataDir, model_path: Path, cfg: TrainConfig) -> Path:
    """Where the base model's per-anchor losses are kept (personalize.gate.cached_mean_loss), by the anchor set."""
    return data_dir.replay / f"{model_key(model_path, cfg)}.base-losses.json"


def checks_cache(data_dir: DataDir, model_path: Path, cfg: TrainConfig) -> Path:
    """Where the base model's answers to the general checks are kept (personalize.ability.base_answers)."""
    return data_dir.replay / f"{model_key(model_path, cfg)}.checks.json"


def generate_answers(model, tokenizer, prompts: list[str], system_prompt: str,
                     max_new_tokens: int, repetition_penalty: float = 1.0) -> list[tuple[str, bool]]:
    """Greedy answers, batched with left padding: (text, ended by itself before ``max_new_tokens``)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[tuple[str, bool]] = []
    try:
        for i in range(0, len(prompts), GENERATION_BATCH):
            texts = [render_chat(tokenizer, _with_system([{"role": "user", "content": p}], system_prompt))
                     for p in prompts[i:i + GENERATION_BATCH]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     repetition_penalty=repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                out.append((tokenizer.decode(row, skip_special_tokens=True).strip(), tokenizer.eos_token_id in row))
    finally:
        tokenizer.padding_side = side
    return out


def _anchor_key(prompt: str) -> float:
    return int.from_bytes(hashlib.sha256(f"anchor:{prompt}".encode()).digest()[:8], "big") / 2**64


def split_anchors(anchors: list[dict], cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) anchor examples; the eval slice is chosen by a hash of the prompt (at least one)."""
    examples = [(a, Example(message_id=-(i + 1), context=_with_system([{"role": "user", "content": a["prompt"]}],
                                                                       cfg.system_prompt),
                            target=a["answer"], kind="anchor", complete=a.get("complete", True), origin="anchor"))
                for i, a in enumerate(anchors)]
    ev = [e for a, e in examples if _anchor_key(a["prompt"]) < cfg.anchor_eval_fraction]
    if not ev and examples:
        ev = [min(examples, key=lambda ae: _anchor_key(ae[0]["prompt"]))[1]]
    ids = {id(e) for e in ev}
    return [e for _, e in examples if id(e) not in ids], ev


def split_monitor(anchor_train: list[Example], cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(train, monitor): ``monitor_anchors`` of the training anchors (by prompt hash) set aside for the
    in-training checks, apart from the gate's slice; at least half of the anchors stay for training."""
    n = min(cfg.monitor_anchors, len(anchor_train) // 2)
    ranked = sorted(anchor_train, key=lambda e: _anchor_key(e.context[-1]["content"]))
    monitor = ranked[:n]
    ids = {id(e) for e in monitor}
    return [e for e in anchor_train if id(e) not in ids], monitor


def compose(data: UserData, watermark: dict | None, reservoir: list[dict], anchors: list[Example],
            cfg: TrainConfig) -> tuple[list[Example], dict]:
    """The run's training examples: the user's new ones, replayed older ones, and anchors.

    With no watermark (first run, or a new base model) every training example is new. Returns
    the examples and counts for the metrics.
    """
    rng = random.Random(cfg.seed)
    new = [e for e in data.train if is_new(e, watermark)]
    new_ids = {e.message_id for e in new}
    by_id: dict[int, list[Example]] = {}
    for e in data.train:
        if e.message_id not in new_ids:
            by_id.setdefault(e.message_id, []).append(e)
    replayed: list[Example] = []
    for item in reservoir:  # key order: any prefix is a uniform sample
        if len({e.message_id for e in replayed}) >= cfg.reservoir_mix:
            break
        replayed.extend(by_id.pop(int(item["message_id"]), []))
    user_part = new + replayed
    n_anchor = 0
    if cfg.anchor_ratio > 0 and anchors and user_part:
        n_anchor = max(1, round(cfg.anchor_ratio / (1 - cfg.anchor_ratio) * len(user_part)))
    picked = [anchors[i % len(anchors)] for i in rng.sample(range(max(n_anchor, len(anchors))), n_anchor)] \
        if n_anchor else []
    if data.facts and cfg.anchor_memory_fraction > 0:
        picked = [_with_memory(e, data.facts, rng, cfg) if rng.random() < cfg.anchor_memory_fraction else e
                  for e in picked]
    return user_part + picked, {"new": len(new), "replayed": len(replayed), "anchors": len(picked)}


def _with_memory(anchor: Example, facts: list[str], rng: random.Random, cfg: TrainConfig) -> Example:
    """A copy of the anchor whose system prompt carries a memory block of 1-2 unrelated user facts."""
    context = memory_context(anchor.context, with_distractors(None, facts, rng), cfg.system_prompt)
    return Example(**{**anchor.to_dict(), "context": context})


def remember(store: Store, user_id: int, learned: list[Example], cfg: TrainConfig) -> int:
    """After a publish: offer the run's new examples to the user's reservoir; returns its size."""
    items: dict[int, dict] = {}
    for e in learned:
        if e.message_id > 0:  # anchors have negative ids
            item = items.setdefault(e.message_id, {"message_id": e.message_id, "kinds": [], "target": e.target})
            item["kinds"].append(e.kind)
    return store.replay.offer(user_id, list(items.values()), cfg.reservoir_size, seed=cfg.seed)
