"""Per-user LoRA adapters on one shared base model: lazy loading, an LRU under a count budget, and
hot reload (a newly published version is picked up on the user's next turn, no restart).

A generation pins the adapter it started with, so a version published mid-answer never changes an
answer in flight and a pinned adapter is never evicted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from storage.db import Store
from storage.errors import CLI, ModelError

log = logging.getLogger("attune.adapters")
BASE = "__base__"  # peft's name for "no adapter" in mixed-adapter batches


@dataclass
class AdapterConfig:
    """How many user adapters stay loaded next to the base model."""

    max_loaded: int = 16
    """Most adapters kept in memory (least recently used ones are unloaded first)."""

    def __post_init__(self):
        if not isinstance(self.max_loaded, int) or self.max_loaded < 1:
            raise ValueError(f"max_loaded: must be an integer of at least 1, got {self.max_loaded!r}")


@dataclass(frozen=True)
class ActiveAdapter:
    user_id: int
    version: int
    name: str


def active_version(store: Store, user_id: int) -> int | None:
    """The user's active published version, or None (base model)."""
    row = store.db.execute(
        "SELECT a.version FROM active_adapters a JOIN adapter_versions v "
        "ON v.user_id = a.user_id AND v.version = a.version AND v.status = 'published' "
        "WHERE a.user_id = ?", [user_id]).fetchone()
    return row[0] if row and row[0] is not None else None


class AdapterRegistry:
    def __init__(self, model, store: Store, config: AdapterConfig | None = None):
        self.base = model
        self.model = model  # becomes a PeftModel once the first adapter is loaded
        self.store = store
        self.config = config or AdapterConfig()
        self._loaded: OrderedDict[str, float] = OrderedDict()  # name -> load seconds
        self._pins: dict[str, int] = {}
        self._lock = threading.RLock()
        self.load_seconds: list[float] = []

    @property
    def is_peft(self) -> bool:
        return self.model is not self.base

    def acquire(self, user_id: int, use_adapter: bool = True) -> ActiveAdapter | None:
        """Pin and return the user's active adapter (loading it if needed), or None for the base model."""
        if not use_adapter:
            return None
        version = active_version(self.store, user_id)
        if version is None:
            return None
        name = f"u{user_id}_v{version}"
        with self._lock:
            if name not in self._loaded:
                self._load(user_id, version, name)
            self._loaded.move_to_end(name)
            self._pins[name] = self._pins.get(name, 0) + 1
        return ActiveAdapter(user_id, version, name)

    def release(self, adapter: ActiveAdapter | None) -> None:
        if adapter is None:
            return
        with self._lock:
            self._pins[adapter.name] -= 1
            if not self._pins[adapter.name]:
                del self._pins[adapter.name]
            self._evict()

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def _load(self, user_id: int, version: int, name: str) -> None:
        path = self.store.data_dir.adapters(user_id) / f"v{version}"
        if not (path / "adapter_config.json").is_file():
            raise ModelError(f"Adapter v{version} of user {user_id} is missing at {path}; roll back with "
                             f"`{CLI} adapters NAME --rollback VERSION`.")
        from peft import PeftModel

        started = time.perf_counter()
        try:
            if not self.is_peft:
                self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=False)
            else:
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        except Exception as e:
            raise ModelError(f"Could not load adapter v{version} of user {user_id} from {path}: {e}") from e
        self.model.eval()
        seconds = time.perf_counter() - started
        self.load_seconds.append(seconds)
        self._loaded[name] = seconds
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
            log.info("unloaded adapter %s", name)
