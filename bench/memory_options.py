"""Retrieval options, measured on dev data only (what a default may be chosen on): which memory ranks first for a
question, for the dev users of ``bench/passing_users.py`` (facts said once in passing, English and Chinese) and
LoCoMo's tune conversations (``bench/memory_locomo.py``). Memories are kept as serving keeps them (defaults);
only the ranking differs:

- **e5, default**: multilingual-e5-small over the mean of the memory, the message it was said in and the
  question it answered (what serving does);
- e5 over the memory's own words only;
- **BM25** (lexical, words; Chinese by character pairs) over the same texts, alone, fused with e5 by reciprocal
  rank (RRF, k=60), or added to e5's cosine (scaled to the question's best, weight 0.02);
- e5 with the question also rewritten to statement form ("Where do I live?" -> "I live.") and mixed in;
- all-MiniLM-L6-v2 (English only) alone and added to e5.

No gate here (ranking only): "first" is the memory a k=1 turn would serve if the gate lets one through. Test
users and LoCoMo's check conversations are not used.
"""

from __future__ import annotations

import collections
import math
import re
import time

import numpy as np

STOP = frozenset(
    "i me my mine we our us you your the a an and or but to of in on at for with is are was were be been am do does "
    "did have has had it its this that what which who where when how why there their they them he she his her so "
    "just about from as by not no can could would should will than then too very also up out into over".split())
REWRITES = [(r"\bdo i\b", "I"), (r"\bdid i\b", "I"), (r"\bam i\b", "I am"), (r"\bhave i\b", "I have"),
            (r"\bcan i\b", "I can"), (r"\bwas i\b", "I was"), (r"\bis my\b", "my"), (r"\bare my\b", "my"),
            (r"\bis our\b", "our"), (r"\bare our\b", "our"), (r"\bwhat's my\b", "my"), (r"\bwhat is my\b", "my"),
            (r"\bdo we\b", "we"), (r"\bare we\b", "we are")]


def rewrite(question: str) -> str:
    """A question in statement form: the auxiliary folded into its subject, the question word dropped."""
    low = question.strip().rstrip("?？ ").strip().lower()
    for pattern, replacement in REWRITES:
        low = re.sub(pattern, replacement, low)
    low = re.sub(r"^(?:what|which|where|who|when|how|whom|whose)\b\s*", "", low)
    return low[:1].upper() + low[1:] + "."


def _tokens(text: str) -> list[str]:
    text = text.lower()
    chars = re.findall(r"[\u4e00-\u9fff]", text)
    return [w for w in re.findall(r"[a-z0-9']+", text) if w not in STOP] + [a + b for a, b in zip(chars, chars[1:])]


def bm25(docs: list[list[str]], query: list[str], k1: float = 1.2, b: float = 0.75) -> np.ndarray:
    df = collections.Counter(w for d in docs for w in set(d))
    avg = float(np.mean([len(d) for d in docs])) or 1.0
    out = np.zeros(len(docs))
    for j, d in enumerate(docs):
        tf = collections.Counter(d)
        for w in query:
            if w in tf:
                idf = math.log(1 + (len(docs) - df[w] + 0.5) / (df[w] + 0.5))
                out[j] += idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * len(d) / avg))
    return out


def rrf(*scores: np.ndarray, k: int = 60) -> np.ndarray:
    out = np.zeros(len(scores[0]))
    for s in scores:
        ranks = np.empty(len(s))
        ranks[np.argsort(-s)] = np.arange(len(s))
        out += 1 / (k + ranks + 1)
    return out


def _parts(row: dict) -> tuple[str, ...]:
    """What serving embeds for the memory (``storage.memories.search_texts``)."""
    from storage.memories import search_texts

    return search_texts(row["text"], row.get("cue"), row.get("context"), row.get("asked"))


def _rows(store, user_id: int) -> list[dict]:
    return list(store.db.query(
        "SELECT * FROM memories WHERE user_id = ? AND replaced_by IS NULL AND cue IS NULL", [user_id]))


def _collect() -> tuple[list[dict], list[dict]]:
    """(passing dev users, LoCoMo tune speakers): each {"rows", "questions": [(question, accepted...)]}."""
    from bench import memory_locomo, memory_passing
    from bench.memory_passing import _has

    users, _ = memory_passing._users("dev")
    _, store, _, ids = memory_passing.setup(users)
    passing = []
    for user, uid in zip(users, ids, strict=True):
        rows = _rows(store, uid)
        probes = [(p["question"], {r["id"] for r in rows if _has(r["text"], p["keywords"])
                                   and not _has(r["text"], p.get("old") or [])})
                  for p in user["probes"] if p["kind"] in ("fact", "updated")]
        passing.append({"rows": rows, "questions": probes, "key": "id"})
    saved = memory_locomo.SPLITS
    memory_locomo.SPLITS = {"tune": saved["tune"]}
    try:
        data, lstore, lmemory = memory_locomo._open()
        speakers, questions, _ = memory_locomo._build(lstore, lmemory, data.root, False)
    finally:
        memory_locomo.SPLITS = saved
    locomo = []
    for u in speakers:
        qs = []
        for q in (q for q in questions if q["user"] is u):
            accepted = {u.where[e][0] for e in q["evidence"]}
            for e in q["evidence"]:  # or the speaker's next message, as memory_locomo counts it
                _, conv, pos = u.where[e]
                accepted.add(next((m for m, role in u.sessions[conv][pos + 1:] if role == "user"), -1))
            qs.append((q["question"], accepted))
        locomo.append({"rows": _rows(lstore, u.id), "questions": qs, "key": "message_id"})
    return passing, locomo


