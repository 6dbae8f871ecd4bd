"""Reliability (issue 28): the fault tests run as CI runs them, their verdicts and the figures they print.

- ``tests/test_crash.py``: 20 SIGKILLs of a server under 10 API clients, a training job and imports;
- ``tests/test_api_fuzz.py``: generated requests against the whole served app, counted by status;
- ``tests/test_damage.py``: damaged adapter files, FAISS indexes, model caches, a full disk during publish;
- ``tests/test_backup.py``: a backup under load restored; ``tests/test_security.py``: throttled guessing.

Runs ``pytest`` in a subprocess (the tests start and stop their own servers on loopback) and keeps each file's
passed/failed counts and the summary lines the tests print (``kill -9 drill: ...``, ``API fuzz: ...``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("tests/test_crash.py", "tests/test_api_fuzz.py", "tests/test_damage.py", "tests/test_backup.py",
         "tests/test_security.py")
FIGURES = re.compile(r"^(kill -9 drill|API fuzz): .*$", re.MULTILINE)


def run(quick: bool = False) -> dict:
    out: dict = {"files": {}}
    started = time.perf_counter()
    for path in FILES[1:] if quick else FILES:
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", path],
                              cwd=ROOT, capture_output=True, text=True, timeout=3600)
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
        out["files"][path] = {"exit": proc.returncode, **counts, "seconds": round(time.perf_counter() - began, 1),
                              "figures": list(dict.fromkeys(m.group(0) for m in FIGURES.finditer(proc.stdout)))}
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def render(r: dict) -> str:
    from bench.report import table

    rows = [[path, f.get("passed", 0), f.get("failed", 0) + f.get("error", 0) + f.get("errors", 0), f["exit"],
             f["seconds"]] for path, f in r["files"].items()]
    figures = [line for f in r["files"].values() for line in f["figures"]]
    return "\n".join([
        "The fault tests as CI runs them (`bench/reliability.py` runs pytest on each file and keeps what they "
        "print). Targets (issue 28): 20/20 kills with 0 acknowledged rows lost and 0 half-published versions; "
        "fuzzing 0 5xx.", "",
        table(["test file", "passed", "failed", "pytest exit", "seconds"], rows), "",
        *[f"- {line}" for line in figures], "",
        f"Time: {r['seconds'] / 60:.1f} min.",
    ])
