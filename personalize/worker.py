"""``launch.py worker``: a long-running process that runs queued training jobs, one at a time, on one device.

Owns: the worker loop and ``WorkerConfig``. The worker waits for a job (PostgreSQL's LISTEN/NOTIFY wakes it as soon
as one is queued; on SQLite, or when nothing is announced, it looks every ``poll_seconds``), claims the oldest one
with a lease (``storage.jobs.Jobs.claim_next``: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so any number of workers
on any number of machines share one queue and each job is taken once) and runs it as training always runs, in its
own process (``python -m personalize.job --worker-id W``, which the kernel kills if the worker dies), renewing the
lease every third of ``lease_seconds`` while that process lives. It stops the job when the lease is lost (the job
was failed meanwhile, or its user deleted), fails the job when its process ends without a verdict, and before each
claim fails the jobs whose worker's lease lapsed (``personalize.runner.LEASE_ERROR``), which frees their users.

Must not know: serving (gradio, HTTP, ChatService). Rows go through ``storage.jobs``, job processes through
``personalize.runner`` (``job_command``, ``spawn``); which jobs are due is the scheduler's business.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from assistant.model import ModelConfig
from personalize.config import TrainConfig
from personalize.runner import LEASE_ERROR, STALE_ERROR, RunnerConfig, job_command, spawn
from storage.common import utcnow
from storage.config import redact
from storage.db import Store

log = logging.getLogger("attune.personalize")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass
class WorkerConfig:
    """One worker process (``launch.py worker``)."""

    device: str = "auto"
    """where its jobs train: auto, cpu, cuda (the GPUs this process sees) or cuda:N (GPU N only: its job processes
    get CUDA_VISIBLE_DEVICES=N; run one worker per GPU)"""
    lease_seconds: float = 60.0
    """how long a claimed job stays this worker's without a renewal (renewed every third of it while the job runs);
    a job whose worker stays silent longer is failed and its user freed"""
    poll_seconds: float = 10.0
    """seconds between two looks at the queue when nothing is announced (PostgreSQL announces each queued job at
    once; SQLite announces nothing, so there this is how long a job may wait)"""
    name: str = ""
    """this worker's name in the jobs it holds (worker_id NAME:PID:XXXX); empty: the host name"""
    job_module: str = "personalize.job"
    """the module each job runs in: python -m MODULE with personalize.job's arguments and --worker-id (tests give a
    fake one)"""

    def __post_init__(self):
        if not _DEVICE.fullmatch(str(self.device)):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:N (a GPU index), got {self.device!r}")
        if not self.lease_seconds >= 3:
            raise ValueError(f"lease_seconds: must be at least 3 (it is renewed every third), got "
                             f"{self.lease_seconds!r}")
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds: must be > 0, got {self.poll_seconds!r}")
        if not re.fullmatch(r"[\w.-]*", self.name):
            raise ValueError(f"name: letters, digits, '.', '-' and '_' only, got {self.name!r}")
        if not _MODULE.fullmatch(self.job_module):
            raise ValueError(f"job_module: must be a module name such as personalize.job, got {self.job_module!r}")

    @property
    def model_device(self) -> str:
        """The device the job's model config names (``cuda`` for ``cuda:N``: the job sees only that GPU)."""
        return "cuda" if self.device.startswith("cuda") else self.device

    @property
    def env(self) -> dict[str, str]:
        """What the job processes' environment adds: the one GPU of ``cuda:N``."""
        return {"CUDA_VISIBLE_DEVICES": self.device.split(":", 1)[1]} if ":" in self.device else {}


