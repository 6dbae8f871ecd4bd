"""The per-user FAISS indexes kept in RAM: one lock per user, LRU eviction, saving, and keeping each index
up to date with SQLite.

SQLite (``storage.memories``) is the source of truth. Each user has their own FAISS index
(``assistant.memory.index``) in ``<data-dir>/memory/u<id>.faiss`` with a JSON sidecar (fingerprint,
embedder, checksum); an index that is missing, corrupt, from another embedder or stale is rebuilt or
brought up to date from SQLite when it is loaded, and a loaded one whenever the user's rows changed behind it
(several serving processes on one PostgreSQL, each with its own data dir: :meth:`IndexCache.slot`). An index is
only a cache: a failed save is logged and made good on the next load.

Must not know what becomes a memory or what is retrieved (``assistant.memory.policy``), nor the service's
use cases (``assistant.memory.service``): it reads memory rows and texts, embeds them and keeps vectors.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from assistant.memory.embedder import Embedder, embed_groups
from assistant.memory.index import IndexConfig, VectorIndex, build, load, save, sidecar
from storage.db import Store
from storage.errors import StorageError

log = logging.getLogger("assistant.memory")


@dataclass
class Slot:
    """A user's index loaded in RAM, with the number of changes not yet saved."""

    index: VectorIndex
    pending: int = 0
    epoch: int | None = None
    """The user's memory epoch (``storage.memories.Memories.epoch``) the index was last checked against."""


