"""A stand-in for ``personalize.job`` that ``launch.py worker --job-module fake_job`` runs in the worker tests.

Same arguments as the real job, the same hand-over of the job its worker claimed (``Jobs.hand_over``), progress
reports and a verdict in the row, but no model: it sleeps instead of training (no torch import, so a job costs a
fraction of a second), and appends ``JOB_ID WORKER_ID PID`` to ``$FAKE_JOB_LOG`` first, so a test counts how often
each job ran. ``$FAKE_JOB_PLAN`` (JSON) says how long each user's jobs take: ``{"alice": [30, 0.1]}`` is 30 s for
alice's first job and 0.1 s for her later ones; users not named take ``$FAKE_JOB_SECONDS`` (default 0.2). The first job
of each user named in ``$FAKE_JOB_REAL`` (comma-separated) is the real ``personalize.job``, with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from storage import Store


def seconds_for(store: Store, job: dict) -> float:
    plan = json.loads(os.environ.get("FAKE_JOB_PLAN") or "{}")
    user = store.users.by_id(job["user_id"])
    times = plan.get(user.name) or [float(os.environ.get("FAKE_JOB_SECONDS", "0.2"))]
    nth = sorted(j["id"] for j in store.jobs.list(user.id, limit=1000)).index(job["id"])
    return float(times[min(nth, len(times) - 1)])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--db", default="")
    p.add_argument("--job-id", required=True, type=int)
    p.add_argument("--worker-id", required=True)
    args, _ = p.parse_known_args()
    store = Store(args.data_dir, args.db)
    user = store.users.by_id(store.jobs.load(args.job_id)["user_id"])
    first = min(j["id"] for j in store.jobs.list(user.id, limit=1000)) == args.job_id
    if first and user.name in os.environ.get("FAKE_JOB_REAL", "").split(","):
        store.close()
        from personalize.job import main as real_job

        with open(os.environ["FAKE_JOB_LOG"], "a", encoding="utf-8") as f:
            f.write(f"{args.job_id} {args.worker_id} {os.getpid()}\n")
        return real_job()
    job = store.jobs.hand_over(args.job_id, args.worker_id, os.getpid())
    with open(os.environ["FAKE_JOB_LOG"], "a", encoding="utf-8") as f:
        f.write(f"{args.job_id} {args.worker_id} {os.getpid()}\n")
    deadline, step = time.monotonic() + seconds_for(store, job), 0
    while time.monotonic() < deadline:
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        step += 1
        store.jobs.progress(args.job_id, step, 0, None, phase="sleeping")
    store.jobs.finish(args.job_id, "rejected", {"published": False, "version": None, "code": "fake",
                                                "reason": "a fake job", "job_id": args.job_id})
    return 0


if __name__ == "__main__":
    sys.exit(main())
