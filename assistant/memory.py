"""Personal memory: what a user told Attune before, found again by meaning and put into the prompt.

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

SQLite (``storage.memories``) is the source of truth. Each user has their own FAISS index
(``assistant.memory_index``) in ``<data-dir>/memory/u<id>.faiss`` with a JSON sidecar (fingerprint,
embedder, checksum); an index that is missing, corrupt, from another embedder or stale is rebuilt or
brought up to date from SQLite when it is loaded, and every hit is re-read from SQLite for that user,
so a deleted memory or another user's memory can never be returned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from assistant.embedder import Embedder, HashEmbedder, MiniLMConfig, MiniLMEmbedder
from assistant.memory_index import DEFAULT_APPROX_THRESHOLD, IndexConfig, VectorIndex, build, load, save, sidecar
from assistant.memory_text import facts_block, informative, second_person, statements
from storage.chats import clean_text
from storage.db import Store
from storage.errors import InputError, StorageError
from storage.memories import MAX_MEMORY_CHARS, Memory, SourceTurn

log = logging.getLogger(__name__)

POLICY = 2
"""Version of what memory is derived from messages; rows of an older one are re-derived (m006)."""
VOICE = {"statement": "user", "fact": "user", "turn": "user", "correction": "assistant", "liked": "assistant"}
"""Whose words a memory kind holds: the user's are put into the second person in the prompt."""
SYNC_CHUNK = 256  # answers per locked step of a backfill


@dataclass
class MemoryConfig:
    """What is remembered, what is retrieved and how much of it goes into a prompt."""

    k: int = 3
    """Memories retrieved per message at most (unrelated facts beside the right one confuse a small model)."""
    min_score: float = 0.35
    """Cosine a memory needs to be retrieved (calibrated on the quality bench: paraphrased probes vs their
    own statement, general questions vs every memory; BENCHMARKS.md reports its precision and recall)."""
    relative_margin: float = 0.1
    """Only memories within this cosine of the best hit are kept (drops weak distractors)."""
    tie_epsilon: float = 0.01
    """Scores within the same ``tie_epsilon``-wide band count as a tie, broken by recency (newer first)."""
    budget_chars: int = 1500
    """Characters the whole memory block may take in the prompt (≈ 4 characters per token in English)."""
    item_chars: int = 400
    """Characters of one memory shown in the block at most (longer ones are cut with "…")."""
    max_text_chars: int = 4000
    """Characters of one stored memory at most (question and answer are each cut to about half)."""
    dedupe_threshold: float = 0.92
    """Cosine similarity from which a new memory counts as a near-duplicate of an existing one."""
    approx_threshold: int = DEFAULT_APPROX_THRESHOLD
    """Memories of one user from which their index is approximate (IVF) instead of exact (measured)."""
    nprobe: int = 32
    """IVF lists searched per query once approximate (recall vs speed; 32: recall@5 0.99 at 100k)."""
    embedder: str = "minilm"
    """``minilm`` (sentence-transformers, offline) or ``hash`` (deterministic, for tests; no meaning)."""
    embedder_model: str | None = None
    """For ``minilm``: a sentence-transformers folder or cached id; None = the packaged all-MiniLM-L6-v2."""
    max_loaded: int = 64
    """User indexes kept in RAM (least recently used ones are saved and dropped)."""
    save_every: int = 16
    """Save a user's index after this many changes (and on eviction/close); lost changes are re-synced."""

    def __post_init__(self):
        _check_int("k", self.k, 1, 100)
        for name in ("min_score", "dedupe_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not -1.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be a cosine similarity from -1 to 1, got {value!r}")
        if not isinstance(self.relative_margin, int | float) or not 0 <= self.relative_margin <= 2:
            raise ValueError(f"relative_margin: must be a number from 0 to 2, got {self.relative_margin!r}")
        if not isinstance(self.tie_epsilon, int | float) or not 0 <= self.tie_epsilon < 1:
            raise ValueError(f"tie_epsilon: must be a number from 0 to below 1, got {self.tie_epsilon!r}")
        _check_int("budget_chars", self.budget_chars, len(facts_block(["x"])) + 100, 10**6)
        _check_int("item_chars", self.item_chars, 40, 10**5)
        _check_int("max_text_chars", self.max_text_chars, 100, MAX_MEMORY_CHARS)
        _check_int("max_loaded", self.max_loaded, 1, 10**6)
        _check_int("save_every", self.save_every, 1, 10**6)
        if self.embedder not in ("minilm", "hash"):
            raise ValueError(f"embedder: must be 'minilm' or 'hash', got {self.embedder!r}")
        try:
            self.index_config()
        except ValueError as e:  # name the MemoryConfig field, not IndexConfig's
            raise ValueError(str(e)) from None

    def index_config(self) -> IndexConfig:
        return IndexConfig(approx_threshold=self.approx_threshold, nprobe=self.nprobe)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name}: must be an integer from {low} to {high}, got {value!r}")


