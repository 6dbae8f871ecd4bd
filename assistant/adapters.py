"""Per-user LoRA adapters on one shared base model: lazy loading, an LRU under a count budget, and
hot reload (a newly published version is picked up on the user's next turn, no restart).

ChatEngine resolves the user's active version on every turn (:func:`resolve_adapter`, through
``storage``) and hands the engine an :class:`AdapterRef`, like vLLM's ``LoRARequest``. Engines know
adapter names and folders, never users; :class:`AdapterRegistry` (the transformers engine's adapter
cache) runs no SQL.

A generation pins the adapter it started with, so a version published mid-answer never changes an
answer in flight and a pinned adapter is never evicted.

Damaged files: :func:`check_adapter` checks a version's files before any engine reads them (again only when
they change), and :meth:`AdapterRegistry._load` takes back what a failed peft load left in the shared model.
Either raises ``AdapterDamaged``; :func:`fall_back` then marks the version damaged and makes the newest older
published version with whole files active (else the base model), so that user's turn is still answered and
nobody else is touched.
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

from assistant.errors import AdapterDamaged
from assistant.file_checks import adapter_problem

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


def _ref(user_id: int, row: dict) -> AdapterRef:
    return AdapterRef(adapter_name(user_id, row["version"], row["created_at"]), row["version"], row["path"])


_FILES = ("adapter_config.json", "adapter_model.safetensors")
_whole: dict[str, tuple] = {}  # adapter folder -> stat of its files when they were last found whole
_whole_lock = threading.Lock()


def _stat(folder: Path) -> tuple | None:
    try:
        return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in ((folder / f).stat() for f in _FILES))
    except OSError:
        return None


def check_adapter(ref: AdapterRef) -> None:
    """Raise ``AdapterDamaged`` when the version's files are not whole (:func:`adapter_problem`). Checked again
    only when the files change, so a turn costs two ``stat`` calls."""
    folder = Path(ref.path)
    stat = _stat(folder)
    with _whole_lock:
        if stat is not None and _whole.get(ref.path) == stat:
            return
    problem = adapter_problem(folder)
    if problem:
        raise AdapterDamaged(ref.version, ref.path, problem)
    with _whole_lock:
        if len(_whole) > 4096:
            _whole.clear()
        if stat is not None:
            _whole[ref.path] = stat


def fall_back(store: Store, user_id: int, damaged: AdapterDamaged) -> AdapterRef | None:
    """Mark ``damaged``'s version damaged and serve the newest older published version whose files are whole
    instead (older ones found damaged on the way are marked too), else the base model. Returns what now
    answers the user (:func:`resolve_adapter`)."""
    fallback = None
    for row in store.adapters.list(user_id):  # newest first
        if row["status"] != "published" or row["version"] >= damaged.version or not row["path"]:
            continue
        try:
            check_adapter(_ref(user_id, row))
        except AdapterDamaged as e:
            store.adapters.mark_damaged(user_id, e.version, e.what, None)  # not active: only its row changes
            log.warning("user %s: adapter v%s is damaged too: %s", user_id, e.version, e.what)
            continue
        fallback = row["version"]
        break
    store.adapters.mark_damaged(user_id, damaged.version, damaged.what, fallback)
    log.warning("user %s: adapter v%s is damaged (%s); marked so, now serving %s", user_id, damaged.version,
                damaged.what, f"v{fallback}" if fallback else "the base model")
    return resolve_adapter(store, user_id)


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
