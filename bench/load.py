"""Load: N concurrent API chats on loopback for a fixed time while a training job runs.

Counts 5xx answers and checks that every acknowledged answer is in SQLite afterwards."""

from __future__ import annotations

import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HISTORY = [{"messages": [{"role": "user", "content": f"Fact {i}: my favourite number is {i * 7}."},
                         {"role": "assistant", "content": f"Noted: your favourite number is {i * 7}."}]}
           for i in range(24)]


def run(quick: bool = False) -> dict:
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from bench.common import models_dir
    from helpers import Server, cli

    clients, seconds = (5, 15) if quick else (20, 60)
    tmp = Path(tempfile.mkdtemp(prefix="attune-load-"))
    data = tmp / "data"
    shutil.copytree(models_dir() / "models", data / "models")
    keys = []
    for i in range(clients):
        cli("users", "add", f"user{i}", data_dir=data, stdin="correct horse\n")
        keys.append(cli("users", "key", f"user{i}", data_dir=data).stdout.strip())
    history = tmp / "history.jsonl"
    history.write_text("\n".join(json.dumps(c) for c in HISTORY))
    cli("import", "user0", str(history), data_dir=data, timeout=300)
    results: list[tuple[int, float, int | None]] = []
    lock = threading.Lock()
    with Server(data, "--max-new-tokens", "16", "--temperature", "0", "--no-personalizer") as srv:
        trainer = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "train", "user0", "--data-dir", str(data)],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        deadline = time.monotonic() + seconds

        def client(i: int) -> None:
            with httpx.Client(base_url=srv.base, timeout=120,
                              headers={"Authorization": f"Bearer {keys[i]}"}) as http:
                n = 0
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    r = http.post("/v1/chat/completions", json={"messages": [
                        {"role": "user", "content": f"Client {i} question {n}: name a colour."}]})
                    mid = r.json().get("attune", {}).get("message_id") if r.status_code == 200 else None
                    with lock:
                        results.append((r.status_code, time.perf_counter() - started, mid))
                    n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        training_overlapped = trainer.poll() is None
        trainer.wait(timeout=900)
    con = sqlite3.connect(data / "attune.db")
    stored = {r[0] for r in con.execute("SELECT id FROM messages WHERE role = 'assistant'")}
    integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    con.close()
    ok = [r for r in results if r[0] == 200]
    lat = sorted(r[1] for r in ok)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"clients": clients, "seconds": seconds, "requests": len(results), "ok": len(ok),
            "http_5xx": sum(1 for r in results if r[0] >= 500), "lost_rows": sum(1 for r in ok if r[2] not in stored),
            "p50_s": statistics.median(lat) if lat else None,
            "p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None,
            "throughput_rps": len(ok) / seconds, "training_ran_throughout": training_overlapped,
            "integrity": integrity}


def render(r: dict) -> str:
    from bench.report import table

    return "\n".join([
        f"{r['clients']} concurrent API clients for {r['seconds']} s on loopback (16-token answers, greedy), while a "
        f"`launch.py train` job ran in its own process (still running at the end: {r['training_ran_throughout']}).",
        "", table(["requests", "200 OK", "5xx", "lost rows", "p50 s", "p95 s", "req/s", "integrity_check"],
                  [[r["requests"], r["ok"], r["http_5xx"], r["lost_rows"], r["p50_s"], r["p95_s"],
                    r["throughput_rps"], r["integrity"]]])])