def make_embedder(config: MemoryConfig) -> Embedder:
    if config.embedder == "hash":
        return HashEmbedder()
    return MiniLMEmbedder(MiniLMConfig(model=config.embedder_model))


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


@dataclass
class _Slot:
    """A user's index loaded in RAM, with the number of changes not yet saved."""

    index: VectorIndex
    pending: int = 0


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def neutralize(text: str, limit: int) -> str:
    """One line that cannot open a chat turn (no angle brackets, so no special tokens) or start a new item."""
    return _clip(" ".join(text.replace("<", "‹").replace(">", "›").split()), limit)


class MemoryService:
    """Per-user memory over a Store: record turns and feedback, retrieve, list, delete, rebuild.

    Thread-safe: one lock per user (different users never wait for each other's embeddings).
    """

    def __init__(self, store: Store, config: MemoryConfig | None = None, embedder: Embedder | None = None):
        self.store = store
        self.config = config or MemoryConfig()
        self.embedder = embedder or make_embedder(self.config)
        self._guard = threading.Lock()
        self._locks: dict[int, threading.RLock] = {}
        self._loaded: OrderedDict[int, _Slot] = OrderedDict()

    # recording --------------------------------------------------------------------------------
    def remember_turn(self, user_id: int, answer_id: int) -> int | None:
        """Make the memories of a stored answer and its question match SQLite (statements of the question,
        a correction or a liked answer); returns the id of the answer's memory, else of the question's first
        statement, else None. Idempotent; call after the answer is stored, and after feedback or a retry."""
        turn = self.store.memories.source_turn(user_id, answer_id)
        result = self._sync(user_id, [*turn.sibling_ids, turn.answer_id])
        return result[turn.answer_id]

    def on_feedback(self, user_id: int, message_id: int, kind: str | None = None, correction: str | None = None,
                    source: str = "ui") -> int | None:
        """Apply like/dislike/clear/correction to the answer's memory; returns its memory id or None.

        With ``kind`` the feedback is first written to SQLite (``Chats.add_feedback``); without it,
        memory follows the feedback already stored there (for callers that wrote it themselves).
        """
        if kind is not None:
            self.store.chats.add_feedback(user_id, message_id, kind, correction, source=source)
        elif correction is not None:
            raise InputError("A correction needs kind 'correction'.")
        return self.remember_turn(user_id, message_id)

    def remember_fact(self, user_id: int, text: str, message_id: int | None = None) -> int | None:
        """Store a fact the user typed (or an edit of a memory, keeping its source message); it replaces an
        older near-duplicate. None if a newer near-duplicate exists."""
        text = _clip(clean_text(text, what="memory"), self.config.max_text_chars)
        vector = self._embed_memories([text])[0]
        with self._lock(user_id):
            slot = self._slot(user_id)
            if not self._make_room(user_id, slot, vector, created_at=None):
                return None
            memory_id = self.store.memories.add(user_id, "fact", text, message_id, policy=POLICY)
            self._index_add(user_id, slot, [memory_id], vector[None])
        self._evict()
        return memory_id

    def edit(self, user_id: int, memory_id: int, text: str) -> int | None:
        """Replace one memory's text (the old text never comes back); returns the new memory's id."""
        text = clean_text(text, what="memory")  # bad input is refused before anything is deleted
        old = self.delete(user_id, memory_id)
        return self.remember_fact(user_id, text, old.message_id)

    def backfill(self, user_id: int) -> dict:
        """Turn all of a user's stored answers (e.g. an imported history) into memories. Idempotent."""
        self.store.users.by_id(user_id)
        before = self.store.memories.count(user_id)
        answer_ids = self.store.memories.answer_ids(user_id)
        for start in range(0, len(answer_ids), SYNC_CHUNK):
            self._sync(user_id, answer_ids[start:start + SYNC_CHUNK])
        self.flush(user_id)
        after = self.store.memories.count(user_id)
        return {"answers": len(answer_ids), "memories": after, "added": max(after - before, 0)}

    # reading ----------------------------------------------------------------------------------
    def retrieve(self, user_id: int, query: str, k: int | None = None, budget_chars: int | None = None,
                 exclude_conversation: int | None = None) -> list[Hit]:
        """The user's memories relevant to ``query``: score >= ``min_score`` and within ``relative_margin`` of the
        best, at most ``k``, best first (ties broken by recency), as many as fit ``budget_chars`` once rendered;
        none from ``exclude_conversation`` (the conversation being answered). Often empty, by design."""
        k = self.config.k if k is None else k
        budget = self.config.budget_chars if budget_chars is None else budget_chars
        _check_int("k", k, 1, 100)
        if not isinstance(query, str) or not query.strip():
            return []
        vector = self.embedder.embed([query])[0]
        with self._lock(user_id):
            slot = self._slot(user_id)
            found = [(i, s) for i, s in slot.index.search(vector, 3 * k + 8) if s >= self.config.min_score]
            rows = self.store.memories.get_many(user_id, [i for i, _ in found])
            gone = [i for i, _ in found if i not in rows]
            if gone:  # deleted behind our back (e.g. a conversation deleted): heal the index
                slot.index.remove(gone)
                self._changed(user_id, slot, len(gone))
        self._evict()
        if exclude_conversation is not None and found:
            origin = self.store.memories.conversations_of(user_id, [i for i, _ in found if i in rows])
            found = [(i, s) for i, s in found if origin.get(i, (None,))[0] != exclude_conversation]
        found = [(i, s) for i, s in found if i in rows]
        if not found:
            return []
        floor = max(s for _, s in found) - self.config.relative_margin
        eps = self.config.tie_epsilon or 1e-9
        hits = sorted(
            (Hit(i, rows[i].text, rows[i].kind, rows[i].created_at, s, rows[i].message_id)
             for i, s in found if s >= floor),
            key=lambda h: (int(np.floor(h.score / eps)), h.created_at, h.id), reverse=True,
        )
        chosen, used = [], len(facts_block(["x"])) - 1
        for hit in hits:
            cost = len(self._line(hit)) + 3
            if used + cost <= budget:
                chosen.append(hit)
                used += cost
            if len(chosen) == k:
                break
        return chosen

    def prompt_block(self, hits: list[Hit]) -> str:
        """The memories as a short list of facts for the system prompt; "" when there are none."""
        return facts_block([self._line(h) for h in hits])

    def list(self, user_id: int, query: str | None = None, limit: int = 50, offset: int = 0) -> list[Memory]:
        """A page of the user's memories for the Memory tab, newest first, optionally containing ``query``."""
        return self.store.memories.list(user_id, query, limit, offset)

    def sources(self, user_id: int, memory_ids: list[int]) -> dict[int, str]:
        """Per memory id: the title of the conversation it came from (absent for facts typed in the Memory tab)."""
        return {i: title or f"#{cid}" for i, (cid, title, _) in
                self.store.memories.conversations_of(user_id, memory_ids).items()}

    def count(self, user_id: int, query: str | None = None) -> int:
        return self.store.memories.count(user_id, query)

    def used(self, user_id: int, memory_ids: list[int]) -> list[Memory]:
        """The memories an answer used (its ``memory_ids``) that still exist, in that order."""
        rows = self.store.memories.get_many(user_id, memory_ids)
        return [rows[i] for i in memory_ids if i in rows]

    # deleting ---------------------------------------------------------------------------------
    def delete(self, user_id: int, memory_id: int) -> Memory:
        """Delete one memory for good (NotFound if it is not the user's); its text is not remembered again."""
        with self._lock(user_id):
            memory = self.store.memories.delete(user_id, memory_id)
            with self._guard:
                slot = self._loaded.get(user_id)
            if slot is not None and slot.index.remove([memory.id]):
                self._changed(user_id, slot, 1)
        return memory

    def forget_all(self, user_id: int) -> int:
        """Delete all of the user's memories and their index files; returns how many there were."""
        with self._lock(user_id):
            count = self.store.memories.delete_all(user_id)
            with self._guard:
                self._loaded.pop(user_id, None)
            index_path = self.store.data_dir.memory_index(user_id)
            for path in (index_path, sidecar(index_path)):
                path.unlink(missing_ok=True)
        return count

    # maintenance ------------------------------------------------------------------------------
    def rebuild(self, user_id: int) -> dict:
        """Re-embed all the user's memories from SQLite into a fresh index and save it."""
        self.store.users.by_id(user_id)
        started = time.perf_counter()
        index = self._embed_all(user_id)  # outside the lock: retrieval goes on meanwhile
        with self._lock(user_id):
            slot = _Slot(index)
            self._bring_up_to_date(user_id, slot)  # what changed while embedding
            self._save(user_id, slot, strict=True)
            with self._guard:
                self._loaded[user_id] = slot
        self._evict()
        return {"user_id": user_id, "memories": slot.index.ntotal, "index": slot.index.kind,
                "seconds": round(time.perf_counter() - started, 3)}

    def flush(self, user_id: int | None = None) -> None:
        """Save unsaved index changes (of one user, or all)."""
        with self._guard:
            users = [user_id] if user_id is not None else list(self._loaded)
        for uid in users:
            with self._lock(uid):
                with self._guard:
                    slot = self._loaded.get(uid)
                if slot is not None and slot.pending:
                    self._save(uid, slot)

    def close(self) -> None:
        self.flush()

    def warm_up(self) -> None:
        """Load the embedder now (seconds on first use) rather than in a user's first request."""
        self.embedder.embed(["warm up"])

    # internals: syncing answers ---------------------------------------------------------------
    def _desired(self, turn: SourceTurn) -> list[tuple[int, str, str]]:
        """(message id, kind, text) of every memory this turn should give, in order."""
        if turn.excluded or turn.source == "compare":
            return []
        out: list[tuple[int, str, str]] = []
        if turn.question is not None and turn.question_id is not None:
            out += [(turn.question_id, "statement", s) for s in statements(turn.question)]
        if turn.replaced:
            return out
        limit = self.config.max_text_chars
        if turn.correction and turn.correction.strip():
            out.append((turn.answer_id, "correction", _clip(turn.correction, limit)))
        elif turn.rating == "like" and informative(turn.answer):
            out.append((turn.answer_id, "liked", _clip(turn.answer, limit)))
        return out

    def _wanted(self, user_id: int, answer_ids: list[int]) -> tuple[list[SourceTurn], list[tuple[int, str, str]]]:
        turns = [self.store.memories.source_turn(user_id, a) for a in answer_ids]
        desired = list(dict.fromkeys(d for t in turns for d in self._desired(t)))
        excluded = self.store.memories.excluded_texts(user_id, {m for m, _, _ in desired})
        return turns, [d for d in desired if (d[0], d[2]) not in excluded]

    def _sync(self, user_id: int, answer_ids: list[int]) -> dict[int, int | None]:
        """Make the memories of these answers (and their questions) match what SQLite says about them now."""
        _, desired = self._wanted(user_id, answer_ids)
        have = {m.text for m in self.store.memories.derived_for(user_id, {d[0] for d in desired})}
        new_texts = list(dict.fromkeys(t for _, _, t in desired if t not in have))
        vectors = dict(zip(new_texts, self._embed_memories(new_texts), strict=True)) if new_texts else {}
        out: dict[int, int | None] = {}
        with self._lock(user_id):
            slot = self._slot(user_id)
            turns, desired = self._wanted(user_id, answer_ids)  # again under the lock: this is authoritative
            sources = {t.answer_id for t in turns} | {t.question_id for t in turns if t.question_id}
            current = self.store.memories.derived_for(user_id, sources)
            kept = {(m.message_id, m.kind, m.text): m.id for m in current if m.policy >= POLICY}
            stale = [m.id for m in current if (m.message_id, m.kind, m.text) not in set(desired) or
                     m.policy < POLICY]
            if stale:
                self.store.memories.delete_many(user_id, stale)
                self._changed(user_id, slot, slot.index.remove(stale))
            created = {t.answer_id: t.created_at for t in turns} | {t.question_id: t.created_at for t in turns}
            for d in desired:
                if d not in kept:
                    kept[d] = self._add_derived(user_id, slot, d, created.get(d[0]), vectors)
            for t in turns:
                mine = [kept.get(d) for d in desired if d[0] == t.answer_id] + \
                    [kept.get(d) for d in desired if d[0] == t.question_id]
                out[t.answer_id] = next((i for i in mine if i is not None), None)
        self._evict()
        return out

    def _add_derived(self, user_id: int, slot: _Slot, d: tuple[int, str, str], created_at: str | None,
                     vectors: dict[str, np.ndarray]) -> int | None:
        message_id, kind, text = d
        vector = vectors[text] if text in vectors else self._embed_memories([text])[0]
        if not self._make_room(user_id, slot, vector, created_at):
            return None
        memory_id = self.store.memories.add(user_id, kind, text, message_id, created_at=created_at, policy=POLICY)
        self._index_add(user_id, slot, [memory_id], vector[None])
        return memory_id

    def _make_room(self, user_id: int, slot: _Slot, vector: np.ndarray, created_at: str | None) -> bool:
        """Near-duplicates collapse, the newest wins: False if a newer one exists (or an older fact the user
        typed, which a derived memory never replaces), else older derived ones are deleted and True."""
        close = [i for i, s in slot.index.search(vector, 4) if s >= self.config.dedupe_threshold]
        rows = self.store.memories.get_many(user_id, close)
        older: list[int] = []
        for row in rows.values():
            newer = created_at is not None and row.created_at >= created_at  # a tie: the one stored stays
            if newer or (row.kind == "fact" and created_at is not None):
                return False
            older.append(row.id)
        if older:
            self.store.memories.delete_many(user_id, older)
            self._changed(user_id, slot, slot.index.remove(older))
        return True

    def _embed_memories(self, texts: list[str]) -> np.ndarray:
        """Vectors of stored memory texts, derived from the text alone (rebuilds give the same vectors)."""
        return self.embedder.embed(texts)

    def _line(self, hit: Hit) -> str:
        return neutralize(hit.fact, self.config.item_chars)

    # internals: loaded indexes ----------------------------------------------------------------
    def _lock(self, user_id: int) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(user_id, threading.RLock())

    def _slot(self, user_id: int) -> _Slot:
        """The user's loaded index, up to date with SQLite (caller holds the user's lock)."""
        with self._guard:
            slot = self._loaded.get(user_id)
            if slot is not None:
                self._loaded.move_to_end(user_id)
        if slot is None:
            upgrade = self.store.memories.delete_derived_below(user_id, POLICY)  # re-derived just below
            slot = self._open(user_id)
            with self._guard:
                self._loaded[user_id] = slot
            if upgrade:
                log.info("Memory of user %s: %d rows of an older policy; re-deriving them from the messages.",
                         user_id, upgrade)
                answer_ids = self.store.memories.answer_ids(user_id)
                for start in range(0, len(answer_ids), SYNC_CHUNK):
                    self._sync(user_id, answer_ids[start:start + SYNC_CHUNK])
        elif self.store.memories.max_id(user_id) != slot.index.max_id:  # added elsewhere (another process)
            self._bring_up_to_date(user_id, slot)
        return slot

    def _evict(self) -> None:
        """Save and drop least recently used indexes beyond ``max_loaded`` (called holding no user lock)."""
        while True:
            with self._guard:
                if len(self._loaded) <= self.config.max_loaded:
                    return
                user_id = next(iter(self._loaded))
            with self._lock(user_id):
                with self._guard:
                    slot = self._loaded.pop(user_id, None)
                if slot is not None and slot.pending:
                    self._save(user_id, slot)

    def _index_add(self, user_id: int, slot: _Slot, ids: list[int], vectors: np.ndarray) -> None:
        slot.index.add(ids, vectors)
        self._changed(user_id, slot, len(ids))

    def _changed(self, user_id: int, slot: _Slot, n: int) -> None:
        slot.pending += n
        if slot.pending >= self.config.save_every:
            self._save(user_id, slot)

    def _bring_up_to_date(self, user_id: int, slot: _Slot) -> None:
        """Remove vectors whose rows are gone and embed rows that have no vector (ids are never reused)."""
        in_db = set(self.store.memories.ids(user_id))
        gone = list(slot.index.ids - in_db)
        missing = sorted(in_db - slot.index.ids)
        if gone:
            slot.index.remove(gone)
        for batch in self.store.memories.iter_texts(user_id, ids=missing, batch=256):
            slot.index.add([i for i, _ in batch], self._embed_memories([t for _, t in batch]))
        if gone or missing:
            log.info("Memory index of user %s brought up to date: %d removed, %d added.",
                     user_id, len(gone), len(missing))
            self._changed(user_id, slot, len(gone) + len(missing))

    def _embed_all(self, user_id: int) -> VectorIndex:
        ids: list[int] = []
        chunks: list[np.ndarray] = []
        for batch in self.store.memories.iter_texts(user_id, batch=256):
            ids.extend(i for i, _ in batch)
            chunks.append(self._embed_memories([t for _, t in batch]))
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, self.embedder.dim), dtype=np.float32)
        return build(ids, vectors, self.embedder.dim, self.config.index_config())

    # internals: files -------------------------------------------------------------------------
    def _open(self, user_id: int) -> _Slot:
        """Load the saved index; rebuild it from SQLite if it is missing, unreadable or from another embedder."""
        index_path = self.store.data_dir.memory_index(user_id)
        try:
            index, fingerprint = load(index_path, self.embedder.name, self.embedder.dim, self.config.index_config())
        except FileNotFoundError:
            log.info("Memory index of user %s is missing; building it from SQLite.", user_id)
        except ValueError as e:
            log.warning("Memory index of user %s is %s; rebuilding it from SQLite.", user_id, e)
        else:
            slot = _Slot(index)
            if self.store.memories.fingerprint(user_id).to_list() != fingerprint:
                log.info("Memory index of user %s is stale; bringing it up to date from SQLite.", user_id)
                self._bring_up_to_date(user_id, slot)
            return slot
        slot = _Slot(self._embed_all(user_id))
        self._bring_up_to_date(user_id, slot)
        self._save(user_id, slot)
        return slot

    def _save(self, user_id: int, slot: _Slot, strict: bool = False) -> None:
        """Save the user's index. A failure is logged (the index is only a cache of SQLite, brought up
        to date on the next load) unless ``strict``."""
        index_path = self.store.data_dir.memory_index(user_id)
        try:
            save(slot.index, index_path, self.embedder.name)
        except OSError as e:
            message = (f"Cannot save the memory index {index_path}: {e}. Free disk space or fix permissions; "
                       "it is rebuilt from the database when needed.")
            if strict:
                raise StorageError(message) from e
            log.warning(message)
            return
        slot.pending = 0
