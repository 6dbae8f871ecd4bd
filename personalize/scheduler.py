"""Scheduler: a background thread that starts a training job for a user when there is enough new
signal and enough time has passed since their last job.

A user is due when personalization is on for them, they have no open job, their last job (any
outcome) was created at least ``min_interval_minutes`` ago, and since then at least
``min_new_events`` assistant answers or feedback events (likes, dislikes, corrections) arrived:
one query (``storage.jobs.Jobs.due_users``). All of this is read from the database, so a restart
loses nothing; ``start`` first marks jobs whose process died as failed.

One scheduler runs at a time across every serving process on one database: each pass first takes
or keeps the ``scheduler`` lock (``Store.hold_lock``: a PostgreSQL advisory lock held by this
process's connection, so it passes to another process when its holder dies; on SQLite every
process holds it, as before). With ``workers="external"`` the serving process only queues jobs
(``personalize.runner.QueueRunner``) for ``launch.py worker`` processes, one per due user each pass.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from personalize.config import TrainConfig
from personalize.runner import QUEUED_GRACE_SECONDS, JobRunner, QueueRunner, fail_stale
from storage.db import Store
from storage.errors import AttuneError

log = logging.getLogger("attune.personalize")
LOCK = "scheduler"
"""The name of the lock only the process that schedules holds (``Store.hold_lock``)."""
WORKERS = ("local", "external")


@dataclass
class SchedulerConfig:
    """When the background personalizer trains whom, and who runs the jobs."""

    poll_seconds: float = 30.0
    """Seconds between two looks at the database for due users (with several servers on one PostgreSQL, also about
    how long the scheduler takes to move to another server when the one running it dies)."""
    min_new_events: int = 8
    """New answers + feedback events since a user's last job needed to train again."""
    min_interval_minutes: float = 30.0
    """Minutes between two jobs of the same user."""
    workers: str = "local"
    """who runs training jobs: local (this server starts each job's process, one at a time) or external (this
    server only queues them; `launch.py worker` processes on this or other machines claim and run them)"""

    def __post_init__(self):
        if self.poll_seconds <= 0:
            raise ValueError(f"poll_seconds: must be > 0, got {self.poll_seconds!r}")
        if not isinstance(self.min_new_events, int) or self.min_new_events < 1:
            raise ValueError(f"min_new_events: must be an integer of at least 1, got {self.min_new_events!r}")
        if self.min_interval_minutes < 0:
            raise ValueError(f"min_interval_minutes: must be >= 0, got {self.min_interval_minutes!r}")
        if self.workers not in WORKERS:
            raise ValueError(f"workers: must be one of {', '.join(WORKERS)}, got {self.workers!r}")


class Scheduler:
    """``start()`` when the server starts, ``stop()`` when it stops; ``tick()`` is one pass (tests)."""

    def __init__(self, store: Store, runner: JobRunner | QueueRunner, config: SchedulerConfig | None = None):
        self.store = store
        self.runner = runner
        self.config = config or SchedulerConfig()
        self.queues = getattr(runner, "queues", False)
        """Whether the runner only queues jobs (for workers): then every due user gets one each pass."""
        self.grace = None if self.queues else QUEUED_GRACE_SECONDS
        """How long a job may stay queued without a process (None: jobs for workers wait for one)."""
        self.leading = False
        """Whether this process held the scheduler's lock at its last pass."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def due(self) -> list[int]:
        """Ids of users due for training, the one with most new signal first (one query)."""
        cutoff = (datetime.now(UTC) - timedelta(minutes=self.config.min_interval_minutes)).isoformat(
            timespec="milliseconds")
        return self.store.jobs.due_users(cutoff, self.config.min_new_events)

    def lead(self) -> bool:
        """Take or keep the scheduler's lock; whether this process schedules now (a change is logged)."""
        leading = self.store.hold_lock(LOCK)
        if leading != self.leading:
            log.info("this process %s the scheduler (pid %s)", "now runs" if leading else "no longer runs",
                     os.getpid())
        self.leading = leading
        return leading

    def tick(self) -> int | None:
        """One pass, in the process that holds the scheduler's lock: start a job for the first due user if the
        runner is free (queue one for every due user when workers run them); returns the (first) job id."""
        if not self.lead() or self.runner.busy():
            return None
        fail_stale(self.store, self.grace)  # e.g. a job process that died at start: it must not block its user
        started: list[int] = []
        for user_id in self.due():
            try:
                started.append(self.runner.start(user_id, trigger="scheduler"))
            except AttuneError as e:  # e.g. a manual `train` for this user is running
                log.warning("not starting a job for user %s: %s", user_id, e)
            if started and not self.queues:
                break
        return started[0] if started else None

    def start(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        failed = fail_stale(self.store, self.grace)
        if failed:
            log.warning("marked %d interrupted training job(s) as failed: %s", len(failed), failed)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="attune-personalizer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad pass must not kill the personalizer; the next one retries
                log.exception("personalizer pass failed; retrying in %s s", self.config.poll_seconds)
            self._stop.wait(self.config.poll_seconds)

    def stop(self, stop_job: bool = True) -> None:
        """Stop the thread; with ``stop_job`` also terminate a running job (it is marked failed)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.config.poll_seconds + 5)
        if stop_job:
            self.runner.stop()
        self.store.release_lock(LOCK)  # another serving process takes over at its next pass
        self.leading = False

    @property
    def running(self) -> bool:
        return bool(self._thread and self._thread.is_alive())


def start_background(store: Store, model_cfg, train_cfg=None, schedule_cfg: SchedulerConfig | None = None,
                     ) -> tuple[JobRunner | QueueRunner, Scheduler]:
    """The background personalizer for a server: a job runner (training processes; with ``workers="external"`` a
    runner that only queues jobs for ``launch.py worker``) and its scheduler, started. The composition of serving
    and learning happens in ``launch.py``, which hands this to ``assistant.server.serve``; serving itself never
    imports ``personalize``."""
    schedule_cfg = schedule_cfg or SchedulerConfig()
    runner = QueueRunner(store) if schedule_cfg.workers == "external" else JobRunner(store, model_cfg,
                                                                                     train_cfg or TrainConfig())
    scheduler = Scheduler(store, runner, schedule_cfg)
    scheduler.start()  # marks jobs whose process died as failed, then polls
    return runner, scheduler
