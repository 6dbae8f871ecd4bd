"""Memory on LoCoMo's public long conversations (the development half): what is kept, what is served, answer F1.

Data: ``$ATTUNE_LOCOMO_DEV`` or /work/shared/data/locomo/locomo_dev.json, the first 5 of LoCoMo's 10
conversations (conversations 0-2 are the "tune" split, 3-4 the "check" split; the other 5 are held out and
never read here). Each speaker of a conversation becomes an Attune user whose history is imported
(``storage.transfer.import_history``) as one conversation per LoCoMo session: the speaker's turns are
``user`` messages, the other speaker's turns ``assistant`` messages, consecutive turns of one side joined
with a newline so that roles alternate. A session the other speaker opens is imported as it is: the import
accepts a leading assistant message, and Attune derives nothing from an answer without a question, which is
what such an opening is. Turn text only (the captions of shared photos are not imported). Memory is then
built by ``MemoryService.backfill`` with the defaults (``MemoryConfig()``).

Questions: LoCoMo's single-hop ones (category 4), each belonging to the speaker of its first evidence turn
and put to that user in the first person (``first_person``). Measured per split and overall:

- kept: a current memory of the user (not one replaced by a newer one) comes from the evidence turn's message
  (memories keep the id of the user message they came from; a session's last turn that nothing answers is
  never remembered);
- evidence hit: ``MemoryService.retrieve`` called as serving calls it (``ChatService.recall``, defaults, a new
  conversation) serves a memory of the evidence message or of the same speaker's next message in that
  session (LoCoMo's label noise: some evidence ids point at the question turn); session hit: a memory from
  the evidence's session; memories served per question (mean, share with none); retrieve latency p50/p95;
- answer F1 (LoCoMo's token F1 against the gold answer, ``answer_f1``) of the embedded model through
  ChatService, adapter off, memory on vs off, greedy, 64 new tokens, each question in a new conversation.

Beside them: the LoCoMo paper's DRAGON figures (evidence recall among the top 5/10/25 of all dialog turns of
both speakers); Attune serves at most ``k`` memories, and only those above its threshold.
"""

from __future__ import annotations

import os
import random
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(os.environ.get("ATTUNE_LOCOMO_DEV") or "/work/shared/data/locomo/locomo_dev.json")
SPLITS = {"tune": (0, 1, 2), "check": (3, 4)}
QUICK_CONVERSATION = 3
SINGLE_HOP = 4
ANSWER_TOKENS = 64
QUICK_ANSWERS = 20
TUNE_ANSWERS = 60  # full run: every check question plus this many tune questions (about 15 min on 2 cores)
DRAGON = {"top-5": 0.680, "top-10": 0.777, "top-25": 0.871}
WIDER_K = 3  # the target's "at most 3 served": also measured with k=3 (retrieval only)
"""LoCoMo paper, single-hop, evidence recall of the DRAGON retriever over dialog turns (the README of the data)."""

AUX = {"did": "did", "does": "do", "do": "do", "is": "am", "has": "have", "have": "have", "was": "was",
       "will": "will", "would": "would", "can": "can", "could": "could", "should": "should"}
"""An auxiliary before the speaker's name -> its form before "I"."""
AFTER_I = {"is": "am", "has": "have", "does": "do", "was": "was", "did": "did", "had": "had", "will": "will",
           "would": "would", "can": "can", "could": "could", "should": "should", "might": "might", "may": "may",
           "must": "must"}
"""Words after the speaker's name that make it the subject ("I") -> their form after "I" (and any -ed verb;
a third-person -s verb loses its -s)."""


