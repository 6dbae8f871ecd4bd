"""Memory on facts said once, in passing: inside requests and questions, with real replies, updated later,
corrected, in English and Chinese (``bench/passing_users.py``).

Its users come in two splits: **dev** users are the ones memory defaults may be tuned on; **test** users are
only reported (written differently, by someone who did not write the extraction rules). For each split,
with ``MemoryConfig()`` defaults:

- what is kept: memories per user, and whether each fact's statement was kept at all;
- retrieval (embeddings only, exactly as a turn retrieves): the right memory served for each probe (a kept
  memory holding one of its keywords among the served ones); for an updated fact, the new value served and
  the old never; a correction served to the question it corrects and never to a different question of the
  same domain; memories served to general questions and to questions about things never told; latency;
- answers through ChatService (adapter off, greedy, ``ANSWER_TOKENS``): recall of the facts with memory on vs
  off (a keyword in the answer; for an updated fact the new value and not the old);
- general ability with memory on vs off: each user asks the split's general-knowledge questions
  (``bench.general_qa``, dev 70 / test 68 distinct), right when a keyword is in the answer. Where no memory is
  served, the prompt is exactly the memory-off prompt (no block is added), so only the questions that got a
  memory are answered again with it; the others count with their memory-off answer.
"""

from __future__ import annotations

import json
import time

ANSWER_TOKENS = 48


def _users(split: str) -> tuple[list[dict], list[str]]:
    from bench import passing_users

    return ((passing_users.DEV, passing_users.GENERAL_DEV) if split == "dev"
            else (passing_users.TEST, passing_users.GENERAL_TEST))


def setup(users: list[dict], config=None):
    """A fresh data dir with the users' histories imported and memory built: (data, store, memory, user ids)."""
    from assistant.memory.service import MemoryConfig, MemoryService
    from bench.common import fresh_data_dir
    from storage import Store
    from storage.transfer import import_history

    data = fresh_data_dir("attune-memp-")
    store = Store(data)
    memory = MemoryService(store, config or MemoryConfig())
    ids = []
    for n, user in enumerate(users):
        uid = store.users.create(f"user{n}", "correct horse").id
        path = data.root / f"history-{n}.jsonl"
        path.write_text("\n".join(json.dumps({"messages": c}, ensure_ascii=False) for c in user["conversations"]),
                        encoding="utf-8")
        import_history(store, uid, path)
        memory.backfill(uid)
        ids.append(uid)
    return data, store, memory, ids


def _has(text: str, keywords: list[str]) -> bool:
    from bench.quality import _hits

    return bool(_hits(text or "", keywords))


def _right(probe: dict, texts: list[str]) -> bool:
    """Whether these texts (served memories or an answer) hold the probe's fact, and not an old value."""
    if not any(_has(t, probe["keywords"]) for t in texts):
        return False
    return not any(_has(t, probe.get("old") or []) for t in texts)


def retrieval(store, memory, users: list[dict], ids: list[int], general: list[str]) -> dict:
    """What is kept and what a turn would serve, per probe kind (embeddings only, defaults)."""
    kinds: dict[str, list[int]] = {}
    kept = [0, 0]
    wrong_correction = never = gen = 0
    latencies = []
    for user, uid in zip(users, ids, strict=True):
        rows = memory.list(uid, limit=500)
        for probe in user["probes"]:
            started = time.perf_counter()
            hits = memory.retrieve(uid, probe["question"])
            latencies.append(time.perf_counter() - started)
            c = kinds.setdefault(probe["kind"], [0, 0])
            c[0] += _right(probe, [h.text for h in hits])
            c[1] += 1
            if probe["kind"] == "fact":
                kept[0] += any(_has(m.text, probe["keywords"]) for m in rows)
                kept[1] += 1
        if user.get("unrelated_howto"):
            wrong_correction += any(h.kind == "correction" for h in memory.retrieve(uid, user["unrelated_howto"]))
        never += sum(bool(memory.retrieve(uid, q)) for q in user["never_told"])
        gen += sum(bool(memory.retrieve(uid, q)) for q in general)
    latencies.sort()
    n_never = sum(len(u["never_told"]) for u in users)
    return {"served_right": kinds, "fact_kept": kept,
            "correction_to_other_question": [wrong_correction, sum(bool(u.get("unrelated_howto")) for u in users)],
            "never_told_served": [never, n_never], "general_served": [gen, len(general) * len(users)],
            "memories": sum(memory.count(uid) for uid in ids),
            "latency_ms_p50": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None}


NEW_USER_CONVERSATIONS = 2
"""A new user, for ``new_users``: only the first conversations of each user's history."""


