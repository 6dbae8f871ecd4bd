"""What the CLI, the server and the UI call: train now, list versions, roll back, job status.

Every function takes the signed-in (or named) user and returns JSON-able data for that user only.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from assistant.model import ModelConfig
from personalize.config import TrainConfig
from personalize.errors import TrainingError
from personalize.runner import JobRunner, queue_job
from storage.db import Store
from storage.users import User

RESULT_KEYS = ("published", "version", "reason", "metrics", "job_id")


def resolve_user(store: Store, user: str | int | User) -> User:
    """A user by object, internal id (int) or name (str; names may be all digits, so a str is a name)."""
    if isinstance(user, User):
        return user
    if isinstance(user, int) and not isinstance(user, bool):
        return store.users.by_id(user)
    return store.users.by_name(str(user))


def train_now(store: Store, user: str | int | User, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None,
              *, subprocess: bool = False, on_progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Run one training job for the user in the foreground and return its result:

    ``{"published": bool, "version": N | None, "reason": str, "metrics": {...}, "job_id": int}``.
    Inline (default) it runs in this process; with ``subprocess`` in a job process like the
    scheduler's. Raises TrainingError (job marked failed) if the job fails, InputError if the user
    already has a job running.
    """
    from personalize.job import execute

    u = resolve_user(store, user)
    cfg = train_cfg or TrainConfig()
    if subprocess:
        runner = JobRunner(store, model_cfg, cfg)
        job_id = runner.start(u.id, trigger="manual")
        try:
            runner.wait()
        except BaseException:
            runner.stop()
            raise
        job = store.jobs.get(u.id, job_id)
        if job["status"] not in ("published", "rejected"):
            raise TrainingError(job["error"] or f"Training job {job_id} ended as {job['status']}; see its log.")
        result = job["result"]
    else:
        job_id = queue_job(store, u.id, trigger="manual", pid=os.getpid())
        result = execute(store, job_id, model_cfg, cfg, on_progress)
    return {k: result.get(k) for k in RESULT_KEYS}


def list_versions(store: Store, user_id: int) -> list[dict]:
    """The user's adapter versions, newest first: version, status (published/rejected/pruned),
    active, created_at, gate_reason, parent_version, job_id, path (None unless on disk), metrics."""
    return store.adapters.list(user_id)


def rollback(store: Store, user_id: int, version: int | str) -> dict:
    """Make a published version (``3`` or ``"v3"``) active again; ``"base"`` serves the base model instead."""
    return store.adapters.choose(user_id, version)


def jobs(store: Store, user_id: int, limit: int = 20) -> list[dict]:
    """The user's jobs, newest first: status, trigger, progress ({phase, step, total, loss}), losses
    (the loss curve, a list of {step, loss}), result (gate metrics, version) and error."""
    return store.jobs.list(user_id, limit)


def status(store: Store, user_id: int) -> dict:
    """Everything the "My assistant" tab shows at once."""
    return store.adapters.overview(user_id)


def set_personalization(store: Store, user_id: int, enabled: bool) -> None:
    """Turn background training on or off for the user (serving their active adapter is separate)."""
    store.users.set_personalization(user_id, enabled)
