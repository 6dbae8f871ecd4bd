"""The jobs table as the queue (issue 27, item 2): ``launch.py worker`` processes claim queued jobs, hold leases and
run each job in its own process; the scheduler runs in one serving process at a time.

The queue's storage calls run on SQLite and PostgreSQL (``any_store``). The process tests start real worker and
scheduler processes against the session's PostgreSQL (loopback only, ``conftest.postgres_server``) with a fake job
(``tests/fake_job.py``: the worker protocol without a model, so a job takes a fraction of a second), kill them with
SIGKILL where the story says so, and stop every process they started by its PID. One test runs the real training job
on the tiny model through a worker.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from helpers import alive, cli, stop_all, wait_for
from personalize.runner import LEASE_ERROR, QueueRunner
from personalize.scheduler import Scheduler, SchedulerConfig
from storage import InputError, StorageError, Store
from storage.common import utcnow

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def _at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def _seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def _answers(store: Store, user_id: int, n: int) -> None:
    cid = store.chats.create_conversation(user_id)
    for i in range(n):
        store.chats.add_message(user_id, cid, "assistant", f"answer {i}")


# the queue in storage, on both databases ------------------------------------------------------------------
def test_the_queue_claims_once_renews_and_lapses(any_store):
    jobs = any_store.jobs
    alice, bob = any_store.users.create("alice", "correct horse"), any_store.users.create("bob", "battery staple")
    mine = jobs.create(alice.id, "api")  # no pid: for a worker
    jobs.create(bob.id, "ui", pid=os.getpid())  # a local runner's job: never a worker's
    claimed = jobs.claim_next("w1", _at(30))
    assert claimed["id"] == mine and claimed["status"] == "running" and claimed["worker_id"] == "w1"
    assert jobs.claim_next("w2", _at(30)) is None
    with pytest.raises(InputError, match="already running"):
        jobs.create(alice.id)  # one open job per user, also while a worker holds it
    with pytest.raises(InputError, match="no longer held by worker w2"):
        jobs.hand_over(mine, "w2", 1)
    assert jobs.hand_over(mine, "w1", 4242)["pid"] == 4242
    assert not jobs.renew(mine, "w2", _at(30)) and jobs.renew(mine, "w1", _at(30))
    assert jobs.fail_lapsed(utcnow(), "gone") == []  # the lease runs for 30 s more
    assert jobs.renew(mine, "w1", _at(-1))  # a lease that ended a second ago
    assert jobs.fail_lapsed(utcnow(), "gone", user_id=bob.id) == []
    assert jobs.fail_lapsed(utcnow(), "gone") == [mine]
    row = jobs.load(mine)
    assert (row["status"], row["error"]) == ("failed", "gone") and row["finished_at"]
    assert not jobs.renew(mine, "w1", _at(30))  # the worker learns it lost the job
    assert not jobs.finish(mine, "published", {"version": 1})  # and a late verdict does not overwrite it
    assert jobs.load(mine)["status"] == "failed"
    assert jobs.claim_next("w1", _at(30)) is None and jobs.create(alice.id) > mine  # the user is free again
    assert jobs.wait_queued(0) in (True, False)  # listening (PostgreSQL) or a no-op sleep (SQLite)


def test_a_job_whose_lease_ran_out_publishes_nothing(any_store):
    """A worker cut off from the database past its lease may still reach publish: its job has been (or is about to
    be) failed and another job of the user may run, so that adapter must not become the user's version."""
    from fakes import write_stand_in_adapter

    jobs, alice = any_store.jobs, any_store.users.create("alice", "correct horse")

    def publish(job_id: int) -> int:
        staging = any_store.data_dir.staging(alice.id, job_id)
        write_stand_in_adapter(staging)
        return any_store.adapters.publish(alice.id, staging, base_model="fake", metrics={}, gate_reason="ok",
                                          parent_version=None, job_id=job_id)

    first = jobs.create(alice.id, "api")
    jobs.claim_next("w1", _at(30))
    assert publish(first) == 1 and jobs.finish(first, "published")  # a live lease publishes
    lapsed = jobs.create(alice.id, "api")
    jobs.claim_next("w1", _at(-1))  # its lease ended a second ago; nobody has failed the job yet
    with pytest.raises(StorageError, match=f"Job {lapsed} is no longer running .* not published"):
        publish(lapsed)
    assert jobs.fail_lapsed(utcnow(), "gone") == [lapsed]
    with pytest.raises(StorageError, match="no longer running"):
        publish(lapsed)  # failed by the lease: still nothing
    assert [v["version"] for v in any_store.adapters.list(alice.id)] == [1]
    assert any_store.adapters.active_version(alice.id) == 1
    assert not [p for p in any_store.data_dir.adapters(alice.id).iterdir() if p.name.startswith("v2")]