def first_person(question: str, name: str) -> str:
    """The question as the speaker ``name`` would ask it: "What are Caroline's plans?" -> "What are my plans?",
    "How does Melanie relax?" -> "How do I relax?", "What did her friend give Melanie?" -> "... give me?"."""
    n = re.escape(name)
    out = re.sub(rf"\b{n}['’]s?(?!\w)", "my", question)
    aux = "|".join(AUX)

    def subject(m: re.Match) -> str:
        word = m.group(1)
        form = AUX[word.lower()]
        return (form.capitalize() if word[0].isupper() else form) + " I"

    out = re.sub(rf"\b({aux})\s+{n}\b", subject, out, flags=re.IGNORECASE)

    def bare(m: re.Match) -> str:
        word = m.group(1)
        low = word.lower()
        if low in AFTER_I:
            return f"I {AFTER_I[low]}"
        if low.endswith("ed"):
            return f"I {word}"
        if low.endswith("s") and not low.endswith(("ss", "us", "is")) and len(low) > 3:
            return f"I {_base(word)}"
        return f"me {word}"

    out = re.sub(rf"\b{n}\s+([A-Za-z]+)", bare, out)
    out = re.sub(rf"\b{n}\b", "me", out)
    return out[:1].upper() + out[1:] if re.match(r"(my|me)\b", out) else out


def _base(verb: str) -> str:
    """A third-person singular verb's base form: likes -> like, watches -> watch, carries -> carry."""
    if verb.endswith("ies") and len(verb) > 4:
        return verb[:-3] + "y"
    if verb.endswith(("ches", "shes", "sses", "xes", "zes", "oes")):
        return verb[:-2]
    return verb[:-1]


def _tokens(text: object) -> list[str]:
    """LoCoMo's answer normalization: lower case, no punctuation, no articles, split on whitespace."""
    text = "".join(ch for ch in str(text).lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def answer_f1(prediction: str, gold: object) -> float:
    """Token-overlap F1 of a prediction against the gold answer (LoCoMo/SQuAD style, without stemming)."""
    pred, ref = _tokens(prediction), _tokens(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def sessions_of(conversation: dict) -> list[list[dict]]:
    """The ``session_N`` turn lists in order (not the date keys: some conversations have more of those)."""
    keys = [k for k, v in conversation.items() if re.fullmatch(r"session_\d+", k) and isinstance(v, list)]
    return [conversation[k] for k in sorted(keys, key=lambda k: int(k.split("_")[1]))]


def speaker_history(sessions: list[list[dict]], speaker: str) -> tuple[list[dict], list[list[list[str]]]]:
    """Import lines for one speaker (a conversation per session, roles alternating) and, per session and
    message, the dia_ids merged into that message."""
    conversations, dia_ids = [], []
    for turns in sessions:
        msgs: list[dict] = []
        ids: list[list[str]] = []
        for turn in turns:
            role, text = ("user" if turn["speaker"] == speaker else "assistant"), turn["text"].strip()
            if not text:
                continue
            if msgs and msgs[-1]["role"] == role:
                msgs[-1]["content"] += "\n" + text
                ids[-1].append(turn["dia_id"])
            else:
                msgs.append({"role": role, "content": text})
                ids.append([turn["dia_id"]])
        if msgs:
            conversations.append({"messages": msgs})
            dia_ids.append(ids)
    return conversations, dia_ids


@dataclass
class _User:
    id: int
    speaker: str
    split: str
    where: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # dia_id -> (message, conversation, pos)
    sessions: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # conversation -> (message, role)
    conversation_of: dict[int, int] = field(default_factory=dict)  # message -> conversation
    kept: set[int] = field(default_factory=set)  # message ids some memory was derived from


def _import_user(store, root: Path, user: _User, sessions: list[list[dict]]) -> int:
    """Import the speaker's history and map every dia_id to its stored message; returns messages imported."""
    import json

    from storage.transfer import import_history

    lines, dia_ids = speaker_history(sessions, user.speaker)
    path = root / f"history-{user.id}.jsonl"
    path.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in lines), encoding="utf-8")
    counts = import_history(store, user.id, path)
    imported = sorted(store.chats.conversations(user.id, limit=10**6), key=lambda c: c["id"])
    for conv, ids in zip(imported, dia_ids, strict=True):
        msgs = store.chats.messages(user.id, conv["id"])
        user.sessions[conv["id"]] = [(m["id"], m["role"]) for m in msgs]
        for pos, (m, merged) in enumerate(zip(msgs, ids, strict=True)):
            user.conversation_of[m["id"]] = conv["id"]
            for dia in merged:
                user.where[dia] = (m["id"], conv["id"], pos)
    return counts["messages"]


