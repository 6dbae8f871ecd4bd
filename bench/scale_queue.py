"""The ``scale`` section's queue measurements (``bench.scale``): real ``launch.py worker`` processes on a throwaway
PostgreSQL database each, driven the way serving drives them (rows in the jobs table), and killed with SIGKILL where
the story says so.

Owns: jobs per hour with 1 and 2 workers (the real training job on the tests' tiny random model, and the worker
tests' fake job), enqueue -> claim by idle workers, and the kill loop (a worker killed mid-job, its job failed by
lease expiry, the user's next job claimed; every job's runs counted from the fake job's log). Every process it
starts is stopped by its PID. Must not know the queue's SQL: it reads rows through ``storage.jobs``.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
FAKE = ("--job-module", "fake_job")
OPEN = ("queued", "running")
TINY_TRAINING = ("rank=4", "alpha=8", "dropout=0.0", "lr=0.003", "epochs=2", "max_steps=4", "batch_size=4",
                 "max_seq_len=128", "anchor_count=6", "anchor_max_new_tokens=6", "anchor_margin=100.0",
                 'mixed_precision="no"', "ability_checks=4", "ability_max_new_tokens=4")
"""The worker test's settings for the real job on the tiny model (tests/test_workers.py)."""


class Workers:
    """``launch.py worker`` processes on one database, each with its own data dir and log; ``with`` stops every
    one still running by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp: Path, url: str, flags: tuple[str, ...], env: dict[str, str]):
        self.tmp, self.url, self.flags = tmp, url, flags
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "HF_HUB_OFFLINE": "1",
                    **env}
        self.procs: list[subprocess.Popen] = []
        tmp.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, wait: bool = True) -> subprocess.Popen:
        """Spawn worker ``name``; with ``wait``, return once it waits for jobs (:meth:`ready`)."""
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "worker", "--data-dir",
                                     str(self.tmp / name), "--db", self.url, "--name", name, *self.flags], cwd=ROOT,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        proc.log = log
        self.procs.append(proc)
        return self.ready(proc) if wait else proc

    def ready(self, proc: subprocess.Popen) -> subprocess.Popen:
        from helpers import wait_for

        text = lambda: proc.log.read_text(errors="replace")  # noqa: E731
        wait_for(lambda: "waiting for jobs" in text() or proc.poll() is not None, timeout=120, interval=0.1,
                 what=f"worker {proc.log.stem} to start")
        if proc.poll() is not None:
            raise RuntimeError(f"worker {proc.log.stem} exited ({proc.returncode}): {text()[-3000:]}")
        return proc

    def by_pid(self, pid: int) -> subprocess.Popen | None:
        return next((p for p in self.procs if p.pid == pid and p.poll() is None), None)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if str(TESTS) not in sys.path:
            sys.path.insert(0, str(TESTS))
        from helpers import stop_all

        stop_all(self.procs, 20)


def _seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]



# jobs per hour -----------------------------------------------------------------------------------------------------
def throughput(pg, s3, cfg, tmp: Path) -> dict:
    """Jobs queued at once (one per user) run by 1 and by 2 workers: the real job on the tiny model, publishing to
    S3, and the fake job (the queue's and the job process's own cost)."""
    sys.path.insert(0, str(TESTS))
    from conftest import build_tiny_model

    tiny = build_tiny_model(tmp / "tiny-llama")
    real = ("--model", str(tiny), "--quant", "none", "--dtype", "float32", "--device", "cpu",
            *[a for s in TINY_TRAINING for a in ("--set", s)])
    out: dict = {"real": {}, "fake": {}}
    for n in (1, 2):
        bucket = s3.new_bucket()
        out["real"][str(n)] = _batch(pg, tmp / f"real{n}", n, cfg.real_jobs, (*real, "--adapter-store", bucket,
                                                                                "--s3-endpoint", s3.endpoint), {},
                                     history=True)
        out["fake"][str(n)] = _batch(pg, tmp / f"fake{n}", n, cfg.fake_jobs, FAKE,
                                     {"FAKE_JOB_SECONDS": str(cfg.fake_seconds), "FAKE_JOB_LOG": str(tmp / "ran.log")})
    return out


def _batch(pg, tmp: Path, workers: int, jobs: int, flags: tuple, env: dict, history: bool = False) -> dict:
    from helpers import wait_for
    from storage import Store

    url = pg.new_database(migrated=True)
    store = Store(tmp / "server", url)
    try:
        users = [store.users.create(f"user{i}", "password 123").id for i in range(jobs)]
        if history:
            _histories(store, users, tmp)
        with Workers(tmp, url, flags, env) as w:
            for i in range(workers):
                w.start(f"w{i}")
            ids = [store.jobs.create(uid, "api") for uid in users]
            wait_for(lambda: not store.jobs.open_jobs(), timeout=120 + 60 * jobs, interval=0.2,
                     what=f"{jobs} jobs to end")
        rows = [store.jobs.load(i) for i in ids]
    finally:
        store.close()
    span = _seconds(min(r["created_at"] for r in rows), max(r["finished_at"] for r in rows))
    statuses = Counter(r["status"] for r in rows)
    return {"jobs": jobs, "workers": workers, "seconds": span, "jobs_per_hour": jobs * 3600 / span,
            "seconds_per_job": span / jobs, "statuses": ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())),
            "errors": sorted({r["error"][:200] for r in rows if r["error"]})}


def _histories(store, users: list[int], tmp: Path) -> None:
    """The worker test's history (tests/test_personalize.py) imported for every user: what the real job trains on."""
    from test_personalize import write_history

    from storage.transfer import import_history

    path = write_history(tmp / "history.jsonl")
    for uid in users:
        import_history(store, uid, path)