def new_users(users: list[dict], general: list[str]) -> dict:
    """The same users when they are new (only their first ``NEW_USER_CONVERSATIONS`` conversations: fewer memories
    than ``memory_policy.STAND_OUT_FROM``, so nothing stands out or not): the facts they told by then served, and
    what questions about things never told and general questions get (embeddings only, defaults)."""
    from bench.quality import _remove

    young = [{**u, "conversations": u["conversations"][:NEW_USER_CONVERSATIONS]} for u in users]
    data, store, memory, ids = setup(young)
    told, never, gen, counts = [0, 0], [0, 0], [0, 0], []
    for user, uid in zip(young, ids, strict=True):
        rows = memory.list(uid, limit=500)
        counts.append(len(rows))
        for p in user["probes"]:
            if p["kind"] in ("fact", "updated") and any(_has(m.text, p["keywords"]) for m in rows):
                told[0] += _right(p, [h.text for h in memory.retrieve(uid, p["question"])])
                told[1] += 1
        never[0] += sum(bool(memory.retrieve(uid, q)) for q in user["never_told"])
        never[1] += len(user["never_told"])
        gen[0] += sum(bool(memory.retrieve(uid, q)) for q in general)
        gen[1] += len(general)
    memory.close()
    store.close()
    _remove(data.root)
    return {"conversations": NEW_USER_CONVERSATIONS, "memories": [min(counts), max(counts)], "told_served_right": told,
            "never_told_served": never, "general_served": gen}


def answers(engine, users: list[dict], ids: list[int]) -> dict:
    """Recall in the answers with memory off and on (adapter off), per probe kind."""
    from bench.quality import _ask_all

    items = [(uid, p["question"]) for user, uid in zip(users, ids, strict=True) for p in user["probes"]]
    probes = [p for user in users for p in user["probes"]]
    out = {}
    for cond, use_memory in (("off", False), ("on", True)):
        turns = _ask_all(engine, items, False, use_memory, ANSWER_TOKENS)
        kinds: dict[str, list[int]] = {}
        for probe, turn in zip(probes, turns, strict=True):
            c = kinds.setdefault(probe["kind"], [0, 0])
            c[0] += _right(probe, [turn.text])
            c[1] += 1
        out[cond] = kinds
    return out


def general_ability(engine, memory, ids: list[int], split: str, quick: bool = False) -> dict:
    """General questions with memory on vs off, for every user of the split (see the module docstring)."""
    from bench.general_qa import questions
    from bench.quality import _ask_all

    qas = questions(split)[: 10 if quick else None]
    off = [bool(_has(t.text, kws)) for t, (_, kws) in zip(
        _ask_all(engine, [(ids[0], q) for q, _ in qas], False, False, ANSWER_TOKENS), qas, strict=True)]
    served = [(uid, n) for uid in ids for n, (q, _) in enumerate(qas) if memory.retrieve(uid, q)]
    turns = _ask_all(engine, [(uid, qas[n][0]) for uid, n in served], False, True, ANSWER_TOKENS)
    on = {(uid, n): bool(_has(t.text, qas[n][1])) for (uid, n), t in zip(served, turns, strict=True)}
    blocks = sum(bool(t.memory_ids) for t in turns)
    right_on = sum(on.get((uid, n), off[n]) for uid in ids for n in range(len(qas)))
    return {"distinct": len(qas), "asked": len(qas) * len(ids), "off": sum(off) * len(ids), "on": right_on,
            "with_memory": len(served), "blocks_seen": blocks,
            "changed": sum(on[p] != off[p[1]] for p in served)}


def run(quick: bool = False) -> dict:
    import torch

    from assistant.chat.service import ChatConfig
    from assistant.engines.base import GenerationSettings
    from assistant.engines.hf.backend import BatchConfig, TransformersBackend
    from assistant.engines.hf.registry import AdapterRegistry
    from assistant.model import ModelConfig, load_model
    from bench.quality import BATCH, _probe_engine, _remove

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"device": device}
    for split in ("dev", "test"):
        users, general = _users(split)
        users = users[:2] if quick else users
        data, store, memory, ids = setup(users)
        rel = memory.relevance
        result["config"] = {"k": memory.config.k, "embedder": memory.embedder.name, "min_score": rel.min_score,
                            "personal_margin": rel.personal_margin, "general_margin": rel.general_margin,
                            "answer_min_score": rel.answer_min_score, "relative_margin": rel.relative_margin,
                            "stand_out": rel.stand_out}
        r = {"users": len(users), "languages": sorted({u["lang"] for u in users}),
             "probes": sum(len(u["probes"]) for u in users), "general": len(general),
             "retrieval": retrieval(store, memory, users, ids, general), "new_users": new_users(users, general)}
        loaded = load_model(ModelConfig(model="embedded", quant="auto", device=device), data)
        backend = TransformersBackend(loaded, 2048, AdapterRegistry(loaded.model),
                                      BatchConfig(max_batch=BATCH, window_ms=50))
        engine = _probe_engine()(store, backend, ChatConfig(defaults=GenerationSettings(temperature=0.0)), memory)
        r["answers"] = answers(engine, users, ids)
        r["general_answers"] = general_ability(engine, memory, ids, split, quick)
        r["dtype"] = loaded.dtype
        backend.close()
        store.close()
        _remove(data.root)
        result[split] = r
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _pct(pair) -> str:
    right, total = pair
    return f"{right}/{total} ({100 * right / max(total, 1):.0f}%)"


