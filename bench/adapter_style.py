"""A style taught only through corrections, on the embedded SmolLM2-135M, default config and gate.

Users of ``bench.style_users`` (dev users to tune on, test users to report) ask everyday questions; the base
model answers them at serving settings (real replies); the user corrects most answers into a style (short
answers, bullet lists, Chinese answers to Chinese questions). One training job each (default ``TrainConfig``,
default gate: a rejected candidate is not served). Then through the real serving path (ChatService +
TransformersBackend, per-row LoRA, no memory, so the adapter alone is measured), at serving settings
(``GenerationSettings`` defaults but greedy, 256 tokens):

- unseen prompts on other topics, base vs adapter: median answer length in words, share of answers that are
  bullet lists, share of answers mostly in Chinese (the probes of a user who teaches Chinese answers are asked
  in Chinese);
- the general questions of ``bench.general_qa`` (the user's split: dev or test) at 128 tokens, base vs adapter:
  right = the keyword in the answer (a shorter answer must still be right);
- the same general questions sampled as served (temperature, top_p, penalty of ``GenerationSettings``), once per
  seed of ``SEEDS``: right per run, and the adapter's difference with a 95% bootstrap interval over questions;
- per job: published or not (the gate's reason), the style it detected, held-out loss, anchor rise, minutes.

Before anything runs, :func:`overlaps` fails the bench when a 4-word run of a test probe appears in any
training text or in ``personalize/facts.py``.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import replace
from pathlib import Path

PROBE_TOKENS = 256
QA_TOKENS = 128
QA_QUESTIONS = 200
"""General questions per user: every one of its split in ``bench.general_qa`` (dev or test)."""
SEEDS = (0, 1, 2)
"""General QA is also sampled as served (temperature, top_p and penalty of ``GenerationSettings``), once per seed."""
BATCH = 16
QUICK_TRAIN = dict(max_steps=2, min_steps=1, anchor_count=8, anchor_max_new_tokens=8, max_seq_len=96)


def _runs(text: str, n: int = 4) -> set[str]:
    """Runs of ``n`` words, and of ``n`` Chinese characters (Chinese has no spaces)."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    runs = {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}
    for chunk in re.findall(r"[\u4e00-\u9fff]+", text):
        runs |= {chunk[i:i + n] for i in range(len(chunk) - n + 1)}
    return runs



def overlaps(users) -> list[str]:
    """Each 4-word run of a test probe found in a training text (any user's) or in personalize/facts.py."""
    facts = (Path(__file__).resolve().parent.parent / "personalize" / "facts.py").read_text(encoding="utf-8")
    taught = set().union(*(_runs(t) for u in users for q, c in u.corrected for t in (q, c)),
                         *(_runs(q) for u in users for q in u.plain), _runs(facts))
    return sorted({f"{p!r}: {r!r}" for u in users if u.split == "test" for p in u.probes for r in _runs(p) & taught})


def _serving(tokens: int, seed: int | None = None):
    """Serving's settings with ``tokens`` new tokens: greedy, or sampled as served with ``seed``."""
    from assistant.engines.base import GenerationSettings

    served = GenerationSettings()
    if seed is None:
        return replace(served, temperature=0.0, max_new_tokens=tokens)
    return replace(served, max_new_tokens=tokens, seed=seed)


def paired_ci(base: list[float], other: list[float], rounds: int = 2000) -> tuple[float, float]:
    """95% interval of the mean difference ``other - base`` over paired items (a bootstrap over the items)."""
    import random

    rng = random.Random(0)
    diffs = [o - b for b, o in zip(base, other, strict=True)]
    means = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def _engine(data, store):
    from assistant.chat.service import ChatConfig
    from assistant.engines.base import GenerationSettings
    from assistant.engines.hf.backend import BatchConfig, TransformersBackend
    from assistant.engines.hf.registry import AdapterRegistry
    from assistant.model import ModelConfig, load_model
    from bench.quality import _probe_engine

    loaded = load_model(ModelConfig(model="embedded", quant="auto", device="cpu"), data)
    backend = TransformersBackend(loaded, 2048, AdapterRegistry(loaded.model),
                                  BatchConfig(max_batch=BATCH, window_ms=50))
    return backend, _probe_engine()(store, backend, ChatConfig(defaults=GenerationSettings(temperature=0.0)))