# enqueue -> claim ---------------------------------------------------------------------------------------------------
def claims(pg, cfg, tmp: Path) -> dict:
    """Two idle workers that look at the queue every 120 s, so only NOTIFY wakes them; ``cfg.claims`` jobs queued
    one at a time (each after the one before ended): created_at -> started_at of each row."""
    from helpers import wait_for
    from storage import Store

    url = pg.new_database(migrated=True)
    store = Store(tmp / "server", url)
    waits = []
    try:
        users = [store.users.create(f"user{i}", "password 123").id for i in range(cfg.claims)]
        env = {"FAKE_JOB_SECONDS": "0", "FAKE_JOB_LOG": str(tmp / "ran.log")}
        with Workers(tmp, url, (*FAKE, "--poll-seconds", "120"), env) as w:
            for name in ("w0", "w1"):
                w.start(name)
            for uid in users:
                job = store.jobs.create(uid, "api")
                row = wait_for(lambda j=job: (r := store.jobs.load(j))["status"] not in OPEN and r, timeout=60,
                               interval=0.05, what="a job queued to idle workers to end")
                waits.append(_seconds(row["created_at"], row["started_at"]) * 1000)
    finally:
        store.close()
    return {"n": len(waits), "p50_ms": statistics.median(waits), "p95_ms": _p95(waits), "max_ms": max(waits),
            "all_ms": waits}


# the kill loop -----------------------------------------------------------------------------------------------------
def kills(pg, cfg, tmp: Path) -> dict:
    """Two workers run fake jobs for 2 users, each user's next job queued as soon as the last one ended (a thread,
    every 50 ms); ``cfg.kills`` times a worker holding a job in progress is killed with SIGKILL and a new worker
    started at once (a supervisor's restart), and the loop waits for that job to be failed by its lapsed lease and
    the user's next job to be claimed."""
    from helpers import wait_for
    from storage import Store

    url = pg.new_database(migrated=True)
    store = Store(tmp / "server", url)
    ran = tmp / "ran.log"
    flags = (*FAKE, "--lease-seconds", str(cfg.lease_seconds), "--poll-seconds", str(cfg.poll_seconds))
    env = {"FAKE_JOB_SECONDS": str(cfg.kill_job_seconds), "FAKE_JOB_LOG": str(ran)}
    try:
        users = [store.users.create(f"user{i}", "password 123").id for i in range(2)]
        with Workers(tmp, url, flags, env) as w:
            replacement = w.start("w0", wait=False)
            w.start("w1")
            with _feeding(store, users):
                cycles = []
                for k in range(cfg.kills):
                    w.ready(replacement)
                    replacement, cycle = _kill_one(store, w, f"w{k + 2}")
                    cycles.append(cycle)
            wait_for(lambda: not store.jobs.open_jobs(), timeout=120, interval=0.2, what="the last jobs to end")
        return _tally(store, ran, cycles)
    finally:
        store.close()