def _questions(sample: dict, users: dict[str, _User], sessions: list[list[dict]]) -> tuple[list[dict], int]:
    """The single-hop questions with their owner and evidence turns; and how many had no usable evidence."""
    speaker_of = {t["dia_id"]: t["speaker"] for turns in sessions for t in turns}
    out, skipped = [], 0
    for qa in sample["qa"]:
        if qa.get("category") != SINGLE_HOP:
            continue
        evidence = [e for e in qa.get("evidence") or [] if e in speaker_of]
        if not evidence or speaker_of[evidence[0]] not in users:
            skipped += 1
            continue
        speaker = speaker_of[evidence[0]]
        own = [e for e in evidence if speaker_of[e] == speaker and e in users[speaker].where]
        out.append({"sample": sample["sample_id"], "user": users[speaker], "original": qa["question"],
                    "question": first_person(qa["question"], speaker), "answer": str(qa["answer"]),
                    "evidence": own})
    return out, skipped


def _build(store, memory, root: Path, quick: bool) -> tuple[list[_User], list[dict], dict]:
    """Users imported and backfilled, their questions, and counts and seconds of each phase."""
    import json

    samples = json.loads(DATA.read_text(encoding="utf-8"))
    chosen = [QUICK_CONVERSATION] if quick else [i for ids in SPLITS.values() for i in ids]
    users, questions = [], []
    totals = {"messages": 0, "memories": 0, "replaced": 0, "skipped_questions": 0, "import_s": 0.0,
              "backfill_s": 0.0}
    for index in chosen:
        sample = samples[index]
        conv = sample["conversation"]
        split = next(name for name, ids in SPLITS.items() if index in ids)
        sessions = sessions_of(conv)
        mine = {}
        for speaker in (conv["speaker_a"], conv["speaker_b"]):
            started = time.perf_counter()
            user = _User(store.users.create(f"{speaker}.{sample['sample_id']}"[:32], "correct horse").id, speaker,
                         split)
            totals["messages"] += _import_user(store, root, user, sessions)
            totals["import_s"] += time.perf_counter() - started
            started = time.perf_counter()
            memory.backfill(user.id)
            totals["backfill_s"] += time.perf_counter() - started
            rows = list(store.db.query("SELECT * FROM memories WHERE user_id = ?", [user.id]))
            current = [r for r in rows if r.get("replaced_by") is None]  # replaced ones are history, never served
            totals["memories"] += len(current)
            totals["replaced"] += len(rows) - len(current)
            user.kept = {r["message_id"] for r in current if r["message_id"] is not None}
            mine[speaker] = user
            users.append(user)
        found, skipped = _questions(sample, mine, sessions)
        questions += found
        totals["skipped_questions"] += skipped
    return users, questions, totals


def _score(memory, q: dict, k: int | None = None) -> dict:
    """One question served as ChatService.recall serves it (a new conversation: nothing excluded); ``k``: serve
    up to that many instead of the default."""
    user: _User = q["user"]
    started = time.perf_counter()
    hits = memory.retrieve(user.id, q["question"], k=k)
    ms = 1000 * (time.perf_counter() - started)
    evidence = {user.where[e][0] for e in q["evidence"]}
    accepted = set(evidence)
    for e in q["evidence"]:  # or the same speaker's next message in that session
        _, conv, pos = user.where[e]
        accepted.add(next((m for m, role in user.sessions[conv][pos + 1:] if role == "user"), -1))
    sessions = {user.where[e][1] for e in q["evidence"]}
    served = [h.message_id for h in hits]
    return {"split": user.split, "key": (q["sample"], q["original"]), "kept": bool(evidence & user.kept),
            "evidence_hit": any(m in accepted for m in served),
            "session_hit": any(user.conversation_of.get(m) in sessions for m in served),
            "served": len(hits), "ms": ms}


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def _summary(rows: list[dict]) -> dict:
    n = max(len(rows), 1)
    return {"questions": len(rows), "distinct": len({r["key"] for r in rows}),
            **{k: sum(r[k] for r in rows) / n for k in ("kept", "evidence_hit", "session_hit")},
            "served_mean": sum(r["served"] for r in rows) / n,
            "served_none": sum(r["served"] == 0 for r in rows) / n,
            "served": dict(sorted(Counter(r["served"] for r in rows).items())),
            "p50_ms": _percentile([r["ms"] for r in rows], 0.5), "p95_ms": _percentile([r["ms"] for r in rows], 0.95)}


