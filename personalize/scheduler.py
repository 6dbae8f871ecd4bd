"""Scheduler: a background thread that starts a training job for a user when there is enough new
signal and enough time has passed since their last job.

A user is due when personalization is on for them, they have no open job, their last job (any
outcome) was created at least ``min_interval_minutes`` ago, and since then at least
``min_new_events`` assistant answers or feedback events (likes, dislikes, corrections) arrived.
All of this is read from SQLite, so a restart loses nothing; ``start`` first marks jobs whose
process died as failed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from personalize.config import TrainConfig
from personalize.runner import JobRunner, fail_stale
from storage.db import Store
from storage.errors import AttuneError

log = logging.getLogger("attune.personalize")


@dataclass
class SchedulerConfig:
    """When the background personalizer trains whom."""

    poll_seconds: float = 30.0
    """Seconds between two looks at the database."""
    min_new_events: int = 8
    """New answers + feedback events since a user's last job needed to train again."""
    min_interval_minutes: float = 30.0
    """Minutes between two jobs of the same user."""

    def __post_init__(self):
        if self.poll_seconds <= 0:
            raise ValueError(f"poll_seconds: must be > 0, got {self.poll_seconds!r}")
        if not isinstance(self.min_new_events, int) or self.min_new_events < 1:
            raise ValueError(f"min_new_events: must be an integer of at least 1, got {self.min_new_events!r}")
        if self.min_interval_minutes < 0:
            raise ValueError(f"min_interval_minutes: must be >= 0, got {self.min_interval_minutes!r}")


class Scheduler:
    """``start()`` when the server starts, ``stop()`` when it stops; ``tick()`` is one pass (tests)."""

    def __init__(self, store: Store, runner: JobRunner, config: SchedulerConfig | None = None):
        self.store = store
        self.runner = runner
        self.config = config or SchedulerConfig()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def due(self) -> list[int]:
        """Ids of users due for training, the one with most new signal first."""
        cutoff = (datetime.now(UTC) - timedelta(minutes=self.config.min_interval_minutes)).isoformat(
            timespec="milliseconds")
        due: list[tuple[int, int]] = []
        for user in self.store.users.list():
            if not user.personalization or self.store.jobs.open_job(user.id):
                continue
            last = self.store.jobs.last(user.id)
            if last and last["created_at"] > cutoff:
                continue
            events = self.store.jobs.events_since(user.id, last["created_at"] if last else None)
            if events >= self.config.min_new_events:
                due.append((events, user.id))
        return [uid for _, uid in sorted(due, key=lambda d: (-d[0], d[1]))]

    def tick(self) -> int | None:
        """Start a job for the first due user if the runner is free; returns the job id started."""
        if self.runner.busy():
            return None
        fail_stale(self.store)  # e.g. a job process that died at start: it must not block its user
        for user_id in self.due():
            try:
                return self.runner.start(user_id, trigger="scheduler")
            except AttuneError as e:  # e.g. a manual `train` for this user is running
                log.warning("not starting a job for user %s: %s", user_id, e)
        return None

    def start(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        failed = fail_stale(self.store)
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

    @property
    def running(self) -> bool:
        return bool(self._thread and self._thread.is_alive())


def start_background(store: Store, model_cfg, train_cfg=None, schedule_cfg: SchedulerConfig | None = None,
                     ) -> tuple[JobRunner, Scheduler]:
    """The background personalizer for a server: a job runner (training processes) and its scheduler,
    started. The composition of serving and learning happens in ``launch.py``, which hands this to
    ``assistant.server.serve``; serving itself never imports ``personalize``."""
    runner = JobRunner(store, model_cfg, train_cfg or TrainConfig())
    scheduler = Scheduler(store, runner, schedule_cfg)
    scheduler.start()  # marks jobs whose process died as failed, then polls
    return runner, scheduler
