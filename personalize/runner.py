"""JobRunner: starts training jobs as separate processes (``python -m personalize.job``), one at
a time per runner (one runner per device), and stops them on shutdown; QueueRunner: only queues them, for
``launch.py worker`` processes (``serve --workers external``); and the rule for open jobs whose process
is gone or whose worker's lease lapsed (:func:`fail_stale`, :func:`queue_job`).

The job row is created here (queued, with this process's pid and then the child's); the child claims
it, and from then on all state is in the database. Child output goes to the server's stderr, or to a
file when ``RunnerConfig.log_path`` is set. Must not know serving (gradio, HTTP, ChatService); rows
are read and written through ``storage.jobs``, process liveness comes from ``assistant.processes``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
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
from storage.common import utcnow
from storage.db import Store
from storage.errors import CLI, NotFound

log = logging.getLogger("attune.personalize")
REPO_ROOT = Path(__file__).resolve().parent.parent
QUEUED_GRACE_SECONDS = 120.0
"""A queued job with no process yet is stale only after this long (its worker may still be starting)."""
STALE_ERROR = ("The training process stopped before finishing (killed, crashed or the server restarted); no version "
               f"was published. It is retried when new data arrives, or run now: {CLI} train NAME")
LEASE_ERROR = ("The worker running this job stopped answering (its lease ran out: the worker was killed, its machine "
               "went down or it lost the database); no version was published and the user's next job can run. It "
               f"is retried when new data arrives, or run now: {CLI} train NAME")


def is_stale(job: dict, grace_seconds: float | None = QUEUED_GRACE_SECONDS) -> bool:
    """An open job of a local process is stale when that process is gone, or it never got one within the grace
    period (``None``: never; jobs queued for workers wait for one). Jobs a worker holds are judged by their lease
    (:func:`fail_stale`), never by a pid, which is another machine's."""
    if job.get("worker_id"):
        return False
    if job["pid"] is None:
        if grace_seconds is None:
            return False
        cutoff = (datetime.now(UTC) - timedelta(seconds=grace_seconds)).isoformat(timespec="milliseconds")
        return job["created_at"] <= cutoff
    return not pid_alive(job["pid"])


def fail_stale(store: Store, grace_seconds: float | None = QUEUED_GRACE_SECONDS, only: int | None = None,
               user_id: int | None = None) -> list[int]:
    """Mark open jobs whose process is gone, and jobs whose worker's lease lapsed, as failed (at server start,
    before each scheduler pass, before a worker claims); their ids. Their staging folders are removed; published
    versions and the active pointer are untouched. ``only`` restricts this to one job (a runner cleaning up after
    the process it killed), ``user_id`` to one user's jobs; ``grace_seconds`` is :func:`is_stale`'s."""
    lapsed = store.jobs.fail_lapsed(utcnow(), LEASE_ERROR, only, user_id)
    stale = [job["id"] for job in store.jobs.open_jobs(user_id)
             if only in (None, job["id"]) and is_stale(job, grace_seconds)]
    for job_id in stale:
        store.jobs.fail_open(job_id, STALE_ERROR)
    return sorted(lapsed + stale)


def queue_job(store: Store, user_id: int, trigger: str = "manual", pid: int | None = None,
              grace_seconds: float | None = QUEUED_GRACE_SECONDS) -> int:
    """Queue a training job for the user: their open jobs whose process died (or worker's lease lapsed) are
    failed first, then the job row is created (refused, InputError, while another of theirs is open and alive).
    ``pid`` None queues it for a worker."""
    fail_stale(store, grace_seconds, user_id=user_id)
    return store.jobs.create(user_id, trigger, pid)


def job_command(store: Store, job_id: int, model_cfg: ModelConfig, train_cfg: TrainConfig,
                python: str = sys.executable, module: str = "personalize.job") -> list[str]:
    """The command line of one job process (``python -m personalize.job ...``) for this store and these configs."""
    cmd = [python, "-m", module, "--data-dir", str(store.data_dir.root), "--job-id", str(job_id),
           "--model", str(model_cfg.model), "--quant", model_cfg.quant, "--device", model_cfg.device,
           "--dtype", model_cfg.dtype, "--config", json.dumps(train_cfg.to_dict())]
    if model_cfg.threads:
        cmd += ["--threads", str(model_cfg.threads)]
    if store.config.db:  # the job writes where the server reads (default: attune.db in the data dir)
        cmd += ["--db", store.config.db]
    objects = store.adapter_store
    if objects.adapter_store:  # and publishes where the server's other processes fetch from
        cmd += ["--adapter-store", objects.adapter_store] + (["--s3-endpoint", objects.s3_endpoint]
                                                             if objects.s3_endpoint else [])
    return cmd


def spawn(cmd: list[str], config: RunnerConfig, env: dict[str, str] | None = None,
          die_with_parent: bool = False) -> subprocess.Popen:
    """Start a job process from the repository root (``nice``d, output to ``config.log_path`` or inherited).
    ``die_with_parent``: on Linux the kernel kills it when this process dies (a worker killed with -9 must not
    leave its job training on unseen). OSError if it cannot start."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    nice, parent = config.nice, os.getpid()

    def prepare() -> None:  # runs in the child before exec
        if nice and hasattr(os, "nice"):
            os.nice(nice)
        if die_with_parent and sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)

    out = open(config.log_path, "ab") if config.log_path else None
    try:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=out or subprocess.DEVNULL, stderr=out or None,
                                preexec_fn=prepare if nice or die_with_parent else None)
    finally:
        if out:
            out.close()


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

    queues = False
    """Runs jobs itself, one at a time (a :class:`QueueRunner` only queues them)."""

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
        return job_command(self.store, job_id, self.model_cfg, self.train_cfg, self.config.python)

    def start(self, user_id: int, trigger: str = "manual") -> int:
        """Queue a job for the user and start its process; returns the job id."""
        with self._lock:
            if self._running():
                raise TrainingError(f"Another training job is running (job {self._job_id}); wait for it to finish.")
            # queued with this process's pid until the child's is known: never a job for workers to claim
            job_id = queue_job(self.store, user_id, trigger, pid=os.getpid())
            try:
                self._proc = spawn(self.command(job_id), self.config)
            except OSError as e:
                self.store.jobs.finish(job_id, "failed", error=f"Could not start the training process: {e}.")
                raise TrainingError(f"Could not start the training process ({e}); check that "
                                    f"{self.config.python} runs.") from e
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


class QueueRunner:
    """The runner of a serving process whose jobs ``launch.py worker`` processes run (``serve --workers external``):
    :meth:`start` only queues the job (a worker claims it; on PostgreSQL the insert wakes the waiting workers).
    Nothing runs here, so it is never busy and :meth:`stop` has nothing to stop; the scheduler queues a job for
    every due user in one pass."""

    queues = True

    def __init__(self, store: Store):
        self.store = store

    def start(self, user_id: int, trigger: str = "manual") -> int:
        """Queue a job for the user's next free worker; its id (InputError while the user has an open job)."""
        job_id = queue_job(self.store, user_id, trigger, grace_seconds=None)
        log.info("queued training job %s for user %s (for a worker)", job_id, user_id)
        return job_id

    def busy(self) -> bool:
        return False

    def stop(self) -> None:
        """Jobs belong to the workers: stopping this server leaves them running."""
