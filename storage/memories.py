"""Per-user memories: the rows the FAISS memory index is built from (SQLite is the source of truth).

A memory is an immutable piece of text (a turn, a correction, a liked answer, a fact) with the id
of the message it came from. Its row id is also its vector id in the user's index: ids are never
reused (AUTOINCREMENT, migration m005) and text never changes (a trigger refuses it), so the pair
(count, max id) of a user's rows changes whenever the set of rows does; ``fingerprint`` exposes it
so an index saved earlier can tell whether it is stale without reading any text.

Every call takes the user's id and sees only that user's rows. Knows nothing of faiss or torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from storage.chats import Chats, clean_text
from storage.common import as_int as _int
from storage.common import utcnow
from storage.errors import InputError, NotFound
from storage.store import StoreBase

KINDS = ("statement", "correction", "liked", "fact", "turn")
"""``turn`` (a "User: … Assistant: …" dump) is only read: rows of it are re-derived as statements (m006)."""
DERIVED_KINDS = ("statement", "correction", "liked", "turn")
"""Kinds derived from messages (re-derivable from SQLite); ``fact`` is written by the user and never derived."""
MAX_MEMORY_CHARS = 20_000
MAX_PAGE = 500
_ID_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's bound-parameter limit


def _chunks(ids: list[int]) -> Iterator[tuple[list[int], str]]:
    """``ids`` in chunks for ``IN (...)`` queries: (chunk, its "?,?,..." placeholders)."""
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = ids[start:start + _ID_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


@dataclass(frozen=True)
class Memory:
    """One stored memory of one user."""

    id: int
    user_id: int
    kind: str
    text: str
    message_id: int | None
    created_at: str
    policy: int = 1
    """The derivation policy the row was written under (see ``assistant.memory.policy.POLICY``)."""
    cue: str | None = None
    """The text the memory is found by when it is not its own text (a correction: the question it corrects)."""
    context: str | None = None
    """The message a statement was said in: the memory is found by its text and this together."""
    topic: str | None = None
    """The one-valued topic it states (``home``, ``job``, ``name of dog``...), None for most memories."""
    replaced_by: int | None = None
    """The newer memory of the same topic that replaced it: history, never retrieved."""
    asked: str | None = None
    """The question of the other side the message answered, when it followed one: found by it too."""

    @property
    def search_texts(self) -> tuple[str, ...]:
        """What the memory's vector is made from (the mean of theirs)."""
        return search_texts(self.text, self.cue, self.context, self.asked)


def search_texts(text: str, cue: str | None, context: str | None, asked: str | None = None) -> tuple[str, ...]:
    """The texts a memory is found by: its cue alone, else its text, with the message it was said in and the
    question that message answered (when there are)."""
    if cue:
        return (cue,)
    return (text, *(t for t in (context, asked) if t and t != text))


@dataclass(frozen=True)
class Fingerprint:
    """A cheap summary of a user's memory rows; equal fingerprints mean the same set of ids."""

    count: int
    max_id: int
    sum_ids: int

    def to_list(self) -> list[int]:
        return [self.count, self.max_id, self.sum_ids]


@dataclass(frozen=True)
class SourceTurn:
    """An assistant answer with what memory needs about it: the question it answers and its feedback."""

    answer_id: int
    question: str | None
    """The user message it answers (the last one before it in the conversation), None if there is none."""
    question_id: int | None
    answer: str
    complete: bool
    """The answer finished normally (not stopped or failed)."""
    replaced: bool
    """A retry replaced it: no longer part of the conversation."""
    rating: str | None
    """``like``, ``dislike`` or None."""
    correction: str | None
    """The user's latest correction of the answer, if any."""
    excluded: bool
    """The user deleted this answer's memory: it must not be remembered again."""
    created_at: str
    sibling_ids: tuple[int, ...]
    """Other answers to the same question (earlier tries, normally replaced)."""
    source: str = "ui"
    """Where the answer came from (``ui``, ``api``, ``import``, ``compare``)."""
    conversation_id: int = 0
    before: str | None = None
    """The assistant's message right before the question (what the question may be a reply to), if any."""


