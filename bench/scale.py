"""Beyond one machine (issue 27, item 6): the job queue, workers, the adapter store and the shared database measured
on a throwaway PostgreSQL 15 and a ``moto_server`` S3 endpoint, both on loopback in temporary folders and stopped by
their PIDs (the tests' own helpers, ``tests/postgres.py`` and ``tests/s3server.py``).

What it measures, each in ``bench.scale_queue`` or ``bench.scale_store``: jobs per hour with 1 and 2 real
``launch.py worker`` processes (the real training job on a tiny random model, and the fake job of the worker tests
for the queue's own cost); enqueue -> claim by idle workers woken by NOTIFY; kill -9 of a worker mid-job -> its job
failed by lease expiry -> the user's next job claimed, over a loop of kills with a replacement worker each time,
counting each job's runs (lost, doubly run); publish -> first token on another server (download from S3 and the
engine's load of a default-rank adapter of the embedded model, split); the per-turn active-version lookup on
PostgreSQL vs SQLite; one scheduler pass (the due-users query) at 1k and 10k users on both.

Owns: :class:`ScaleConfig`, the services' lifetime and the section's table. Must not know how a worker or a store
works inside: it drives them through ``launch.py`` and ``storage`` as a deployment would.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


@dataclass(frozen=True)
class ScaleConfig:
    """The sizes of one run (``--quick``: :data:`QUICK`)."""

    real_jobs: int = 3
    """real training jobs (tiny model) queued at once, for 1 and for 2 workers"""
    fake_jobs: int = 10
    """fake jobs (``tests/fake_job.py``) queued at once, for 1 and for 2 workers"""
    fake_seconds: float = 1.0
    """how long each fake job sleeps in the throughput runs"""
    claims: int = 30
    """jobs queued one at a time to idle workers (enqueue -> claim samples)"""
    kills: int = 20
    """workers killed with SIGKILL mid-job, each replaced by a new one"""
    kill_job_seconds: float = 3.0
    """how long each fake job sleeps in the kill loop (long enough to be killed mid-job)"""
    lease_seconds: float = 3.0
    """the workers' lease in the kill loop (the smallest WorkerConfig allows; the default is 60 s)"""
    poll_seconds: float = 1.0
    """the workers' look at the queue in the kill loop (when lapsed leases are failed; the default is 10 s)"""
    publishes: int = 2
    """versions published and first served on another server, per engine"""
    lookups: int = 2000
    """active-version lookups per database"""
    users: tuple[int, ...] = (1000, 10000)
    """users in the database for the scheduler pass (the lookups run at the largest)"""
    passes: int = 5
    """scheduler passes timed at each size (median)"""


QUICK = ScaleConfig(real_jobs=1, fake_jobs=2, fake_seconds=0.2, claims=3, kills=2, publishes=1, lookups=100,
                    users=(100, 300), passes=1)


def run(quick: bool = False) -> dict:
    sys.path.insert(0, str(TESTS))
    from postgres import find_bin
    from s3server import find_moto

    if find_bin() is None or find_moto() is None:
        return {"skipped": "PostgreSQL's server binaries or moto_server are not installed (apt-get install "
                           "postgresql; make setup)"}
    from bench import scale_queue, scale_store
    from bench.common import in_fresh_process

    cfg = QUICK if quick else ScaleConfig()
    out: dict = {"config": cfg.__dict__ | {"users": list(cfg.users)}}
    with services() as (pg, s3), tempfile.TemporaryDirectory(prefix="attune-scale-") as tmp:
        tmp = Path(tmp)
        load = out["load_avg"] = {}  # the machine is shared: how busy it was as each part began
        load["throughput"] = os.getloadavg()[0]
        out["throughput"] = scale_queue.throughput(pg, s3, cfg, tmp / "throughput")
        load["claims"] = os.getloadavg()[0]
        out["claims"] = scale_queue.claims(pg, cfg, tmp / "claims")
        load["kills"] = os.getloadavg()[0]
        out["kills"] = scale_queue.kills(pg, cfg, tmp / "kills")
        load["publish"] = os.getloadavg()[0]
        out["publish"] = in_fresh_process(scale_store.publish_to_first_token, pg.new_database(migrated=True),
                                          s3.new_bucket(), s3.endpoint, cfg.publishes)
        load["store"] = os.getloadavg()[0]
        out["store"] = scale_store.lookups_and_passes(pg, cfg, tmp / "store")
        load["end"] = os.getloadavg()[0]
    return out


@contextmanager
def services():
    """``(pg, s3)``: a PostgreSQL server and a moto S3 endpoint on loopback, with the test credentials in this
    process's environment (so workers and spawned measurements inherit them), all stopped by PID at the end."""
    from postgres import PostgresServer, find_bin
    from s3server import S3Server, credentials_in_env, find_moto

    with credentials_in_env(), PostgresServer(find_bin()) as pg, S3Server(find_moto()) as s3:
        yield pg, s3