def test_concurrent_claimers_take_each_job_once(any_store):
    """Six threads, each with its own connection, claim from one queue of 120 jobs at once (the exactly-once property
    itself; on PostgreSQL without SKIP LOCKED and the status re-check a row is taken twice)."""
    n, threads = 120, 6
    with any_store.write() as db:
        for i in range(n):
            uid = db["users"].insert({"name": f"u{i}", "password_hash": "-", "created_at": utcnow()}).last_pk
            db["jobs"].insert({"user_id": uid, "status": "queued", "trigger": "api", "created_at": utcnow()})
    barrier = threading.Barrier(threads)

    def claim_all(k: int) -> list[int]:
        barrier.wait()
        got = []
        while (job := any_store.jobs.claim_next(f"w{k}", _at(30))) is not None:
            got.append(job["id"])
        return got

    with ThreadPoolExecutor(threads) as pool:
        taken = list(pool.map(claim_all, range(threads)))
    claimed = [job for got in taken for job in got]
    assert len(claimed) == len(set(claimed)) == n, (len(claimed), len(set(claimed)))
    assert sum(1 for got in taken if got) > 1  # they did claim side by side


def test_due_users_is_one_query_with_the_schedulers_rule(any_store):
    users = {name: any_store.users.create(name, "password 123") for name in ("ann", "ben", "cat", "dan", "eve")}
    for name, n in (("ann", 3), ("ben", 5), ("cat", 1), ("dan", 4), ("eve", 9)):
        _answers(any_store, users[name].id, n)
    any_store.users.set_personalization(users["eve"].id, False)
    dan_job = any_store.jobs.create(users["dan"].id)  # an open job: not due
    sched = Scheduler(any_store, QueueRunner(any_store), SchedulerConfig(min_new_events=2, min_interval_minutes=0,
                                                                          workers="external"))
    assert sched.due() == [users["ben"].id, users["ann"].id]  # most new signal first; cat has too little
    any_store.jobs.finish(dan_job, "rejected")
    assert sched.due() == [users["ben"].id, users["ann"].id]  # nothing new since dan's job
    _answers(any_store, users["dan"].id, 2)
    assert sched.due() == [users["ben"].id, users["ann"].id, users["dan"].id]
    started = sched.tick()  # with workers, one job queued for every due user in one pass
    queued = any_store.jobs.open_jobs()
    assert [j["user_id"] for j in queued] == [users[n].id for n in ("ben", "ann", "dan")] and started == queued[0]["id"]
    assert {j["trigger"] for j in queued} == {"scheduler"} and all(j["pid"] is None for j in queued)
    assert sched.due() == [] and sched.tick() is None and sched.leading
    later = Scheduler(any_store, QueueRunner(any_store), SchedulerConfig(min_new_events=2, min_interval_minutes=60))
    assert later.due() == []


def test_serve_with_external_workers_only_queues_and_local_stays_the_default(store):
    from assistant.model import ModelConfig
    from personalize.runner import JobRunner
    from personalize.scheduler import start_background

    runner, sched = start_background(store, ModelConfig(), None, SchedulerConfig(workers="external", poll_seconds=60))
    try:
        alice = store.users.create("alice", "correct horse")
        job = runner.start(alice.id, "ui")  # what "Train a new version now" does
        assert isinstance(runner, QueueRunner) and not runner.busy() and sched.grace is None
        assert store.jobs.load(job)["pid"] is None and store.jobs.claim_next("w1", _at(30))["id"] == job
    finally:
        sched.stop()
    runner, sched = start_background(store, ModelConfig(), None, SchedulerConfig(poll_seconds=60))
    sched.stop()
    assert isinstance(runner, JobRunner) and sched.grace is not None