def _replaced_by(db, user_id: int, ids: list[int]) -> list[int]:
    out: list[int] = []
    for chunk, marks in _chunks(ids):
        out += [r[0] for r in db.execute(
            f"SELECT id FROM memories WHERE user_id = ? AND replaced_by IN ({marks})", [user_id, *chunk])]
    return out


def _memory(row: dict) -> Memory:
    return Memory(row["id"], row["user_id"], row["kind"], row["text"], row["message_id"], row["created_at"],
                  row.get("policy") or 1, row.get("cue"), row.get("context"), row.get("topic"), row.get("replaced_by"),
                  row.get("asked"))


def _like_pattern(query: str) -> str:
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Memories:
    def __init__(self, store: StoreBase, chats: Chats):
        self.store = store
        self.chats = chats

    # writes ----------------------------------------------------------------------------------
    def add(self, user_id: int, kind: str, text: Any, message_id: int | None = None,
            created_at: str | None = None, policy: int = 1, cue: str | None = None,
            context: str | None = None, topic: str | None = None, asked: str | None = None) -> int:
        """Insert and commit one memory; returns its id (never reused, even after deletion)."""
        if kind not in KINDS:
            raise InputError(f"A memory's kind must be one of {', '.join(KINDS)}, got {kind!r}.")
        text = clean_text(text, what="memory", limit=MAX_MEMORY_CHARS)
        cue = clean_text(cue, what="memory cue", limit=MAX_MEMORY_CHARS) if cue is not None else None
        context = clean_text(context, what="memory context", limit=MAX_MEMORY_CHARS) if context is not None else None
        asked = clean_text(asked, what="memory question", limit=MAX_MEMORY_CHARS) if asked is not None else None
        if message_id is not None:
            self.chats.message(user_id, message_id)  # NotFound for another user's message
        with self.store.write() as db:
            return db["memories"].insert(
                {"user_id": user_id, "kind": kind, "text": text, "message_id": message_id,
                 "created_at": created_at or utcnow(), "policy": policy, "cue": cue, "context": context,
                 "topic": topic, "asked": asked}
            ).last_pk

    def replace(self, user_id: int, old_ids: Iterable[int], new_id: int) -> None:
        """Mark the user's memories ``old_ids`` as replaced by ``new_id`` (a newer statement of their topic)."""
        ids = [_int(i) for i in old_ids]
        with self.store.write() as db:
            for chunk, marks in _chunks(ids):
                db.execute(f"UPDATE memories SET replaced_by = ? WHERE user_id = ? AND id IN ({marks})",
                           [_int(new_id), user_id, *chunk])

    def on_topic(self, user_id: int, topic: str) -> list[Memory]:
        """The user's current (not replaced) memories of one topic, ascending id."""
        return [_memory(r) for r in self.store.db.query(
            "SELECT * FROM memories WHERE user_id = ? AND topic = ? AND replaced_by IS NULL ORDER BY id",
            [user_id, topic])]

    def replaced_by(self, user_id: int, memory_ids: Iterable[int]) -> list[int]:
        """Ids of the user's memories that the memories ``memory_ids`` replaced."""
        return _replaced_by(self.store.db, user_id, [_int(i) for i in memory_ids])

    @staticmethod
    def _revive(db, user_id: int, ids: list[int]) -> list[int]:
        """Memories replaced by the deleted ``ids`` are current again; returns their ids."""
        revived = _replaced_by(db, user_id, ids)
        for chunk, marks in _chunks(ids):
            db.execute(f"UPDATE memories SET replaced_by = NULL WHERE user_id = ? AND replaced_by IN ({marks})",
                       [user_id, *chunk])
        return revived

    def set_kind(self, user_id: int, memory_id: Any, kind: str) -> None:
        """Change only the kind (e.g. ``turn`` → ``liked``); the text and so the vector stay the same."""
        if kind not in KINDS:
            raise InputError(f"A memory's kind must be one of {', '.join(KINDS)}, got {kind!r}.")
        memory = self.get(user_id, memory_id)
        with self.store.write() as db:
            db.execute("UPDATE memories SET kind = ? WHERE id = ? AND user_id = ?", [kind, memory.id, user_id])

    def delete(self, user_id: int, memory_id: Any) -> Memory:
        """The user deletes one memory: NotFound if it is not theirs. That text of its message never becomes
        memory again (other statements of the same message stay). Returns the deleted row."""
        memory = self.get(user_id, memory_id)
        with self.store.write() as db:
            db.execute("DELETE FROM memories WHERE id = ? AND user_id = ?", [memory.id, user_id])
            self._revive(db, user_id, [memory.id])
            if memory.message_id is not None:
                db.execute("INSERT OR IGNORE INTO memory_text_exclusions (user_id, message_id, text, created_at) "
                           "VALUES (?, ?, ?, ?)", [user_id, memory.message_id, memory.text, utcnow()])
        return memory

    def delete_all(self, user_id: int) -> int:
        """The user forgets every memory; none of their messages so far becomes memory again. Returns the count."""
        with self.store.write() as db:
            db.execute("INSERT OR IGNORE INTO memory_exclusions (user_id, message_id, created_at) "
                       "SELECT user_id, id, ? FROM messages WHERE user_id = ?", [utcnow(), user_id])
            return db.execute("DELETE FROM memories WHERE user_id = ?", [user_id]).rowcount

    def delete_many(self, user_id: int, memory_ids: Iterable[int]) -> list[int]:
        """Delete those of ``memory_ids`` that are the user's, recording no exclusion (a memory superseded
        by a correction, or withdrawn by a dislike). Memories they had replaced are current again: returns
        the ids of those."""
        ids = [_int(i) for i in memory_ids]
        with self.store.write() as db:
            for chunk, marks in _chunks(ids):
                db.execute(f"DELETE FROM memories WHERE user_id = ? AND id IN ({marks})", [user_id, *chunk])
            return [i for i in self._revive(db, user_id, ids) if i not in set(ids)]

    def excluded_texts(self, user_id: int, message_ids: Iterable[int]) -> set[tuple[int, str]]:
        """(message id, text) pairs among these messages whose memory the user deleted."""
        ids = [int(i) for i in message_ids]
        out: set[tuple[int, str]] = set()
        for chunk, marks in _chunks(ids):
            out.update((r[0], r[1]) for r in self.store.db.execute(
                f"SELECT message_id, text FROM memory_text_exclusions WHERE user_id = ? AND message_id IN ({marks})",
                [user_id, *chunk]))
        return out

    def derived_for(self, user_id: int, message_ids: Iterable[int]) -> list[Memory]:
        """The user's memories derived from these messages (every kind but ``fact``), ascending id."""
        ids = [int(i) for i in message_ids]
        out: list[Memory] = []
        for chunk, marks in _chunks(ids):
            out += [_memory(r) for r in self.store.db.query(
                f"SELECT * FROM memories WHERE user_id = ? AND kind != 'fact' AND message_id IN ({marks})",
                [user_id, *chunk])]
        return sorted(out, key=lambda m: m.id)

    def delete_derived_below(self, user_id: int, policy: int) -> int:
        """Delete the user's derived memories written under an older policy (they are re-derived from the
        messages, which stay); the user's own facts are kept. Returns how many were deleted."""
        with self.store.write() as db:
            return db.execute("DELETE FROM memories WHERE user_id = ? AND kind != 'fact' AND policy < ?",
                              [user_id, policy]).rowcount

    def conversations_of(self, user_id: int, memory_ids: Iterable[int]) -> dict[int, tuple[int, str, str]]:
        """Per memory id: (conversation id, conversation title, message role) of the message it came from;
        memories without a message (facts the user added) are absent."""
        ids = [int(i) for i in memory_ids]
        out: dict[int, tuple[int, str, str]] = {}
        for chunk, marks in _chunks(ids):
            for r in self.store.db.execute(
                "SELECT m.id, c.id, c.title, g.role FROM memories m JOIN messages g ON g.id = m.message_id "
                "AND g.user_id = m.user_id JOIN conversations c ON c.id = g.conversation_id AND c.user_id = m.user_id "
                f"WHERE m.user_id = ? AND m.id IN ({marks})", [user_id, *chunk]):
                out[r[0]] = (r[1], r[2], r[3])
        return out

    def excluded(self, user_id: int, message_id: int) -> bool:
        """Whether the user deleted this message's memory (so it must not be remembered again)."""
        return self.store.db.execute("SELECT 1 FROM memory_exclusions WHERE user_id = ? AND message_id = ?",
                                     [user_id, message_id]).fetchone() is not None

    # reads -----------------------------------------------------------------------------------
    def get(self, user_id: int, memory_id: Any) -> Memory:
        rows = list(self.store.db.query("SELECT * FROM memories WHERE id = ? AND user_id = ?",
                                        [_int(memory_id), user_id]))
        if not rows:
            raise NotFound(f"Memory {memory_id!r} does not exist (or is not yours); refresh the Memory list.")
        return _memory(rows[0])

    def get_many(self, user_id: int, memory_ids: Iterable[int], current: bool = False) -> dict[int, Memory]:
        """The user's memories among ``memory_ids``, by id; ids of deleted or other users' rows are absent
        (and of replaced ones with ``current``)."""
        ids = [int(i) for i in memory_ids]
        out: dict[int, Memory] = {}
        only = " AND replaced_by IS NULL" if current else ""
        for chunk, marks in _chunks(ids):
            for row in self.store.db.query(
                f"SELECT * FROM memories WHERE user_id = ? AND id IN ({marks}){only}", [user_id, *chunk]
            ):
                out[row["id"]] = _memory(row)
        return out

    def for_message(self, user_id: int, message_id: int) -> list[Memory]:
        """The user's memories that came from one message (normally zero or one)."""
        return [_memory(r) for r in self.store.db.query(
            "SELECT * FROM memories WHERE message_id = ? AND user_id = ? ORDER BY id", [message_id, user_id]
        )]

    def list(self, user_id: int, query: str | None = None, limit: int = 50, offset: int = 0) -> list[Memory]:
        """One page of the user's memories, newest first; ``query`` keeps those containing it (any case)."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InputError(f"limit must be an integer from 1 to {MAX_PAGE}, got {limit!r}.")
        if not isinstance(offset, int) or offset < 0:
            raise InputError(f"offset must be a non-negative integer, got {offset!r}.")
        where, params = self._where(user_id, query)
        return [_memory(r) for r in self.store.db.query(
            f"SELECT * FROM memories WHERE {where} ORDER BY id DESC LIMIT ? OFFSET ?", [*params, limit, offset]
        )]

    def count(self, user_id: int, query: str | None = None) -> int:
        """How many memories the user has (containing ``query``, if given)."""
        where, params = self._where(user_id, query)
        return self.store.db.execute(f"SELECT COUNT(*) FROM memories WHERE {where}", params).fetchone()[0]

    # what the user's vector index holds: the current (not replaced) memories ------------------
    def ids(self, user_id: int) -> list[int]:
        """The user's current memory ids, ascending."""
        return [r[0] for r in self.store.db.execute(
            "SELECT id FROM memories WHERE user_id = ? AND replaced_by IS NULL ORDER BY id", [user_id])]

    def max_id(self, user_id: int) -> int:
        """The user's newest current memory id, 0 if none: one index lookup, cheap enough for every request."""
        return self.store.db.execute(
            "SELECT COALESCE(MAX(id), 0) FROM memories WHERE user_id = ? AND replaced_by IS NULL",
            [user_id]).fetchone()[0]

    def epoch(self, user_id: int) -> int:
        """A number that changes whenever any of the user's memory rows is added, changed or deleted, by any
        process (a trigger counts them, migration m014): one primary-key read, cheap enough for every request."""
        row = self.store.db.execute("SELECT epoch FROM memory_epochs WHERE user_id = ?", [user_id]).fetchone()
        return int(row[0]) if row else 0

    def fingerprint(self, user_id: int) -> Fingerprint:
        """Count, max id and sum of ids of the user's current rows: changes whenever the set changes."""
        row = self.store.db.execute(
            "SELECT COUNT(*), COALESCE(MAX(id), 0), COALESCE(SUM(id), 0) FROM memories WHERE user_id = ? "
            "AND replaced_by IS NULL", [user_id],
        ).fetchone()
        return Fingerprint(*row)

    def iter_texts(self, user_id: int, ids: Iterable[int] | None = None,
                   batch: int = 1000) -> Iterator[list[tuple[int, tuple[str, ...]]]]:
        """Batches of (id, search texts) of the user's current memories (all, or those among ``ids``), ascending
        id; the search texts are what the vector is made from (``Memory.search_texts``)."""
        if ids is not None:
            wanted = sorted(int(i) for i in ids)
            for start in range(0, len(wanted), batch):
                found = self.get_many(user_id, wanted[start:start + batch], current=True)
                if found:
                    yield [(i, found[i].search_texts) for i in sorted(found)]
            return
        after = 0
        while True:
            rows = self.store.db.execute(
                "SELECT id, text, cue, context, asked FROM memories WHERE user_id = ? AND id > ? "
                "AND replaced_by IS NULL ORDER BY id LIMIT ?",
                [user_id, after, batch],
            ).fetchall()
            if not rows:
                return
            yield [(r[0], search_texts(r[1], r[2], r[3], r[4])) for r in rows]
            after = rows[-1][0]

    # the messages memories come from --------------------------------------------------------
    def source_turn(self, user_id: int, message_id: Any) -> SourceTurn:
        """The answer ``message_id`` of the user, with its question and feedback (NotFound if not theirs)."""
        answer = self.chats.message(user_id, message_id)
        if answer["role"] != "assistant":
            raise InputError("Only the assistant's answers are remembered (with the question they answer); "
                             f"message {answer['id']} is a {answer['role']} message.")
        db, conv = self.store.db, answer["conversation_id"]
        question = db.execute(
            "SELECT id, content FROM messages WHERE conversation_id = ? AND user_id = ? AND role = 'user' "
            "AND id < ? ORDER BY id DESC LIMIT 1", [conv, user_id, answer["id"]]
        ).fetchone()
        siblings: tuple[int, ...] = ()
        before = None
        if question is not None:
            siblings = tuple(i for i in self._answers_after(user_id, conv, question[0]) if i != answer["id"])
            prior = db.execute(
                "SELECT role, content FROM messages WHERE conversation_id = ? AND user_id = ? AND id < ? "
                "AND replaced_by IS NULL ORDER BY id DESC LIMIT 1", [conv, user_id, question[0]]).fetchone()
            before = prior[1] if prior is not None and prior[0] == "assistant" else None
        state = self.chats.feedback_state(user_id, answer["id"])
        return SourceTurn(
            answer_id=answer["id"], question=question[1] if question else None,
            question_id=question[0] if question else None, answer=answer["content"],
            complete=answer["status"] == "complete", replaced=answer["replaced_by"] is not None,
            rating=state["rating"], correction=state["correction"],
            excluded=self.excluded(user_id, answer["id"]), created_at=answer["created_at"], sibling_ids=siblings,
            source=answer["source"], conversation_id=conv, before=before,
        )

    def answers_to(self, user_id: int, message_id: int) -> list[int]:
        """Ids of the user's answers to one of their messages (those after it, before their next message)."""
        row = self.store.db.execute("SELECT conversation_id FROM messages WHERE id = ? AND user_id = ?",
                                    [message_id, user_id]).fetchone()
        return [] if row is None else self._answers_after(user_id, row[0], message_id)

    def _answers_after(self, user_id: int, conversation_id: int, question_id: int) -> list[int]:
        return [r[0] for r in self.store.db.execute(
            "SELECT id FROM messages WHERE conversation_id = ? AND user_id = ? AND role = 'assistant' AND id > ? "
            "AND id < COALESCE((SELECT MIN(id) FROM messages WHERE conversation_id = ? AND user_id = ? AND "
            "role = 'user' AND id > ?), 9223372036854775807) ORDER BY id",
            [conversation_id, user_id, question_id, conversation_id, user_id, question_id])]

    def answer_ids(self, user_id: int) -> list[int]:
        """Ids of all the user's assistant messages, oldest first (what ``backfill`` walks)."""
        return [r[0] for r in self.store.db.execute(
            "SELECT id FROM messages WHERE user_id = ? AND role = 'assistant' ORDER BY id", [user_id]
        )]

    @staticmethod
    def _where(user_id: int, query: str | None) -> tuple[str, list]:
        if query is None or not str(query).strip():
            return "user_id = ?", [user_id]
        return "user_id = ? AND text LIKE ? ESCAPE '\\'", [user_id, _like_pattern(str(query).strip())]
