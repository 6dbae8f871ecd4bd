"""Training jobs: queued -> running (with the worker's pid) -> published | rejected | failed.

A job row is the only state a training run has outside its process: progress and the loss curve
are appended while it runs, the result (gate metrics, version) or the error when it ends.

The jobs table is also the queue that ``launch.py worker`` processes share: a job queued without a pid waits for a
worker; :meth:`Jobs.claim_next` takes the oldest one (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so claimers never
queue behind each other; SQLite's single writer elsewhere) with a lease (``worker_id``, ``lease_until``) that
:meth:`Jobs.renew` extends and :meth:`Jobs.fail_lapsed` ends; on PostgreSQL a trigger (p003) NOTIFYs
:data:`QUEUE_CHANNEL` whenever a job becomes queued and :meth:`Jobs.wait_queued` wakes on it (SQLite: it sleeps).

Rows and files only. Must not know processes or the scheduler's rules: whether a job's worker is
still alive, when an open job counts as stale, how long a lease lasts and when a user is due for training are
decided in ``personalize`` (``personalize.runner.fail_stale``, ``personalize.worker``, ``personalize.scheduler``),
which read the plain queries here (:meth:`Jobs.open_jobs`, :meth:`Jobs.due_users`) and write back with
:meth:`Jobs.fail_open` and :meth:`Jobs.fail_lapsed`.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any

from storage.common import as_int, row_or_not_found, utcnow
from storage.config import POSTGRESQL
from storage.errors import InputError
from storage.paths import remove_tree
from storage.store import StoreBase

OPEN = ("queued", "running")
DONE = ("published", "rejected", "failed")
TRIGGERS = ("manual", "scheduler", "ui", "cli", "api")
QUEUE_CHANNEL = "attune_jobs"
"""The channel PostgreSQL's trigger (migration p003) notifies, with the job's id, when a job becomes queued."""


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

        ``pid``: the process that will run it (it then claims it with :meth:`claim`); None queues it for a worker
        (:meth:`claim_next`). Open jobs whose process died are failed first by the caller
        (``personalize.runner.queue_job``).
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

    def finish(self, job_id: int, status: str, result: dict | None = None, error: str | None = None) -> bool:
        """Record how an open job ended; False, and nothing written, if it had ended already (e.g. failed when its
        worker's lease lapsed: a late verdict must not overwrite that)."""
        if status not in DONE:
            raise InputError(f"status must be one of {', '.join(DONE)}, got {status!r}.")
        with self.store.write() as db:
            return db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ? "
                              "WHERE id = ? AND status IN ('queued', 'running')",
                              [status, json.dumps(result or {}), error, utcnow(), job_id]).rowcount == 1

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


    # the queue that workers share ---------------------------------------------------------------------------
    def claim_next(self, worker_id: str, lease_until: str) -> dict | None:
        """Take the oldest job queued for a worker (no pid): running, held by ``worker_id`` until ``lease_until``;
        the job, or None when none is queued. On PostgreSQL one statement whose ``FOR UPDATE SKIP LOCKED`` lets
        concurrent claimers each take another row without waiting for a lock; on SQLite inside ``write()``."""
        postgres = self.store.kind == POSTGRESQL
        pick = "SELECT id FROM jobs WHERE status = 'queued' AND pid IS NULL ORDER BY id LIMIT 1"
        sql = ("UPDATE jobs SET status = 'running', worker_id = ?, lease_until = ?, started_at = ? "
               f"WHERE id = ({pick}{' FOR UPDATE SKIP LOCKED' if postgres else ''}) AND status = 'queued' "
               "RETURNING *")
        with nullcontext(self.store.db) if postgres else self.store.write() as db:
            rows = list(db.query(sql, [worker_id, lease_until, utcnow()]))
        return _job(rows[0]) if rows else None

    def hand_over(self, job_id: int, worker_id: str, pid: int) -> dict:
        """The process a worker started for its claimed job takes it over (its pid noted); InputError if the job is
        no longer running under that worker (its lease lapsed, or its user was forgotten)."""
        with self.store.write() as db:
            cur = db.execute("UPDATE jobs SET pid = ? WHERE id = ? AND status = 'running' AND worker_id = ?",
                             [pid, job_id, worker_id])
            if cur.rowcount != 1:
                raise InputError(f"Job {job_id} is no longer held by worker {worker_id} (its lease ran out, or its "
                                 "user was deleted); nothing to run.")
        return self.load(job_id)

    def renew(self, job_id: int, worker_id: str, lease_until: str) -> bool:
        """Extend the lease of a job ``worker_id`` holds; False if it no longer holds it (the job ended or failed,
        e.g. because the lease had lapsed, or the row is gone)."""
        with self.store.write() as db:
            return db.execute("UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'running' AND worker_id = ?",
                              [lease_until, job_id, worker_id]).rowcount == 1

    def fail_lapsed(self, now: str, error: str, job_id: int | None = None, user_id: int | None = None) -> list[int]:
        """Fail, with ``error``, every running job whose lease ended before ``now`` (of one job or one user if
        given): one statement, so a lease renewed meanwhile is kept. Their ids; their staging folders are removed."""
        where, params = "status = 'running' AND lease_until IS NOT NULL AND lease_until < ?", [now]
        for column, value in (("id", job_id), ("user_id", user_id)):
            if value is not None:
                where, params = f"{where} AND {column} = ?", [*params, value]
        if not list(self.store.db.query(f"SELECT id FROM jobs WHERE {where} LIMIT 1", params)):
            return []  # the usual case, and always without workers: no write lock taken
        with self.store.write() as db:
            rows = list(db.query(f"UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE {where} "
                                 "RETURNING id, user_id", [utcnow(), error, *params]))
        for row in rows:
            remove_tree(self.store.data_dir.staging(row["user_id"], row["id"]))
        return sorted(row["id"] for row in rows)

    def wait_queued(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a job to be queued; True when PostgreSQL said one was (LISTEN on
        :data:`QUEUE_CHANNEL`, from the first call on). SQLite cannot say: it sleeps and returns False."""
        return self.store.wait(QUEUE_CHANNEL, timeout)

    def due_users(self, created_before: str, min_events: int) -> list[int]:
        """Users with personalization on, no open job, no job created after ``created_before``, and at least
        ``min_events`` assistant answers plus feedback events since their last job (ever, without one): one query,
        the most new events first. The thresholds are the caller's rule."""
        since = "COALESCE(prev.at, '')"
        sql = f"""
            SELECT id FROM (
                SELECT u.id,
                    (SELECT COUNT(*) FROM messages m WHERE m.user_id = u.id AND m.role = 'assistant'
                        AND m.created_at > {since})
                    + (SELECT COUNT(*) FROM feedback f WHERE f.user_id = u.id AND f.created_at > {since}) AS events
                FROM users u LEFT JOIN (SELECT user_id, MAX(created_at) AS at FROM jobs GROUP BY user_id) prev
                    ON prev.user_id = u.id
                WHERE u.personalization != 0 AND (prev.at IS NULL OR prev.at <= ?)
                    AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.user_id = u.id AND o.status IN ('queued', 'running'))
            ) due WHERE events >= ? ORDER BY events DESC, id"""
        return [row["id"] for row in self.store.db.query(sql, [created_before, min_events])]
