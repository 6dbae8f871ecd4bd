"""Kill -9 anywhere under load (issue 28, item 3), as an operator's machine would crash: ``launch.py serve`` on
loopback with 10 API clients (streamed and whole answers, likes and corrections that write memories), the
background personalizer training in its own process, and a ``launch.py import`` now and then; the server is
SIGKILLed 20 times at random moments (its first start on a fresh data dir, streaming, memory writes, an import,
a publish), the training and import processes with it when they run. After every kill, read straight from the
SQLite file: the database is intact, every answer and every feedback the API acknowledged is there, an import
is there whole or not at all. At the end: no version is half-published, no job is left open, every user's
FAISS index holds exactly their current memories, and the server answers again. Everything started here is
stopped by its pid; the counts are printed (BENCHMARKS.md, Reliability)."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import ROOT, Server, cli, free_port

pytestmark = pytest.mark.slow
ROUNDS = 20
MOMENTS = ("streaming", "memory writes", "import", "publish")
CLIENTS = 10
TRAIN = ["rank=4", "alpha=8", "lr=0.003", "epochs=1", "max_steps=6", "max_seq_len=96", "anchor_count=4",
         "anchor_max_new_tokens=4", "anchor_margin=100.0", "mixed_precision=\"no\""]
IMPORTED = 40  # conversations per import file


def _alive(pid: int | None, marker: str) -> bool:
    """The process is running and is ours (its command line names ``marker``): pids are never reused blindly."""
    try:
        return bool(pid) and marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _kill(pid: int | None, marker: str) -> bool:
    if _alive(pid, marker):
        os.kill(pid, signal.SIGKILL)
        return True
    return False


class Load:
    """CLIENTS threads asking, streaming and correcting until stopped; what the API acknowledged."""

    def __init__(self, base: str, key: str, seed: int):
        self.base, self.headers, self.rng = base, {"Authorization": f"Bearer {key}"}, random.Random(seed)
        self.answers: dict[int, str] = {}  # acknowledged answer id -> its text
        self.feedback: list[tuple[int, str, str | None]] = []  # acknowledged (answer id, kind, correction)
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(n, self.rng.random()), daemon=True)
                        for n in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def _client(self, n: int, seed: float) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=30) as http:
            while not self.stop.is_set():
                try:
                    self._one(http, n, rng)
                except (httpx.HTTPError, json.JSONDecodeError, KeyError):
                    time.sleep(0.05)  # the server died under us (expected) or is starting

    def _one(self, http: httpx.Client, n: int, rng: random.Random) -> None:
        text = f"I live in town {rng.randrange(1000)} and my bike is called Spoke{n}, how do I fix a flat?"
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 6, "temperature": 1}
        if rng.random() < 0.5:
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    return
                parts, info = [], None
                for line in r.iter_lines():
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    parts += [c["delta"].get("content") or "" for c in event.get("choices", [])]
                    info = event.get("attune") or info
                if info is None:  # never finished: not acknowledged
                    return
                answer_id, content = info["message_id"], "".join(parts)
        else:
            r = http.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return
            answer_id, content = r.json()["attune"]["message_id"], r.json()["choices"][0]["message"]["content"]
        with self.lock:
            self.answers[answer_id] = content
        if rng.random() < 0.4:  # memory writes: a like or a correction of this answer
            kind, correction = ("like", None) if rng.random() < 0.5 else ("correction", f"Patch it, take {n}.")
            fb = {"message_id": answer_id, **({"feedback": "like"} if kind == "like" else {"correction": correction})}
            if http.post("/v1/feedback", json=fb).status_code == 200:
                with self.lock:
                    self.feedback.append((answer_id, kind, correction))

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def _start(data: Path, flags: tuple[str, ...], log: Path) -> subprocess.Popen:
    """``launch.py serve`` without waiting for it (a kill may come before it is up)."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "serve", "--data-dir", str(data), "--port",
                                 str(free_port()), *flags], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def _import_file(path: Path, label: str) -> Path:
    path.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"{label} c{i}: I grow tomatoes on my balcony number {i}."},
        {"role": "assistant", "content": "Nice, keep them watered."}]}) for i in range(IMPORTED)))
    return path