class IndexCache:
    """Loaded user indexes, least recently used first. Methods taking a ``Slot`` expect the caller to hold
    that user's :meth:`lock`; :meth:`evict` and :meth:`flush` take the locks themselves (call them holding
    no user lock)."""

    def __init__(self, store: Store, embedder: Embedder, index_config: IndexConfig, max_loaded: int,
                 save_every: int):
        self.store = store
        self.embedder = embedder
        self.index_config = index_config
        self.max_loaded = max_loaded
        self.save_every = save_every
        self._guard = threading.Lock()
        self._locks: dict[int, threading.RLock] = {}
        self._loaded: OrderedDict[int, Slot] = OrderedDict()

    def lock(self, user_id: int) -> threading.RLock:
        """The user's lock: different users never wait for each other."""
        with self._guard:
            return self._locks.setdefault(user_id, threading.RLock())

    def loaded(self, user_id: int) -> Slot | None:
        """The user's index if it is in RAM (not loaded for this)."""
        with self._guard:
            return self._loaded.get(user_id)

    def slot(self, user_id: int) -> Slot:
        """The user's index, loaded if needed, up to date with the database. Every call reads the user's memory
        epoch (one primary-key read); when it moved since the index was last checked (rows added, deleted,
        replaced or brought back by any process: another server on the same database, a job, the CLI, or this
        one), the rows' fingerprint (count, max id, sum of ids: an aggregate over the user's rows) is compared with
        the vectors held and the index brought up to date. The epoch is read before the rows, so a change made
        while they are read moves it again and is caught on the next call."""
        epoch = self.store.memories.epoch(user_id)
        with self._guard:
            slot = self._loaded.get(user_id)
            if slot is not None:
                self._loaded.move_to_end(user_id)
        if slot is None:
            slot = self._open(user_id)
            with self._guard:
                self._loaded[user_id] = slot
        elif slot.epoch != epoch and self.store.memories.fingerprint(user_id).to_list() != slot.index.fingerprint():
            self._bring_up_to_date(user_id, slot)  # changed elsewhere: another serving process, a job, the CLI
        slot.epoch = epoch
        return slot

    def add(self, user_id: int, slot: Slot, ids: list[int], vectors: np.ndarray) -> None:
        slot.index.add(ids, vectors)
        self.changed(user_id, slot, len(ids))

    def remove(self, user_id: int, slot: Slot, ids: list[int]) -> None:
        self.changed(user_id, slot, slot.index.remove(ids))

    def changed(self, user_id: int, slot: Slot, n: int) -> None:
        slot.pending += n
        if slot.pending >= self.save_every:
            self._save(user_id, slot)

    def drop(self, user_id: int) -> None:
        """Forget the user's index: out of RAM, its files deleted."""
        with self._guard:
            self._loaded.pop(user_id, None)
        index_path = self.store.data_dir.memory_index(user_id)
        for path in (index_path, sidecar(index_path)):
            path.unlink(missing_ok=True)

    def rebuild(self, user_id: int) -> Slot:
        """Re-embed all the user's memories from SQLite into a fresh index, save it (StorageError if that
        fails) and use it."""
        index = self._embed_all(user_id)  # outside the lock: retrieval goes on meanwhile
        with self.lock(user_id):
            slot = Slot(index)
            self._bring_up_to_date(user_id, slot)  # what changed while embedding
            self._save(user_id, slot, strict=True)
            with self._guard:
                self._loaded[user_id] = slot
        return slot

    def evict(self) -> None:
        """Save and drop least recently used indexes beyond ``max_loaded``."""
        while True:
            with self._guard:
                if len(self._loaded) <= self.max_loaded:
                    return
                user_id = next(iter(self._loaded))
            with self.lock(user_id):
                with self._guard:
                    slot = self._loaded.pop(user_id, None)
                if slot is not None and slot.pending:
                    self._save(user_id, slot)

    def flush(self, user_id: int | None = None) -> None:
        """Save unsaved index changes (of one user, or all)."""
        with self._guard:
            users = [user_id] if user_id is not None else list(self._loaded)
        for uid in users:
            with self.lock(uid):
                with self._guard:
                    slot = self._loaded.get(uid)
                if slot is not None and slot.pending:
                    self._save(uid, slot)

    def _bring_up_to_date(self, user_id: int, slot: Slot) -> None:
        """Remove vectors whose rows are gone and embed rows that have no vector (ids are never reused)."""
        in_db = set(self.store.memories.ids(user_id))
        gone = list(slot.index.ids - in_db)
        missing = sorted(in_db - slot.index.ids)
        if gone:
            slot.index.remove(gone)
        for batch in self.store.memories.iter_texts(user_id, ids=missing, batch=256):
            slot.index.add([i for i, _ in batch], embed_groups(self.embedder, [t for _, t in batch]))
        if gone or missing:
            log.info("Memory index of user %s brought up to date: %d removed, %d added.",
                     user_id, len(gone), len(missing))
            self.changed(user_id, slot, len(gone) + len(missing))

    def _embed_all(self, user_id: int) -> VectorIndex:
        ids: list[int] = []
        chunks: list[np.ndarray] = []
        for batch in self.store.memories.iter_texts(user_id, batch=256):
            ids.extend(i for i, _ in batch)
            chunks.append(embed_groups(self.embedder, [t for _, t in batch]))
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, self.embedder.dim), dtype=np.float32)
        return build(ids, vectors, self.embedder.dim, self.index_config)

    def _open(self, user_id: int) -> Slot:
        """Load the saved index; rebuild it from SQLite if it is missing, unreadable or from another embedder."""
        index_path = self.store.data_dir.memory_index(user_id)
        try:
            index, fingerprint = load(index_path, self.embedder.name, self.embedder.dim, self.index_config)
        except FileNotFoundError:
            log.info("Memory index of user %s is missing; building it from SQLite.", user_id)
        except ValueError as e:
            log.warning("Memory index of user %s is %s; rebuilding it from SQLite.", user_id, e)
        else:
            slot = Slot(index)
            if self.store.memories.fingerprint(user_id).to_list() != fingerprint:
                log.info("Memory index of user %s is stale; bringing it up to date from SQLite.", user_id)
                self._bring_up_to_date(user_id, slot)
            return slot
        slot = Slot(self._embed_all(user_id))
        self._bring_up_to_date(user_id, slot)
        self._save(user_id, slot)
        return slot

    def _save(self, user_id: int, slot: Slot, strict: bool = False) -> None:
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