class Worker:
    """``run()`` until ``stop()`` (a signal handler may call it); ``run_next()`` claims and runs one job (tests)."""

    def __init__(self, store: Store, config: WorkerConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 runner_cfg: RunnerConfig | None = None):
        self.store, self.config, self.model_cfg, self.train_cfg = store, config, model_cfg, train_cfg
        self.runner_cfg = runner_cfg or RunnerConfig(nice=0)  # a worker's machine trains: no serving to yield to
        self.id = f"{config.name or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.jobs_run = 0
        self._stop = threading.Event()

    def lease_until(self) -> str:
        return (datetime.now(UTC) + timedelta(seconds=self.config.lease_seconds)).isoformat(timespec="milliseconds")

    def stop(self) -> None:
        """Finish soon: a running job is terminated (it records itself as failed), then :meth:`run` returns."""
        self._stop.set()

    def run(self) -> int:
        """Claim and run jobs until :meth:`stop`; how many ran. Database errors are logged and retried."""
        self.store.jobs.wait_queued(0)  # listen before the first look: a job queued after it is announced
        log.info("worker %s: waiting for jobs in %s (device %s)", self.id,
                 redact(self.store.config.db) or self.store.path, self.config.device)
        while not self._stop.is_set():
            try:
                if self.run_next() is None:
                    self._idle()
            except Exception:  # the database went away, a bad row: log it, wait, look again
                log.exception("worker %s: looking for a job failed; trying again in %s s", self.id,
                              self.config.poll_seconds)
                self._stop.wait(self.config.poll_seconds)
        log.info("worker %s: stopped after %d job(s)", self.id, self.jobs_run)
        return self.jobs_run

    def run_next(self) -> int | None:
        """Fail jobs whose lease lapsed, then claim the oldest queued job and run it to its end; its id, or None."""
        lapsed = self.store.jobs.fail_lapsed(utcnow(), LEASE_ERROR)
        if lapsed:
            log.warning("worker %s: failed job(s) %s: their worker stopped answering", self.id, lapsed)
        job = self.store.jobs.claim_next(self.id, self.lease_until())
        if job is None:
            return None
        self._run(job)
        self.jobs_run += 1
        return job["id"]

    def _idle(self) -> None:
        """Wait for an announced job, at most ``poll_seconds``, looking at the stop flag every second."""
        deadline = time.monotonic() + self.config.poll_seconds
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if self.store.jobs.wait_queued(min(left, 1.0)):
                return

    def _run(self, job: dict) -> None:
        """Run the claimed job in its own process; renew the lease while it lives; record a death without verdict."""
        job_id = job["id"]
        cmd = job_command(self.store, job_id, self.model_cfg, self.train_cfg, self.runner_cfg.python,
                          self.config.job_module) + ["--worker-id", self.id]
        try:
            proc = spawn(cmd, self.runner_cfg, self.config.env, die_with_parent=True)
        except OSError as e:
            self.store.jobs.finish(job_id, "failed", error=f"The worker could not start the training process: {e}.")
            log.error("worker %s: could not start job %s: %s", self.id, job_id, e)
            return
        log.info("worker %s: job %s for user %s runs as pid %s", self.id, job_id, job["user_id"], proc.pid)
        every = self.config.lease_seconds / 3
        renew_at = time.monotonic() + every
        while proc.poll() is None:
            if self._stop.is_set():
                self._terminate(proc)
                break
            try:
                proc.wait(timeout=min(1.0, max(0.05, renew_at - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None and time.monotonic() >= renew_at:
                renew_at = time.monotonic() + every
                if not self._renew(job_id):
                    log.warning("worker %s: job %s is no longer ours (failed meanwhile or its user deleted); "
                                "stopping its process", self.id, job_id)
                    self._terminate(proc)
                    break
        if self.store.jobs.fail_open(job_id, STALE_ERROR):  # still open: the process ended without a verdict
            log.warning("worker %s: job %s's process ended (exit code %s) without recording how it ended",
                        self.id, job_id, proc.returncode)
        else:
            log.info("worker %s: job %s done (exit code %s)", self.id, job_id, proc.returncode)

    def _renew(self, job_id: int) -> bool:
        """Extend the lease; False if the job is no longer this worker's. A database error keeps the job running
        (the lease may lapse meanwhile; the next renewal then says so)."""
        try:
            return self.store.jobs.renew(job_id, self.id, self.lease_until())
        except Exception as e:
            log.warning("worker %s: could not renew the lease of job %s (%s); trying again", self.id, job_id, e)
            return True

    def _terminate(self, proc: subprocess.Popen) -> None:
        proc.terminate()  # the job marks itself failed ("stopped")
        try:
            proc.wait(self.runner_cfg.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_worker(store: Store, config: WorkerConfig, model_cfg: ModelConfig, train_cfg: TrainConfig) -> int:
    """The ``launch.py worker`` process: run jobs until SIGTERM or SIGINT (a running job is stopped and recorded as
    failed, then the worker exits); how many jobs ran."""
    worker = Worker(store, config, model_cfg, train_cfg)
    previous = {sig: signal.signal(sig, lambda *_: worker.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return worker.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
