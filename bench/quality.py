"""Personalization quality on the embedded SmolLM2-135M: a synthetic multi-user benchmark.

Each user states personal facts and preferences across several conversations, asks about them
later (some answers liked, some non-answers disliked and corrected, one disliked without a
correction), and is then asked paraphrased probe questions never seen in training. A probe is
right when its expected keyword appears (whole word, any case) in the greedy answer.

Measured through the real serving path (ChatEngine + TransformersBackend with mixed-adapter
batches + MemoryService with MiniLM), with adapters trained by ``personalize.api.train_now``:

- recall under base / memory only / adapter only / adapter + memory;
- leakage: every answer user B gets is checked for the keywords of every other user that B's own
  history does not contain (must be 0; the base model's answers are the coincidence control), and
  every memory retrieved for B (directly and in each engine turn) must be B's;
- general-ability retention: the gate's anchor-set loss and a shipped 20-question general QA set,
  base vs adapter trained with replay (default ``anchor_ratio``) vs without (``anchor_ratio=0``);
- SFT only (``preference_loss='none'``, ``undesirable_weight=0``) vs SFT + preference losses (default).

Probe turns are not turned into memories (``_remember`` is a no-op in the bench's engine) so one
probe's answer can never become the memory that answers the next.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# slot: (statement, acknowledgement, training question, answer, paraphrased probe, values per user)
# Values are distinct across users and rare enough that the base model does not say them by chance.
SLOTS = [
    ("My dog is called {v}.", "What a lovely name! {v} it is.", "What is my dog's name?", "Your dog is called {v}.",
     "Remind me, what did I name my dog?", ["Biscuit", "Pepperoni", "Waffles", "Noodle", "Sprocket", "Truffle"]),
    ("I live in {v}.", "Got it, you live in {v}.", "Where do I live?", "You live in {v}.",
     "Which town is my home?", ["Lyon", "Tromso", "Ljubljana", "Valparaiso", "Hobart", "Tartu"]),
    ("I work as a {v}.", "Noted: you are a {v}.", "What is my job?", "You work as a {v}.",
     "What do I do for a living?", ["beekeeper", "cartographer", "luthier", "glassblower", "sommelier",
                                    "locksmith"]),
    ("I play the {v}.", "Nice, you play the {v}.", "Which instrument do I play?", "You play the {v}.",
     "What musical instrument is mine?", ["cello", "bagpipes", "accordion", "theremin", "banjo", "harpsichord"]),
    ("My favourite tea is {v}.", "Noted: {v} is your favourite tea.", "What is my favourite tea?",
     "Your favourite tea is {v}.", "Which tea do I enjoy the most?",
     ["jasmine", "rooibos", "matcha", "chamomile", "hibiscus", "oolong"]),
    ("My sister's name is {v}.", "Thanks, your sister is {v}.", "What is my sister's name?",
     "Your sister is called {v}.", "Who is my sister?", ["Clara", "Ingrid", "Yasmin", "Beatrix", "Odette",
                                                         "Marisol"]),
    ("I am allergic to {v}.", "I will remember that you are allergic to {v}.", "What am I allergic to?",
     "You are allergic to {v}.", "Which food must I avoid because of my allergy?",
     ["peanuts", "shellfish", "sesame", "kiwi", "mustard", "celery"]),
    ("I drive a {v}.", "Got it, you drive a {v}.", "What car do I drive?", "You drive a {v}.",
     "Which brand is my car?", ["Volvo", "Subaru", "Lada", "Saab", "Skoda", "Citroen"]),
    ("My favourite cuisine is {v} food.", "Noted: you love {v} food.", "What is my favourite cuisine?",
     "Your favourite cuisine is {v} food.", "What kind of food do I like best?",
     ["Ethiopian", "Peruvian", "Georgian", "Sichuan", "Lebanese", "Oaxacan"]),
    ("My favourite sport is {v}.", "Great, {v} is your sport.", "What is my favourite sport?",
     "Your favourite sport is {v}.", "Which sport do I love doing?",
     ["fencing", "curling", "bouldering", "kayaking", "archery", "rowing"]),
    ("My cat is named {v}.", "Cute! Your cat is {v}.", "What is my cat's name?", "Your cat is named {v}.",
     "What do I call my cat?", ["Pickles", "Zucchini", "Marmalade", "Gizmo", "Cinnamon", "Domino"]),
    ("My best friend is {v}.", "Noted: {v} is your best friend.", "Who is my best friend?",
     "Your best friend is {v}.", "What is the name of my closest friend?",
     ["Tobias", "Rashid", "Leopold", "Svetlana", "Anouk", "Fergus"]),
    ("I work at a company called {v}.", "Got it, you work at {v}.", "Which company do I work for?",
     "You work at {v}.", "What is the name of my employer?",
     ["Brightwater", "Nordlys", "Quillfield", "Ambervale", "Copperleaf", "Stonebridge"]),
    ("I live on {v} Lane.", "Noted: {v} Lane.", "What street do I live on?", "You live on {v} Lane.",
     "Which lane is my address on?", ["Juniper", "Hawthorn", "Wisteria", "Magnolia", "Rowan", "Linden"]),
    ("My favourite fruit is {v}.", "Noted: {v} is your favourite fruit.", "What is my favourite fruit?",
     "Your favourite fruit is {v}.", "Which fruit do I like best?",
     ["durian", "persimmon", "lychee", "quince", "guava", "rambutan"]),
    ("I am learning {v}.", "Good luck with your {v}!", "Which language am I learning?", "You are learning {v}.",
     "What language am I studying at the moment?", ["Icelandic", "Swahili", "Basque", "Tagalog", "Welsh",
                                                    "Estonian"]),
    ("My partner's name is {v}.", "Thanks, your partner is {v}.", "What is my partner's name?",
     "Your partner is {v}.", "Who is my partner?", ["Henrik", "Ngozi", "Mateo", "Ayumi", "Soren", "Lucia"]),
    ("My favourite board game is {v}.", "Noted: {v} is your favourite board game.",
     "What is my favourite board game?", "Your favourite board game is {v}.", "Which board game do I love?",
     ["Carcassonne", "Azul", "Wingspan", "Agricola", "Patchwork", "Dixit"]),
    ("My dream holiday is a trip to {v}.", "{v} sounds wonderful!", "Where is my dream holiday?",
     "Your dream holiday is a trip to {v}.", "Which place do I most want to visit?",
     ["Madeira", "Zanzibar", "Svalbard", "Patagonia", "Lofoten", "Tasmania"]),
    ("My son is called {v}.", "Lovely, your son is {v}.", "What is my son's name?", "Your son is called {v}.",
     "Remind me of my son's name.", ["Elio", "Cosimo", "Bram", "Thiago", "Emeric", "Rafferty"]),
    ("I can't stand {v}.", "Noted: no {v} for you.", "Which food do I hate?", "You can't stand {v}.",
     "What food do I dislike the most?", ["olives", "cilantro", "anchovies", "liquorice", "mushrooms",
                                          "beetroot"]),
    ("My coffee order is always a {v}.", "Noted: a {v} it is.", "What is my usual coffee order?",
     "Your usual coffee order is a {v}.", "How do I take my coffee?",
     ["cortado", "macchiato", "affogato", "ristretto", "lungo", "frappe"]),
]
# What the assistant said before being corrected: non-answers, never anyone's keyword.
WRONG = ["I'm not sure, you haven't told me that.", "Sorry, I don't know.", "I have no idea, could you remind me?",
         "I don't remember that, sorry."]
USER_NAMES = ["ana", "ben", "chen", "dara", "eli", "fay"]

GENERAL_QA = [
    ("What is the capital of France?", ["Paris"]), ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]), ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]), ("What is the capital of the United Kingdom?", ["London"]),
    ("What is 2 + 2?", ["4", "four"]), ("What is 3 + 5?", ["8", "eight"]), ("What is 10 minus 3?", ["7", "seven"]),
    ("What is 6 times 2?", ["12", "twelve"]), ("How many days are in a week?", ["7", "seven"]),
    ("How many legs does a spider have?", ["8", "eight"]), ("What colour is the sky on a clear day?", ["blue"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]), ("What is H2O commonly called?", ["water"]),
    ("What is the opposite of hot?", ["cold"]), ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What do bees make?", ["honey"]), ("At what temperature in Celsius does water freeze?", ["0", "zero"]),
]

CONDITIONS = {"base": (False, False), "memory": (False, True), "adapter": (True, False), "both": (True, True)}
PROBE_TOKENS = 16
QA_TOKENS = 16
BATCH = 16  # concurrent probes decoded together (one mixed-adapter batch)
SERVE_QUANT = "auto"
"""Base weights while probing: what Attune serves by default (unquantized, bf16 where the CPU has native
bf16, on CPU; NF4 on CUDA; see assistant.model.resolve_quant / resolve_dtype)."""


@dataclass
class Sizes:
    users: int
    facts: int
    variant_users: int  # users who also get the no-replay and SFT-only adapters
    general_qa: int
    train: dict


FULL = Sizes(users=5, facts=20, variant_users=2, general_qa=20,
             train=dict(max_seq_len=128, epochs=3, batch_size=4, anchor_count=64, anchor_max_new_tokens=32))
QUICK = Sizes(users=2, facts=6, variant_users=1, general_qa=4,
              train=dict(max_seq_len=96, epochs=1, max_steps=2, batch_size=4, anchor_count=8,
                         anchor_max_new_tokens=12))


def user_facts(u: int, n_facts: int) -> list[dict]:
    return [{"slot": s, "value": SLOTS[s][5][u], "keyword": SLOTS[s][5][u], "probe": SLOTS[s][4]}
            for s in range(n_facts)]


def user_history(u: int, n_facts: int) -> list[dict]:
    """The user's conversations in the import format: facts told two per conversation, then asked
    about three per conversation (every 4th answer liked; 4 wrong answers disliked and corrected;
    one more wrong answer disliked without a correction)."""
    convs = []
    for start in range(0, n_facts, 2):
        msgs = []
        for s in range(start, min(start + 2, n_facts)):
            statement, ack, *_, values = SLOTS[s]
            msgs += [{"role": "user", "content": statement.format(v=values[u])},
                     {"role": "assistant", "content": ack.format(v=values[u])}]
        convs.append({"messages": msgs})
    order = list(range(n_facts))[u % 3:] + list(range(n_facts))[:u % 3]  # a different order per user
    corrected = set(order[1:1 + 4 * 5:5][:4])  # four facts answered wrongly first
    for start in range(0, n_facts, 3):
        msgs = []
        for s in order[start:start + 3]:
            _, _, question, answer, _, values = SLOTS[s]
            right = answer.format(v=values[u])
            msgs.append({"role": "user", "content": question})
            if s in corrected:
                wrong = WRONG[len([c for c in corrected if c < s]) % len(WRONG)]
                msgs.append({"role": "assistant", "content": wrong, "feedback": "dislike", "correction": right})
            else:
                reply = {"role": "assistant", "content": right}
                if s % 4 == 0:
                    reply["feedback"] = "like"
                msgs.append(reply)
        convs.append({"messages": msgs})
    convs.append({"messages": [{"role": "user", "content": "Do you remember anything about me?"},
                               {"role": "assistant", "content": "No, I know nothing about you.",
                                "feedback": "dislike"}]})
    return convs


def _remove(root: Path) -> None:
    """Delete a bench data dir; its models/ and replay/ links go, never what they point to."""
    for name in ("models", "replay"):
        if (root / name).is_symlink():
            (root / name).unlink()
    shutil.rmtree(root, ignore_errors=True)


def _history_counts(history: list[dict]) -> dict:
    answers = [m for c in history for m in c["messages"] if m["role"] == "assistant"]
    return {"conversations": len(history), "answers": len(answers),
            "likes": sum(m.get("feedback") == "like" for m in answers),
            "corrected": sum(bool(m.get("correction")) for m in answers),
            "disliked_only": sum(m.get("feedback") == "dislike" and not m.get("correction") for m in answers)}


def _hits(text: str, keywords: list[str]) -> list[str]:
    return [k for k in keywords if re.search(rf"(?<!\w){re.escape(k)}(?!\w)", text, re.IGNORECASE)]


@functools.cache
def _probe_engine():
    """ChatEngine whose finished turns are not remembered (so a probe never answers the next one)."""
    from assistant.engine import ChatEngine

    class ProbeEngine(ChatEngine):
        def _remember(self, user_id, turn):
            return None

    return ProbeEngine


def _ask_all(engine, items: list[tuple[int, str]], use_adapter: bool, use_memory: bool, tokens: int) -> list:
    """Each (user_id, question) in a new conversation, concurrently (the backend batches them): final Turns."""
    from assistant.backend import GenerationSettings

    settings = GenerationSettings(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)

    def one(item):
        turn = None
        for turn in engine.send(item[0], None, item[1], settings, source="api", use_adapter=use_adapter,
                                use_memory=use_memory):
            pass
        return turn

    with ThreadPoolExecutor(max_workers=BATCH) as pool:
        return list(pool.map(one, items))


def _owned(store, user_id: int, memory_ids: list[int]) -> int:
    """How many of the memory ids do NOT belong to the user (must be 0)."""
    if not memory_ids:
        return 0
    marks = ",".join("?" * len(memory_ids))
    owners = [r[0] for r in store.db.execute(f"SELECT user_id FROM memories WHERE id IN ({marks})",
                                             list(memory_ids)).fetchall()]
    return sum(o != user_id for o in owners) + (len(set(memory_ids)) - len(owners))


def run(quick: bool = False) -> dict:
    import torch

    from assistant.adapters import AdapterRegistry
    from assistant.backend import BatchConfig, GenerationSettings, TransformersBackend
    from assistant.engine import ChatConfig
    from assistant.memory import MemoryConfig, MemoryService
    from assistant.model import ModelConfig, load_model
    from bench.common import models_dir
    from personalize.api import train_now
    from personalize.config import TrainConfig
    from storage import DataDir, Store
    from storage.transfer import import_history

    sz = QUICK if quick else FULL
    started_all = time.perf_counter()
    data = DataDir(Path(tempfile.mkdtemp(prefix="attune-quality-"))).ensure()
    for name in ("models", "replay"):  # the converted model and the anchor-set cache persist between runs
        (data.root / name).rmdir()
        (models_dir() / name).mkdir(parents=True, exist_ok=True)
        (data.root / name).symlink_to(models_dir() / name)
    store = Store(data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    users, facts = [], {}
    for u in range(sz.users):
        uid = store.users.create(USER_NAMES[u], "correct horse").id
        users.append(uid)
        facts[uid] = user_facts(u, sz.facts)
        path = data.root / f"history-{u}.jsonl"
        path.write_text("\n".join(json.dumps(c) for c in user_history(u, sz.facts)), encoding="utf-8")
        import_history(store, uid, path)
    own_text = {uid: " ".join(m["content"] for m in store.chats.all_messages(uid)) + " " +
                " ".join(f["correction"] or "" for f in store.chats.feedback(uid)) for uid in users}
    others = {uid: [f["keyword"] for v in users if v != uid for f in facts[v] if not _hits(own_text[uid],
                                                                                          [f["keyword"]])]
              for uid in users}

    # Train: default config for every user; no-replay and SFT-only variants for the first few users.
    # The general-loss rule of the gate is relaxed (anchor_margin) so every candidate is published and can be
    # measured; the verdict of the default gate is recorded beside it.
    base_cfg = dict(sz.train, anchor_margin=100.0)
    variants = {"default": TrainConfig(**base_cfg),
                "no_replay": TrainConfig(**base_cfg, anchor_ratio=0.0),
                "sft_only": TrainConfig(**base_cfg, preference_loss="none", undesirable_weight=0.0)}
    default_margin = TrainConfig().anchor_margin
    train_model = ModelConfig(model="embedded", quant="auto", device=device)  # fp32 on CPU, QLoRA on CUDA
    trained: dict[str, dict[int, dict]] = {v: {} for v in variants}
    t = time.perf_counter()
    for i, uid in enumerate(users):
        for name, cfg in variants.items():
            if name != "default" and i >= sz.variant_users:
                continue
            store.adapters.set_active(uid, None)  # every variant starts from the base model
            job_started = time.perf_counter()
            result = train_now(store, uid, train_model, cfg)
            m = result["metrics"]
            rise = m.get("anchor_rise")
            trained[name][uid] = {
                "version": result["version"], "published": result["published"], "reason": result["reason"],
                "wall_s": round(time.perf_counter() - job_started, 1),
                "heldout_loss_base": m.get("heldout_loss_before"), "heldout_loss": m.get("heldout_loss"),
                "anchor_loss_base": m.get("anchor_loss_base"), "anchor_loss": m.get("anchor_loss"),
                "anchor_rise": rise, "pref_margin_before": m.get("heldout_pref_margin_before"),
                "pref_margin": m.get("heldout_pref_margin"), "examples": m.get("examples"), "train": m.get("train"),
                "timings": m.get("timings"),
                "default_gate_pass": bool(m.get("heldout_loss") is not None and
                                          m["heldout_loss"] < m["heldout_loss_before"] and
                                          (rise is None or rise <= default_margin)),
            }
    train_s = time.perf_counter() - t

    # Serve: the real engine, backend (mixed-adapter batches) and memory.
    setup = time.perf_counter()
    loaded = load_model(ModelConfig(model="embedded", quant=SERVE_QUANT, device=device), data)
    registry = AdapterRegistry(loaded.model, store)
    backend = TransformersBackend(loaded, 2048, registry, BatchConfig(max_batch=BATCH, window_ms=50))
    memory = MemoryService(store, MemoryConfig())
    for uid in users:
        memory.backfill(uid)
    engine = _probe_engine()(store, backend, ChatConfig(defaults=GenerationSettings(temperature=0.0)), memory)

    def activate(name: str) -> None:
        for uid in users:
            row = trained[name].get(uid)
            store.adapters.set_active(uid, row["version"] if row and row["published"] else None)

    t = time.perf_counter()
    probes = [(uid, f["probe"]) for uid in users for f in facts[uid]]
    answers: dict[str, list] = {}
    foreign_memories = 0
    activate("default")
    phase_s: dict[str, float] = {"serve_setup": round(t - setup, 1)}
    for cond, (use_adapter, use_memory) in CONDITIONS.items():
        started = time.perf_counter()
        answers[cond] = _ask_all(engine, probes, use_adapter, use_memory, PROBE_TOKENS)
        phase_s[f"probes_{cond}"] = round(time.perf_counter() - started, 1)
        foreign_memories += sum(_owned(store, uid, turn.memory_ids) for (uid, _), turn in
                                zip(probes, answers[cond], strict=True))

    def score(turns, items=probes) -> dict:
        per_user: dict[int, list[int]] = {uid: [0, 0] for uid, _ in items}
        for (uid, q), turn in zip(items, turns, strict=True):
            expected = next(f["keyword"] for f in facts[uid] if f["probe"] == q)
            per_user[uid][0] += bool(_hits(turn.text, [expected]))
            per_user[uid][1] += 1
        return {"correct": sum(c for c, _ in per_user.values()), "total": sum(n for _, n in per_user.values()),
                "per_user": {USER_NAMES[users.index(uid)]: c for uid, (c, _) in per_user.items()}}

    def leaks(turns, items=probes) -> list[dict]:
        out = []
        for (uid, q), turn in zip(items, turns, strict=True):
            for k in _hits(turn.text, others[uid]):
                out.append({"user": USER_NAMES[users.index(uid)], "probe": q, "keyword": k, "answer": turn.text})
        return out

    recall = {cond: score(answers[cond]) for cond in CONDITIONS}
    leakage = {cond: leaks(answers[cond]) for cond in CONDITIONS}
    samples = {cond: [{"user": USER_NAMES[users.index(uid)], "probe": q, "answer": turn.text}
                      for (uid, q), turn in list(zip(probes, answers[cond], strict=True))[:3]]
               for cond in CONDITIONS}

    # Retrieval isolation: every user's probe set against every user's memory.
    retrieval_checks = 0
    all_probes = sorted({q for _, q in probes})
    for uid in users:
        for q in all_probes:
            hits = memory.retrieve(uid, q)
            retrieval_checks += 1
            foreign_memories += _owned(store, uid, [h.id for h in hits])

    # Variants: adapter-only recall and general QA on the variant users.
    v_users = users[:sz.variant_users]
    v_probes = [(uid, f["probe"]) for uid in v_users for f in facts[uid]]
    qa = GENERAL_QA[:sz.general_qa]
    qa_items = [(uid, q) for uid in v_users for q, _ in qa]

    def qa_score(turns) -> dict:
        right = sum(bool(_hits(turn.text, kws)) for turn, (_, kws) in zip(turns, qa * len(turns), strict=False))
        return {"correct": right, "total": len(turns)}

    started = time.perf_counter()
    general = {"base": qa_score(_ask_all(engine, [(users[0], q) for q, _ in qa], False, False, QA_TOKENS))}
    variant_recall = {"default": score([turn for (uid, _), turn in zip(probes, answers["adapter"], strict=True)
                                        if uid in v_users], v_probes)}  # the main run's adapter-only answers
    for name in variants:
        activate(name)
        if name != "default":
            turns = _ask_all(engine, v_probes, True, False, PROBE_TOKENS)
            variant_recall[name] = score(turns, v_probes)
            leakage[f"adapter:{name}"] = leaks(turns, v_probes)
        general[name] = qa_score(_ask_all(engine, qa_items, True, False, QA_TOKENS))
    probe_s = time.perf_counter() - t
    phase_s["variants_and_general_qa"] = round(time.perf_counter() - started, 1)
    store.close()
    _remove(data.root)

    def mean(name: str, key: str, only=None) -> float | None:
        vals = [r[key] for uid, r in trained[name].items() if r[key] is not None and (only is None or uid in only)]
        return sum(vals) / len(vals) if vals else None

    keys = ("heldout_loss_base", "heldout_loss", "anchor_loss_base", "anchor_loss", "anchor_rise",
            "pref_margin_before", "pref_margin")
    summary = {name: {k: mean(name, k, v_users) for k in keys} | {  # the same users for every variant
        "published": sum(trained[name][uid]["published"] for uid in v_users)} for name in variants}
    gates = {name: {k: mean(name, k) for k in keys} | {
        "jobs": len(trained[name]), "published": sum(r["published"] for r in trained[name].values()),
        "default_gate_pass": sum(r["default_gate_pass"] for r in trained[name].values())} for name in variants}
    return {
        "device": device, "quant": loaded.quant, "dtype": loaded.dtype, "users": sz.users, "facts_per_user": sz.facts,
        "history": _history_counts(user_history(0, sz.facts)),
        "variant_users": sz.variant_users, "general_qa": len(qa), "probe_tokens": PROBE_TOKENS, "batch": BATCH,
        "qa_tokens": QA_TOKENS, "train_config": sz.train, "default_anchor_ratio": TrainConfig().anchor_ratio,
        "recall": recall, "leakage": {k: len(v) for k, v in leakage.items()},
        "leak_examples": {k: v[:3] for k, v in leakage.items() if v}, "foreign_memories": foreign_memories,
        "retrieval_checks": retrieval_checks, "variant_recall": variant_recall, "general_qa_acc": general,
        "variants": summary, "gates": gates,
        "jobs": {name: {USER_NAMES[users.index(uid)]: r for uid, r in rows.items()} for name, rows in trained.items()},
        "samples": samples, "seconds": {"train": round(train_s, 1), "probe": round(probe_s, 1),
                                        "total": round(time.perf_counter() - started_all, 1),
                    **phase_s},
    }


def render(r: dict) -> str:
    from bench.report import table

    def pct(s: dict) -> str:
        return f"{s['correct']}/{s['total']} ({100 * s['correct'] / max(s['total'], 1):.0f}%)"

    names = {"base": "base model", "memory": "memory only", "adapter": "adapter only", "both": "adapter + memory"}
    rec = [[names[c], pct(r["recall"][c]), r["leakage"][c]] for c in ("base", "memory", "adapter", "both")]
    v = r["variants"]
    labels = {"default": f"replay (anchor_ratio {r['default_anchor_ratio']}) + preference losses (default)",
              "no_replay": "no replay (anchor_ratio 0)", "sft_only": "SFT only (no DPO / undesirable term)"}
    ret = [["base model", None, None, None, pct(r["general_qa_acc"]["base"]), None, None]]
    for name in ("default", "no_replay", "sft_only"):
        s = v[name]
        ret.append([labels[name], f"{s['published']}/{r['variant_users']}", s["anchor_loss_base"], s["anchor_loss"],
                    pct(r["general_qa_acc"][name]), pct(r["variant_recall"][name]), s["pref_margin"]])
    g = r["gates"]
    gates = [[labels[n], g[n]["jobs"], g[n]["published"], g[n]["default_gate_pass"], g[n]["heldout_loss_base"],
              g[n]["heldout_loss"], g[n]["anchor_rise"]] for n in ("default", "no_replay", "sft_only")]
    t = r["train_config"]
    h = r["history"]
    leak_total = sum(n for k, n in r["leakage"].items() if k != "base")
    return "\n".join([
        f"Synthetic benchmark shipped in `bench/quality.py`: {r['users']} users × {r['facts_per_user']} personal facts "
        f"and preferences (per user: {h['answers']} answers in {h['conversations']} conversations: facts told, then "
        f"asked about; {h['likes']} answers liked, {h['corrected']} non-answers disliked and corrected, "
        f"{h['disliked_only']} disliked without correction). One "
        "paraphrased probe per fact, never seen in training; right = the expected keyword in the greedy answer "
        f"(≤ {r['probe_tokens']} new tokens). Served by ChatEngine + TransformersBackend (`--quant {r['quant']}`, "
        f"{r.get('dtype', 'float32')}, "
        f"{r['device']}, mixed-adapter batches of ≤ {r['batch']}) with MemoryService (MiniLM, defaults); adapters "
        f"trained by `train_now` with {', '.join(f'{k}={val}' for k, val in t.items())} (other TrainConfig fields "
        "default; the gate's general-loss margin relaxed so every candidate is published and measured; the default "
        "gate's verdict is in the last table).", "",
        table(["condition", "probe recall", "other users' keywords in answers"], rec), "",
        f"**Leakage across users: {leak_total}** keyword(s) of another user (not in the asker's own history) in the "
        f"answers of the memory/adapter conditions (the base row is the coincidence control); "
        f"**{r['foreign_memories']}** memories of another user among all retrieved ones (every engine turn, plus "
        f"{r['retrieval_checks']} direct `retrieve` calls: each user × every probe).", "",
        f"Variants on the first {r['variant_users']} user(s): general-ability retention (gate anchor-set loss, mean "
        f"nats/token; a {r['general_qa']}-question general QA set, ≤ {r['qa_tokens']} tokens, keyword match) and "
        "adapter-only recall; preference margin = held-out corrected answers, mean log-prob of correction minus the "
        "disliked original, per token (higher is better).", "",
        table(["adapter", "published", "anchor loss base", "anchor loss after", "general QA",
               "probe recall (adapter only)", "held-out pref margin"], ret), "",
        "A user whose candidate was not published (held-out loss did not improve) is served the base model in the "
        "QA and recall columns; the anchor losses are the candidate's.", "",
        table(["adapter", "jobs", "published", "would pass default gate", "held-out loss base", "held-out loss after",
               "anchor loss rise"], gates), "",
        f"Time: training {r['seconds']['train'] / 60:.1f} min, probing {r['seconds']['probe'] / 60:.1f} min, total "
        f"{r['seconds']['total'] / 60:.1f} min.",
    ])