# processes on PostgreSQL ----------------------------------------------------------------------------------
class Procs:
    """Processes a test starts: each stopped by its PID at the end (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.procs, self.logs = tmp_path, [], []

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={
                **os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), **env})
        proc.log = log
        self.procs.append(proc)
        return proc

    def worker(self, name: str, db: str, *flags: str, **env: str) -> subprocess.Popen:
        env.setdefault("FAKE_JOB_LOG", str(self.tmp / "ran.log"))
        proc = self.start(name, [sys.executable, str(ROOT / "launch.py"), "worker", "--data-dir",
                                 str(self.tmp / name), "--db", db, "--name", name, *flags], **env)
        wait_for(lambda: "waiting for jobs" in _text(proc) or proc.poll() is not None, timeout=60,
                 what=f"worker {name} to start")
        assert proc.poll() is None, _text(proc)
        return proc

    def stop(self) -> None:
        stop_all(self.procs, 15)


def _text(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")



@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.stop()


@pytest.fixture
def pg_store(pg_url, tmp_path):
    s = Store(tmp_path / "server", pg_url)
    yield s
    s.close()


FAKE = ("--job-module", "fake_job")


def test_two_workers_run_every_job_exactly_once(pg_store, pg_url, procs, tmp_path):
    n = 12
    workers = [procs.worker(name, pg_url, *FAKE, "--lease-seconds", "10", "--poll-seconds", "120")
               for name in ("wa", "wb")]
    users = [pg_store.users.create(f"user{i}", "password 123").id for i in range(n)]
    started = time.monotonic()
    ids = [pg_store.jobs.create(uid, "api") for uid in users]
    done = lambda: [j for j in (pg_store.jobs.load(i) for i in ids) if j["status"] not in ("queued", "running")]  # noqa: E731
    wait_for(lambda: len(done()) == n, timeout=120, interval=0.3, what="every job to be run")
    took = time.monotonic() - started
    ran = [line.split() for line in (tmp_path / "ran.log").read_text().splitlines()]
    assert sorted(int(r[0]) for r in ran) == sorted(ids)  # each job ran once: none twice, none lost
    rows = {i: pg_store.jobs.load(i) for i in ids}
    assert all(rows[int(job)]["worker_id"] == worker for job, worker, _ in ran)
    assert {r["status"] for r in rows.values()} == {"rejected"} and {r["result"]["code"] for r in rows.values()} == {
        "fake"}
    per_worker = {w: sum(r[1].startswith(w + ":") for r in ran) for w in ("wa", "wb")}
    assert all(per_worker.values()), per_worker  # both took part
    # idle workers (next look in 120 s) are woken by NOTIFY: the claim follows the queueing at once
    waits = []
    for uid in users[:5]:
        job = pg_store.jobs.create(uid, "api")
        wait_for(lambda: pg_store.jobs.load(job)["status"] == "rejected", timeout=30, interval=0.05,
                 what="a job queued to idle workers to be run")
        row = pg_store.jobs.load(job)
        waits.append(_seconds(row["created_at"], row["started_at"]))
    assert max(waits) < 2.0, waits
    print(f"\n{n} jobs on 2 workers in {took:.1f} s ({per_worker}); queued -> claimed by an idle worker: "
          f"p50 {statistics.median(waits) * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms")
    assert all(w.poll() is None for w in workers)


def test_a_killed_worker_lapses_its_job_and_the_other_carries_on(pg_store, pg_url, procs, tmp_path):
    plan = json.dumps({"alice": [120, 0.3]})  # alice's first job would run for 2 minutes
    flags = (*FAKE, "--lease-seconds", "3", "--poll-seconds", "1")
    workers = {name: procs.worker(name, pg_url, *flags, FAKE_JOB_PLAN=plan) for name in ("wa", "wb")}
    alice, bob = pg_store.users.create("alice", "correct horse"), pg_store.users.create("bob", "battery staple")
    first = QueueRunner(pg_store).start(alice.id, "api")
    job = wait_for(lambda: (j := pg_store.jobs.load(first))["pid"] and j["losses"] and j, timeout=30,
                   what="alice's job to run")
    with pytest.raises(InputError, match="already running"):
        QueueRunner(pg_store).start(alice.id, "ui")  # a second open job for her is refused
    holder = job["worker_id"].split(":")[0]
    other = "wb" if holder == "wa" else "wa"
    workers[holder].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    workers[holder].wait(10)
    wait_for(lambda: not alive(job["pid"]), timeout=10, what="the dead worker's job process to die with it")
    bobs = QueueRunner(pg_store).start(bob.id, "api")  # the other worker carries on
    wait_for(lambda: pg_store.jobs.load(bobs)["status"] == "rejected", timeout=30, what="bob's job to run")
    assert pg_store.jobs.load(bobs)["worker_id"].startswith(other + ":")
    wait_for(lambda: pg_store.jobs.load(first)["status"] == "failed", timeout=30, what="the lapsed job to fail")
    lapsed_after = time.monotonic() - killed
    failed = pg_store.jobs.load(first)
    assert failed["error"] == LEASE_ERROR and "stopped answering" in failed["error"]
    assert _seconds(failed["lease_until"], failed["finished_at"]) >= 0  # not before the lease ran out
    nxt = QueueRunner(pg_store).start(alice.id, "api")  # alice is free: her next job runs on the other worker
    wait_for(lambda: pg_store.jobs.load(nxt)["status"] == "rejected", timeout=30, what="alice's next job to run")
    assert pg_store.jobs.load(nxt)["worker_id"].startswith(other + ":") and workers[other].poll() is None
    ran = [line.split()[0] for line in (tmp_path / "ran.log").read_text().splitlines()]
    assert sorted(ran) == sorted(str(j) for j in (first, bobs, nxt))
    print(f"\nworker SIGKILLed -> its job failed after {lapsed_after:.1f} s (lease 3 s, poll 1 s)")


SCHEDULER = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s", force=True)
from personalize.runner import QueueRunner
from personalize.scheduler import Scheduler, SchedulerConfig
from storage import Store
store = Store(sys.argv[1], sys.argv[2])
Scheduler(store, QueueRunner(store), SchedulerConfig(poll_seconds=0.2, min_new_events=1, min_interval_minutes=0,
                                                     workers="external")).start()
while True:
    time.sleep(1)
"""