def _embed(embedder, texts: list[str], query: bool) -> dict[str, np.ndarray]:
    texts = sorted(set(texts))
    vectors = embedder.embed_query(texts) if query else embedder.embed(texts)
    return dict(zip(texts, vectors, strict=True))


def _options(groups: list[dict]) -> dict:
    """name -> scorer(question, group) giving one score per memory row of the group."""
    from assistant.memory.embedder import E5Embedder, MiniLMEmbedder, normalize

    texts = [t for g in groups for r in g["rows"] for t in _parts(r)]
    questions = [q for g in groups for q, _ in g["questions"]]
    e5, minilm = E5Embedder(), MiniLMEmbedder()
    P, Q = _embed(e5, texts, False), _embed(e5, questions, True)
    R = dict(zip(questions, e5.embed([rewrite(q) for q in questions]), strict=True))
    MP, MQ = _embed(minilm, texts, False), _embed(minilm, questions, True)
    for g in groups:
        g["e5"] = normalize(np.stack([np.mean([P[t] for t in _parts(r)], axis=0) for r in g["rows"]]))
        g["e5_text"] = np.stack([P[r["text"]] for r in g["rows"]])
        g["minilm"] = normalize(np.stack([np.mean([MP[t] for t in _parts(r)], axis=0) for r in g["rows"]]))
        g["docs"] = [_tokens(" ".join(_parts(r))) for r in g["rows"]]

    def lexical(q, g):
        return bm25(g["docs"], _tokens(q))

    def dense(q, g):
        return g["e5"] @ Q[q]

    def added(q, g):
        s = lexical(q, g)
        return dense(q, g) + 0.02 * s / (s.max() + 1e-9)

    return {
        "e5: memory + message + question answered (default)": dense,
        "e5: the memory's own words only": lambda q, g: g["e5_text"] @ Q[q],
        "BM25 alone": lexical,
        "e5 and BM25, reciprocal rank fusion": lambda q, g: rrf(dense(q, g), lexical(q, g)),
        "e5 + 0.02 x BM25 (scaled to the best)": added,
        "e5, question + 0.3 x its statement form": lambda q, g: g["e5"] @ normalize((Q[q] + 0.3 * R[q])[None])[0],
        "MiniLM alone (English only)": lambda q, g: g["minilm"] @ MQ[q],
        "e5 + 0.3 x MiniLM": lambda q, g: dense(q, g) + 0.3 * (g["minilm"] @ MQ[q]),
    }


def _score(scorer, groups: list[dict]) -> dict:
    first = in3 = n = 0
    for g in groups:
        for question, accepted in g["questions"]:
            order = np.argsort(-scorer(question, g))[:3]
            found = [g["rows"][i][g["key"]] for i in order]
            n += 1
            first += found[0] in accepted
            in3 += any(f in accepted for f in found)
    return {"first": first, "top3": in3, "n": n}


def run(quick: bool = False) -> dict:
    started = time.perf_counter()
    passing, locomo = _collect()
    if quick:
        passing, locomo = passing[:2], locomo[:2]
    options = _options(passing + locomo)
    rows = [{"option": name, "passing": _score(fn, passing), "locomo": _score(fn, locomo)}
            for name, fn in options.items()]
    return {"rows": rows, "passing_users": len(passing), "locomo_speakers": len(locomo),
            "seconds": round(time.perf_counter() - started, 1)}


def render(r: dict) -> str:
    from bench.report import table

    def pct(x: dict, key: str) -> str:
        return f"{x[key]}/{x['n']} ({100 * x[key] / max(x['n'], 1):.0f}%)"

    rows = [[x["option"], pct(x["passing"], "first"), pct(x["locomo"], "first"), pct(x["locomo"], "top3")]
            for x in r["rows"]]
    return "\n".join([
        "How memories are ranked for a question, on dev data only (`bench/memory_options.py`): the "
        f"{r['passing_users']} dev users of `bench/passing_users.py` (facts and updated facts said in passing, "
        f"English and Chinese) and the {r['locomo_speakers']} speakers of LoCoMo's tune conversations. Memories "
        "kept with defaults; ranking only (no gate).", "",
        table(["ranking", "passing users: right memory first", "LoCoMo: evidence first", "LoCoMo: evidence in top 3"],
              rows), "",
        f"Time: {r['seconds'] / 60:.1f} min.",
    ])