def ask(engine, items: list[tuple[int, str]], use_adapter: bool, tokens: int, use_memory: bool = False,
        seed: int | None = None) -> list[str]:
    """Each (user id, question) in a new conversation, concurrently (the backend batches them), at serving
    settings but greedy (``seed``: sampled as served, with this seed): the answers' texts."""
    from concurrent.futures import ThreadPoolExecutor

    from assistant.chat.service import TurnOptions

    settings = _serving(tokens, seed)
    options = TurnOptions(settings, source="api", use_adapter=use_adapter, use_memory=use_memory)

    def one(item):
        turn = None
        for turn in engine.send(item[0], None, item[1], options):
            pass
        return turn.text

    with ThreadPoolExecutor(max_workers=BATCH) as pool:
        return list(pool.map(one, items))


def _histories(store, data, users: dict) -> None:
    """The base model answers every question (serving settings); the user's corrections go on the answers."""
    import json

    from storage.transfer import import_history

    backend, engine = _engine(data, store)
    asker = store.users.create("asker", "correct horse").id  # its turns are logged: not the users' own history
    try:
        for uid, u in users.items():
            asked = [q for q, _ in u.corrected] + u.plain
            answers = ask(engine, [(asker, q) for q in asked], False, PROBE_TOKENS)
            fixes = dict(u.corrected)
            convs = [{"messages": [{"role": "user", "content": q},
                                   {"role": "assistant", "content": a,
                                    **({"feedback": "dislike", "correction": fixes[q]} if q in fixes else {})}]}
                     for q, a in zip(asked, answers, strict=True)]
            path = data.root / f"history-{u.name}.jsonl"
            path.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in convs), encoding="utf-8")
            import_history(store, uid, path)
    finally:
        backend.close()


def _measure(engine, users: dict) -> dict:
    from bench.general_qa import hits, questions
    from personalize.style import is_chinese, is_list, word_count

    out = {}
    for cond, use_adapter in (("base", False), ("adapter", True)):
        probes = [(uid, p) for uid, u in users.items() for p in u.probes]
        answers = ask(engine, probes, use_adapter, PROBE_TOKENS)
        qa = [(uid, q, k) for uid, u in users.items() for q, k in questions(u.split)[:QA_QUESTIONS]]
        qa_answers = ask(engine, [(u, q) for u, q, _ in qa], use_adapter, QA_TOKENS)
        for uid, u in users.items():
            mine = [a for (v, _), a in zip(probes, answers, strict=True) if v == uid]
            scored = [bool(hits(a, k)) for (v, _, k), a in zip(qa, qa_answers, strict=True) if v == uid]
            out.setdefault(u.name, {})[cond] = {
                "median_words": statistics.median(word_count(a) for a in mine),
                "lists": sum(is_list(a) for a in mine), "chinese": sum(is_chinese(a) for a in mine),
                "probes": len(mine),
                "qa_right": sum(scored), "qa_total": len(scored), "sample": mine[0][:300]}
    _sampled(engine, users, out)
    return out


def _sampled(engine, users: dict, out: dict) -> None:
    """General QA sampled as served, once per seed, base and adapter: right per seed, and the adapter's difference
    with a 95% interval over questions (each question scored by its share of seeds answered right)."""
    from bench.general_qa import hits, questions

    qa = [(uid, q, k) for uid, u in users.items() for q, k in questions(u.split)[:QA_QUESTIONS]]
    runs = {cond: [[bool(hits(a, k)) for (_, _, k), a in zip(qa, ask(engine, [(u, q) for u, q, _ in qa],
                                                                      cond == "adapter", QA_TOKENS, seed=seed),
                                                               strict=True)] for seed in SEEDS]
            for cond in ("base", "adapter")}
    for uid, u in users.items():
        rows = [n for n, (v, _, _) in enumerate(qa) if v == uid]
        share = {c: [sum(run[n] for run in runs[c]) / len(SEEDS) for n in rows] for c in runs}
        lo, hi = paired_ci(share["base"], share["adapter"])
        out[u.name]["sampled"] = {"seeds": len(SEEDS), "questions": len(rows),
                                  **{c: [sum(run[n] for n in rows) for run in runs[c]] for c in runs},
                                  "diff_ci": [round(lo * len(rows), 1), round(hi * len(rows), 1)]}


