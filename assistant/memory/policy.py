"""Memory policy: what becomes a memory, which near-duplicate wins, and which memories come out for a question.

What becomes memory (each row keyed by the message it came from):
- ``statement``: each short, self-contained sentence the user said about themselves, in their own words
  (``assistant.memory.text.statements``: first person, declarative; questions, requests and orders are not
  kept; long sentences are chunked);
- ``correction``: the user's correction of an answer (it supersedes the answer: a corrected answer is
  never remembered). It is no fact about the user: it belongs to the question it corrects, is found by that
  question (its ``cue``) and served only to a question about the same thing (``answer_min_score``);
- ``liked``: an answer the user liked, kept the same way as a correction;
- ``fact``: what the user typed into the Memory tab (or an edit of a memory).
Never: unrated or disliked answers, replaced (retried) answers, Compare runs. Near-duplicates collapse
into one (among its nearest vectors, the ones sharing at least ``dedupe_overlap`` of their words: the
newest wins). A statement of a one-valued topic (home, job,
name of the dog: ``memory_text.topic``) replaces the user's older ones of that topic: they stay as history
(the Memory tab shows them as replaced) and are never retrieved. A memory the user deleted never comes back
(its text is excluded in SQLite). Rows written under an older policy (``turn`` dumps of whole turns) are
re-derived from the messages the first time the user's memory is opened (``POLICY``).

What comes out: only memories whose cosine to the question is at least ``min_score`` and within
``relative_margin`` of the best one, at most ``k``, never from the conversation being answered (its turns
are already in the prompt); none at all for most general questions, and then no block is added.
The block is a short list of facts in the second person (``memory_text.facts_block``) put before the
text of the question it is for (``memory_text.with_facts``), chosen by measurement (BENCHMARKS.md).

Pure decisions on values the caller brings (turns, rows, scores): must not know SQLite, FAISS, the
embedder or locking (``assistant.memory.service`` orchestrates, ``assistant.memory.cache`` holds the indexes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from assistant.memory.text import (
    asked,
    facts_block,
    informative,
    says_change,
    second_person,
    sentences,
    statements,
    topic,
)
from storage.memories import Memory, SourceTurn, search_texts

POLICY = 5
"""Version of what memory is derived from messages; rows of an older one are re-derived (m006). 3: clauses
(not sentences), corrections and liked answers found by their question, topics. 4: a statement is also found
by the question it answered (``asked``). 5: an aside naming whom someone is to the user is a statement of its
own, in any sentence ("Can Biscotti, our rabbit, join in?" -> "Biscotti is our rabbit.")."""
CUE_CHARS = 300
"""Characters of a question kept as the cue of the correction or liked answer it belongs to."""
CONTEXT_CHARS = 1000
"""Characters of the message a statement was said in kept as its context (what it is found by, with it)."""
VOICE = {"statement": "user", "fact": "user", "turn": "user", "correction": "assistant", "liked": "assistant"}
"""Whose words a memory kind holds: the user's are put into the second person in the prompt."""



class Derived(NamedTuple):
    """One memory a turn should give."""

    message_id: int
    kind: str
    text: str
    cue: str | None = None
    """The question a correction or a liked answer belongs to (what it is found by)."""
    context: str | None = None
    """The message a statement was said in (it is found by itself and that message together)."""
    asked: str | None = None
    """The questions the assistant asked just before that message (a reply is found by what it answers)."""

    @property
    def search_texts(self) -> tuple[str, ...]:
        return search_texts(self.text, self.cue, self.context, self.asked)

    @property
    def key(self) -> tuple[int, str, str]:
        return self.message_id, self.kind, self.text

    @property
    def topic(self) -> str | None:
        return topic(self.text) if VOICE.get(self.kind) == "user" else None


@dataclass(frozen=True)
class Hit:
    """One retrieved memory."""

    id: int
    text: str
    kind: str
    created_at: str
    score: float
    message_id: int | None
    cue: str | None = None

    @property
    def fact(self) -> str:
        """The memory as told to the model: the user's own words in the second person; a correction or a
        liked answer with the question it belongs to."""
        if VOICE.get(self.kind) == "user":
            return second_person(self.text)
        if self.cue:
            verb = "you corrected the answer to" if self.kind == "correction" else "you liked the answer"
            return f'When you asked "{neutralize(self.cue, CUE_CHARS)}" before, {verb}: {self.text}'
        return self.text


def clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def neutralize(text: str, limit: int) -> str:
    """One line that cannot open a chat turn (no angle brackets, so no special tokens) or start a new item."""
    return clip(" ".join(text.replace("<", "‹").replace(">", "›").split()), limit)


def desired(turn: SourceTurn, max_text_chars: int, deleted: frozenset[str] = frozenset()) -> list[Derived]:
    """Every memory this turn should give, in order. ``deleted``: texts of the question's statements the
    user deleted; they are not given, and the sentences they were said in leave the others' context."""
    if turn.excluded or turn.source == "compare":
        return []
    out: list[Derived] = []
    if turn.question is not None and turn.question_id is not None:
        context = clip(_without(turn.question, deleted), CONTEXT_CHARS)
        question = asked(turn.before)
        question = clip(question, CUE_CHARS) if question else None
        out += [Derived(turn.question_id, "statement", s, context=context, asked=question)
                for s in statements(turn.question) if s not in deleted]
    if turn.replaced:
        return out
    cue = clip(turn.question, CUE_CHARS) if turn.question and turn.question.strip() else None
    if turn.correction and turn.correction.strip():
        out.append(Derived(turn.answer_id, "correction", clip(turn.correction, max_text_chars), cue))
    elif turn.rating == "like" and informative(turn.answer):
        out.append(Derived(turn.answer_id, "liked", clip(turn.answer, max_text_chars), cue))
    return out


