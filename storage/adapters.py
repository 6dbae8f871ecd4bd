"""Per-user adapter versions: numbering, atomic publish of a trained folder, the active pointer,
rollback and pruning.

Layout: ``adapters/u<id>/v<N>/`` holds a peft adapter plus ``metrics.json``; the active version is
the ``active_adapters`` row, switched in the same SQLite transaction that records the version.
Every candidate that reached the gate gets a version number; rejected ones keep their metrics in
SQLite and have no folder. A published version whose files serving found damaged is marked ``damaged``
(:meth:`Adapters.mark_damaged`): never served or made active again; its folder is swept like an orphan's.
Training writes into ``adapters/u<id>/.staging-j<job>``, which is never a version until :meth:`Adapters.publish`
renames it (a publish that fails after the rename removes the folder again). Knows nothing of torch or peft.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from storage.common import row_or_not_found, utcnow
from storage.errors import CLI, InputError, NotFound, StorageError
from storage.jobs import Jobs
from storage.paths import STAGING_PREFIX, atomic_write_bytes, publish_dir, remove_tree
from storage.replay import Replay
from storage.store import StoreBase
from storage.users import Users

STATUSES = ("published", "rejected", "pruned", "damaged")
_VERSION_DIR = re.compile(r"^v(\d+)$")


def staging_dir(store: StoreBase, user_id: int, job_id: int) -> Path:
    """Where a job writes its adapter before publish; removed when the job ends or is found stale."""
    return store.data_dir.staging(user_id, job_id)


def _row(row: dict, root: Path, active: int | None) -> dict:
    row = dict(row)
    row["metrics"] = json.loads(row.get("metrics") or "{}")
    row["path"] = str(root / row["path"]) if row.get("path") else None
    row["active"] = row["version"] == active
    return row


class Adapters:
    """Adapter versions of each user. Every call takes the user's id and sees only that user's rows."""

    def __init__(self, store: StoreBase, users: Users, jobs: Jobs, replay: Replay):
        self.store = store
        self.users, self.jobs, self.replay = users, jobs, replay

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
        """Turn a fully written staging folder into ``v<N>`` and make it active; returns N.

        One write transaction: number the version, write ``metrics.json``, fsync and rename the
        folder, insert the row and switch the active pointer. A crash before COMMIT leaves at most
        a complete ``v<N>`` folder without a row, which is swept as an orphan (never served).
        Then prunes to the last ``keep`` published versions when ``keep`` is given.
        """
        staging = Path(staging)
        if not staging.is_dir() or not any(staging.iterdir()):
            raise StorageError(f"{staging} is missing or empty; the adapter was not saved. Run the job again.")
        user_dir = self.store.data_dir.adapters(user_id)
        renamed: Path | None = None
        try:
            with self.store.write() as db:
                if not db.execute("SELECT 1 FROM users WHERE id = ?", [user_id]).fetchone():
                    raise NotFound(f"User {user_id} no longer exists (forgotten while training); nothing was "
                                   "published.")
                version = self.next_version(user_id)
                final = user_dir / f"v{version}"
                if final.exists():  # left by a crash between rename and COMMIT: no row points at it
                    remove_tree(final)
                now = utcnow()
                record = {"user_id": user_id, "version": version, "base_model": base_model, "status": "published",
                          "parent_version": parent_version, "job_id": job_id, "metrics": metrics,
                          "gate_reason": gate_reason, "created_at": now}
                atomic_write_bytes(staging / "metrics.json", json.dumps(record, indent=1, sort_keys=True).encode())
                publish_dir(staging, final)
                renamed = final
                db["adapter_versions"].insert({**record, "metrics": json.dumps(metrics),
                                               "path": str(final.relative_to(self.store.data_dir.root))})
                db.execute("INSERT INTO active_adapters (user_id, version, updated_at) VALUES (?, ?, ?) "
                           "ON CONFLICT(user_id) DO UPDATE SET version = excluded.version, "
                           "updated_at = excluded.updated_at", [user_id, version, now])
        except BaseException:
            if renamed is not None:  # renamed but never committed (e.g. the disk filled up): no half version stays
                remove_tree(renamed)
            raise
        if keep is not None:
            self.prune(user_id, keep)
        return version

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
            if not row["path"] or not (Path(row["path"]) / "adapter_config.json").is_file():
                raise NotFound(f"The folder of version {row['version']} is missing ({row['path']}); roll back to "
                               "another version or train a new one.")
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
        with self.store.write() as db:
            db.execute(f"UPDATE adapter_versions SET status = 'pruned' WHERE user_id = ? AND version IN "
                       f"({', '.join('?' * len(doomed))})", [user_id, *doomed])
        for v in doomed:
            remove_tree(self.store.data_dir.adapters(user_id) / f"v{v}")
        return doomed

    def sweep(self, user_id: int, keep_staging: set[int] | None = None) -> list[str]:
        """Remove what a crash can leave: staging folders (except jobs in ``keep_staging``) and
        ``v<N>`` folders that no published row points at. Returns the names removed."""
        user_dir = self.store.data_dir.adapters(user_id)
        if not user_dir.is_dir():
            return []
        published = {r["version"] for r in self.store.db.query(
            "SELECT version FROM adapter_versions WHERE user_id = ? AND status = 'published'", [user_id])}
        removed = []
        for child in user_dir.iterdir():
            m = _VERSION_DIR.match(child.name)
            if child.name.startswith(STAGING_PREFIX):
                job = child.name[len(STAGING_PREFIX):]
                if job.isdigit() and int(job) in (keep_staging or set()):
                    continue
            elif not m or int(m.group(1)) in published:
                continue
            remove_tree(child)
            removed.append(child.name)
        return removed


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
