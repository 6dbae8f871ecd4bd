"""Memory policy: what becomes a memory, which near-duplicate wins, and which memories come out for a question.

What becomes memory (each row keyed by the message it came from):
- ``statement``: each short, self-contained sentence the user said about themselves, in their own words
  (``assistant.memory_text.statements``: first person, declarative; questions, requests and orders are not
  kept; long sentences are chunked);
- ``correction``: the user's correction of an answer (it supersedes the answer: a corrected answer is
  never remembered);
- ``liked``: an answer the user liked;
- ``fact``: what the user typed into the Memory tab (or an edit of a memory).
Never: unrated or disliked answers, replaced (retried) answers, Compare runs. Near-duplicates collapse
into one (cosine >= ``dedupe_threshold``; the newest wins). A memory the user deleted never comes back
(its text is excluded in SQLite). Rows written under an older policy (``turn`` dumps of whole turns) are
re-derived from the messages the first time the user's memory is opened (``POLICY``).

What comes out: only memories whose cosine to the question is at least ``min_score`` and within
``relative_margin`` of the best one, at most ``k``, never from the conversation being answered (its turns
are already in the prompt); none at all for most general questions, and then no block is added.
The block is a short list of facts in the second person (``memory_text.facts_block``) put before the
text of the question it is for (``memory_text.with_facts``), chosen by measurement (BENCHMARKS.md).

Pure decisions on values the caller brings (turns, rows, scores): must not know SQLite, FAISS, the
embedder or locking (``assistant.memory`` orchestrates, ``assistant.memory_cache`` holds the indexes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from assistant.memory_text import facts_block, informative, second_person, statements
from storage.memories import Memory, SourceTurn

POLICY = 2
"""Version of what memory is derived from messages; rows of an older one are re-derived (m006)."""
VOICE = {"statement": "user", "fact": "user", "turn": "user", "correction": "assistant", "liked": "assistant"}
"""Whose words a memory kind holds: the user's are put into the second person in the prompt."""

Derived = tuple[int, str, str]
"""(message id, kind, text) of one memory a turn should give."""


@dataclass(frozen=True)
class Hit:
    """One retrieved memory."""

    id: int
    text: str
    kind: str
    created_at: str
    score: float
    message_id: int | None

    @property
    def fact(self) -> str:
        """The memory as a fact told to the model: the user's own words in the second person."""
        return second_person(self.text) if VOICE.get(self.kind) == "user" else self.text


def clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def neutralize(text: str, limit: int) -> str:
    """One line that cannot open a chat turn (no angle brackets, so no special tokens) or start a new item."""
    return clip(" ".join(text.replace("<", "‹").replace(">", "›").split()), limit)


def desired(turn: SourceTurn, max_text_chars: int) -> list[Derived]:
    """(message id, kind, text) of every memory this turn should give, in order."""
    if turn.excluded or turn.source == "compare":
        return []
    out: list[Derived] = []
    if turn.question is not None and turn.question_id is not None:
        out += [(turn.question_id, "statement", s) for s in statements(turn.question)]
    if turn.replaced:
        return out
    if turn.correction and turn.correction.strip():
        out.append((turn.answer_id, "correction", clip(turn.correction, max_text_chars)))
    elif turn.rating == "like" and informative(turn.answer):
        out.append((turn.answer_id, "liked", clip(turn.answer, max_text_chars)))
    return out


def superseded(near_duplicates: list[Memory], created_at: str | None) -> list[int] | None:
    """Near-duplicates collapse, the newest wins. ``created_at`` is the new memory's time (None: a fact
    typed now). None if the new one must not be stored (a near-duplicate is as new or newer, or is a fact
    the user typed, which a derived memory never replaces); else the ids of the older ones it replaces."""
    older: list[int] = []
    for row in near_duplicates:
        newer = created_at is not None and row.created_at >= created_at  # a tie: the one stored stays
        if newer or (row.kind == "fact" and created_at is not None):
            return None
        older.append(row.id)
    return older


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
        (Hit(i, rows[i].text, rows[i].kind, rows[i].created_at, s, rows[i].message_id)
         for i, s in found if s >= floor),
        key=lambda h: (int(np.floor(h.score / eps)), h.created_at, h.id), reverse=True,
    )
    chosen, used = [], len(facts_block(["x"])) - 1
    for hit in hits:
        cost = len(line(hit, item_chars)) + 3
        if used + cost <= budget_chars:
            chosen.append(hit)
            used += cost
        if len(chosen) == k:
            break
    return chosen
