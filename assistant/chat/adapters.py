"""Which adapter answers a user: the chat service resolves the user's active published version on every turn
(:func:`resolve_adapter`, through ``storage``) and hands the engine an ``AdapterRef``; a newly published
version is picked up on the user's next turn, no restart.

Damaged files: :func:`check_adapter` checks a version's files before any engine reads them (again only when
they change); an engine that fails to load one raises ``AdapterDamaged`` too. :func:`fall_back` then marks the
version damaged and makes the newest older published version with whole files active (else the base model),
so that user's turn is still answered and nobody else is touched.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.engines.base import AdapterRef
from assistant.errors import AdapterDamaged
from assistant.file_checks import adapter_problem

if TYPE_CHECKING:
    from storage.db import Store

log = logging.getLogger("attune.adapters")


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
