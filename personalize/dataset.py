"""Training examples from one user's log, following what the user's feedback means (below: corrections
replace answers, likes weigh more, dislikes are never targets), and their tokenization with the model's
chat template.

For every assistant answer still in its conversation (a retried answer, ``replaced_by`` set, is
ignored) the context is the system prompt plus the messages before it, with earlier corrected
answers shown as their corrections (what the user now sees). Then:

- a correction replaces the answer: it is the SFT target (``correction_weight``); if the
  original was not liked it is also the rejected side of a preference pair (chosen=correction);
- a liked answer is an SFT target with ``like_weight``; a plain complete answer weighs 1;
- a disliked answer is never a target: alone it is an undesirable example (KTO-style);
- stopped or failed answers without a like or correction are not used;
- filler (an uncorrected short acknowledgment of a message that asks nothing: "Noted!", "Got it,
  you live in Lyon.") weighs ``filler_weight`` (0: dropped), and at most ``max_target_repeats``
  examples share one near-identical target (the newest are kept);
- every statement the user made about themselves (the clauses memory keeps: ``memory_text.statements``)
  becomes ``fact_questions`` question/answer examples (personalize.facts) with the statement in second
  person as the answer; a statement a newer one replaced ("I moved to Lyon" after "I live in Porto", the
  one-valued topics of ``memory_text.topic``) is left out, so only the current value is trained.

Examples are rendered as serving renders them: a ``memory_fraction`` share of fact and answer
examples that have a relevant fact get the memory block (``facts_block`` of the relevant fact and 0-2
of the user's other facts, shuffled, put before the text of the last user message as
``memory_text.with_facts`` does in serving); the rest have none, so the adapter learns to use the
block when it is there and to answer without it.

Answers from every source (ui, api, import) count. Everything is read with the user's id only.
A deterministic per-user hash of the message id holds ``heldout_fraction`` of answers out for
the gate, together with their pairs and undesirable examples.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from assistant.memory.text import facts_block, second_person, statements, topic, with_facts
from assistant.model import render_chat
from personalize.config import TrainConfig
from personalize.facts import fact_questions, is_filler, target_key, untold_questions

if TYPE_CHECKING:
    from storage.db import Store

KINDS = ("sft", "pair", "undesirable", "anchor")


@dataclass
class Example:
    """One (context, answer) pair; ``rejected`` is set for preference pairs."""

    message_id: int
    context: list[dict]
    target: str
    kind: str = "sft"
    weight: float = 1.0
    rejected: str | None = None
    conversation_id: int | None = None
    signal_id: int = 0
    """Highest feedback id that shaped this example (0 if none): it is new when this passes a watermark."""
    complete: bool = True
    """False for an answer cut at a length limit: it is trained without an end-of-turn token."""
    origin: str = "answer"
    """``answer`` (the user's log), ``fact`` (a question made from a statement), ``untold`` (a question about
    something the user never said) or ``anchor``."""
    style_head: str = ""
    style_tail: str = ""
    """The user's style put on this target's start / end (personalize.style): trained, but neither held to the
    base model by the KL term nor counted in evaluation losses."""
    style_stop: bool = False
    """The answer was shortened to the user's length: its end-of-turn token is the style's (trained, not
    evaluated, no KL)."""
    style_spans: list = field(default_factory=list)
    """[start, end) character spans of ``target`` that the style added (list markers, line breaks): trained,
    not evaluated, no KL."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Example:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class UserData:
    """A user's examples split into training and held-out sets."""

    train: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)
    watermark: dict = field(default_factory=lambda: {"message_id": 0, "feedback_id": 0})
    """The newest message and feedback ids this data was built from."""
    facts: list[str] = field(default_factory=list)
    """The user's statements about themselves in second person, as the memory block shows them."""
    dropped: dict = field(default_factory=lambda: {"filler": 0, "repeats": 0, "heldout_duplicates": 0})
    """How many answers were left out as filler or as repeats of a near-identical target, and how many held-out
    answers were trained on instead because a training answer says the same."""

    def counts(self) -> dict:
        out: dict[str, Any] = {}
        for split, items in (("train", self.train), ("heldout", self.heldout)):
            for kind in KINDS[:3]:
                out[f"{split}_{kind}"] = sum(e.kind == kind for e in items)
            out[f"{split}_fact"] = sum(e.origin == "fact" for e in items)
            out[f"{split}_untold"] = sum(e.origin == "untold" for e in items)
        out["facts"] = len(self.facts)
        out.update({f"dropped_{k}": v for k, v in self.dropped.items()})
        return out

    def of(self, kind: str, heldout: bool = False) -> list[Example]:
        return [e for e in (self.heldout if heldout else self.train) if e.kind == kind]


