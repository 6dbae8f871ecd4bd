"""Memory quality on the embedded SmolLM2-135M: does personal memory help, and never hurt?

Synthetic users (facts and paraphrased probes from ``bench.quality.SLOTS``) of two kinds: facts told and
then asked about (``quality_users.told_then_asked``: likes, corrections, a dislike), and facts told *in passing*
inside chatty messages that get a short acknowledgment, mixed with unrated general questions (how people
talk). Their histories are imported and turned into memory by ``MemoryService.backfill`` with defaults
(the default embedder). These users' probes are the ones earlier defaults were calibrated on (in-sample);
the out-of-sample numbers are ``bench/memory_passing.py``'s test users. Then:

- calibration (embeddings only): for thresholds around the default (the embedder's gate: min_score, or the
  margin over the question's baseline), recall of the probe's own fact among
  the retrieved memories, precision of what is retrieved, and the share of general questions (the 20
  general-QA questions + 60 everyday anchor prompts) that would get any memory injected;
- memory-only recall of the probes through ChatService (adapter off, memory on, greedy, keyword match),
  general QA with memory on vs off, the share of general questions with a memory block, the precision of
  injected memories, leakage (another user's keyword in an answer, another user's memory retrieved);
- how the block is shown: the probe's fact plus two unrelated facts of the same user handed in (no
  retrieval), in several phrasings/placements, recall of each (chooses ``memory_text.facts_block``).
"""

from __future__ import annotations

import dataclasses
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
"""min_score values tried for an embedder whose gate is the cosine itself (MiniLM)."""
MARGINS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.06)
"""Margins over the question's baseline tried for an embedder gated by them (e5; questions about the user)."""
FORMATS = ("facts_second_person", "facts_first_person", "turn_dump", "in_user_message")
N_ANCHOR_GENERAL = 60


