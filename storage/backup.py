"""Backup of a running Attune and restore into an empty data dir.

A backup holds what cannot be made again: the database (SQLite's online backup API: one consistent snapshot,
taken while other processes keep writing) and the adapter versions that snapshot lists as published (the
active one and those kept for rollback; one kept in the adapter store, ``storage.objects``, is copied when this data
dir holds it and otherwise stays there, its row pointing at it). Caches are left out: converted base models
(``models/``), the FAISS indexes (rebuilt from the database on first use) and the replay anchors (made again per
base model). A manifest lists every file with its size and SHA-256; the backup folder appears under its name only
once it is complete (written beside it, then renamed).

Restore checks every file against the manifest, refuses a data dir that holds anything (it never mixes two
installs), copies the files into place and checks the database's integrity.

On PostgreSQL (``--db postgresql://...``) the database is the server's to back up: both refuse with what to use
instead (``pg_dump`` / ``pg_restore``, and a copy of ``adapters/``).

Knows nothing of models or serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from storage.common import utcnow
from storage.config import StoreConfig, redact
from storage.errors import InputError, StorageError
from storage.paths import DataDir, fsync_dir

if TYPE_CHECKING:
    from storage.db import Store

MANIFEST = "attune-backup.json"
FORMAT = 1
DB_NAME = "attune.db"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def backup(store: Store, dest: Path) -> dict:
    """Write a backup of ``store``'s data dir to the new or empty folder ``dest``; returns the manifest."""
    if store.kind != "sqlite":
        raise StorageError(
            "launch.py backup copies a SQLite database; this Attune keeps its rows in PostgreSQL. Back the database "
            "up with pg_dump (e.g. `pg_dump -Fc -f attune.dump URL`, consistent while Attune serves) and copy the "
            f"adapters/ folder of {store.data_dir.root}.")
    dest = Path(dest).expanduser().resolve()
    if not _empty(dest):
        raise InputError(f"{dest} is not empty: give a new or empty folder for the backup.")
    if dest == store.data_dir.root or store.data_dir.root in dest.parents:
        raise InputError(f"{dest} is inside the data dir {store.data_dir.root}: put the backup somewhere else.")
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        _snapshot(store.path, partial / DB_NAME)
        missing = _copy_adapters(store.data_dir.root, partial)
        manifest = {"format": FORMAT, "created_at": utcnow(), "source": str(store.data_dir.root),
                    "files": {str(p.relative_to(partial)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                              for p in sorted(partial.rglob("*")) if p.is_file()},
                    "adapters_pruned_meanwhile": missing}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for p in partial.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(partial)
        if dest.exists():
            dest.rmdir()
        os.rename(partial, dest)
        fsync_dir(dest.parent)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise StorageError(f"Backup to {dest} failed: {e}. Free disk space or pick another folder.") from e
    return manifest


def _snapshot(source: Path, target: Path) -> None:
    """The database as one consistent snapshot (readers and writers go on meanwhile)."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst, pages=1024)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    finally:
        dst.close()
        src.close()


def _copy_adapters(root: Path, partial: Path) -> list[str]:
    """Copy the adapter folders the snapshot lists as published. A version pruned between the snapshot and
    the copy (never the active one) is marked pruned in the backup too; returns those paths."""
    db = sqlite3.connect(partial / DB_NAME)
    try:
        rows = db.execute("SELECT user_id, version, path, location FROM adapter_versions WHERE status = 'published' "
                          "AND path IS NOT NULL").fetchall()
        missing = []
        for user_id, version, path, location in rows:
            source = (root / path).resolve()
            if root not in source.parents:
                raise StorageError(f"Adapter path {path!r} of user {user_id} leaves the data dir; not backed up.")
            rel = str(source.relative_to(root))
            db.execute("UPDATE adapter_versions SET path = ? WHERE user_id = ? AND version = ?",
                       [rel, user_id, version])  # relative, so the restored data dir can live anywhere
            try:
                shutil.copytree(source, partial / rel)
            except FileNotFoundError:
                if location:  # kept in the adapter store (storage.objects): the restored Attune fetches it from there
                    continue
                db.execute("UPDATE adapter_versions SET status = 'pruned' WHERE user_id = ? AND version = ?",
                           [user_id, version])
                missing.append(rel)
        db.commit()
        return missing
    finally:
        db.close()


def restore(source: Path, data_dir: DataDir, config: StoreConfig | None = None) -> dict:
    """Restore the backup in ``source`` into the empty data dir (its ``attune.db``: ``config`` must be the default
    database); returns counts of what is restored."""
    if config is not None and config.db:
        raise InputError(f"restore writes attune.db into the data dir; run it without --db {redact(config.db)!r}. "
                         "A PostgreSQL database is restored with pg_restore (and the adapters/ folder copied back).")
    source = Path(source).expanduser().resolve()
    manifest = _manifest(source)
    root = data_dir.root
    if not _empty(root):
        held = ", ".join(sorted(p.name for p in root.iterdir())[:5])
        raise InputError(f"The data dir {root} is not empty (it holds {held}): restore only goes into a new or empty "
                         "one, so two installs are never mixed. Pick another --data-dir, or move that one aside.")
    for rel, meta in manifest["files"].items():
        path = source / rel
        if not path.is_file() or path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise StorageError(f"The backup in {source} is damaged: {rel} is missing or differs from its manifest. "
                               "Nothing was restored; use another backup.")
    try:
        for rel in manifest["files"]:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, target)
        data_dir.ensure()
    except OSError as e:
        raise StorageError(f"Restore into {root} failed: {e}. Free disk space, empty {root} and run it again.") from e
    db = sqlite3.connect(root / DB_NAME)
    try:
        if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise StorageError(f"The restored database in {root} fails SQLite's integrity check; use another backup.")
        counts = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                  for t in ("users", "conversations", "messages", "feedback", "memories", "adapter_versions")}
    finally:
        db.close()
    return {"restored_into": str(root), "backup_created_at": manifest["created_at"], **counts}


def _manifest(source: Path) -> dict:
    path = source / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{source} holds no Attune backup ({MANIFEST} is missing).") from None
    except (OSError, ValueError) as e:
        raise StorageError(f"Cannot read {path}: {e}. The backup is damaged; use another one.") from e
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise InputError(f"{path} is not a backup this Attune can restore (format {manifest.get('format')!r}).")
    for rel in manifest["files"]:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise StorageError(f"{path} names a file outside the backup ({rel!r}); refusing to restore it.")
    return manifest