@contextmanager
def _feeding(store, users: list[int]):
    """While the block runs, a thread queues the next job of every user who has none open (what the scheduler or
    the user would do), looking every 50 ms on its own connection."""
    from storage import InputError

    stop = threading.Event()

    def feed() -> None:
        try:
            while not stop.wait(0.05):
                for uid in users:
                    if store.jobs.open_job(uid) is None:
                        try:
                            store.jobs.create(uid, "api")
                        except InputError:  # opened meanwhile: nothing to do
                            pass
        finally:
            store.close()  # this thread's connection

    thread = threading.Thread(target=feed, name="feeder", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def _kill_one(store, workers: Workers, replacement: str) -> tuple[subprocess.Popen, dict]:
    """Kill the worker of a job in progress, start ``replacement`` without waiting for it; the new process and the
    cycle's times (from the rows' timestamps and the kill's)."""
    from helpers import alive, wait_for
    from storage.common import utcnow

    def victim() -> dict | None:
        for job in store.jobs.open_jobs():
            pid = int(job["worker_id"].split(":")[1]) if job.get("worker_id") else 0
            if job["status"] == "running" and job["pid"] and job["progress"] and workers.by_pid(pid):
                return job
        return None

    job = wait_for(victim, timeout=120, interval=0.1, what="a worker with a job in progress")
    proc = workers.by_pid(int(job["worker_id"].split(":")[1]))
    killed_at = utcnow()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    new = workers.start(replacement, wait=False)

    def next_claimed() -> tuple | None:
        row = store.jobs.load(job["id"])
        later = [j for j in store.jobs.list(job["user_id"], limit=5) if j["id"] > job["id"] and j["started_at"]]
        return (row, min(later, key=lambda j: j["id"])) if row["status"] not in OPEN and later else None

    row, nxt = wait_for(next_claimed, timeout=120, interval=0.05, what="the killed job to fail and the next to run")
    deadline = time.monotonic() + 10
    while alive(job["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return new, {"job": job["id"], "status": row["status"], "error": row["error"],
                 "lapse_s": _seconds(killed_at, row["finished_at"]),
                 "next_s": _seconds(row["finished_at"], nxt["started_at"]),
                 "total_s": _seconds(killed_at, nxt["started_at"]), "orphan": alive(job["pid"])}


def _tally(store, ran: Path, cycles: list[dict]) -> dict:
    """Each job's runs (the fake job's log) and how it ended: lost is a job never ended, one that did not run, or one
    that ended otherwise than by its verdict (the fake job's is ``rejected``) or, killed, by the lease error."""
    from personalize.runner import LEASE_ERROR

    runs = Counter(int(line.split()[0]) for line in ran.read_text().splitlines()) if ran.exists() else Counter()
    rows = list(store.db.query("SELECT id, status, error FROM jobs ORDER BY id"))
    killed = {c["job"] for c in cycles}
    lost = [r["id"] for r in rows if r["status"] in OPEN or not runs[r["id"]]
            or (r["status"], r["error"]) != (("failed", LEASE_ERROR) if r["id"] in killed else ("rejected", None))]
    total = [c["total_s"] for c in cycles]
    return {"kills": len(cycles), "jobs": len(rows), "runs": sum(runs.values()), "lost": len(lost), "lost_ids": lost,
            "doubly_run": sum(1 for n in runs.values() if n > 1),
            "killed_failed": sum(1 for c in cycles if c["status"] == "failed" and c["error"] == LEASE_ERROR),
            "orphans": sum(c["orphan"] for c in cycles),
            "lapse_s_p50": statistics.median(c["lapse_s"] for c in cycles),
            "lapse_s_max": max(c["lapse_s"] for c in cycles),
            "next_s_p50": statistics.median(c["next_s"] for c in cycles),
            "total_s_p50": statistics.median(total), "total_s_max": max(total), "cycles": cycles}