def _general_questions() -> list[str]:
    from bench.quality_users import GENERAL_QA

    lines = [ln.strip() for ln in (Path(__file__).resolve().parent.parent / "personalize" / "anchor_prompts.txt")
             .read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    return [q for q, _ in GENERAL_QA] + random.Random(0).sample(lines, N_ANCHOR_GENERAL)


def _calibrate(memory, store, users: list[int], facts: dict, general: list[str]) -> dict:
    """Per threshold (the embedder's gate: min_score, or the margin over the question's baseline): probe recall
    (own fact retrieved), precision, share of general questions with a memory."""
    from assistant.memory.service import MemoryService

    rows = []
    knob = "personal_margin" if memory.relevance.personal_margin >= 0 else "min_score"
    for threshold in MARGINS if knob == "personal_margin" else THRESHOLDS:
        svc = MemoryService(store, dataclasses.replace(memory.config, **{knob: threshold}), memory.embedder)
        found = relevant = retrieved = 0
        for uid in users:
            for f in facts[uid]:
                hits = svc.retrieve(uid, f["probe"])
                good = [h for h in hits if f["keyword"].lower() in h.text.lower()]
                found += bool(good)
                relevant += len(good)
                retrieved += len(hits)
        injected = sum(bool(svc.retrieve(uid, q)) for uid in users for q in general)
        probes = sum(len(facts[u]) for u in users)
        rows.append({"min_score": threshold, "knob": knob, "probe_recall": found / probes,
                     "precision": relevant / retrieved if retrieved else None,
                     "general_injected": injected / (len(users) * len(general))})
    return {"rows": rows, "default": getattr(memory.relevance, knob), "knob": knob, "k": memory.config.k,
            "relative_margin": memory.relevance.relative_margin}


def _format_prompt(fmt: str, fact: str, distractors: list[str], probe: str) -> list[dict]:
    from assistant.chat.service import DEFAULT_SYSTEM_PROMPT
    from assistant.memory.text import facts_block, second_person, with_facts

    items = [fact, *distractors]
    random.Random(probe).shuffle(items)
    if fmt == "facts_second_person":
        block = facts_block([second_person(x) for x in items])
    elif fmt == "facts_first_person":
        block = "What the user said about themselves earlier:\n" + "\n".join(f'- "{x}"' for x in items)
    elif fmt == "turn_dump":
        block = "<memories>\nNotes from this user's earlier conversations with you.\n" + "\n".join(
            f"- User: {x}\n  Assistant: Noted!" for x in items) + "\n</memories>"
    else:  # what serving does (the default)
        return with_facts([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": probe}],
                          facts_block([second_person(x) for x in items]))
    return [{"role": "system", "content": f"{DEFAULT_SYSTEM_PROMPT}\n\n{block}"}, {"role": "user", "content": probe}]


def _formats(backend, tokenizer, users: list[int], facts: dict, tokens: int) -> dict:
    """Recall per block format with the right statement and two unrelated ones handed in."""
    import threading

    from assistant.engines.base import GenerationSettings, StreamStats
    from bench.quality import BATCH, _hits
    from bench.quality_users import SLOTS

    settings = GenerationSettings(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)
    out = {}
    for fmt in FORMATS:
        items = []
        for uid in users:
            own = [SLOTS[f["slot"]][0].format(v=f["value"]) for f in facts[uid]]
            for i, f in enumerate(facts[uid]):
                others = [x for j, x in enumerate(own) if j != i]
                items.append((_format_prompt(fmt, own[i], random.Random(i).sample(others, 2), f["probe"]),
                              f["keyword"]))

        def one(item):
            ids = tokenizer.apply_chat_template(item[0], add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            return "".join(backend.stream(ids, settings, threading.Event(), StreamStats()))

        with ThreadPoolExecutor(max_workers=BATCH) as pool:
            texts = list(pool.map(one, items))
        right = sum(bool(_hits(t, [k])) for t, (_, k) in zip(texts, items, strict=True))
        out[fmt] = {"correct": right, "total": len(items)}
    return out


def _setup(quick: bool):
    """A bench data dir with users imported and memory backfilled: (store, memory, users, facts, kinds)."""
    import json
    import tempfile

    from assistant.memory.service import MemoryConfig, MemoryService
    from bench.common import models_dir
    from bench.quality_users import SLOTS, USER_NAMES, in_passing, told_then_asked
    from storage import DataDir, Store
    from storage.transfer import import_history

    n_users, n_facts = (2, 6) if quick else (6, 12)
    data = DataDir(Path(tempfile.mkdtemp(prefix="attune-memq-"))).ensure()
    (data.root / "models").rmdir()  # the converted model persists between runs
    (models_dir() / "models").mkdir(parents=True, exist_ok=True)
    (data.root / "models").symlink_to(models_dir() / "models")
    store = Store(data)
    memory = MemoryService(store, MemoryConfig())
    users, facts, kinds = [], {}, {}
    for u in range(n_users):
        uid = store.users.create(USER_NAMES[u], "correct horse").id
        kinds[uid] = "told then asked" if u % 2 == 0 else "in passing"
        history = told_then_asked(u, n_facts) if u % 2 == 0 else in_passing(u, n_facts)
        path = data.root / f"history-{u}.jsonl"
        path.write_text("\n".join(json.dumps(c) for c in history), encoding="utf-8")
        import_history(store, uid, path)
        memory.backfill(uid)
        users.append(uid)
        facts[uid] = [{"slot": s, "value": SLOTS[s][5][u], "keyword": SLOTS[s][5][u], "probe": SLOTS[s][4]}
                      for s in range(n_facts)]
    return data, store, memory, users, facts, kinds


# Over 60 lines on purpose: one measurement script, its steps in run order, sharing one loaded model and users.
def run(quick: bool = False) -> dict:
    import torch

    from assistant.chat.service import ChatConfig
    from assistant.engines.base import GenerationSettings
    from assistant.engines.hf.backend import BatchConfig, TransformersBackend
    from assistant.engines.hf.registry import AdapterRegistry
    from assistant.model import ModelConfig, load_model
    from bench.quality import (
        BATCH,
        GENERAL_QA,
        PROBE_TOKENS,
        QA_TOKENS,
        _ask_all,
        _hits,
        _owned,
        _probe_engine,
        _remove,
    )
    from bench.quality_users import USER_NAMES

    started = time.perf_counter()
    data, store, memory, users, facts, kinds = _setup(quick)
    general = _general_questions()[: (6 if quick else None)]
    calibration = _calibrate(memory, store, users, facts, general)
    kinds_count = {uid: {k: sum(m.kind == k for m in memory.list(uid, limit=500))
                         for k in ("statement", "liked", "correction", "fact")} for uid in users}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(ModelConfig(model="embedded", quant="auto", device=device), data)
    backend = TransformersBackend(loaded, 2048, AdapterRegistry(loaded.model), BatchConfig(max_batch=BATCH,
                                                                                                  window_ms=50))
    engine = _probe_engine()(store, backend, ChatConfig(defaults=GenerationSettings(temperature=0.0)), memory)
    probes = [(uid, f["probe"]) for uid in users for f in facts[uid]]
    keyword = {(uid, f["probe"]): f["keyword"] for uid in users for f in facts[uid]}
    own_keywords = {uid: {f["keyword"] for f in facts[uid]} for uid in users}
    result: dict = {"users": len(users), "facts_per_user": len(facts[users[0]]), "calibration": calibration,
                    "kinds": {USER_NAMES[users.index(u)]: kinds[u] for u in users},
                    "memories": {USER_NAMES[users.index(u)]: c for u, c in kinds_count.items()}}
    recall, leaks, foreign = {}, 0, 0
    for cond, use_memory in (("off", False), ("on", True)):
        turns = _ask_all(engine, probes, False, use_memory, PROBE_TOKENS)
        per_kind: dict[str, list[int]] = {}
        for (uid, q), turn in zip(probes, turns, strict=True):
            c = per_kind.setdefault(kinds[uid], [0, 0])
            c[0] += bool(_hits(turn.text, [keyword[(uid, q)]]))
            c[1] += 1
            others = [k for v in users if v != uid for k in own_keywords[v] if k not in own_keywords[uid]]
            leaks += len(_hits(turn.text, others)) if use_memory else 0
            foreign += _owned(store, uid, turn.memory_ids)
        recall[cond] = {"correct": sum(c for c, _ in per_kind.values()), "total": len(probes), "per_kind": per_kind}
    qa = GENERAL_QA[: (4 if quick else None)]
    qa_items = [(uid, q) for uid in users for q, _ in qa]
    qa_keys = [kws for _ in users for _, kws in qa]
    general_qa = {}
    for cond, use_memory in (("off", False), ("on", True)):
        turns = _ask_all(engine, qa_items, False, use_memory, QA_TOKENS)
        general_qa[cond] = {"correct": sum(bool(_hits(t.text, k)) for t, k in zip(turns, qa_keys, strict=True)),
                            "total": len(turns), "injected": sum(bool(t.memory_ids) for t in turns)}
        foreign += sum(_owned(store, uid, t.memory_ids) for (uid, _), t in zip(qa_items, turns, strict=True))
    injected = [(uid, q, memory.retrieve(uid, q)) for uid in users for q in general]
    probe_hits = [(uid, q, memory.retrieve(uid, q)) for uid, q in probes]
    relevant = sum(keyword[(uid, q)].lower() in h.text.lower() for uid, q, hs in probe_hits for h in hs)
    result.update({
        "recall": recall, "general_qa": general_qa, "leakage": leaks, "foreign_memories": foreign,
        "general_injected": {"with_memory": sum(bool(h) for *_, h in injected), "total": len(injected)},
        "precision": {"relevant": relevant, "retrieved": sum(len(hs) for *_, hs in probe_hits)},
        "formats": _formats(backend, loaded.tokenizer, users, facts, PROBE_TOKENS),
        "config": {"k": memory.config.k, "min_score": memory.relevance.min_score,
                   "relative_margin": memory.relevance.relative_margin, "dedupe_overlap": memory.config.dedupe_overlap,
                   "embedder": memory.embedder.name},
        "seconds": round(time.perf_counter() - started, 1), "device": device, "dtype": loaded.dtype,
    })
    backend.close()
    store.close()
    _remove(data.root)
    return result


def render(r: dict) -> str:
    from bench.report import table

    def pct(c: dict) -> str:
        return f"{c['correct']}/{c['total']} ({100 * c['correct'] / max(c['total'], 1):.0f}%)"

    cal = [[row["min_score"], f"{100 * row['probe_recall']:.0f}%",
            "-" if row["precision"] is None else f"{100 * row['precision']:.0f}%",
            f"{100 * row['general_injected']:.1f}%"] for row in r["calibration"]["rows"]]
    kinds = sorted({k for k in r["kinds"].values()})
    rec = [[f"memory {cond}", pct(r["recall"][cond])] + [pct({"correct": r["recall"][cond]["per_kind"][k][0],
                                                             "total": r["recall"][cond]["per_kind"][k][1]})
                                                        for k in kinds] for cond in ("off", "on")]
    gi, pr = r["general_injected"], r["precision"]
    fmt_names = {"facts_second_person": "facts list, second person, in the system prompt",
                 "facts_first_person": "the user's own words quoted, in the system prompt",
                 "turn_dump": "old `<memories>` block of User/Assistant turns",
                 "in_user_message": "facts list, second person, before the question in the user message (default)"}
    fmts = [[fmt_names[f], pct(c)] for f, c in r["formats"].items()]
    cfg = r["config"]
    mem = "; ".join(f"{u}: {c['statement']} statements, {c['liked']} liked, {c['correction']} corrections"
                    for u, c in r["memories"].items())
    return "\n".join([
        f"{r['users']} synthetic users × {r['facts_per_user']} facts (`bench/memory_quality.py`), half told then "
        "asked about (likes, corrections, a dislike), half told *in passing* in chatty messages answered with a "
        "short acknowledgment, between unrated general questions. Histories imported, memory built by "
        f"`MemoryService.backfill` with defaults (k={cfg['k']}, min_score={cfg['min_score']}, relative_margin="
        f"{cfg['relative_margin']}, dedupe overlap {cfg['dedupe_overlap']}, {cfg['embedder']}). Served by "
        "ChatService with "
        f"the adapter off ({r['dtype']}, {r['device']}, greedy, keyword match).", "",
        f"What memory kept: {mem}.", "",
        table(["condition", "paraphrased probe recall", *kinds], rec), "",
        table(["general QA (20 questions × users)", "right", "answers with a memory block"],
              [[f"memory {c}", pct(r["general_qa"][c]), r["general_qa"][c]["injected"]] for c in ("off", "on")]), "",
        f"General questions (20 QA + {N_ANCHOR_GENERAL} everyday prompts, × every user) with any memory injected: "
        f"**{gi['with_memory']}/{gi['total']} ({100 * gi['with_memory'] / max(gi['total'], 1):.1f}%)**. "
        f"Precision of memories retrieved for the probes: {pr['relevant']}/{pr['retrieved']} relevant. "
        f"Leakage: **{r['leakage']}** keywords of another user in memory-on answers, **{r['foreign_memories']}** "
        "memories of another user retrieved.", "",
        f"Threshold calibration (embeddings only, same users; `{r['calibration'].get('knob', 'min_score')}`, the "
        f"default is {r['calibration']['default']}):", "",
        table([r["calibration"].get("knob", "min_score"), "probe's fact retrieved", "precision",
               "general questions with a memory"], cal), "",
        "How the block is shown (the probe's own statement plus two unrelated statements of the same user handed "
        "in, no retrieval):", "",
        table(["format", "probe recall"], fmts), "",
        f"Time: {r['seconds'] / 60:.1f} min.",
    ])
