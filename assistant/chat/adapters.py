"""Which adapter answers a user: the chat service resolves the user's active published version on every turn
(:func:`resolve_adapter`, through ``storage``) and hands the engine an ``AdapterRef``; a newly published
version is picked up on the user's next turn, no restart.

Damaged files: :func:`check_adapter` checks a version's files before any engine reads them (again only when
they change); an engine that fails to load one raises ``AdapterDamaged`` too. :func:`fall_back` then marks the
version damaged and makes the newest older published version with whole files active (else the base model),
so that user's turn is still answered and nobody else is touched.

The adapter store (``--adapter-store``): a version this server does not hold yet is downloaded into its data dir on
first use (:func:`ready`, through ``storage``), only a completed upload and each file checked. Stored objects that are
not whole are damage as above; a store that cannot be reached is ``AdapterUnavailable``: this turn is answered by an
older version this server holds (:func:`held_fallback`, else the base model), nothing is marked, the next turn tries
again. A damaged copy in this data dir of a version the store holds is downloaded again once before it counts as
damaged. Engines only ever get local paths.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.engines.base import AdapterRef
from assistant.errors import AdapterDamaged, AdapterUnavailable
from assistant.file_checks import adapter_problem
from storage.objects import ObjectsIncomplete, ObjectStoreUnavailable
from storage.paths import remove_tree

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


def fetch_adapter(store: Store, user_id: int, ref: AdapterRef) -> None:
    """Make sure the version's files are in this data dir, downloading a version kept in the adapter store on its
    first use here. Raises ``AdapterDamaged`` when its stored objects are not whole (no completion marker, a file
    missing or changed), ``AdapterUnavailable`` when the store cannot be reached now. One ``stat`` when held."""
    if Path(ref.path).exists():
        return
    row = store.adapters.get(user_id, ref.version)
    if not row.get("location"):
        return  # kept only in a data dir: check_adapter says the folder is missing
    started = time.perf_counter()
    try:
        store.adapters.fetch(row)
    except ObjectsIncomplete as e:
        raise AdapterDamaged(ref.version, row["location"], str(e).rstrip(".")) from e
    except ObjectStoreUnavailable as e:
        raise AdapterUnavailable(ref.version, row["location"], str(e).rstrip(".")) from e
    log.info("user %s: downloaded adapter v%s from %s in %.2f s", user_id, ref.version, row["location"],
             time.perf_counter() - started)


def ready(store: Store, user_id: int, ref: AdapterRef) -> None:
    """The version's files are here and whole (:func:`fetch_adapter`, :func:`check_adapter`); a damaged copy of a
    version kept in the adapter store is replaced by a fresh download once before it counts as damaged."""
    fetch_adapter(store, user_id, ref)
    try:
        check_adapter(ref)
    except AdapterDamaged as e:
        if not store.adapters.get(user_id, ref.version).get("location"):
            raise
        log.warning("user %s: the copy of adapter v%s here is damaged (%s); downloading it again", user_id,
                    ref.version, e.what)
        remove_tree(Path(ref.path))
        fetch_adapter(store, user_id, ref)
        check_adapter(ref)


def held_fallback(store: Store, user_id: int, version: int) -> AdapterRef | None:
    """The newest published version older than ``version`` whose whole files this data dir already holds (nothing
    is downloaded or marked), else None: what answers while the adapter store cannot be reached."""
    for row in store.adapters.list(user_id):  # newest first
        if row["status"] == "published" and row["version"] < version and row["path"] and Path(row["path"]).exists():
            try:
                check_adapter(_ref(user_id, row))
            except AdapterDamaged:
                continue
            return _ref(user_id, row)
    return None


def fall_back(store: Store, user_id: int, damaged: AdapterDamaged) -> AdapterRef | None:
    """Mark ``damaged``'s version damaged and serve the newest older published version whose files are whole
    instead (older ones found damaged on the way are marked too), else the base model. Returns what now
    answers the user (:func:`resolve_adapter`)."""
    fallback = None
    for row in store.adapters.list(user_id):  # newest first
        if row["status"] != "published" or row["version"] >= damaged.version or not row["path"]:
            continue
        try:
            ready(store, user_id, _ref(user_id, row))
        except AdapterDamaged as e:
            store.adapters.mark_damaged(user_id, e.version, e.what, None)  # not active: only its row changes
            log.warning("user %s: adapter v%s is damaged too: %s", user_id, e.version, e.what)
            continue
        except AdapterUnavailable:  # nothing wrong with it, it cannot be had right now: it stays the one to serve
            pass
        fallback = row["version"]
        break
    store.adapters.mark_damaged(user_id, damaged.version, damaged.what, fallback)
    log.warning("user %s: adapter v%s is damaged (%s); marked so, now serving %s", user_id, damaged.version,
                damaged.what, f"v{fallback}" if fallback else "the base model")
    return resolve_adapter(store, user_id)
