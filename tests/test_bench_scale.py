"""The scale bench's bookkeeping without processes or servers: how the kill loop counts lost and doubly-run jobs
from the rows and the fake job's log, and that the section renders from a result of the shape ``run`` writes."""

from __future__ import annotations

from bench import scale, scale_queue
from personalize.runner import LEASE_ERROR


def _jobs(store, outcomes: list[tuple[str, str | None]]) -> list[int]:
    ids = []
    for i, (status, error) in enumerate(outcomes):
        uid = store.users.create(f"user{i}", "password 123").id
        job = store.jobs.create(uid, "api")
        if status != "queued":
            store.jobs.finish(job, status, error=error)
        ids.append(job)
    return ids


def test_tally_counts_lost_and_doubly_run_jobs(store, tmp_path):
    ok, killed, twice, stuck, other, never_ran = _jobs(store, [
        ("rejected", None), ("failed", LEASE_ERROR), ("rejected", None), ("queued", None), ("failed", "boom"),
        ("rejected", None)])
    ran = tmp_path / "ran.log"
    ran.write_text("".join(f"{j} w0:1:ab 7\n" for j in (ok, killed, twice, twice, stuck, other)))
    cycle = {"job": killed, "status": "failed", "error": LEASE_ERROR, "lapse_s": 3.0, "next_s": 0.1, "total_s": 3.1,
             "orphan": False}
    t = scale_queue._tally(store, ran, [cycle])
    assert (t["jobs"], t["runs"], t["kills"], t["killed_failed"], t["orphans"]) == (6, 6, 1, 1, 0)
    assert t["doubly_run"] == 1
    assert t["lost_ids"] == [stuck, other, never_ran]  # open at the end, ended otherwise, never ran


def test_the_section_renders_every_part():
    point = {"jobs": 2, "workers": 1, "seconds": 4.0, "jobs_per_hour": 1800.0, "seconds_per_job": 2.0,
             "statuses": "2 rejected", "errors": []}
    engine = {"upload_s": 0.5, "download_s": 0.2, "load_s": 0.02, "first_token_s": 0.3, "total_s": 0.52}
    r = {"config": scale.QUICK.__dict__ | {"users": list(scale.QUICK.users)},
         "load_avg": {"throughput": 1.0, "end": 1.2},
         "throughput": {k: {"1": point, "2": point} for k in ("real", "fake")},
         "claims": {"n": 3, "p50_ms": 1.0, "p95_ms": 2.0, "max_ms": 2.0},
         "kills": {"kills": 2, "jobs": 6, "lost": 0, "doubly_run": 0, "killed_failed": 2, "orphans": 0,
                   "lapse_s_p50": 2.9, "lapse_s_max": 3.0, "next_s_p50": 0.2, "total_s_p50": 3.1, "total_s_max": 3.2},
         "publish": {"rank": 16, "mb": {"safetensors": 19.6, "gguf": 19.6}, "repeats": 1,
                     "engines": {"llama.cpp, 1 thread": engine}},
         "store": {"passes_each": 1, "answers": "0-11",
                   "passes": {"100": {"sqlite_ms": 0.4, "postgresql_ms": 1.7, "due": 32}},
                   "lookups": {"n": 100, "users": 100, "sqlite": {"p50_ms": 0.08, "p95_ms": 0.1},
                               "postgresql": {"p50_ms": 0.3, "p95_ms": 0.4}}}}
    text = scale.render(r)
    assert "**0 lost**" in text and "**0 run twice**" in text and "llama.cpp, 1 thread" in text
    assert "p50 1 ms, p95 2 ms" in text and "100 users, 32 due" in text
    assert scale.render({"skipped": "no PostgreSQL"}) == "Not measured: no PostgreSQL."