def _without(message: str, deleted: frozenset[str]) -> str:
    """The message less the sentences that gave a deleted statement, on one line."""
    kept = [s for s in sentences(message) if not deleted or not set(statements(s)) & deleted]
    return " ".join(" ".join(kept).split())


def superseded(near_duplicates: list[Memory], created_at: str | None, cue_less: bool = True) -> list[int] | None:
    """Near-duplicates collapse, the newest wins. ``created_at`` is the new memory's time (None: a fact
    typed now). None if the new one must not be stored (a near-duplicate is as new or newer, or is a fact
    the user typed, which a derived memory never replaces); else the ids of the older ones it replaces."""
    older: list[int] = []
    for row in near_duplicates:
        if (row.cue is None) != cue_less:  # a question's answer never collapses with a statement
            continue
        newer = created_at is not None and row.created_at >= created_at  # a tie: the one stored stays
        if newer or (row.kind == "fact" and created_at is not None):
            return None
        older.append(row.id)
    return older


STAND_OUT_FROM = 8
"""Memories a user needs before ``stands_out`` is asked: the best of n scores is at most sqrt(n - 1) standard
deviations above their mean, so with fewer a real fact could never stand out by ``stand_out``."""


def relevant(best: float, baseline: float, about_user: bool, rel, spread: tuple[float, float, int] | None = None
             ) -> bool:
    """Whether the best memory's score says it answers the question: above ``rel.min_score``, by the margin
    for the kind of question above the question's baseline, and standing out from the user's other memories
    (``stands_out``; ``spread``: the question's mean and deviation against them, and their count).
    ``rel``: ``embedder.Relevance``."""
    margin = rel.personal_margin if about_user else rel.general_margin
    return (best >= rel.min_score and (margin < 0 or best - baseline >= margin)
            and (spread is None or stands_out(best, spread, rel.stand_out)))


def stands_out(best: float, spread: tuple[float, float, int], z: float) -> bool:
    """Whether the best memory scores ``z`` standard deviations above the question's mean against all the
    user's memories: a fact that answers the question does; a question about something never told scores
    about alike with everything (its best is only the luckiest of many). Always true below ``STAND_OUT_FROM``
    memories or when ``z`` < 0."""
    mean, std, n = spread
    return z < 0 or n < STAND_OUT_FROM or best - mean >= z * max(std, 1e-6)


def line(hit: Hit, item_chars: int) -> str:
    """The hit as one line of the facts block."""
    return neutralize(hit.fact, item_chars)


def select(found: list[tuple[int, float]], rows: dict[int, Memory], *, k: int, budget_chars: int,
           relative_margin: float, tie_epsilon: float, item_chars: int) -> list[Hit]:
    """The hits to show for one question, from (id, cosine) pairs already above ``min_score`` whose rows
    exist: within ``relative_margin`` of the best, best first (scores in one ``tie_epsilon`` band are a
    tie, newer first), at most ``k``, as many as fit ``budget_chars`` once rendered."""
    if not found:
        return []
    floor = max(s for _, s in found) - relative_margin
    eps = tie_epsilon or 1e-9
    hits = sorted(
        (Hit(i, rows[i].text, rows[i].kind, rows[i].created_at, s, rows[i].message_id, rows[i].cue)
         for i, s in found if s >= floor),
        key=lambda h: (int(np.floor(h.score / eps)), h.created_at, h.id), reverse=True,
    )
    hits = _after_changes(hits)
    chosen, used = [], len(facts_block(["x"])) - 1
    for hit in hits:
        cost = len(line(hit, item_chars)) + 3
        if used + cost <= budget_chars:
            chosen.append(hit)
            used += cost
        if len(chosen) == k:
            break
    return chosen


def _after_changes(hits: list[Hit]) -> list[Hit]:
    """When the best statement found says something changed ("I swapped my bike for a scooter", "改学日语了"),
    it answers the question over older statements found for it: those are dropped (they are what changed)."""
    if not hits or VOICE.get(hits[0].kind) != "user" or not says_change(hits[0].text):
        return hits
    return [h for h in hits if VOICE.get(h.kind) != "user" or h.created_at >= hits[0].created_at]


def topic_update(current: list[Memory], new_id: int, created_at: str) -> tuple[list[int], int | None]:
    """A new memory of a one-valued topic among the user's ``current`` ones of that topic: (ids of the older
    ones it replaces, id of a newer one that replaces it, or None). Equal times: the one stored later wins."""
    others = [m for m in current if m.id != new_id]
    newer = [m for m in others if m.created_at > created_at]
    if newer:
        return [], max(newer, key=lambda m: (m.created_at, m.id)).id
    return [m.id for m in others], None
