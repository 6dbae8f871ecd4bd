"""Per-user adapter versions: numbering, atomic publish of a trained folder, the active pointer,
rollback and pruning.

Layout: ``adapters/u<id>/v<N>/`` holds a peft adapter plus ``metrics.json``; the active version is
the ``active_adapters`` row, switched in the same SQLite transaction that records the version.
Every candidate that reached the gate gets a version number; rejected ones keep their metrics in
SQLite and have no folder. A published version whose files serving found damaged is marked ``damaged``
(:meth:`Adapters.mark_damaged`): never served or made active again; its folder is swept like an orphan's.
Training writes into ``adapters/u<id>/.staging-j<job>``, which is never a version until :meth:`Adapters.publish`
renames it (a publish that fails after the rename removes the folder again). Knows nothing of torch or peft.

With an adapter store (``--adapter-store``, ``storage.objects``) publishing first uploads the version's files under
``u<id>/v<N>-<8 hex>`` with the completion marker last, then one transaction records the version (its ``location``
and ``files`` manifest) and switches the active pointer; the publisher keeps its copy as its cache,
``adapters/u<id>/v<N>-<8 hex>``, and any other process fetches it there on first use (:meth:`Adapters.fetch`). The
random part keeps a forgotten user's cached files from ever answering for a new user given the same id.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any

from storage.common import row_or_not_found, utcnow
from storage.errors import CLI, InputError, NotFound, StorageError
from storage.jobs import Jobs
from storage.objects import AdapterStoreConfig, ObjectStore, ObjectStoreUnavailable, open_store
from storage.paths import STAGING_PREFIX, atomic_write_bytes, publish_dir, remove_tree
from storage.replay import Replay
from storage.store import StoreBase
from storage.users import Users

STATUSES = ("published", "rejected", "pruned", "damaged")
_VERSION_DIR = re.compile(r"^v\d+(-[0-9a-f]+)?$")
log = logging.getLogger("attune.storage")


def staging_dir(store: StoreBase, user_id: int, job_id: int) -> Path:
    """Where a job writes its adapter before publish; removed when the job ends or is found stale."""
    return store.data_dir.staging(user_id, job_id)


def _row(row: dict, root: Path, active: int | None) -> dict:
    row = dict(row)
    row["metrics"] = json.loads(row.get("metrics") or "{}")
    row["files"] = json.loads(row["files"]) if row.get("files") else None
    row["path"] = str(root / row["path"]) if row.get("path") else None
    row["active"] = row["version"] == active
    return row


class Adapters:
    """Adapter versions of each user. Every call takes the user's id and sees only that user's rows."""

    def __init__(self, store: StoreBase, users: Users, jobs: Jobs, replay: Replay,
                 objects: AdapterStoreConfig | None = None):
        self.store = store
        self.users, self.jobs, self.replay = users, jobs, replay
        self.config = objects or AdapterStoreConfig()
        self.objects: ObjectStore | None = self.config.open()
        """Where this process publishes (None: the data dir only). Reading follows each version's ``location``."""

    # reads -------------------------------------------------------------------------------------
    def next_version(self, user_id: int) -> int:
        """1 + the highest version the user has ever had (published, rejected or pruned)."""
        row = self.store.db.execute(
            "SELECT COALESCE(MAX(version), 0) FROM adapter_versions WHERE user_id = ?", [user_id]).fetchone()
        return int(row[0]) + 1

    def active_version(self, user_id: int) -> int | None:
        row = self.store.db.execute("SELECT version FROM active_adapters WHERE user_id = ?", [user_id]).fetchone()
        return row[0] if row else None

    def active(self, user_id: int) -> dict | None:
        """The active version's row (``version``, absolute ``path``, ``base_model``, ``metrics``...) or None.

        This is what serving loads: ``PeftModel.from_pretrained(base, active["path"])``.
        """
        version = self.active_version(user_id)
        return None if version is None else self.get(user_id, version)

    def get(self, user_id: int, version: Any) -> dict:
        row = row_or_not_found(self.store.db, "SELECT * FROM adapter_versions WHERE user_id = ? AND version = ?",
                               [user_id, _version(version)],
                               f"Adapter version {version!r} does not exist for this user. List them with: "
                               f"{CLI} adapters NAME")
        return _row(row, self.store.data_dir.root, self.active_version(user_id))

    def list(self, user_id: int) -> list[dict]:
        """All versions of the user, newest first, with metrics and an ``active`` flag."""
        active = self.active_version(user_id)
        root = self.store.data_dir.root
        return [_row(r, root, active) for r in self.store.db.query(
            "SELECT * FROM adapter_versions WHERE user_id = ? ORDER BY version DESC", [user_id])]

    # writes ------------------------------------------------------------------------------------
    def publish(self, user_id: int, staging: Path, *, base_model: str, metrics: dict, gate_reason: str,
                parent_version: int | None, job_id: int | None, keep: int | None = None) -> int:
        """Turn a fully written staging folder into the user's next version ``N`` and make it active; returns N.

        Without an adapter store, one write transaction: number the version, write ``metrics.json``, fsync and
        rename the folder to ``v<N>``, insert the row and switch the active pointer. A crash before COMMIT leaves at
        most a complete ``v<N>`` folder without a row, which is swept as an orphan (never served). With one, the
        upload (marker last) comes first, then that transaction (:meth:`_publish_remote`). Then prunes to the last
        ``keep`` published versions when ``keep`` is given.
        """
        staging = Path(staging)
        if not staging.is_dir() or not any(staging.iterdir()):
            raise StorageError(f"{staging} is missing or empty; the adapter was not saved. Run the job again.")
        record = {"user_id": user_id, "base_model": base_model, "status": "published",
                  "parent_version": parent_version, "job_id": job_id, "metrics": metrics, "gate_reason": gate_reason}
        if self.objects is None:
            version = self._publish_local(user_id, staging, record)
        else:
            version = self._publish_remote(user_id, staging, record, self.objects)
        if keep is not None:
            self.prune(user_id, keep)
        return version

    def _publish_local(self, user_id: int, staging: Path, record: dict) -> int:
        renamed: Path | None = None
        try:
            with self.store.write() as db:
                version = self._check_user_and_number(db, user_id, record["job_id"])
                final = self.store.data_dir.adapters(user_id) / f"v{version}"
                if final.exists():  # left by a crash between rename and COMMIT: no row points at it
                    remove_tree(final)
                record = {**record, "version": version, "created_at": utcnow()}
                atomic_write_bytes(staging / "metrics.json", json.dumps(record, indent=1, sort_keys=True).encode())
                publish_dir(staging, final)
                renamed = final
                self._insert_active(db, record, final)
        except BaseException:
            if renamed is not None:  # renamed but never committed (e.g. the disk filled up): no half version stays
                remove_tree(renamed)
            raise
        return version

    def _publish_remote(self, user_id: int, staging: Path, record: dict, objects: ObjectStore) -> int:
        """Upload ``staging`` as version N (every file, then the completion marker), then one transaction: check N
        is still the next number, keep the folder as this process's cache, insert the row (``location``, ``files``)
        and switch the active pointer. A failure at any step deletes the objects and the folder again."""
        version = self.next_version(user_id)  # one open job per user: nobody else numbers this user's versions
        name = f"v{version}-{secrets.token_hex(4)}"
        remote = objects.child(f"u{int(user_id)}/{name}")
        final = self.store.data_dir.adapters(user_id) / name
        record = {**record, "version": version, "created_at": utcnow()}
        renamed: Path | None = None
        try:
            atomic_write_bytes(staging / "metrics.json", json.dumps(record, indent=1, sort_keys=True).encode())
            files = remote.upload(staging)
            with self.store.write() as db:
                if self._check_user_and_number(db, user_id, record["job_id"]) != version:
                    raise StorageError(f"Another process recorded version {version} of this user while it was "
                                       "uploaded; nothing was published. Train again.")
                publish_dir(staging, final)
                renamed = final
                self._insert_active(db, {**record, "location": remote.url, "files": json.dumps(files)}, final)
        except BaseException:
            if renamed is not None:
                remove_tree(renamed)
            self._delete_quietly(remote, f"v{version} was not published")
            raise
        return version

    def _check_user_and_number(self, db, user_id: int, job_id: int | None) -> int:
        """Inside a write: the user still exists (NotFound if forgotten meanwhile) and the job publishing is still
        theirs to finish (:meth:`_check_job`); the next version number."""
        if not db.execute("SELECT 1 FROM users WHERE id = ?", [user_id]).fetchone():
            raise NotFound(f"User {user_id} no longer exists (forgotten while training); nothing was published.")
        if job_id is not None:
            self._check_job(db, job_id)
        return self.next_version(user_id)

    @staticmethod
    def _check_job(db, job_id: int) -> None:
        """The job is still running and, when a worker holds it, its lease has not run out. A job failed meanwhile
        (its worker's lease lapsed, so another job of the user may run now; or it was stopped) publishes nothing."""
        lost = db.execute("SELECT 1 FROM jobs WHERE id = ? AND (status <> 'running' OR lease_until < ?)",
                          [job_id, utcnow()]).fetchone()
        if lost:
            raise StorageError(f"Job {job_id} is no longer running (its worker's lease ran out, or it was stopped), so "
                               "its adapter was not published; the user's active version is unchanged. Train again.")

    def _insert_active(self, db, record: dict, final: Path) -> None:
        db["adapter_versions"].insert({**record, "metrics": json.dumps(record["metrics"]),
                                       "path": str(final.relative_to(self.store.data_dir.root))})
        db.execute("INSERT INTO active_adapters (user_id, version, updated_at) VALUES (?, ?, ?) "
                   "ON CONFLICT(user_id) DO UPDATE SET version = excluded.version, "
                   "updated_at = excluded.updated_at", [record["user_id"], record["version"], record["created_at"]])

    def _delete_quietly(self, remote: ObjectStore, why: str) -> None:
        """Delete ``remote``'s objects after a failure; if even that fails, say so in the log (they are orphans no
        row points at, never served; forgetting the user deletes them)."""
        try:
            remote.delete()
        except StorageError as e:
            log.warning("%s, and its uploaded objects could not be deleted (%s); no row points at them", why, e)

    def reject(self, user_id: int, *, base_model: str, metrics: dict, gate_reason: str,
               parent_version: int | None, job_id: int | None) -> int:
        """Record a candidate that failed the gate (metrics and reason, no folder); returns its number."""
        with self.store.write() as db:
            version = self.next_version(user_id)
            db["adapter_versions"].insert({
                "user_id": user_id, "version": version, "path": None, "base_model": base_model,
                "status": "rejected", "parent_version": parent_version, "job_id": job_id,
                "metrics": json.dumps(metrics), "gate_reason": gate_reason, "created_at": utcnow()})
        return version

    def set_active(self, user_id: int, version: Any | None) -> None:
        """Point the user at a published version whose folder exists, or at the base model (None)."""
        if version is not None:
            row = self.get(user_id, version)
            if row["status"] == "damaged":
                raise InputError(f"Version {row['version']} is damaged ({row['damage']}) and cannot be served; roll "
                                 f"back to another version or train a new one. List them with: {CLI} adapters NAME")
            if row["status"] != "published":
                raise InputError(f"Version {row['version']} is {row['status']}; only published versions can be "
                                 f"made active. List them with: {CLI} adapters NAME")
            if not self._present(row):
                raise NotFound(f"The files of version {row['version']} are missing ({row['location'] or row['path']}); "
                               "roll back to another version or train a new one.")
            version = row["version"]
        with self.store.write() as db:
            db.execute("INSERT INTO active_adapters (user_id, version, updated_at) VALUES (?, ?, ?) "
                       "ON CONFLICT(user_id) DO UPDATE SET version = excluded.version, "
                       "updated_at = excluded.updated_at", [user_id, version, utcnow()])

    def mark_damaged(self, user_id: int, version: int, damage: str, fallback: int | None) -> int | None:
        """Mark a published version ``damaged`` (``damage`` says what is wrong with its files) and, if it is still
        the user's active version, serve ``fallback`` instead (a published version; None: the base model), in one
        transaction. Returns the active version after it; calling it again for the same version changes nothing
        (two turns that found the same damage at once agree)."""
        with self.store.write() as db:
            db.execute("UPDATE adapter_versions SET status = 'damaged', damage = ? WHERE user_id = ? AND version = ? "
                       "AND status = 'published'", [damage, user_id, version])
            if fallback is not None and not db.execute(
                    "SELECT 1 FROM adapter_versions WHERE user_id = ? AND version = ? AND status = 'published'",
                    [user_id, fallback]).fetchone():
                fallback = None
            db.execute("UPDATE active_adapters SET version = ?, updated_at = ? WHERE user_id = ? AND version = ?",
                       [fallback, utcnow(), user_id, version])
        return self.active_version(user_id)

    def rollback(self, user_id: int, version: Any) -> dict:
        """Make an older (or newer) published version active again; returns its row."""
        self.set_active(user_id, version)
        return self.get(user_id, version)

    def choose(self, user_id: int, version: int | str) -> dict:
        """Serve a published version (``3`` or ``"v3"``) from now on, or ``"base"`` for the base model:
        ``{"active_version": N | None, "path": ...}``."""
        if isinstance(version, str) and version.strip().lower() in ("base", "none", "0"):
            self.set_active(user_id, None)
            return {"active_version": None}
        row = self.rollback(user_id, version)
        return {"active_version": row["version"], "path": row["path"]}

    def overview(self, user_id: int) -> dict:
        """Everything a user's "My assistant" view shows at once: the personalization switch, the active
        version, the open job, versions (newest first), the last jobs and the replay reservoir's size."""
        user = self.users.by_id(user_id)
        return {"personalization": user.personalization, "active_version": self.active_version(user_id),
                "open_job": self.jobs.open_job(user_id), "versions": self.list(user_id),
                "jobs": self.jobs.list(user_id, 10), "replay_examples": self.replay.count(user_id)}

    def prune(self, user_id: int, keep: int) -> list[int]:
        """Keep the ``keep`` newest published versions (and the active one); delete the rest's folders.

        Rows are marked ``pruned`` first, folders deleted after, so a crash in between leaves only an
        orphan folder that :meth:`sweep` removes. Returns the pruned version numbers.
        """
        if keep < 1:
            raise ValueError(f"keep: must be at least 1, got {keep}")
        active = self.active_version(user_id)
        published = [r["version"] for r in self.store.db.query(
            "SELECT version FROM adapter_versions WHERE user_id = ? AND status = 'published' ORDER BY version DESC",
            [user_id])]
        doomed = [v for v in published[keep:] if v != active]
        if not doomed:
            return []
        rows = [self.get(user_id, v) for v in doomed]
        with self.store.write() as db:
            db.execute(f"UPDATE adapter_versions SET status = 'pruned' WHERE user_id = ? AND version IN "
                       f"({', '.join('?' * len(doomed))})", [user_id, *doomed])
        for row in rows:
            if row["path"]:
                remove_tree(Path(row["path"]))
            if row["location"]:
                self._delete_quietly(self._remote(row), f"v{row['version']} was pruned")
        return doomed

    def sweep(self, user_id: int, keep_staging: set[int] | None = None) -> list[str]:
        """Remove what a crash can leave: staging folders (except jobs in ``keep_staging``), ``v<N>`` folders that
        no published row points at and, in the adapter store, uploads no row points at (:meth:`_sweep_remote`).
        Returns the names (and URLs) removed."""
        user_dir = self.store.data_dir.adapters(user_id)
        if not user_dir.is_dir():
            return self._sweep_remote(user_id)
        published = {Path(r["path"]).name for r in self.store.db.query(
            "SELECT path FROM adapter_versions WHERE user_id = ? AND status = 'published' AND path IS NOT NULL",
            [user_id])}
        removed = []
        for child in user_dir.iterdir():
            if child.name.startswith(STAGING_PREFIX):
                job = child.name[len(STAGING_PREFIX):]
                if job.isdigit() and int(job) in (keep_staging or set()):
                    continue
            elif not _VERSION_DIR.match(child.name) or child.name in published:
                continue
            remove_tree(child)
            removed.append(child.name)
        return removed + self._sweep_remote(user_id)

    def _sweep_remote(self, user_id: int) -> list[str]:
        """Delete the uploads under ``u<id>/`` of this process's adapter store that no version's row points at (a
        process killed mid-upload, or between upload and its transaction, before it could delete them) and the
        pruned versions whose delete failed. Called as the user's one running job starts, so no upload of theirs is
        in flight (a worker whose lease lapsed may still upload, but cannot publish: :meth:`_check_job`). A store
        that cannot be reached is logged and left for the next job. Returns the URLs deleted."""
        if self.objects is None:
            return []
        root = self.objects.child(f"u{int(user_id)}")
        kept = {r["location"] for r in self.store.db.query(
            "SELECT location FROM adapter_versions WHERE user_id = ? AND location IS NOT NULL AND status <> 'pruned'",
            [user_id])}
        try:
            orphans = [root.child(key) for key in root.children() if root.child(key).url not in kept]
            for orphan in orphans:
                orphan.delete()
        except ObjectStoreUnavailable as e:
            log.warning("adapter store: orphan uploads of user %s not swept this time (%s); the next job tries "
                        "again", user_id, e)
            return []
        if orphans:
            log.info("adapter store: deleted %d upload(s) no version points at: %s", len(orphans),
                     ", ".join(o.url for o in orphans))
        return [o.url for o in orphans]

    # the adapter store ------------------------------------------------------------------------
    def _remote(self, row: dict) -> ObjectStore:
        return open_store(row["location"], self.config.s3_endpoint)

    def _present(self, row: dict) -> bool:
        """Whether a version's files can be had: its folder here, else its completed upload in the adapter store."""
        if row["path"] and (Path(row["path"]) / "adapter_config.json").is_file():
            return True
        return bool(row["location"]) and self._remote(row).manifest() is not None

    def fetch(self, row: dict) -> Path | None:
        """The folder of version ``row`` (from :meth:`get`) in this data dir, downloaded from the adapter store when
        it is not here yet: only a completed upload (its marker), each file checked against the row's manifest.
        Raises ``ObjectsIncomplete`` when the stored objects are not whole, ``ObjectStoreUnavailable`` when the
        store cannot be reached; a version kept only in the data dir is returned as it is."""
        folder = Path(row["path"]) if row["path"] else None
        if folder is None or folder.exists() or not row["location"]:
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        self._remote(row).download(folder, row["files"])
        return folder

    def delete_objects(self, user_id: int) -> int:
        """Delete every object of the user in the adapter store: each version's (wherever its row says) and
        anything under ``u<id>/`` of this process's store (uploads no row points at). Before the rows go
        (``storage.transfer.delete_user``); ``ObjectStoreUnavailable`` if the store cannot be reached."""
        roots = {r["location"] for r in self.store.db.query(
            "SELECT location FROM adapter_versions WHERE user_id = ? AND location IS NOT NULL", [user_id])}
        stores = [open_store(url, self.config.s3_endpoint) for url in sorted(roots)]
        if self.objects is not None:
            stores.append(self.objects.child(f"u{int(user_id)}"))
        return sum(store.delete() for store in stores)


def _version(value: Any) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = int(str(value).lstrip("vV")) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise InputError(f"{value!r} is not a version number; use e.g. 3 or v3.") from None
    if v < 1:
        raise InputError(f"Version numbers start at 1, got {v}.")
    return v
