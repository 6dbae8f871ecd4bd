"""The transformers engine's adapter cache: peft adapters loaded into one in-process model, lazily, in an LRU
under a count budget, keyed by :attr:`AdapterRef.name` (it runs no SQL and knows no user).

A generation pins the adapter it started with, so a version published mid-answer never changes an answer in
flight and a pinned adapter is never evicted. :meth:`AdapterRegistry._load` takes back what a failed peft load
left in the shared model and raises ``AdapterDamaged``."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.engines.base import AdapterRef
from assistant.errors import AdapterDamaged
from assistant.file_checks import adapter_problem

if TYPE_CHECKING:
    pass

log = logging.getLogger("attune.adapters")


@dataclass
class AdapterConfig:
    """How many user adapters stay loaded next to the base model."""

    max_loaded: int = 16
    """Most adapters kept in memory (least recently used ones are unloaded first)."""

    def __post_init__(self):
        if not isinstance(self.max_loaded, int) or self.max_loaded < 1:
            raise ValueError(f"max_loaded: must be an integer of at least 1, got {self.max_loaded!r}")


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
        problem = adapter_problem(path)  # peft changes the shared model before it reads the weights
        if problem:
            raise AdapterDamaged(ref.version, ref.path, problem)
        from peft import PeftModel

        started = time.perf_counter()
        try:
            if not self.is_peft:
                self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=False)
            else:
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        except Exception as e:
            self._undo(name)
            raise AdapterDamaged(ref.version, ref.path, f"peft could not load it: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from e
        self.model.eval()
        seconds = time.perf_counter() - started
        self.load_seconds.append(seconds)
        self._loaded[name] = seconds
        self.generation += 1
        log.info("loaded adapter %s in %.2f s", name, seconds)
        self._evict()

    def _undo(self, name: str) -> None:
        """Take back what a failed load left in the shared model: peft injects the new adapter's LoRA layers
        (into the base model itself on a first load) before it reads the weights."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.generation += 1
        if self.is_peft:
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
            return
        for module_name, module in list(self.base.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, _, child = module_name.rpartition(".")
                setattr(self.base.get_submodule(parent) if parent else self.base, child, module.get_base_layer())
        if "peft_config" in vars(self.base):
            delattr(self.base, "peft_config")

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
