"""Per-user LoRA adapters on one shared base model: lazy loading, an LRU under a count budget, and
hot reload (a newly published version is picked up on the user's next turn, no restart).

ChatEngine resolves the user's active version on every turn (:func:`resolve_adapter`, through
``storage``) and hands the engine an :class:`AdapterRef`, like vLLM's ``LoRARequest``. Engines know
adapter names and folders, never users; :class:`AdapterRegistry` (the transformers engine's adapter
cache) runs no SQL.

A generation pins the adapter it started with, so a version published mid-answer never changes an
answer in flight and a pinned adapter is never evicted.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.errors import ModelError
from storage.errors import CLI

if TYPE_CHECKING:
    from storage.db import Store

log = logging.getLogger("attune.adapters")


@dataclass
class AdapterConfig:
    """How many user adapters stay loaded next to the base model."""

    max_loaded: int = 16
    """Most adapters kept in memory (least recently used ones are unloaded first)."""

    def __post_init__(self):
        if not isinstance(self.max_loaded, int) or self.max_loaded < 1:
            raise ValueError(f"max_loaded: must be an integer of at least 1, got {self.max_loaded!r}")


@dataclass(frozen=True)
class AdapterRef:
    """One published adapter version as an engine sees it: engines get this, never a user id."""

    name: str
    """Unique engine-side name ``u<user>-v<N>-<tag>``; engines cache adapters under it (never reused)."""
    version: int
    """The version number, reported back with the answer."""
    path: str
    """The peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""


def adapter_name(user_id: int, version: int, created_at: str) -> str:
    """``u<user>-v<N>-<6 hex of the creation time>``. User ids can be reused after ``forget``; with the
    tag a cached adapter (vLLM keeps them by name) can never answer for another user's version."""
    tag = hashlib.sha1(str(created_at).encode()).hexdigest()[:6]
    return f"u{int(user_id)}-v{int(version)}-{tag}"


def resolve_adapter(store: Store, user_id: int) -> AdapterRef | None:
    """The user's active published version as a reference, or None (the base model)."""
    row = store.adapters.active(user_id)
    if row is None or row["status"] != "published" or not row["path"]:
        return None
    return AdapterRef(adapter_name(user_id, row["version"], row["created_at"]), row["version"], row["path"])


class AdapterRegistry:
    """peft adapters loaded into one in-process model, keyed by :attr:`AdapterRef.name`."""

    def __init__(self, model, config: AdapterConfig | None = None):
        self.base = model
        self.model = model  # becomes a PeftModel once the first adapter is loaded
        self.config = config or AdapterConfig()
        self._loaded: OrderedDict[str, float] = OrderedDict()  # name -> load seconds
        self._pins: dict[str, int] = {}
        self._lock = threading.RLock()
        self.load_seconds: list[float] = []
        self.generation = 0
        """Bumped whenever an adapter is loaded or unloaded: what an engine derived from the loaded set is stale."""

    @property
    def is_peft(self) -> bool:
        return self.model is not self.base

    def acquire(self, ref: AdapterRef | None) -> AdapterRef | None:
        """Pin ``ref`` for one generation (loading it if needed); None is the base model."""
        if ref is None:
            return None
        with self._lock:
            if ref.name not in self._loaded:
                self._load(ref)
            self._loaded.move_to_end(ref.name)
            self._pins[ref.name] = self._pins.get(ref.name, 0) + 1
        return ref

    def release(self, ref: AdapterRef | None) -> None:
        if ref is None:
            return
        with self._lock:
            self._pins[ref.name] -= 1
            if not self._pins[ref.name]:
                del self._pins[ref.name]
            self._evict()

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def _load(self, ref: AdapterRef) -> None:
        path, name = Path(ref.path), ref.name
        if not (path / "adapter_config.json").is_file():
            raise ModelError(f"Adapter v{ref.version} is missing at {path}; roll back with "
                             f"`{CLI} adapters NAME --rollback VERSION`.")
        from peft import PeftModel

        started = time.perf_counter()
        try:
            if not self.is_peft:
                self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=False)
            else:
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        except Exception as e:
            raise ModelError(f"Could not load adapter v{ref.version} from {path}: {e}. Roll back with "
                             f"`{CLI} adapters NAME --rollback VERSION`.") from e
        self.model.eval()
        seconds = time.perf_counter() - started
        self.load_seconds.append(seconds)
        self._loaded[name] = seconds
        self.generation += 1
        log.info("loaded adapter %s in %.2f s", name, seconds)
        self._evict()

    def _evict(self) -> None:
        for name in list(self._loaded):
            if len(self._loaded) <= self.config.max_loaded:
                break
            if name in self._pins:
                continue
            self.model.delete_adapter(name)
            del self._loaded[name]
            self.generation += 1
            log.info("unloaded adapter %s", name)