def render(r: dict) -> str:
    from bench.report import table

    rows = []
    for split in ("dev", "test"):
        s = r[split]
        ret, ans = s["retrieval"], s["answers"]
        for kind in ("fact", "updated", "correction"):
            if kind in ret["served_right"]:
                rows.append([split, kind, _pct(ret["served_right"][kind]), _pct(ans["off"][kind]),
                             _pct(ans["on"][kind])])
    other = [[split, _pct(r[split]["retrieval"]["fact_kept"]), _pct(r[split]["retrieval"]["never_told_served"]),
              _pct(r[split]["retrieval"]["general_served"]),
              _pct(r[split]["retrieval"]["correction_to_other_question"]),
              r[split]["retrieval"]["memories"], r[split]["retrieval"]["latency_ms_p50"]] for split in ("dev", "test")]
    cfg = r["config"]
    return "\n".join([
        f"Users who mention facts once inside requests and questions, with real replies (`bench/passing_users.py`): "
        f"**dev** ({r['dev']['users']} users, {r['dev']['probes']} probes, {', '.join(r['dev']['languages'])}) is "
        f"what defaults may be tuned on; **test** ({r['test']['users']} users, {r['test']['probes']} probes, "
        f"{', '.join(r['test']['languages'])}) is only reported. Defaults: k={cfg['k']}, embedder {cfg['embedder']}, "
        f"min_score={cfg['min_score']}, margin over the question's baseline {cfg.get('personal_margin')} (questions "
        f"about the user) / {cfg.get('general_margin')} (others), standing out from the user's other memories by "
        f"{cfg.get('stand_out', -1)} standard deviations (-1: not checked), "
        f"answer_min_score={cfg['answer_min_score']}, "
        f"relative_margin={cfg['relative_margin']}. Answers: ChatService, adapter off, greedy, {ANSWER_TOKENS} tokens, "
        f"{r['test'].get('dtype')}, {r['device']}; a keyword of the fact in the answer (an updated fact: the new "
        "value, never the old).", "",
        table(["split", "probe kind", "right memory served", "answer recall, memory off", "memory on"], rows), "",
        table(["split", "fact's statement kept", "never-told questions with a memory", "general questions with a "
               "memory", "correction served to another question", "memories", "retrieve p50 ms"], other), "",
        *_new_user_lines(r),
        *_general_lines(r),
        f"Time: {r['seconds'] / 60:.1f} min.",
    ])


def _new_user_lines(r: dict) -> list[str]:
    from assistant.memory.policy import STAND_OUT_FROM
    from bench.report import table

    if "new_users" not in r.get("test", {}):
        return []
    rows = [[split, f"{n['memories'][0]}-{n['memories'][1]}", _pct(n["told_served_right"]),
             _pct(n["never_told_served"]), _pct(n["general_served"])]
            for split in ("dev", "test") for n in [r[split]["new_users"]]]
    head = ["split", "memories per user", "told facts: right memory served", "never-told questions with a memory",
            "general questions with a memory"]
    return [f"The same users when new (only their first {r['test']['new_users']['conversations']} conversations): "
            f"with fewer than {STAND_OUT_FROM} memories the stand-out check is not made (nothing can stand out of so "
            "few), which leaves never-told questions to the margin over the baseline alone:", "",
            table(head, rows), ""]


def _general_lines(r: dict) -> list[str]:
    if "general_answers" not in r.get("test", {}):
        return []
    rows = [[split, g["distinct"], g["asked"], _pct((g["off"], g["asked"])), _pct((g["on"], g["asked"])),
             g["with_memory"], g["changed"]] for split in ("dev", "test") for g in [r[split]["general_answers"]]]
    return [table_general(rows), ""]


def table_general(rows: list[list]) -> str:
    from bench.report import table

    return ("General questions (`bench/general_qa.py`, the split's own), asked by every user of the split, right "
            "when a keyword is in the answer; only the questions that got a memory are answered again with it (the "
            "others have exactly the memory-off prompt):\n\n" + table(
                ["split", "distinct questions", "asked", "right, memory off", "memory on", "got a memory",
                 "answers that changed"], rows))
