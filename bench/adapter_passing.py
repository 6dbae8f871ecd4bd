"""Adapters on natural histories: the users of ``bench/passing_users.py`` (facts said once inside requests, real
replies, one fact updated later, one correction; English and Chinese; dev users tune, test users report).

Each user gets one training job with the default ``TrainConfig`` and gate (a rejected candidate is not served).
Then through ChatService + TransformersBackend + MemoryService (defaults), greedy, ``TOKENS`` new tokens,
under base / memory only / adapter only / adapter + memory:

- recall of each fact probe (a keyword in the answer; an updated fact: the new value and not the old);
- the question the user corrected, asked again in other words: the correction's keyword in the answer;
- never-told questions (things the user never said): the share answered with "you haven't told me" or the like
  (:func:`abstained`) rather than a made-up answer;
- general questions of the split (``bench.general_qa``), ``QA_TOKENS`` new tokens, base vs adapter + memory:
  right = the keyword in the answer;
- per job: published or not, held-out loss, anchor rise, minutes.
"""

from __future__ import annotations

import re
import time

TOKENS = 64
QA_TOKENS = 128
CONDITIONS = {"base": (False, False), "memory": (False, True), "adapter": (True, False), "both": (True, True)}
QUICK_TRAIN = dict(max_steps=2, min_steps=1, anchor_count=8, anchor_max_new_tokens=8, max_seq_len=96)
_ABSTAIN = re.compile(
    r"\b(?:you )?(?:haven't|have not|hadn't|didn't|did not|never) (?:told|mentioned|said|shared|specified|"
    r"given|provided)|\b(?:i )?(?:don't|do not|can't|cannot) (?:know|recall|remember|tell|say)|\bnot sure\b|"
    r"\bno (?:information|record|details|idea)\b|\bdon't have (?:any |that |this )?(?:information|details|"
    r"access|record)|\bwasn't mentioned|\bnot mentioned|\bunknown\b|"
    r"没有?告诉|不知道|没有?提(?:到|过)|不清楚|无法(?:知道|确定)",
    re.IGNORECASE)


def abstained(text: str) -> bool:
    """The answer says it does not know (English or Chinese), instead of naming something."""
    return bool(_ABSTAIN.search(text or ""))


def _split(split: str, quick: bool, train: dict, qa: bool) -> dict:
    from assistant.chat.service import ChatConfig
    from bench.adapter_style import ask
    from bench.general_qa import hits, questions
    from bench.memory_passing import _has, _users, setup

    users, _general = _users(split)
    users = users[:1] if quick else users
    data, store, memory, ids = setup(users)
    jobs = _train(store, ids, users, quick, train)
    backend, engine = _serve(data, store, memory, ChatConfig)
    out: dict = {"jobs": jobs}
    try:
        for cond, (use_adapter, use_memory) in CONDITIONS.items():
            facts = [(uid, p) for uid, u in zip(ids, users, strict=True) for p in u["probes"]
                     if p["kind"] != "correction"]
            texts = ask(engine, [(uid, p["question"]) for uid, p in facts], use_adapter, TOKENS, use_memory)
            right = [_has(t, p["keywords"]) and not (p.get("old") and _has(t, p["old"]))
                     for (_, p), t in zip(facts, texts, strict=True)]
            fixes = [(uid, p) for uid, u in zip(ids, users, strict=True) for p in u["probes"]
                     if p["kind"] == "correction"]
            fixed = ask(engine, [(uid, p["question"]) for uid, p in fixes], use_adapter, TOKENS, use_memory)
            never = [(uid, q) for uid, u in zip(ids, users, strict=True) for q in u["never_told"]]
            said = ask(engine, never, use_adapter, TOKENS, use_memory)
            if qa and cond in ("base", "both"):
                items = [(uid, q, k) for uid in ids for q, k in questions(split)]
                got = ask(engine, [(u, q) for u, q, _ in items], use_adapter, QA_TOKENS, use_memory)
                out[f"qa_{cond}"] = [sum(bool(hits(t, k)) for (_, _, k), t in zip(items, got, strict=True)),
                                     len(items), len({q for _, q, _ in items})]
            out[cond] = {"recall": [sum(right), len(right)],
                         "updated": [sum(r for r, (_, p) in zip(right, facts, strict=True) if p["kind"] == "updated"),
                                     sum(p["kind"] == "updated" for _, p in facts)],
                         "abstained": [sum(map(abstained, said)), len(said)],
                         "corrected": [sum(_has(t, p["keywords"]) for (_, p), t in zip(fixes, fixed, strict=True)),
                                       len(fixes)],
                         "samples": [t[:200] for t in said[:2]]}
    finally:
        backend.close()
        store.close()
    import shutil

    shutil.rmtree(data.root, ignore_errors=True)
    return out


