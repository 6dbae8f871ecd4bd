"""Training jobs: queued -> running (with the worker's pid) -> published | rejected | failed.

A job row is the only state a training run has outside its process: progress and the loss curve
are appended while it runs, the result (gate metrics, version) or the error when it ends.

Rows and files only. Must not know processes or the scheduler's rules: whether a job's worker is
still alive, when an open job counts as stale and when a user is due for training are decided in
``personalize`` (``personalize.runner.fail_stale``, ``personalize.scheduler``), which read the plain
queries here (:meth:`Jobs.open_jobs`, :meth:`Jobs.events_since`) and write back with :meth:`Jobs.fail_open`.
"""

from __future__ import annotations

import json
from typing import Any

from storage.common import as_int, row_or_not_found, utcnow
from storage.errors import InputError
from storage.paths import remove_tree
from storage.store import StoreBase

OPEN = ("queued", "running")
DONE = ("published", "rejected", "failed")
TRIGGERS = ("manual", "scheduler", "ui", "cli", "api")


def _job(row: dict) -> dict:
    row = dict(row)
    for key, empty in (("progress", "{}"), ("losses", "[]"), ("result", "{}")):
        row[key] = json.loads(row.get(key) or empty)
    return row


class Jobs:
    """Training jobs of each user. User-facing reads take the user's id; :meth:`load` is for the worker."""

    def __init__(self, store: StoreBase):
        self.store = store

    def create(self, user_id: int, trigger: str = "manual", pid: int | None = None) -> int:
        """Queue a job; refused while the user has another open job (check and insert in one transaction).

        Open jobs whose process died are failed first by the caller (``personalize.runner.queue_job``).
        """
        if trigger not in TRIGGERS:
            raise InputError(f"trigger must be one of {', '.join(TRIGGERS)}, got {trigger!r}.")
        with self.store.write() as db:
            for row in db.query("SELECT id, status FROM jobs WHERE user_id = ? AND status IN ('queued', 'running') "
                                "ORDER BY id LIMIT 1", [user_id]):
                raise InputError(f"A training job for this user is already {row['status']} (job {row['id']}); "
                                 "wait for it to finish, then try again.")
            return db["jobs"].insert({"user_id": user_id, "kind": "train", "trigger": trigger, "status": "queued",
                                      "pid": pid, "created_at": utcnow()}).last_pk

    def set_pid(self, job_id: int, pid: int) -> None:
        """The runner notes the worker's pid as soon as it is spawned (before the worker claims the job)."""
        with self.store.write() as db:
            db.execute("UPDATE jobs SET pid = ? WHERE id = ? AND status = 'queued'", [pid, job_id])

    def load(self, job_id: Any) -> dict:
        """One job by id, for the worker process that was handed this id (not for user-facing reads)."""
        return _job(row_or_not_found(self.store.db, "SELECT * FROM jobs WHERE id = ?", [as_int(job_id, "job id")],
                                     f"Job {job_id!r} does not exist."))

    def claim(self, job_id: int, pid: int) -> dict:
        """queued -> running, by the worker that will do it; anything else means another worker has it."""
        with self.store.write() as db:
            cur = db.execute("UPDATE jobs SET status = 'running', pid = ?, started_at = ? "
                             "WHERE id = ? AND status = 'queued'", [pid, utcnow(), job_id])
            if cur.rowcount != 1:
                job = self.load(job_id)
                raise InputError(f"Job {job_id} is {job['status']}, not queued; start a new job instead.")
        return self.load(job_id)

    def progress(self, job_id: int, step: int, total: int, loss: float | None, **extra: Any) -> None:
        """Record the current step and append ``{"step", "loss"}`` to the loss curve."""
        point = {"step": int(step), "loss": None if loss is None else round(float(loss), 5)}
        state = {**point, "total": int(total), "updated_at": utcnow(), **extra}
        with self.store.write() as db:
            db.execute("UPDATE jobs SET progress = json_patch(progress, ?), "
                       "losses = json_insert(losses, '$[#]', json(?)) WHERE id = ? AND status = 'running'",
                       [json.dumps(state), json.dumps(point), job_id])

    def phase(self, job_id: int, phase: str) -> None:
        """Name what a running job is doing now (``loading model``, ``training``, ``evaluating``...)."""
        with self.store.write() as db:
            db.execute("UPDATE jobs SET progress = json_set(progress, '$.phase', ?) "
                       "WHERE id = ? AND status = 'running'", [phase, job_id])

    def finish(self, job_id: int, status: str, result: dict | None = None, error: str | None = None) -> None:
        if status not in DONE:
            raise InputError(f"status must be one of {', '.join(DONE)}, got {status!r}.")
        with self.store.write() as db:
            db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ? WHERE id = ?",
                       [status, json.dumps(result or {}), error, utcnow(), job_id])

    def get(self, user_id: int, job_id: Any) -> dict:
        return _job(row_or_not_found(self.store.db, "SELECT * FROM jobs WHERE id = ? AND user_id = ?",
                                     [as_int(job_id, "job id"), user_id],
                                     f"Job {job_id!r} does not exist (or is not yours)."))

    def list(self, user_id: int, limit: int = 50) -> list[dict]:
        """The user's jobs, newest first (status, progress, loss curve, result or error)."""
        return [_job(r) for r in self.store.db.query(
            "SELECT * FROM jobs WHERE user_id = ? ORDER BY id DESC LIMIT ?", [user_id, limit])]

    def open_job(self, user_id: int) -> dict | None:
        """The user's queued or running job, if any."""
        rows = list(self.store.db.query("SELECT * FROM jobs WHERE user_id = ? AND status IN ('queued', 'running') "
                                        "ORDER BY id DESC LIMIT 1", [user_id]))
        return _job(rows[0]) if rows else None

    def last(self, user_id: int) -> dict | None:
        rows = list(self.store.db.query("SELECT * FROM jobs WHERE user_id = ? ORDER BY id DESC LIMIT 1", [user_id]))
        return _job(rows[0]) if rows else None

    def open_jobs(self, user_id: int | None = None) -> list[dict]:
        """Queued or running jobs, oldest first (each with its ``pid``, None before a worker got one, and
        ``created_at``); of one user, or of everyone when ``user_id`` is None."""
        where, params = ("AND user_id = ? ", [user_id]) if user_id is not None else ("", [])
        return [_job(r) for r in self.store.db.query(
            f"SELECT * FROM jobs WHERE status IN ('queued', 'running') {where}ORDER BY id", params)]

    def fail_open(self, job_id: int, error: str) -> bool:
        """Mark a job that is still open as failed with ``error`` and remove its staging folder (published
        versions and the active pointer are untouched). False, and nothing done, if it had already ended."""
        with self.store.write() as db:
            row = db.execute("SELECT user_id FROM jobs WHERE id = ? AND status IN ('queued', 'running')",
                             [job_id]).fetchone()
            if row is None:
                return False
            db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                       [utcnow(), error, job_id])
        remove_tree(self.store.data_dir.staging(row[0], job_id))
        return True

    def events_since(self, user_id: int, since: str | None) -> int:
        """How many assistant answers plus feedback events the user has after ``since`` (ISO time; None: ever).

        A plain count: how many of them make a user due for training is the scheduler's rule."""
        since = since or ""
        answers = self.store.db.execute(
            "SELECT COUNT(*) FROM messages WHERE user_id = ? AND role = 'assistant' AND created_at > ?",
            [user_id, since]).fetchone()[0]
        feedback = self.store.db.execute(
            "SELECT COUNT(*) FROM feedback WHERE user_id = ? AND created_at > ?", [user_id, since]).fetchone()[0]
        return int(answers) + int(feedback)