def test_the_scheduler_runs_in_one_process_and_its_lock_moves_when_that_dies(pg_store, pg_url, procs, tmp_path):
    leads = lambda p: "now runs the scheduler" in _text(p)  # noqa: E731
    two = [procs.start(f"s{i}", [sys.executable, "-c", SCHEDULER, str(tmp_path / f"s{i}"), pg_url]) for i in (1, 2)]
    wait_for(lambda: any(leads(p) for p in two), timeout=60, what="one process to take the scheduler")
    time.sleep(1.0)  # five passes each
    assert [leads(p) for p in two].count(True) == 1, [_text(p) for p in two]
    leader, other = (two[0], two[1]) if leads(two[0]) else (two[1], two[0])
    alice = pg_store.users.create("alice", "correct horse")
    _answers(pg_store, alice.id, 1)
    wait_for(lambda: pg_store.jobs.open_job(alice.id), timeout=10, what="the scheduler to queue alice's job")
    assert [j["trigger"] for j in pg_store.jobs.list(alice.id)] == ["scheduler"]
    leader.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    leader.wait(10)
    wait_for(lambda: leads(other), timeout=15, what="the lock to move to the other process")
    moved_after = time.monotonic() - killed
    bob = pg_store.users.create("bob", "battery staple")
    _answers(pg_store, bob.id, 1)
    wait_for(lambda: pg_store.jobs.open_job(bob.id), timeout=10, what="the new holder to queue bob's job")
    assert other.poll() is None
    print(f"\nscheduler holder SIGKILLed -> the other process runs it after {moved_after:.2f} s")