def _train(store, ids: list[int], users: list[dict], quick: bool, train: dict) -> dict:
    from assistant.model import ModelConfig
    from personalize.api import train_now
    from personalize.config import TrainConfig

    cfg = TrainConfig(**{**(QUICK_TRAIN if quick else {}), **train})
    jobs = {}
    for uid, u in zip(ids, users, strict=True):
        t = time.perf_counter()
        r = train_now(store, uid, ModelConfig(model="embedded", quant="auto", device="cpu"), cfg)
        m = r.get("metrics") or {}
        jobs[u["name"]] = {"published": bool(r.get("published")), "reason": r.get("reason"),
                           "minutes": round((time.perf_counter() - t) / 60, 2),
                           **{k: m.get(k) for k in ("heldout_loss_before", "heldout_loss", "anchor_rise")}}
    return jobs


def _serve(data, store, memory, chat_config):
    from assistant.engines.base import GenerationSettings
    from assistant.engines.hf.backend import BatchConfig, TransformersBackend
    from assistant.engines.hf.registry import AdapterRegistry
    from assistant.model import ModelConfig, load_model
    from bench.quality import _probe_engine

    loaded = load_model(ModelConfig(model="embedded", quant="auto", device="cpu"), data)
    backend = TransformersBackend(loaded, 2048, AdapterRegistry(loaded.model), BatchConfig(max_batch=16, window_ms=50))
    return backend, _probe_engine()(store, backend, chat_config(defaults=GenerationSettings(temperature=0.0)), memory)


def run(quick: bool = False, splits: tuple[str, ...] = ("dev", "test"), train: dict | None = None,
        qa: bool = True) -> dict:
    """Both splits with the default ``TrainConfig`` (``train``: field overrides, ``qa=False``: no general
    questions; for trying a change on dev)."""
    started = time.perf_counter()
    out = {split: _split(split, quick, train or {}, qa) for split in splits}
    return {**out, "tokens": TOKENS, "seconds": round(time.perf_counter() - started, 1), "train": train or {}}


def _pct(pair) -> str:
    return f"{pair[0]}/{pair[1]} ({100 * pair[0] / max(1, pair[1]):.0f}%)"


def render(r: dict) -> str:
    rows = ["| split | condition | fact recall | updated: new value | correction followed | never told: abstained |",
            "|---|---|---|---|---|---|"]
    jobs = ["| split | user | published | held-out loss base → after | anchor rise | job min |",
            "|---|---|---|---|---|---|"]
    qa = ["| split | distinct general questions | base | adapter + memory |", "|---|---|---|---|"]
    for split in ("dev", "test"):
        if split not in r:
            continue
        for cond in CONDITIONS:
            c = r[split][cond]
            fixed = _pct(c["corrected"]) if "corrected" in c else "—"
            rows.append(f"| {split} | {cond} | {_pct(c['recall'])} | {_pct(c['updated'])} | {fixed} | "
                        f"{_pct(c['abstained'])} |")
        if "qa_base" in r[split]:
            b, a = r[split]["qa_base"], r[split]["qa_both"]
            qa.append(f"| {split} | {b[2]} | {_pct(b[:2])} | {_pct(a[:2])} |")
        for name, j in r[split]["jobs"].items():
            before, after, rise = (j.get(k) for k in ("heldout_loss_before", "heldout_loss", "anchor_rise"))
            loss = "—" if before is None or after is None else f"{before:.3f} → {after:.3f}"
            jobs.append(f"| {split} | {name} | {'yes' if j['published'] else 'no'} | {loss} | "
                        f"{'—' if rise is None else f'{rise:+.3f}'} | {j['minutes']} |")
    return "\n".join([
        "Adapters on natural histories (`bench/adapter_passing.py`, users of `bench/passing_users.py`: facts said "
        "once inside requests, real replies, an update, a correction; dev users tune, test users report). One job "
        "per user, default `TrainConfig` and gate (a rejected adapter is not served); probes through ChatService, "
        f"greedy, {r['tokens']} new tokens; memory with `MemoryConfig()` defaults. "
        + (f"General questions (`bench/general_qa.py`, the split's own, asked by every user of it) at {QA_TOKENS} "
           "tokens." if len(qa) > 2 else "General questions not asked in this run.")
        + ("" if "dev" in r else " This run: the test split only."), "", *rows, "",
        *(qa if len(qa) > 2 else []), "", *jobs, "",
        f"Time: {r['seconds'] / 60:.1f} min in all."])