def run(quick: bool = False, names: tuple[str, ...] | None = None) -> dict:
    """Every style user (``names``: only these, for trying a change on dev users)."""
    from assistant.model import ModelConfig
    from bench.common import fresh_data_dir
    from bench.style_users import style_users
    from personalize.api import train_now
    from personalize.config import TrainConfig
    from storage import Store

    all_users = [u for u in style_users(quick) if names is None or u.name in names]
    found = overlaps(all_users)
    if found:
        raise RuntimeError("test probes overlap training text: " + "; ".join(found[:5]))
    started = time.perf_counter()
    data = fresh_data_dir("attune-style-")
    store = Store(data)
    users = {store.users.create(u.name, "correct horse").id: u for u in all_users}
    _histories(store, data, users)
    cfg = TrainConfig(**QUICK_TRAIN) if quick else TrainConfig()
    jobs = {}
    for uid, u in users.items():
        t = time.perf_counter()
        r = train_now(store, uid, ModelConfig(model="embedded", quant="auto", device="cpu"), cfg)
        m = r["metrics"]
        jobs[u.name] = {"published": r["published"], "reason": r["reason"], "style": m.get("style"),
                        "minutes": round((time.perf_counter() - t) / 60, 2),
                        **{k: m.get(k) for k in ("heldout_loss_before", "heldout_loss", "anchor_rise")}}
    backend, engine = _engine(data, store)
    try:
        measured = _measure(engine, users)
    finally:
        backend.close()
        store.close()
    import shutil

    shutil.rmtree(data.root, ignore_errors=True)
    return {"users": {u.name: {"split": u.split, "style": u.style, "corrections": len(u.corrected),
                               **measured[u.name], "job": jobs[u.name]} for u in users.values()},
            "probe_tokens": PROBE_TOKENS, "qa_tokens": QA_TOKENS, "overlaps": found,
            "seconds": round(time.perf_counter() - started, 1)}


def _count(cond: dict, key: str) -> str:
    """``n/probes``, or — for a run that did not count it (results from before the column existed)."""
    return f"{cond[key]}/{cond['probes']}" if key in cond else "—"


def render(r: dict) -> str:
    rows = ["| user | split | taught | published | style found | median words base → adapter | lists base → "
            "adapter | in Chinese base → adapter | general QA base → adapter | anchor rise | job min |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, u in r["users"].items():
        j, b, a = u["job"], u["base"], u["adapter"]
        st = j.get("style") or {}
        found = ", ".join(x for x in ((f"≤ {st['max_words']} words" if st.get("max_words") else ""),
                                      ("bullets" if st.get("bullets") else ""),
                                      (f"answers in {st['language']}" if st.get("language") else ""),
                                      st.get("head", ""), st.get("tail", "")) if x) or "none"
        rise = "—" if j.get("anchor_rise") is None else f"{j['anchor_rise']:+.3f}"
        rows.append(f"| {name} | {u['split']} | {u['style']} ({u['corrections']} corrections) | "
                    f"{'yes' if j['published'] else 'no'} | {found} | {b['median_words']:.0f} → "
                    f"{a['median_words']:.0f} | {b['lists']}/{b['probes']} → {a['lists']}/{a['probes']} | "
                    f"{_count(b, 'chinese')} → {_count(a, 'chinese')} | "
                    f"{b['qa_right']}/{b['qa_total']} → {a['qa_right']}/{a['qa_total']} | {rise} | {j['minutes']} |")
    sampled = ["| user | split | base right per seed | adapter right per seed | adapter - base (mean, 95% interval) |",
               "|---|---|---|---|---|"]
    for name, u in r["users"].items():
        sm = u.get("sampled")
        if sm:
            diff = (sum(sm["adapter"]) - sum(sm["base"])) / sm["seeds"]
            sampled.append(f"| {name} | {u['split']} | {', '.join(map(str, sm['base']))} of {sm['questions']} | "
                           f"{', '.join(map(str, sm['adapter']))} | {diff:+.1f} ({sm['diff_ci'][0]:+.1f} to "
                           f"{sm['diff_ci'][1]:+.1f}) |")
    return "\n".join([
        "A style taught only through corrections (`bench/adapter_style.py`, users in `bench/style_users.py`): the "
        "base model answers each user's everyday questions at serving settings, the user corrects most answers "
        "(shorter, as a bullet list, or in Chinese), one job each with the default `TrainConfig` and gate (a "
        "rejected adapter is not served, so its user gets the base model). Unseen prompts on other topics, greedy, "
        f"{r['probe_tokens']} new tokens, repetition penalty as served; general QA at {r['qa_tokens']} tokens. Dev "
        "users tune, test users report; no 4-word run of a test probe is in any training text or facts.py "
        f"(checked: {len(r['overlaps'])} found).", "", *rows, "",
        *([f"General QA sampled as served (temperature, top_p, repetition penalty of the serving defaults; "
           f"{r['qa_tokens']} tokens), once per seed; the difference in questions right per run, its interval a "
           "bootstrap over questions:", "", *sampled, ""] if len(sampled) > 2 else []),
        f"Time: {r['seconds'] / 60:.1f} min in all."])