def test_sqlite_workers_poll_the_same_queue(procs, tmp_path):
    """SQLite has no NOTIFY: a worker on the same machine (the same data dir) looks every --poll-seconds."""
    data = tmp_path / "one-machine"
    store = Store(data)
    try:
        uids = [store.users.create(f"u{i}", "password 123").id for i in range(3)]
        procs.worker("wa", f"sqlite:///{data / 'attune.db'}", *FAKE, "--poll-seconds", "0.3")
        ids = [store.jobs.create(uid, "api") for uid in uids]
        wait_for(lambda: all(store.jobs.load(i)["status"] == "rejected" for i in ids), timeout=60,
                 what="the SQLite worker to run every job")
        assert sorted(int(line.split()[0]) for line in (tmp_path / "ran.log").read_text().splitlines()) == ids
    finally:
        store.close()


def test_a_worker_runs_the_real_training_job(pg_store, pg_url, procs, tmp_path, tiny_model_dir):
    """The real job (``personalize.job``) on the tiny model, claimed and run by ``launch.py worker``."""
    from test_personalize import write_history

    from storage.transfer import import_history

    alice = pg_store.users.create("alice", "correct horse")
    import_history(pg_store, alice.id, write_history(tmp_path / "alice.jsonl"))
    tiny = ["rank=4", "alpha=8", "dropout=0.0", "lr=0.003", "epochs=2", "max_steps=4", "batch_size=4",
            "max_seq_len=128", "anchor_count=6", "anchor_max_new_tokens=6", "anchor_margin=100.0",
            'mixed_precision="no"', "ability_checks=4", "ability_max_new_tokens=4"]
    shared = str(tmp_path / "server")  # until adapters live in object storage, the data dir is shared
    proc = procs.start("real", [sys.executable, str(ROOT / "launch.py"), "worker", "--data-dir", shared, "--db", pg_url,
                                "--model", str(tiny_model_dir), "--quant", "none", "--dtype", "float32",
                                "--device", "cpu", *[a for s in tiny for a in ("--set", s)]])
    job_id = QueueRunner(pg_store).start(alice.id, "ui")
    wait_for(lambda: pg_store.jobs.load(job_id)["status"] not in ("queued", "running") or proc.poll() is not None,
             timeout=300, interval=0.5, what="the worker to train alice")
    job = pg_store.jobs.load(job_id)
    assert job["status"] == "published", (job["error"], _text(proc)[-3000:])
    assert job["worker_id"] and job["pid"] != proc.pid and job["result"]["version"] == 1
    assert pg_store.adapters.active(alice.id)["job_id"] == job_id


# the command line, and forgetting a user whose job a worker holds ------------------------------------------
def test_worker_and_serve_help_and_bad_values_are_clear(tmp_path):
    helped = cli("worker", "--help", data_dir=tmp_path)
    assert helped.returncode == 0 and "FOR UPDATE SKIP LOCKED" in helped.stdout and "--lease-seconds" in helped.stdout
    assert "cuda:N" in helped.stdout and "--workers external" in helped.stdout
    served = cli("serve", "--help", data_dir=tmp_path)
    assert "--workers {local,external}" in served.stdout and "launch.py worker" in " ".join(served.stdout.split())
    for flags, field in ((("--device", "cuda:x"), "device"), (("--lease-seconds", "1"), "lease_seconds"),
                         (("--poll-seconds", "0"), "poll_seconds"), (("--set", "rank=0"), "rank")):
        bad = cli("worker", *flags, data_dir=tmp_path)
        assert bad.returncode == 2 and f"attune: error: {field}:" in bad.stderr and "Traceback" not in bad.stderr
    wrong = cli("serve", "--workers", "remote", data_dir=tmp_path)
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


def test_forgetting_a_user_leaves_a_workers_job_process_to_its_worker(store):
    """The pid in a worker-held job is a process on the worker's machine: forgetting its user never signals it
    here; the worker learns at its next renewal that the job is gone and stops it."""
    from assistant.chat.account import forget_user

    alice = store.users.create("alice", "correct horse")
    elsewhere = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        job = store.jobs.create(alice.id, "api")
        store.jobs.claim_next("w1", _at(30))
        store.jobs.hand_over(job, "w1", elsewhere.pid)
        forget_user(store, alice.id)
        assert elsewhere.poll() is None and not store.jobs.renew(job, "w1", _at(30))
    finally:
        elsewhere.kill()
        elsewhere.wait()
