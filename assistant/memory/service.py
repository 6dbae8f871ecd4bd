"""Personal memory, the service: what a user told Attune before, found again by meaning and put into the prompt.

Owns the use cases (record a turn or its feedback, a typed fact, an edit; retrieve; list; delete; forget;
rebuild; backfill an imported history) and their configuration, and keeps SQLite rows and the user's
index in step under the user's lock. The rules of what becomes memory, which near-duplicate wins and what
comes out for a question are in ``assistant.memory.policy``; the per-user FAISS indexes in RAM and on disk
in ``assistant.memory.cache`` (over ``assistant.memory.index``); the text forms in ``assistant.memory.text``.

Feedback reaches memory one way: it is written to SQLite (``ChatService.feedback`` ->
``Chats.add_feedback``), then :meth:`MemoryService.remember_turn` makes the answer's memories match it.
SQLite is the source of truth: every hit is re-read from SQLite for that user, so a deleted memory or
another user's memory can never be returned. Must not know the model, the UI or training.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from assistant.memory.cache import IndexCache, Slot
from assistant.memory.embedder import (
    E5Embedder,
    Embedder,
    HashEmbedder,
    MiniLMConfig,
    MiniLMEmbedder,
    Relevance,
    e5_available,
    embed_groups,
)
from assistant.memory.index import DEFAULT_APPROX_THRESHOLD, IndexConfig
from assistant.memory.policy import (
    POLICY,
    Derived,
    Hit,
    clip,
    desired,
    line,
    relevant,
    select,
    superseded,
    topic_update,
)
from assistant.memory.relations import names_others, roles
from assistant.memory.text import NEUTRAL_STATEMENTS, facts_block, overlap, personal, topic
from storage.chats import clean_text
from storage.db import Store
from storage.memories import MAX_MEMORY_CHARS, Memory, SourceTurn

__all__ = ["POLICY", "Hit", "MemoryConfig", "MemoryService", "make_embedder"]

log = logging.getLogger(__name__)

SYNC_CHUNK = 256  # answers per locked step of a backfill
DEDUPE_NEIGHBOURS = 8  # nearest vectors checked for a near-duplicate of a new memory
BASELINE_TOP = 5  # a question's baseline: the mean of its best scores against this many neutral statements


@dataclass
class MemoryConfig:
    """What is remembered, what is retrieved and how much of it goes into a prompt."""

    k: int = 1
    """Memories retrieved per message at most. Measured on the dev users (adapter off, the embedded 135M model):
    the fact recalled in 19/35 answers with 1, 16/35 with 2, 12/35 with 3 (other facts beside the right one
    confuse a small model), while the right memory was among those served in 27/35 and 28/35: with a bigger
    model, raise it."""
    min_score: float | None = None
    """Cosine the best memory needs; None: the embedder's calibrated value (``embedder.Relevance``, chosen on
    dev users and LoCoMo's tune conversations; BENCHMARKS.md reports them on the test users)."""
    personal_margin: float | None = None
    """How far the best memory must score above the question's baseline when the question is about the user;
    None: the embedder's calibrated value, -1: no such check."""
    general_margin: float | None = None
    """The same for other questions; None: the embedder's calibrated value, -1: no such check."""
    answer_min_score: float | None = None
    """Cosine a correction or a liked answer needs between the question asked and the question it belongs to:
    it is served only to a question about the same thing, never as a fact to others; None: the embedder's."""
    relative_margin: float | None = None
    """Only memories within this cosine of the best hit are kept (drops weak distractors); None: the embedder's."""
    stand_out: float | None = None
    """Standard deviations the best memory must score above the question's mean against all the user's
    memories (questions about things never told get none); None: the embedder's, -1: no such check."""
    tie_epsilon: float = 0.01
    """Scores within the same ``tie_epsilon``-wide band count as a tie, broken by recency (newer first)."""
    budget_chars: int = 1500
    """Characters the whole memory block may take in the prompt (≈ 4 characters per token in English)."""
    item_chars: int = 400
    """Characters of one memory shown in the block at most (longer ones are cut with "…")."""
    max_text_chars: int = 4000
    """Characters of one stored memory at most (question and answer are each cut to about half)."""
    dedupe_overlap: float = 0.8
    """Share of their words (Chinese: characters) two memories must have in common to be near-duplicates (the
    newer replaces the older). Words, not cosine: a memory's vector also holds the message it was said in, so
    two different facts of one message are close in vector space."""
    approx_threshold: int = DEFAULT_APPROX_THRESHOLD
    """Memories of one user from which their index is approximate (IVF) instead of exact (measured)."""
    nprobe: int = 64
    """IVF lists searched per query once approximate (recall vs speed; 64: recall@5 0.96 with e5, 1.0 with
    MiniLM at 100k, about 1 ms: ``assistant.memory.index``)."""
    embedder: str = "auto"
    """``e5`` (multilingual-e5-small, 4-bit, offline), ``minilm`` (all-MiniLM-L6-v2, English only), ``auto``
    (e5 where its engine runs: Linux x86-64 with AVX2; else minilm) or ``hash`` (for tests; no meaning)."""
    embedder_model: str | None = None
    """For ``minilm``: a sentence-transformers folder or cached id; None = the packaged all-MiniLM-L6-v2."""
    max_loaded: int = 64
    """User indexes kept in RAM (least recently used ones are saved and dropped)."""
    save_every: int = 16
    """Save a user's index after this many changes (and on eviction/close); lost changes are re-synced."""

    def __post_init__(self):
        _check_int("k", self.k, 1, 100)
        if not isinstance(self.dedupe_overlap, int | float) or not 0 < self.dedupe_overlap <= 1:
            raise ValueError(f"dedupe_overlap: must be a share above 0 and at most 1, got {self.dedupe_overlap!r}")
        for name in ("min_score", "answer_min_score", "personal_margin", "general_margin"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or not -1.0 <= value <= 1.0):
                raise ValueError(f"{name}: must be a number from -1 to 1 (or None for the embedder's), got {value!r}")
        if self.stand_out is not None and (not isinstance(self.stand_out, int | float) or isinstance(
                self.stand_out, bool) or not (self.stand_out == -1 or 0 <= self.stand_out <= 10)):
            raise ValueError(f"stand_out: must be -1 (off) or a number from 0 to 10, got {self.stand_out!r}")
        if self.relative_margin is not None and (not isinstance(self.relative_margin, int | float)
                                                 or not 0 <= self.relative_margin <= 2):
            raise ValueError(f"relative_margin: must be a number from 0 to 2, got {self.relative_margin!r}")
        if not isinstance(self.tie_epsilon, int | float) or not 0 <= self.tie_epsilon < 1:
            raise ValueError(f"tie_epsilon: must be a number from 0 to below 1, got {self.tie_epsilon!r}")
        _check_int("budget_chars", self.budget_chars, len(facts_block(["x"])) + 100, 10**6)
        _check_int("item_chars", self.item_chars, 40, 10**5)
        _check_int("max_text_chars", self.max_text_chars, 100, MAX_MEMORY_CHARS)
        _check_int("max_loaded", self.max_loaded, 1, 10**6)
        _check_int("save_every", self.save_every, 1, 10**6)
        if self.embedder not in ("auto", "e5", "minilm", "hash"):
            raise ValueError(f"embedder: must be 'auto', 'e5', 'minilm' or 'hash', got {self.embedder!r}")
        try:
            self.index_config()
        except ValueError as e:  # name the MemoryConfig field, not IndexConfig's
            raise ValueError(str(e)) from None

    def index_config(self) -> IndexConfig:
        return IndexConfig(approx_threshold=self.approx_threshold, nprobe=self.nprobe)

    def relevance(self, embedder: Embedder) -> Relevance:
        """The embedder's calibrated relevance, with the fields this config sets."""
        names = [f.name for f in dataclasses.fields(Relevance)]
        return dataclasses.replace(embedder.relevance, **{n: getattr(self, n) for n in names
                                                          if getattr(self, n) is not None})


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name}: must be an integer from {low} to {high}, got {value!r}")