def render(r: dict) -> str:
    from bench.report import table

    if "skipped" in r:
        return f"Not measured: {r['skipped']}."
    c = r["config"]
    return "\n\n".join([
        "Everything on one 2-core machine: PostgreSQL 15 (Debian's, loopback, a temporary folder, `fsync=off`), "
        "`moto_server` as S3 on loopback, and real `launch.py worker` processes; **2 workers share the same 2 cores** "
        "(and the job processes they spawn), so 2 workers show what the queue adds, not what a second machine "
        "or GPU would add. Timestamps of claims and failures are the job rows' own (1 ms resolution). The machine "
        "was shared: 1-minute load average as each part began: " +
        ", ".join(f"{k} {v:.1f}" for k, v in r["load_avg"].items()) + " (2 cores).",
        _queue_table(r, table),
        _kills_line(r["kills"], c),
        _publish_table(r["publish"], table),
        _store_table(r["store"], table),
    ])


def _queue_table(r: dict, table) -> str:
    t, cl = r["throughput"], r["claims"]
    rows = []
    for kind, label in (("real", "real training job, tiny random model (as tests/test_workers.py), S3 store"),
                        ("fake", f"fake job (tests/fake_job.py), sleeps {r['config']['fake_seconds']:g} s")):
        for n in ("1", "2"):
            x = t[kind][n]
            rows.append([f"{label}: {x['jobs']} jobs, {n} worker{'s' if n == '2' else ''}", x["jobs_per_hour"],
                         x["seconds_per_job"], x["statuses"]])
    claims = (f"Enqueue -> claim by an idle worker (2 workers waiting on LISTEN, next look in 120 s, so NOTIFY wakes "
              f"them), {cl['n']} jobs queued one at a time: **p50 {cl['p50_ms']:.0f} ms, p95 {cl['p95_ms']:.0f} ms**, "
              f"max {cl['max_ms']:.0f} ms.")
    return table(["queue, jobs queued at once", "jobs/hour", "s/job", "ended"], rows) + "\n\n" + claims


def _kills_line(k: dict, c: dict) -> str:
    return (f"**Kill -9 of a worker mid-job**, {k['kills']} times, each worker replaced by a new one (2 workers, "
            f"fake jobs of {c['kill_job_seconds']:g} s for 2 users kept queued, lease {c['lease_seconds']:g} s, poll "
            f"{c['poll_seconds']:g} s): kill -> job failed by lease expiry p50 {k['lapse_s_p50']:.1f} s (max "
            f"{k['lapse_s_max']:.1f}), job failed -> the user's next job claimed p50 {k['next_s_p50']:.2f} s, kill -> "
            f"next job claimed p50 **{k['total_s_p50']:.1f} s** (max {k['total_s_max']:.1f}). Of {k['jobs']} jobs: "
            f"**{k['lost']} lost** (not ended, or ended otherwise than by a verdict or the lease), **{k['doubly_run']} "
            f"run twice**, {k['killed_failed']}/{k['kills']} killed jobs failed with the lease error, "
            f"{k['orphans']} job processes outlived their worker. With the default 60 s lease the lapse is about 60 s.")


def _publish_table(p: dict, table) -> str:
    rows = [[e, x["download_s"], x["load_s"], x["first_token_s"], x["total_s"], x["upload_s"]]
            for e, x in p["engines"].items()]
    return (table(["publish -> first token on another server (median s)", "download", "engine load",
                   "prefill + 1st token", "**total**", "upload (worker, before)"], rows) +
            f"\n\nA random rank-{p['rank']} all-linear LoRA of the embedded model ({p['mb']['safetensors']:.1f} MB "
            f"safetensors + {p['mb']['gguf']:.1f} MB GGUF for llama.cpp, both uploaded and downloaded) published by "
            f"one Store with `--adapter-store s3://...` (upload, completion marker, one transaction) and served "
            f"by a second Store with its own data dir on the same PostgreSQL and an already warm engine: the user's "
            f"next turn resolves the version, downloads it (`assistant.chat.adapters.ready`) and streams. "
            f"{p['repeats']} versions per engine, after one more that was the first adapter the engine served at "
            f"all (not counted; results.json keeps it). Both engines use every core by default; while another process "
            f"keeps a core busy their threads wait on each other at every step, so each is also measured with one "
            f"thread. Target: total <= 2 s.")


def _store_table(s: dict, table) -> str:
    lk = s["lookups"]
    rows = [[f"per-turn active-version lookup ({lk['n']} users with a version, {lk['users']} users)",
             lk["sqlite"]["p50_ms"], lk["sqlite"]["p95_ms"], lk["postgresql"]["p50_ms"], lk["postgresql"]["p95_ms"],
             lk["postgresql"]["p50_ms"] - lk["sqlite"]["p50_ms"]]]
    for n, x in s["passes"].items():
        rows.append([f"scheduler pass (the due-users query), {int(n):,} users, {x['due']} due", x["sqlite_ms"], None,
                     x["postgresql_ms"], None, x["postgresql_ms"] - x["sqlite_ms"]])
    return (table(["shared database (ms)", "SQLite p50", "SQLite p95", "PostgreSQL p50", "PostgreSQL p95",
                   "PG - SQLite (p50)"], rows) +
            f"\n\nA lookup is what every turn does before the engine (`resolve_adapter` + `ready` on a held version). "
            f"Scheduler passes are medians of {s['passes_each']}; each user has one conversation of "
            f"{s['answers']} answers, a third a like, half an older finished job. Target: PostgreSQL's per-turn "
            f"overhead <= 2 ms p50.")