def heldout_key(user_id: int, message_id: int) -> float:
    """A stable number in [0, 1) per (user, message); below ``heldout_fraction`` means held out."""
    digest = hashlib.sha256(f"heldout:{user_id}:{message_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _feedback_state(rows: list[dict]) -> dict[int, dict]:
    """Per message: the current rating, the latest correction and the newest feedback id."""
    state: dict[int, dict] = defaultdict(lambda: {"rating": None, "correction": None, "signal_id": 0})
    for r in rows:  # ordered by id
        s = state[r["message_id"]]
        s["signal_id"] = max(s["signal_id"], r["id"])
        if r["kind"] == "correction":
            s["correction"] = r["correction"]
        else:
            s["rating"] = None if r["kind"] == "clear" else r["kind"]
    return state


def build_examples(store: Store, user_id: int, cfg: TrainConfig) -> UserData:
    """All of the user's examples from the log (their rows only), split train/held-out."""
    messages = store.chats.all_messages(user_id)
    feedback = store.chats.feedback(user_id)
    state = _feedback_state(feedback)
    conversations: dict[int, list[dict]] = defaultdict(list)
    for m in messages:
        if m["user_id"] != user_id:  # defensive: all_messages is already scoped
            continue
        if m["replaced_by"] is None:
            conversations[m["conversation_id"]].append(m)
    data = UserData(watermark={"message_id": max((m["id"] for m in messages), default=0),
                               "feedback_id": max((f["id"] for f in feedback), default=0)})
    examples: list[Example] = []
    said: dict[str, int] = {}  # statement -> id of the (first) user message that said it
    last: dict[str, int] = {}  # statement -> id of the newest user message that said it
    for cid, msgs in conversations.items():
        shown: list[dict] = []  # the conversation as the user sees it now
        for m in msgs:
            fb = state.get(m["id"], {"rating": None, "correction": None, "signal_id": 0})
            if m["role"] == "assistant":
                found = _answer_examples(m, fb, shown, cfg, cid)
                data.dropped["filler"] += sum(e.weight == 0 for e in found)
                examples.extend(e for e in found if e.weight > 0)
                text = fb["correction"] or m["content"]
                if text:
                    shown.append({"role": "assistant", "content": text})
            else:
                shown.append({"role": m["role"], "content": m["content"]})
                if m["role"] == "user":
                    for st in statements(m["content"]):
                        said.setdefault(st, m["id"])
                        last[st] = max(last.get(st, 0), m["id"])
    examples = _cap_repeats(examples, cfg.max_target_repeats, data)
    current = {st: i for st, i in said.items() if st not in superseded(last)}
    newest = sorted(current.items(), key=lambda kv: kv[1])[-cfg.max_facts:] if cfg.max_facts else []
    data.facts = [second_person(st) for st, _ in newest]
    facts = fact_examples(newest, cfg)
    said_texts = [m["content"] for m in messages if m["role"] == "user" and m["user_id"] == user_id]
    untold = untold_examples(said_texts, user_id, cfg)
    _split(user_id, examples + facts + untold, cfg.heldout_fraction, data)
    render_memory(data, user_id, cfg)
    return data


def superseded(said: dict[str, int]) -> set[str]:
    """Statements a newer one of the same one-valued topic replaced (``memory_text.topic``: "I moved to Lyon"
    after "I live in Porto"), by the id of the newest message that said each: never trained as current."""
    newest: dict[str, tuple[int, str]] = {}
    for st, i in said.items():
        t = topic(st)
        if t is not None and i >= newest.get(t, (-1, ""))[0]:
            newest[t] = (i, st)
    return {st for st in said if (t := topic(st)) is not None and newest[t][1] != st}


def _cap_repeats(examples: list[Example], limit: int, data: UserData) -> list[Example]:
    """At most ``limit`` SFT examples per near-identical target (the newest); pairs and others stay."""
    seen: dict[str, int] = defaultdict(int)
    keep: list[Example] = []
    for e in sorted(examples, key=lambda e: -e.message_id):
        if e.kind == "sft":
            key = target_key(e.target)
            seen[key] += 1
            if seen[key] > limit:
                data.dropped["repeats"] += 1
                continue
        keep.append(e)
    return sorted(keep, key=lambda e: e.message_id)


def fact_examples(said: list[tuple[str, int]], cfg: TrainConfig) -> list[Example]:
    """``fact_questions`` (question, second-person answer) examples per (statement, user message id)."""
    out: list[Example] = []
    if not cfg.fact_questions:
        return out
    for statement, message_id in said:
        pairs = fact_questions(statement)
        rng = random.Random(f"{cfg.seed}:fact:{statement}")
        picked = pairs[:1] + rng.sample(pairs[1:], min(len(pairs) - 1, cfg.fact_questions - 1)) if pairs else []
        for question, answer in picked:
            out.append(Example(message_id=message_id, context=_with_system([{"role": "user", "content": question}],
                                                                            cfg.system_prompt),
                               target=answer, weight=cfg.fact_weight, origin="fact"))
    return out


def untold_examples(messages: list[str], user_id: int, cfg: TrainConfig) -> list[Example]:
    """``cfg.never_told`` questions about things the user never mentioned, answered "You haven't told me about
    your ..." (personalize.facts.untold_questions), each with its own negative id (held out like the others by
    it). None for a user who has told nothing about themselves yet."""
    if not cfg.never_told or not messages:
        return []
    pairs = untold_questions(messages, cfg.never_told, f"{cfg.seed}:untold:{user_id}")
    return [Example(message_id=-(10_000 + i), context=_with_system([{"role": "user", "content": q}], cfg.system_prompt),
                    target=a, weight=cfg.fact_weight, origin="untold") for i, (q, a) in enumerate(pairs)]


_CONTENT = re.compile(r"[^\W\d_]{4,}|[\u4e00-\u9fff]{2,}", re.UNICODE)
_COMMON = {"your", "you're", "yours", "what", "which", "that", "this", "with", "have", "about", "called", "named",
           "name", "favourite", "favorite", "like", "really", "always", "there", "their", "they", "from", "would"}


def _words(text: str) -> set[str]:
    return {w.lower() for w in _CONTENT.findall(text or "")} - _COMMON


def relevant_fact(example: Example, facts: list[str]) -> str | None:
    """The user's fact an example is about: the one sharing the most content words with its answer (>= 1
    distinctive word for a fact example, >= 2 otherwise), or None."""
    if example.origin == "fact":
        return next((f for f in facts if f == example.target), None)
    words = _words(example.target)
    best, score = None, 1
    for f in facts:
        overlap = len(words & _words(f))
        if overlap > score:
            best, score = f, overlap
    return best


def memory_context(context: list[dict], lines: list[str], system_prompt: str) -> list[dict]:
    """``context`` with the memory block where serving puts it (``memory_text.with_facts``: before the text of
    the last user message; the system prompt stays as it is)."""
    return with_facts(_with_system(context, system_prompt), facts_block(lines))


def with_distractors(fact: str | None, facts: list[str], rng: random.Random) -> list[str]:
    """The relevant fact (if any) and 0-2 other facts of the user, in random order."""
    others = [f for f in facts if f != fact]
    lines = ([fact] if fact else []) + rng.sample(others, min(len(others), rng.randint(0 if fact else 1, 2)))
    rng.shuffle(lines)
    return lines


def render_memory(data: UserData, user_id: int, cfg: TrainConfig) -> None:
    """Give a ``memory_fraction`` share of the examples with a relevant fact the memory block (in place);
    held-out fact examples always get it (serving retrieves the fact the adapter never saw)."""
    if not data.facts:
        return
    for heldout, items in ((False, data.train), (True, data.heldout)):
        for e in items:
            if e.kind == "undesirable":
                continue
            fact = None if e.origin == "untold" else relevant_fact(e, data.facts)
            if fact is None and e.origin != "untold":  # a never-told question may see unrelated facts
                continue
            rng = random.Random(f"{cfg.seed}:memory:{user_id}:{e.message_id}:{e.context[-1]['content']}")
            if (heldout and e.origin in ("fact", "untold")) or rng.random() < cfg.memory_fraction:
                e.context = memory_context(e.context, with_distractors(fact, data.facts, rng), cfg.system_prompt)


def _answer_examples(m: dict, fb: dict, shown: list[dict], cfg: TrainConfig, cid: int) -> list[Example]:
    if not any(x["role"] == "user" for x in shown):
        return []
    context = _with_system(shown, cfg.system_prompt)
    base: dict[str, Any] = {"message_id": m["id"], "context": context, "conversation_id": cid,
                            "signal_id": fb["signal_id"]}
    original, correction, rating = m["content"], fb["correction"], fb["rating"]
    if correction:
        out = [Example(**base, target=correction, kind="sft", weight=cfg.correction_weight)]
        if rating != "like" and original.strip() and original.strip() != correction.strip():
            out.append(Example(**base, target=correction, kind="pair", rejected=original))
        return out
    if not original.strip():
        return []
    if rating != "dislike" and is_filler(original, shown[-1]["content"] if shown[-1]["role"] == "user" else "",
                                         cfg.filler_max_words):
        base["weight"] = cfg.filler_weight * (cfg.like_weight if rating == "like" else 1.0)
        return [] if m["status"] != "complete" and rating != "like" else [Example(**base, target=original)]
    if rating == "dislike":
        return [Example(**base, target=original, kind="undesirable")]
    if rating == "like":
        return [Example(**base, target=original, kind="sft", weight=cfg.like_weight)]
    if m["status"] != "complete":
        return []  # stopped or failed mid-answer, and the user said nothing about it
    return [Example(**base, target=original, kind="sft", weight=1.0)]


def _with_system(shown: list[dict], system_prompt: str) -> list[dict]:
    msgs = [dict(x) for x in shown]
    if system_prompt and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _split(user_id: int, examples: list[Example], fraction: float, data: UserData) -> None:
    """Held out by message id; with two or more answers at least one is held out and one trained on."""
    keys = {e.message_id: heldout_key(user_id, e.message_id) for e in examples}
    held = {mid for mid, k in keys.items() if k < fraction}  # a pair follows its answer's message id
    answers = {e.message_id for e in examples if e.kind == "sft"}
    if len(answers) >= 2 and not held & answers:
        held.add(min(answers, key=keys.__getitem__))
    elif len(answers) >= 2 and answers <= held:
        held.discard(max(answers, key=keys.__getitem__))
    for e in examples:
        (data.heldout if e.message_id in held else data.train).append(e)
    _dedupe_heldout(data)


def _dedupe_heldout(data: UserData) -> None:
    """A held-out answer whose target is also trained on (near-identical: ``target_key``) measures memorizing,
    not generalizing: it is trained on instead, unless that would leave no held-out answer at all."""
    trained = {target_key(e.target) for e in data.train if e.kind == "sft"}
    dupes = {id(e) for e in data.heldout if e.kind == "sft" and target_key(e.target) in trained}
    if not dupes or len(dupes) == len(data.of("sft", heldout=True)):
        return
    data.train += [e for e in data.heldout if id(e) in dupes]
    data.heldout = [e for e in data.heldout if id(e) not in dupes]
    data.dropped["heldout_duplicates"] = len(dupes)


def is_new(example: Example, watermark: dict | None) -> bool:
    """True if the example is newer than a version's watermark (new answer or new feedback on it)."""
    if not watermark:
        return True
    return example.message_id > watermark.get("message_id", 0) or example.signal_id > watermark.get("feedback_id", 0)


# tokenization ----------------------------------------------------------------------------------
def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return render_chat(tokenizer, messages, generation_prompt)


def token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(tokenizer, context: list[dict], answer: str, max_seq_len: int,
           complete: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt + answer and the number of answer tokens at the end (the loss covers those).

    The prompt is what serving feeds the model (chat template with the generation prompt); the
    answer is the rest of the templated conversation up to and including the end-of-turn token.
    Too long: the oldest messages go first, then the start of what is left, keeping the end of the
    context; an answer longer than 3/4 of ``max_seq_len`` keeps its start. An incomplete answer (cut
    at a length limit) gets no end-of-turn token, so the model does not learn to stop mid-way.
    """
    prompt_text = _render(tokenizer, context, True)
    full_text = _render(tokenizer, context + [{"role": "assistant", "content": answer}], False)
    if full_text.startswith(prompt_text):
        answer_text = full_text[len(prompt_text):]
        eos = tokenizer.eos_token or ""
        if eos and eos in answer_text:
            answer_text = answer_text[: answer_text.rindex(eos) + (len(eos) if complete else 0)]
    else:
        answer_text = answer + ((tokenizer.eos_token or "") if complete else "")
    answer_ids = token_ids(tokenizer, answer_text)[: max(1, max_seq_len * 3 // 4)]
    budget = max_seq_len - len(answer_ids)
    msgs = list(context)
    prompt_ids = token_ids(tokenizer, prompt_text)
    while len(prompt_ids) > budget and _droppable(msgs):
        del msgs[1 if msgs[0]["role"] == "system" else 0]
        prompt_ids = token_ids(tokenizer, _render(tokenizer, msgs, True))
    prompt_ids = prompt_ids[-budget:]
    return prompt_ids + answer_ids, len(answer_ids)


def _droppable(msgs: list[dict]) -> bool:
    """More than the system message and the last message are left."""
    return len(msgs) - (1 if msgs and msgs[0]["role"] == "system" else 0) > 1