def make_embedder(config: MemoryConfig) -> Embedder:
    if config.embedder == "hash":
        return HashEmbedder()
    if config.embedder == "e5" or (config.embedder == "auto" and config.embedder_model is None):
        why = e5_available()
        if why is None or config.embedder == "e5":
            return E5Embedder()
        log.warning("Memory uses the English-only MiniLM embedder: %s.", why)
    return MiniLMEmbedder(MiniLMConfig(model=config.embedder_model))


class MemoryService:
    """Per-user memory over a Store: record turns and feedback, retrieve, list, delete, rebuild.

    Thread-safe: one lock per user (different users never wait for each other's embeddings).
    """

    def __init__(self, store: Store, config: MemoryConfig | None = None, embedder: Embedder | None = None):
        self.store = store
        self.config = config or MemoryConfig()
        self.embedder = embedder or make_embedder(self.config)
        self.relevance = self.config.relevance(self.embedder)
        self._neutral: np.ndarray | None = None
        self.cache = IndexCache(store, self.embedder, self.config.index_config(), self.config.max_loaded,
                                self.config.save_every)

    # recording --------------------------------------------------------------------------------
    def remember_turn(self, user_id: int, answer_id: int) -> int | None:
        """Make the memories of a stored answer and its question match SQLite (statements of the question,
        a correction or a liked answer); returns the id of the answer's memory, else of the question's first
        statement, else None. Idempotent; call after the answer is stored, and after its feedback is stored
        or it is retried (memory follows the feedback in SQLite; it never writes feedback itself)."""
        turn = self.store.memories.source_turn(user_id, answer_id)
        result = self._sync(user_id, [*turn.sibling_ids, turn.answer_id])
        return result[turn.answer_id]

    def remember_fact(self, user_id: int, text: str, message_id: int | None = None) -> int | None:
        """Store a fact the user typed (or an edit of a memory, keeping its source message); it replaces an
        older near-duplicate. None if a newer near-duplicate exists."""
        text = clip(clean_text(text, what="memory"), self.config.max_text_chars)
        vector = self._embed_memories([(text,)])[0]
        with self.cache.lock(user_id):
            slot = self._slot(user_id)
            if not self._make_room(user_id, slot, text, vector, created_at=None):
                return None
            memory_id = self.store.memories.add(user_id, "fact", text, message_id, policy=POLICY, topic=topic(text))
            self.cache.add(user_id, slot, [memory_id], vector[None])
            self._update_topic(user_id, slot, self.store.memories.get(user_id, memory_id))
        self.cache.evict()
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
        self._sync_chunked(user_id, answer_ids)
        self.flush(user_id)
        after = self.store.memories.count(user_id)
        return {"answers": len(answer_ids), "memories": after, "added": max(after - before, 0)}

    # reading ----------------------------------------------------------------------------------
    def retrieve(self, user_id: int, query: str, k: int | None = None, budget_chars: int | None = None,
                 exclude_conversation: int | None = None) -> list[Hit]:
        """The user's memories relevant to ``query`` (``memory_policy.relevant``: the best one scores high enough
        above the question's baseline, more so for a question not about the user), those within
        ``relative_margin`` of the best, at most ``k``, best first (ties broken by recency), as many as fit
        ``budget_chars`` once rendered; a correction or liked answer only for the question it belongs to; none
        from ``exclude_conversation`` (the conversation being answered); a statement naming only other relatives
        than the question asks about is passed over (``memory_relations``). Often empty, by design."""
        k = self.config.k if k is None else k
        budget = self.config.budget_chars if budget_chars is None else budget_chars
        _check_int("k", k, 1, 100)
        if not isinstance(query, str) or not query.strip():
            return []
        vector = self.embedder.embed_query([query])[0]
        rel = self.relevance
        with self.cache.lock(user_id):
            slot = self._slot(user_id)
            found = [(i, s) for i, s in slot.index.search(vector, 3 * k + 8)
                     if s >= min(rel.min_score, rel.answer_min_score)]
            spread = slot.index.spread(vector) if rel.stand_out >= 0 else None
            rows = self.store.memories.get_many(user_id, [i for i, _ in found], current=True)
            gone = [i for i, _ in found if i not in rows]
            if gone:  # deleted behind our back (e.g. a conversation deleted): heal the index
                slot.index.remove(gone)
                self.cache.changed(user_id, slot, len(gone))
        self.cache.evict()
        if exclude_conversation is not None and found:
            origin = self.store.memories.conversations_of(user_id, [i for i, _ in found if i in rows])
            found = [(i, s) for i, s in found if origin.get(i, (None,))[0] != exclude_conversation]
        found = [(i, s) for i, s in found if i in rows]
        asked = roles(query)  # read once; most questions name no relative, and then no memory is read for it
        facts = [(i, s) for i, s in found if rows[i].cue is None and s >= rel.min_score
                 and not names_others(asked, rows[i].text)]
        if facts and not relevant(facts[0][1], self._baseline(vector), personal(query), rel, spread):
            facts = []
        answers = [(i, s) for i, s in found if rows[i].cue is not None and s >= rel.answer_min_score]
        return select(sorted(facts + answers, key=lambda p: -p[1]), rows, k=k, budget_chars=budget,
                      relative_margin=rel.relative_margin, tie_epsilon=self.config.tie_epsilon,
                      item_chars=self.config.item_chars)

    def _baseline(self, vector: np.ndarray) -> float:
        """How high the question scores against statements about nothing in particular (the mean of its best
        ``BASELINE_TOP`` against ``NEUTRAL_STATEMENTS``): some questions score high with everything."""
        if self._neutral is None:
            self._neutral = embed_groups(self.embedder, [(s,) for s in NEUTRAL_STATEMENTS])
        scores = np.sort(self._neutral @ vector)
        return float(scores[-BASELINE_TOP:].mean())

    def prompt_block(self, hits: list[Hit]) -> str:
        """The memories as a short list of facts for the system prompt; "" when there are none."""
        return facts_block([line(h, self.config.item_chars) for h in hits])

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
        with self.cache.lock(user_id):
            revived = self.store.memories.replaced_by(user_id, [self.store.memories.get(user_id, memory_id).id])
            memory = self.store.memories.delete(user_id, memory_id)
            slot = self.cache.loaded(user_id)
            if slot is not None and slot.index.remove([memory.id]):
                self.cache.changed(user_id, slot, 1)
            if slot is not None:
                self._index_again(user_id, slot, revived)
            if memory.message_id is not None and memory.kind == "statement":  # its sentence leaves the others' context
                self._sync(user_id, self.store.memories.answers_to(user_id, memory.message_id))
        return memory

    def forget_all(self, user_id: int) -> int:
        """Delete all of the user's memories and their index files; returns how many there were."""
        with self.cache.lock(user_id):
            count = self.store.memories.delete_all(user_id)
            self.cache.drop(user_id)
        return count

    # maintenance ------------------------------------------------------------------------------
    def rebuild(self, user_id: int) -> dict:
        """Re-embed all the user's memories from SQLite into a fresh index and save it."""
        self.store.users.by_id(user_id)
        started = time.perf_counter()
        slot = self.cache.rebuild(user_id)
        self.cache.evict()
        return {"user_id": user_id, "memories": slot.index.ntotal, "index": slot.index.kind,
                "seconds": round(time.perf_counter() - started, 3)}

    def flush(self, user_id: int | None = None) -> None:
        """Save unsaved index changes (of one user, or all)."""
        self.cache.flush(user_id)

    def close(self) -> None:
        self.flush()

    def warm_up(self) -> None:
        """Load the embedder now (seconds on first use) rather than in a user's first request."""
        self._baseline(self.embedder.embed_query(["warm up"])[0])

    # internals: syncing answers ---------------------------------------------------------------
    def _slot(self, user_id: int) -> Slot:
        """The user's loaded index, up to date with SQLite (caller holds the user's lock). The first time it
        is opened, rows of an older policy are deleted and re-derived from the messages."""
        if self.cache.loaded(user_id) is not None:
            return self.cache.slot(user_id)
        upgrade = self.store.memories.delete_derived_below(user_id, POLICY)  # re-derived just below
        slot = self.cache.slot(user_id)
        if upgrade:
            log.info("Memory of user %s: %d rows of an older policy; re-deriving them from the messages.",
                     user_id, upgrade)
            self._sync_chunked(user_id, self.store.memories.answer_ids(user_id))
        return slot

    def _sync_chunked(self, user_id: int, answer_ids: list[int]) -> None:
        for start in range(0, len(answer_ids), SYNC_CHUNK):
            self._sync(user_id, answer_ids[start:start + SYNC_CHUNK])

    def _wanted(self, user_id: int, answer_ids: list[int]) -> tuple[list[SourceTurn], list[Derived]]:
        turns = [self.store.memories.source_turn(user_id, a) for a in answer_ids]
        excluded = self.store.memories.excluded_texts(
            user_id, {i for t in turns for i in (t.answer_id, t.question_id) if i is not None})
        deleted = {m: frozenset(t for i, t in excluded if i == m) for m, _ in excluded}
        wanted = list(dict.fromkeys(d for t in turns for d in desired(
            t, self.config.max_text_chars, deleted.get(t.question_id, frozenset()))))
        return turns, [d for d in wanted if (d.message_id, d.text) not in excluded]

    def _sync(self, user_id: int, answer_ids: list[int]) -> dict[int, int | None]:
        """Make the memories of these answers (and their questions) match what SQLite says about them now."""
        _, wanted = self._wanted(user_id, answer_ids)
        have = {m.text for m in self.store.memories.derived_for(user_id, {d.message_id for d in wanted})}
        new = list(dict.fromkeys(d.search_texts for d in wanted if d.text not in have))
        vectors = dict(zip(new, self._embed_memories(new), strict=True)) if new else {}
        out: dict[int, int | None] = {}
        with self.cache.lock(user_id):
            slot = self._slot(user_id)
            turns, wanted = self._wanted(user_id, answer_ids)  # again under the lock: this is authoritative
            sources = {t.answer_id for t in turns} | {t.question_id for t in turns if t.question_id}
            current = self.store.memories.derived_for(user_id, sources)
            found_by = {d.key: d.search_texts for d in wanted}  # a changed context (a sibling deleted): stale
            stale = [m.id for m in current if found_by.get((m.message_id, m.kind, m.text)) != m.search_texts
                     or m.policy < POLICY]
            kept = {(m.message_id, m.kind, m.text): m.id for m in current if m.id not in set(stale)}
            if stale:
                self._delete(user_id, slot, stale)
            created = {t.answer_id: t.created_at for t in turns} | {t.question_id: t.created_at for t in turns}
            for d in wanted:
                if d.key not in kept:
                    kept[d.key] = self._add_derived(user_id, slot, d, created.get(d.message_id), vectors)
            for t in turns:
                mine = [kept.get(d.key) for d in wanted if d.message_id == t.answer_id] + \
                    [kept.get(d.key) for d in wanted if d.message_id == t.question_id]
                out[t.answer_id] = next((i for i in mine if i is not None), None)
        self.cache.evict()
        return out

    def _add_derived(self, user_id: int, slot: Slot, d: Derived, created_at: str | None,
                     vectors: dict[tuple[str, ...], np.ndarray]) -> int | None:
        search = d.search_texts
        vector = vectors[search] if search in vectors else self._embed_memories([search])[0]
        if not self._make_room(user_id, slot, d.text, vector, created_at, cue_less=d.cue is None):
            return None
        memory_id = self.store.memories.add(user_id, d.kind, d.text, d.message_id, created_at=created_at,
                                            policy=POLICY, cue=d.cue, context=d.context, topic=d.topic,
                                            asked=d.asked)
        self.cache.add(user_id, slot, [memory_id], vector[None])
        if d.topic:
            self._update_topic(user_id, slot, self.store.memories.get(user_id, memory_id))
        return memory_id

    def _update_topic(self, user_id: int, slot: Slot, memory: Memory) -> None:
        """A memory of a one-valued topic replaces the user's older ones of it (or is replaced by a newer one)."""
        if not memory.topic:
            return
        older, newer = topic_update(self.store.memories.on_topic(user_id, memory.topic), memory.id,
                                    memory.created_at)
        if newer is not None:
            self.store.memories.replace(user_id, [memory.id], newer)
            self.cache.remove(user_id, slot, [memory.id])
        elif older:
            self.store.memories.replace(user_id, older, memory.id)
            self.cache.remove(user_id, slot, older)

    def _delete(self, user_id: int, slot: Slot, ids: list[int]) -> None:
        """Delete memories (no exclusion recorded); the ones they had replaced are current again."""
        revived = self.store.memories.delete_many(user_id, ids)
        self.cache.remove(user_id, slot, ids)
        self._index_again(user_id, slot, revived)

    def _index_again(self, user_id: int, slot: Slot, ids: list[int]) -> None:
        """Put memories that are current again (their replacement was deleted) back into the index."""
        rows = self.store.memories.get_many(user_id, ids, current=True)
        if rows:
            order = sorted(rows)
            self.cache.add(user_id, slot, order, self._embed_memories([rows[i].search_texts for i in order]))

    def _make_room(self, user_id: int, slot: Slot, text: str, vector: np.ndarray, created_at: str | None,
                   cue_less: bool = True) -> bool:
        """Near-duplicates collapse (``memory_policy.superseded``): False if the new memory must not be
        stored, else the older near-duplicates it replaces are deleted and True."""
        near = self.store.memories.get_many(user_id, [i for i, _ in slot.index.search(vector, DEDUPE_NEIGHBOURS)])
        close = [m for m in near.values() if overlap(m.text, text) >= self.config.dedupe_overlap]
        older = superseded(close, created_at, cue_less)
        if older is None:
            return False
        if older:
            self._delete(user_id, slot, older)
        return True

    def _embed_memories(self, groups: list[tuple[str, ...]]) -> np.ndarray:
        """Vectors of stored memories from what they are found by (``Memory.search_texts``), derived from the
        row alone: a rebuild gives the same vectors."""
        return embed_groups(self.embedder, groups)
