"""JobRunner: starts training jobs as separate processes (``python -m personalize.job``), one at
a time per runner (one runner per device), and stops them on shutdown; and the rule for open jobs
whose process is gone (:func:`fail_stale`, :func:`queue_job`).

The job row is created here (queued, with the child's pid as soon as it exists); the child claims
it, and from then on all state is in SQLite. Child output goes to the server's stderr, or to a
file when ``RunnerConfig.log_path`` is set. Must not know serving (gradio, HTTP, ChatService); rows
are read and written through ``storage.jobs``, process liveness comes from ``assistant.processes``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from assistant.model import ModelConfig
from assistant.processes import pid_alive
from personalize.config import TrainConfig
from personalize.errors import TrainingError
from storage.db import Store
from storage.errors import CLI, NotFound

log = logging.getLogger("attune.personalize")
REPO_ROOT = Path(__file__).resolve().parent.parent
QUEUED_GRACE_SECONDS = 120.0
"""A queued job with no process yet is stale only after this long (its worker may still be starting)."""
STALE_ERROR = ("The training process stopped before finishing (killed, crashed or the server restarted); no version "
               f"was published. It is retried when new data arrives, or run now: {CLI} train NAME")


def is_stale(job: dict, grace_seconds: float = QUEUED_GRACE_SECONDS) -> bool:
    """An open job is stale when its worker is gone, or it never got one within the grace period."""
    if job["pid"] is None:
        cutoff = (datetime.now(UTC) - timedelta(seconds=grace_seconds)).isoformat(timespec="milliseconds")
        return job["created_at"] <= cutoff
    return not pid_alive(job["pid"])


def fail_stale(store: Store, grace_seconds: float = QUEUED_GRACE_SECONDS, only: int | None = None,
               user_id: int | None = None) -> list[int]:
    """Mark open jobs whose worker is gone as failed (at server start, before each scheduler pass); their
    ids. Their staging folders are removed; published versions and the active pointer are untouched.
    ``only`` restricts this to one job (a runner cleaning up after the process it killed), ``user_id`` to
    one user's jobs."""
    stale = [job["id"] for job in store.jobs.open_jobs(user_id)
             if only in (None, job["id"]) and is_stale(job, grace_seconds)]
    for job_id in stale:
        store.jobs.fail_open(job_id, STALE_ERROR)
    return stale


def queue_job(store: Store, user_id: int, trigger: str = "manual", pid: int | None = None) -> int:
    """Queue a training job for the user: their open jobs whose process died are failed first, then the
    job row is created (refused, InputError, while another of theirs is open and alive)."""
    fail_stale(store, user_id=user_id)
    return store.jobs.create(user_id, trigger, pid)


@dataclass
class RunnerConfig:
    """How job processes are started."""

    python: str = sys.executable
    """Interpreter that runs ``-m personalize.job``."""
    nice: int = 10
    """Niceness added to job processes so chat answers keep the CPU first (0 to disable)."""
    log_path: Path | None = None
    """Append job output to this file; None inherits the server's stderr."""
    stop_timeout: float = 15.0
    """Seconds a job gets to record its failure after SIGTERM before it is killed."""

    def __post_init__(self):
        if not self.python:
            raise ValueError("python: give the interpreter that runs the jobs")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice: must be 0-19, got {self.nice!r}")
        if self.stop_timeout <= 0:
            raise ValueError(f"stop_timeout: must be > 0, got {self.stop_timeout!r}")


class JobRunner:
    """Starts one job process at a time; ``busy()`` says whether one is still running."""

    def __init__(self, store: Store, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 config: RunnerConfig | None = None):
        self.store = store
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.config = config or RunnerConfig()
        self._proc: subprocess.Popen | None = None
        self._job_id: int | None = None
        self._lock = threading.Lock()

    def command(self, job_id: int) -> list[str]:
        cmd = [self.config.python, "-m", "personalize.job", "--data-dir", str(self.store.data_dir.root),
               "--job-id", str(job_id), "--model", str(self.model_cfg.model), "--quant", self.model_cfg.quant,
               "--device", self.model_cfg.device, "--dtype", self.model_cfg.dtype,
               "--config", json.dumps(self.train_cfg.to_dict())]
        if self.model_cfg.threads:
            cmd += ["--threads", str(self.model_cfg.threads)]
        if self.store.config.db:  # the job writes where the server reads (default: attune.db in the data dir)
            cmd += ["--db", self.store.config.db]
        objects = self.store.adapter_store
        if objects.adapter_store:  # and publishes where the server's other processes fetch from
            cmd += ["--adapter-store", objects.adapter_store] + (["--s3-endpoint", objects.s3_endpoint]
                                                                 if objects.s3_endpoint else [])
        return cmd

    def start(self, user_id: int, trigger: str = "manual") -> int:
        """Queue a job for the user and start its process; returns the job id."""
        with self._lock:
            if self._running():
                raise TrainingError(f"Another training job is running (job {self._job_id}); wait for it to finish.")
            job_id = queue_job(self.store, user_id, trigger)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
            nice = self.config.nice
            out = open(self.config.log_path, "ab") if self.config.log_path else None
            try:
                self._proc = subprocess.Popen(
                    self.command(job_id), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                    stdout=out or subprocess.DEVNULL, stderr=out or None,
                    preexec_fn=(lambda: os.nice(nice)) if nice and hasattr(os, "nice") else None)
            except OSError as e:
                self.store.jobs.finish(job_id, "failed", error=f"Could not start the training process: {e}.")
                raise TrainingError(f"Could not start the training process ({e}); check that "
                                    f"{self.config.python} runs.") from e
            finally:
                if out:
                    out.close()
            self._job_id = job_id
            self.store.jobs.set_pid(job_id, self._proc.pid)
            log.info("started training job %s for user %s (pid %s)", job_id, user_id, self._proc.pid)
            return job_id

    def _running(self) -> bool:
        """The last job's process is alive and its row still open (a process that has recorded its verdict and
        is only exiting, which can take seconds on a busy machine, does not hold up the next job)."""
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            return self.store.jobs.load(self._job_id)["status"] in ("queued", "running")
        except NotFound:  # its user was forgotten meanwhile
            return False

    def busy(self) -> bool:
        """True while a job process started here is alive (reaps it once it has exited)."""
        with self._lock:
            return self._running()

    @property
    def job_id(self) -> int | None:
        """The job started last (running or finished)."""
        return self._job_id

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the current process; its exit code (None if none was started)."""
        if self._proc is None:
            return None
        return self._proc.wait(timeout)

    def stop(self) -> None:
        """Terminate a running job (it marks itself failed), killing it if it does not exit in time."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                return
            proc.terminate()
            try:
                proc.wait(self.config.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._job_id is not None:  # killed before it could record anything
            fail_stale(self.store, grace_seconds=0, only=self._job_id)