def _by_split(rows: list[dict], summarize) -> dict:
    out = {name: summarize([r for r in rows if r["split"] == name]) for name in SPLITS
           if any(r["split"] == name for r in rows)}
    return {**out, "overall": summarize(rows)}


def _answers(data, store, memory, questions: list[dict], quick: bool) -> dict:
    """Mean answer F1 with memory off and on, the embedded model through ChatService (adapter off, greedy)."""
    import torch

    from assistant.chat.service import ChatConfig
    from assistant.engines.base import GenerationSettings
    from assistant.engines.hf.backend import BatchConfig, TransformersBackend
    from assistant.engines.hf.registry import AdapterRegistry
    from assistant.model import ModelConfig, load_model
    from bench.quality import BATCH, _ask_all, _probe_engine

    rng = random.Random(0)
    if quick:
        asked = rng.sample(questions, min(QUICK_ANSWERS, len(questions)))
    else:
        tune = [q for q in questions if q["user"].split == "tune"]
        asked = rng.sample(tune, min(TUNE_ANSWERS, len(tune))) + [q for q in questions if q["user"].split != "tune"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(ModelConfig(model="embedded", quant="auto", device=device), data)
    backend = TransformersBackend(loaded, 2048, AdapterRegistry(loaded.model), BatchConfig(max_batch=BATCH,
                                                                                                  window_ms=50))
    engine = _probe_engine()(store, backend, ChatConfig(defaults=GenerationSettings(temperature=0.0)), memory)
    rows = [{"split": q["user"].split} for q in asked]
    started = time.perf_counter()
    for cond, use_memory in (("off", False), ("on", True)):
        turns = _ask_all(engine, [(q["user"].id, q["question"]) for q in asked], False, use_memory, ANSWER_TOKENS)
        for row, q, turn in zip(rows, asked, turns, strict=True):
            row[cond] = answer_f1(turn.text, q["answer"])
            row[f"{cond}_block"] = bool(turn.memory_ids)
            row[f"{cond}_error"] = turn.status != "complete"
    seconds = time.perf_counter() - started
    backend.close()

    def summarize(part: list[dict]) -> dict:
        n = max(len(part), 1)
        return {"questions": len(part), "f1_off": sum(r["off"] for r in part) / n,
                "f1_on": sum(r["on"] for r in part) / n, "with_memory": sum(r["on_block"] for r in part),
                "errors": sum(r["off_error"] + r["on_error"] for r in part)}

    return {"splits": _by_split(rows, summarize), "seconds": round(seconds, 1), "device": device,
            "dtype": loaded.dtype, "tokens": ANSWER_TOKENS}


def _open():
    """A bench data dir (the converted model linked in, so it persists between runs), its Store and memory."""
    import tempfile

    from assistant.memory.service import MemoryConfig, MemoryService
    from bench.common import models_dir
    from storage import DataDir, Store

    data = DataDir(Path(tempfile.mkdtemp(prefix="attune-locomo-"))).ensure()
    (data.root / "models").rmdir()
    (models_dir() / "models").mkdir(parents=True, exist_ok=True)
    (data.root / "models").symlink_to(models_dir() / "models")
    store = Store(data)
    return data, store, MemoryService(store, MemoryConfig())


def run(quick: bool = False, answers: bool = True) -> dict:
    """``answers=False``: the retrieval measures only (no model loaded)."""
    from bench.quality import _remove

    started = time.perf_counter()
    data, store, memory = _open()
    try:
        users, questions, totals = _build(store, memory, data.root, quick)
        memory.warm_up()
        for user in users:  # load every index once: serving has them in RAM
            memory.retrieve(user.id, "warm up")
        phase = time.perf_counter()
        rows = [_score(memory, q) for q in questions]
        totals["retrieve_s"] = time.perf_counter() - phase
        upto3 = _by_split([_score(memory, q, k=WIDER_K) for q in questions], _summary)
        totals["load_avg"] = os.getloadavg()[0]  # latency is CPU-bound: how busy the machine was
        cfg = memory.config
        result = {
            "conversations": [QUICK_CONVERSATION] if quick else sorted(i for ids in SPLITS.values() for i in ids),
            "users": len(users), **{k: round(v, 1) if isinstance(v, float) else v for k, v in totals.items()},
            "retrieval": _by_split(rows, _summary), "dragon": DRAGON,
            "wider": {"k": WIDER_K, **{name: {key: v[key] for key in ("evidence_hit", "session_hit", "served_mean")}
                                       for name, v in upto3.items()}},
            "config": {"k": cfg.k, "min_score": memory.relevance.min_score,
                       "relative_margin": memory.relevance.relative_margin, "embedder": memory.embedder.name},
            "examples": [{"original": q["original"], "asked": q["question"]} for q in questions[:: max(
                len(questions) // 5, 1)][:5]],
        }
        if answers:
            result["answers"] = _answers(data, store, memory, questions, quick)
        result["seconds"] = round(time.perf_counter() - started, 1)
        return result
    finally:
        memory.close()
        store.close()
        _remove(data.root)


def render(r: dict) -> str:
    from bench.report import table

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    ret = [[name, s["questions"], s["distinct"], pct(s["kept"]), pct(s["evidence_hit"]), pct(s["session_hit"]),
            s["served_mean"], pct(s["served_none"]), s["p50_ms"], s["p95_ms"]] for name, s in r["retrieval"].items()]
    cfg, d = r["config"], r["dragon"]
    out = [
        f"LoCoMo's development half (`bench/memory_locomo.py`), conversations {r['conversations']} (0-2 tune, 3-4 "
        f"check): {r['users']} users (one per speaker), {r['messages']:,} messages imported (one conversation per "
        f"session), {r['memories']:,} current memories ({r.get('replaced', 0):,} more replaced by newer ones) "
        f"kept by `MemoryService.backfill` with defaults (k={cfg['k']}, "
        f"min_score={cfg['min_score']}, relative_margin={cfg['relative_margin']}, {cfg['embedder']}). Single-hop "
        "questions asked in the first person by the speaker they are about, retrieved as serving does.", "",
        table(["split", "questions", "distinct", "evidence kept", "evidence served", "session served",
               "served (mean)", "none served", "p50 ms", "p95 ms"], ret), "",
        f"LoCoMo paper, DRAGON over all dialog turns: evidence in the top 5 {pct(d['top-5'])}, top 10 "
        f"{pct(d['top-10'])}, top 25 {pct(d['top-25'])} (Attune serves at most {cfg['k']}, only above its "
        "threshold). Evidence served: a memory of the evidence message or of the speaker's next message.",
    ]
    if "wider" in r:
        w = r["wider"]
        out += ["", f"With up to k={w['k']} served (retrieval only, same gate): evidence served " + ", ".join(
            f"{name} {pct(w[name]['evidence_hit'])}" for name in r["retrieval"]) + "; session served " + ", ".join(
            f"{name} {pct(w[name]['session_hit'])}" for name in r["retrieval"]) + "; served (mean) " + ", ".join(
            f"{name} {w[name]['served_mean']:.2f}" for name in r["retrieval"]) + "."]
    if "answers" in r:
        a = r["answers"]
        f1 = [[name, s["questions"], s["f1_off"], s["f1_on"], s["with_memory"], s["errors"]]
              for name, s in a["splits"].items()]
        out += ["", f"Answer F1 (LoCoMo token F1), embedded model, adapter off, greedy, {a['tokens']} new tokens "
                f"({a['dtype']}, {a['device']}, {a['seconds'] / 60:.1f} min):", "",
                table(["split", "questions", "F1 memory off", "F1 memory on", "answers with a memory block",
                       "errors"], f1)]
    out += ["", f"Time: import {r['import_s']} s, backfill {r['backfill_s']} s, retrieval {r['retrieve_s']} s "
            f"(load average {r['load_avg']} after it), total {r['seconds'] / 60:.1f} min."]
    return "\n".join(out)