def _check(data: Path, load_answers: dict, load_feedback: list, imports: list[str]) -> dict:
    """What must hold after any kill, read from the SQLite file alone."""
    con = sqlite3.connect(data / "attune.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = dict(con.execute("SELECT id, content FROM messages WHERE role = 'assistant'"))
        lost = [i for i, text in load_answers.items() if stored.get(i) != text]
        changed = [(i, load_answers[i], stored.get(i)) for i in lost[:5]]
        assert not lost, f"acknowledged answers lost or changed (id, acknowledged, stored): {changed}"
        rows = {(m, k, c) for m, k, c in con.execute("SELECT message_id, kind, correction FROM feedback")}
        missing = [f for f in load_feedback if f not in rows]
        assert not missing, f"acknowledged feedback lost: {missing[:5]}"
        for label in imports:  # all or nothing
            n = con.execute("SELECT COUNT(*) FROM conversations WHERE title LIKE ?", [f"{label} c%"]).fetchone()[0]
            assert n in (0, IMPORTED), f"import {label} half there: {n}"
        return {"answers": len(stored)}
    finally:
        con.close()


def test_twenty_sigkills_under_load_lose_nothing_acknowledged(tmp_path, tiny_model_dir):
    rng = random.Random(28)
    data, log = tmp_path / "data", tmp_path / "servers.log"
    flags = ("--model", str(tiny_model_dir), "--quant", "none", "--dtype", "float32", "--max-new-tokens", "6",
             "--train-after", "8", "--train-interval", "0", *[a for s in TRAIN for a in ("--train-set", s)])
    proc = _start(data, flags, log)  # the first start on a fresh data dir, killed while it creates it
    deadline = time.time() + 60
    while time.time() < deadline and not (data / "attune.db").exists():
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert cli("users", "add", "alice", data_dir=data, stdin="correct horse\n").returncode == 0
    key = cli("users", "key", "alice", data_dir=data).stdout.strip()
    answers, feedback, imports, kills, ended = {}, [], [], {"first start": 1}, {}
    job_pids: set[int] = set()
    try:
        for round_no in range(1, ROUNDS):
            moment = MOMENTS[round_no % len(MOMENTS)]
            with Server(data, *flags) as srv:
                load = Load(srv.base, key, seed=round_no)
                importer = None
                if moment == "import":
                    label = f"import-r{round_no}"
                    imports.append(label)
                    importer = subprocess.Popen(
                        [sys.executable, str(ROOT / "launch.py"), "import", "alice",
                         str(_import_file(tmp_path / f"{label}.jsonl", label)), "--data-dir", str(data)],
                        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(rng.uniform(0.5, 3.0))
                if moment == "publish":  # a training process: killed mid-way, or the server right as it ends
                    _wait(lambda: _job(data) == "running", 60)
                    if (round_no // len(MOMENTS)) % 2 == 0:  # rounds 3, 11, 19
                        time.sleep(rng.uniform(1.0, 20.0))
                    else:
                        _wait(lambda: _job(data) != "running", 240)
                        ended[_job(data)] = ended.get(_job(data), 0) + 1
                os.kill(srv.proc.pid, signal.SIGKILL)
                for pid in _job_pids(data):
                    job_pids.add(pid)
                    if moment == "publish":
                        _kill(pid, "personalize.job")
                if importer is not None and importer.poll() is None:
                    importer.kill()
                if importer is not None:
                    importer.wait(30)
                load.join()
                srv.proc.wait(30)
            answers.update(load.answers)
            feedback += load.feedback
            kills[moment] = kills.get(moment, 0) + 1
            _check(data, answers, feedback, imports)
        for pid in job_pids | set(_job_pids(data)):  # orphaned training processes end (by pid) before the
            _kill(pid, "personalize.job")            # last start, which fails what they left open
        with Server(data, *flags) as srv:  # restarts cleanly and answers
            r = httpx.post(srv.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4},
                           timeout=60)
            assert r.status_code == 200, r.text
    finally:
        for pid in job_pids | set(_job_pids(data)):
            _kill(pid, "personalize.job")
    final = _check(data, answers, feedback, imports)
    published = _final_state(data)
    print(f"\nkill -9 drill: {sum(kills.values())} kills {kills}; acknowledged {len(answers)} answers and "
          f"{len(feedback)} feedback, 0 lost; imports {len(imports)} whole or absent; jobs that ended just before a "
          f"kill {ended}; {published} published versions, all complete; {final['answers']} answers stored")
    assert sum(kills.values()) == ROUNDS and len(answers) > 50 and feedback
    assert published >= 1 and ended.get("published", 0) >= 1  # a kill came right after a publish


def _job_pids(data: Path) -> list[int]:
    con = sqlite3.connect(data / "attune.db")
    try:
        return [r[0] for r in con.execute("SELECT pid FROM jobs WHERE pid IS NOT NULL")]
    finally:
        con.close()


def _job(data: Path) -> str | None:
    """The status of the newest job."""
    con = sqlite3.connect(data / "attune.db")
    try:
        row = con.execute("SELECT status FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None
    finally:
        con.close()


def _wait(predicate, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not predicate():
        time.sleep(0.05)


def _final_state(data: Path) -> int:
    """No version half-published, no job open, every FAISS index exactly the user's current memories."""
    from assistant.file_checks import adapter_problem
    from assistant.memory.service import MemoryConfig, MemoryService
    from storage import Store

    store = Store(data)
    try:
        published = 0
        for user in store.users.list():
            for version in store.adapters.list(user.id):
                if version["status"] == "published":
                    assert adapter_problem(Path(version["path"])) is None, version
                    published += 1
            active = store.adapters.active(user.id)
            assert active is None or active["status"] == "published"
        assert not [j for j in store.db.query("SELECT * FROM jobs WHERE status IN ('queued', 'running')")]
        memory = MemoryService(store, MemoryConfig())
        for user in store.users.list():
            current = {r["id"] for r in store.db.query(
                "SELECT id FROM memories WHERE user_id = ? AND replaced_by IS NULL", [user.id])}
            assert memory.cache.slot(user.id).index.ids == current
        memory.close()
        return published
    finally:
        store.close()
