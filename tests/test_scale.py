"""Several serving processes on one PostgreSQL (issue 27, items 4 and 5).

In process: two memory services with their own data dirs (their own FAISS files) on one database, as two
``launch.py serve`` processes have; a memory one adds, deletes, replaces or brings back is found or dropped by the
other's next retrieval. Across processes (the ``make test-scale`` story): PostgreSQL and moto_server on loopback, two
``launch.py worker`` and two ``launch.py serve --workers external`` processes with their own data dirs, driven through
the official ``openai`` client; every process is stopped by its PID.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest
from test_memory import make_service
from test_workers import FAKE, Procs, _answers

from helpers import Server, alive, cli, wait_for
from personalize.runner import LEASE_ERROR, QueueRunner
from storage import InputError, Store


# the memory index of one user on two serving processes --------------------------------------------------
@pytest.fixture
def two_servers(pg_url, tmp_path):
    """Two serving processes' memory: one database, a data dir each (each its own FAISS index files)."""
    stores = [Store(tmp_path / name, pg_url) for name in ("a", "b")]
    services = [make_service(s, k=1) for s in stores]
    yield stores, services
    for service, store in zip(services, stores, strict=True):
        service.close()
        store.close()


def _found(service, user_id: int, question: str) -> list[str]:
    return [h.text for h in service.retrieve(user_id, question)]


def test_a_memory_added_or_deleted_on_one_server_is_found_or_never_served_on_the_other(two_servers):
    (a, _), (mem_a, mem_b) = two_servers
    alice = a.users.create("alice", "correct horse")
    dog = mem_a.remember_fact(alice.id, "My dog is called Biscuit.")
    assert _found(mem_b, alice.id, "What is my dog called?") == ["My dog is called Biscuit."]  # built from the DB
    mem_a.remember_fact(alice.id, "My favourite colour is green.")
    assert _found(mem_b, alice.id, "What is my favourite colour?") == ["My favourite colour is green."]
    mem_a.delete(alice.id, dog)  # not the newest: the newest id stays the same
    assert "My dog is called Biscuit." not in _found(mem_b, alice.id, "What is my dog called?")
    assert dog not in mem_b.cache.loaded(alice.id).index.ids  # B's index dropped it, not only its answer

    # a newer statement replaces an older one; deleting the newer one brings the older one back, on both servers
    mem_a.remember_fact(alice.id, "I live in Lyon.")
    porto = mem_a.remember_fact(alice.id, "I live in Porto.")
    assert _found(mem_b, alice.id, "Where do I live?") == ["I live in Porto."]
    mem_a.remember_fact(alice.id, "My sister is called Ines.")  # Porto is no longer the newest memory
    assert _found(mem_b, alice.id, "What is my sister called?") == ["My sister is called Ines."]
    mem_a.delete(alice.id, porto)
    assert _found(mem_a, alice.id, "Where do I live?") == ["I live in Lyon."]
    assert _found(mem_b, alice.id, "Where do I live?") == ["I live in Lyon."]
    held = mem_b.cache.loaded(alice.id).index
    assert held.fingerprint() == a.memories.fingerprint(alice.id).to_list()
    assert held.ids == set(a.memories.ids(alice.id))


# two workers and two serving processes on one PostgreSQL and one S3 endpoint ---------------------------------
TINY_TRAIN = ["rank=4", "alpha=8", "dropout=0.0", "lr=0.003", "epochs=2", "max_steps=4", "batch_size=4",
              "max_seq_len=128", "anchor_count=6", "anchor_max_new_tokens=6", "anchor_margin=100.0",
              'mixed_precision="no"', "ability_checks=4", "ability_max_new_tokens=4"]
LEASE = 4


class Cluster:
    """Two ``launch.py worker`` and two ``launch.py serve --workers external`` processes, each with its own data dir,
    on one database and one adapter store; ``store`` is the test's own view of that database."""

    def __init__(self, tmp: Path, db: str, s3_url: str, endpoint: str, model: Path):
        self.tmp, self.db, self.procs = tmp, db, Procs(tmp)
        self.shared = ("--db", db, "--adapter-store", s3_url, "--s3-endpoint", endpoint)
        self.model = ("--model", str(model), "--quant", "none", "--dtype", "float32")
        self.store = Store(tmp / "test", db)
        self.workers: dict[str, subprocess.Popen] = {}
        self.servers: dict[str, Server] = {}

    def start(self) -> Cluster:
        flags = (*FAKE, *self.shared, *self.model, "--device", "cpu", "--lease-seconds", str(LEASE),
                 "--poll-seconds", "1", *[a for s in TINY_TRAIN for a in ("--set", s)])
        env = {"FAKE_JOB_PLAN": json.dumps({"dora": [120, 0.2]}), "FAKE_JOB_REAL": "carol"}  # her later jobs: fakes
        serve = (*self.shared, *self.model, "--engine", "transformers", "--max-new-tokens", "8", "--temperature", "0",
                 "--no-memory", "--workers", "external", "--train-after", "1", "--train-interval", "0",
                 "--train-poll-seconds", "0.5")
        with ThreadPoolExecutor(2) as pool:  # the servers load their model meanwhile
            started = {n: pool.submit(Server, self.tmp / n, *serve, timeout=240) for n in ("A", "B")}
            for name in ("wa", "wb"):
                self.workers[name] = self.procs.worker(name, self.db, *flags, **env)
            self.servers = {n: f.result() for n, f in started.items()}
        return self

    def client(self, server: str, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.servers[server].base + "/v1", api_key=key, max_retries=0, timeout=120)

    def cli(self, server: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        """``launch.py ARGS`` on server ``server``'s machine: its data dir, the shared database and store."""
        done = cli(*args, *self.shared, data_dir=self.tmp / server, stdin=stdin)
        assert done.returncode == 0, done.stderr
        return done

    def user(self, name: str, answers: int = 0) -> int:
        uid = self.store.users.create(name, "correct horse").id
        if answers:
            _answers(self.store, uid, answers)
        return uid

    def pids(self) -> list[int]:
        return [p.pid for p in self.workers.values()] + [s.proc.pid for s in self.servers.values()]

    def stop(self) -> None:
        try:
            for server in self.servers.values():
                server.stop()
            self.procs.stop()
        finally:
            self.store.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres_server, s3_server, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("cluster")
    c = Cluster(tmp, postgres_server.new_database(migrated=True), s3_server.new_bucket(), s3_server.endpoint,
                tiny_model_dir)
    try:
        yield c.start()
    finally:
        pids = c.pids()
        c.stop()
        assert not [pid for pid in pids if alive(pid)]  # every process stopped by its PID


def _ran(cluster: Cluster) -> list[int]:
    return [int(line.split()[0]) for line in (cluster.tmp / "ran.log").read_text().splitlines()]


def test_api_keys_sessions_and_throttling_hold_on_either_server(cluster):
    cluster.user("alice")
    key = cluster.cli("A", "users", "key", "alice").stdout.strip()
    for name in ("B", "A"):  # a key made on A's machine answers on B, and on A
        r = cluster.client(name, key).chat.completions.create(model="attune", messages=[{"role": "user",
                                                                                         "content": "Hello!"}])
        assert r.model_extra["attune"]["message_id"] and r.system_fingerprint == "attune-base"
    a, b = cluster.servers["A"].base, cluster.servers["B"].base
    with httpx.Client(timeout=30) as http:
        signed = http.post(a + "/auth/signin", data={"username": "alice", "password": "correct horse"})
        assert signed.status_code == 303 and "attune_session" in signed.cookies
        cookies = {"attune_session": signed.cookies["attune_session"]}
        assert http.get(b + "/account/export", cookies=cookies).json()["user"]["name"] == "alice"  # signed in on B
        http.post(b + "/auth/signout", cookies=cookies)
        assert http.get(a + "/account/export", cookies=cookies).status_code == 401  # signed out on A too
        for _ in range(5):
            wrong = http.post(a + "/auth/signin", data={"username": "alice", "password": "wrong horse"})
            assert wrong.status_code == 401 or wrong.status_code == 400, wrong.status_code
        locked = http.post(b + "/auth/signin", data={"username": "alice", "password": "correct horse"})
        assert locked.status_code == 429  # five wrong passwords on A lock the name on B


def test_a_browser_signed_in_on_one_server_chats_on_the_other(cluster, browser):
    """Item 4 in the browser: each page is served and answered by one server (the sticky routing README asks for),
    and the next page load may land on the other. Both servers are on 127.0.0.1, and a host's cookies are sent to
    all its ports, as a load balancer's one address would: the session made on A holds on B."""
    from playwright.sync_api import expect

    from helpers import bot, open_page, send, sign_in

    frank = cluster.user("frank")

    def answers() -> list[dict]:
        return list(cluster.store.db.query(
            "SELECT conversation_id, status FROM messages WHERE user_id = ? AND role = 'assistant' ORDER BY id",
            [frank]))

    a, b = cluster.servers["A"], cluster.servers["B"]
    page = open_page(browser, a)
    sign_in(page, "frank", "correct horse")
    send(page, "Hello from the first server")
    wait_for(lambda: len(answers()) == 1, timeout=60, what="A to store frank's answer")
    expect(page.locator("#send-btn")).to_be_visible(timeout=30_000)

    page.goto(b.base + "/")  # the next page load lands on B: signed in, the conversation resumed from the database
    expect(page.locator("#who")).to_contain_text("frank", timeout=30_000)
    expect(page.locator("#chatbot")).to_contain_text("Hello from the first server", timeout=15_000)
    send(page, "And now from the second one")
    wait_for(lambda: len(answers()) == 2, timeout=60, what="B to store frank's second answer")
    expect(bot(page)).to_have_count(2, timeout=30_000)
    first, second = answers()
    assert first["conversation_id"] == second["conversation_id"] and second["status"] == "complete"

    page.get_by_role("button", name="Sign out").click()  # signed out on B: A's next page asks to sign in
    page.get_by_label("User name").wait_for(timeout=15_000)
    page.goto(a.base + "/")
    expect(page.get_by_label("User name")).to_be_visible(timeout=15_000)
    expect(page.locator("#who")).to_have_count(0)
    page.context.close()


def test_a_version_a_worker_publishes_answers_the_next_turn_on_either_server(cluster):
    from test_personalize import write_history

    from storage.transfer import import_history

    carol = cluster.user("carol")
    import_history(cluster.store, carol, write_history(cluster.tmp / "carol.jsonl"))  # due: a server queues her job
    job = wait_for(lambda: cluster.store.jobs.list(carol), timeout=30, what="a server to queue carol's job")[0]
    wait_for(lambda: cluster.store.jobs.load(job["id"])["status"] not in ("queued", "running"), timeout=300,
             interval=0.5, what="a worker to train carol")
    row = cluster.store.jobs.load(job["id"])
    assert row["status"] == "published", row["error"]
    version = row["result"]["version"]
    published = cluster.store.adapters.get(carol, version)
    assert published["location"].startswith("s3://") and published["active"]
    key = cluster.cli("A", "users", "key", "carol").stdout.strip()
    for name in ("B", "A"):  # neither server holds the version: each downloads it on this turn
        asked = time.monotonic()
        stream = cluster.client(name, key).chat.completions.create(
            model="attune", stream=True, messages=[{"role": "user", "content": "Where do I live?"}])
        chunks = iter(stream)
        first = next(chunks)
        waited = time.monotonic() - asked
        last = [first, *chunks][-1]
        attune = last.model_extra["attune"]
        assert attune["adapter_version"] == version and attune["notice"] is None
        assert last.system_fingerprint == f"attune-adapter-v{version}"
        since = (datetime.now(UTC) - datetime.fromisoformat(published["created_at"])).total_seconds()
        asked = time.monotonic()
        next(iter(cluster.client(name, key).chat.completions.create(
            model="attune", stream=True, messages=[{"role": "user", "content": "Where do I live?"}])))
        print(f"\nserver {name}: v{version} published by {row['worker_id']} -> first token {waited:.2f} s after "
              f"the request (download and load included; {time.monotonic() - asked:.2f} s once held), "
              f"{since:.1f} s after publish (the test's polling included)")
    cluster.cli("A", "adapters", "carol", "--rollback", "base")  # switched on A's machine: B sees it next turn
    r = cluster.client("B", key).chat.completions.create(model="attune", messages=[{"role": "user", "content": "Hi"}])
    assert r.model_extra["attune"]["adapter_version"] is None
    cluster.cli("B", "adapters", "carol", "--rollback", str(version))
    r = cluster.client("A", key).chat.completions.create(model="attune", messages=[{"role": "user", "content": "Hi"}])
    assert r.model_extra["attune"]["adapter_version"] == version


def test_jobs_run_once_and_a_killed_workers_job_lapses_while_the_other_carries_on(cluster):
    dora = cluster.user("dora", answers=1)  # her first job runs for two minutes
    first = wait_for(lambda: [j for j in cluster.store.jobs.list(dora) if j["pid"]], timeout=30,
                     what="a worker to run dora's job")[0]["id"]
    with pytest.raises(InputError, match="already"):
        QueueRunner(cluster.store).start(dora, "api")  # one open job per user
    holder = cluster.store.jobs.load(first)["worker_id"].split(":")[0]
    other = "wb" if holder == "wa" else "wa"
    many = [cluster.user(f"user{i}", answers=1) for i in range(8)]  # the scheduler queues a job for each
    cluster.workers[holder].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    cluster.workers[holder].wait(10)
    wait_for(lambda: cluster.store.jobs.load(first)["status"] == "failed", timeout=30, what="dora's job to lapse")
    lapsed = time.monotonic() - killed
    assert cluster.store.jobs.load(first)["error"] == LEASE_ERROR
    _answers(cluster.store, dora, 1)  # new signal: her next job is queued and runs on the other worker
    wait_for(lambda: len(cluster.store.jobs.list(dora)) == 2, timeout=30, what="dora's next job")
    jobs = lambda: [j for uid in [dora, *many] for j in cluster.store.jobs.list(uid)]  # noqa: E731
    wait_for(lambda: len(jobs()) >= 10 and all(j["status"] not in ("queued", "running") for j in jobs()),
             timeout=60, interval=0.3, what="every job to end")
    assert cluster.store.jobs.list(dora)[0]["worker_id"].startswith(other + ":")
    assert {j["status"] for j in jobs() if j["id"] != first} == {"rejected"}
    everything = [r[0] for r in cluster.store.db.execute("SELECT id FROM jobs WHERE status <> 'queued'")]
    ran = _ran(cluster)
    assert sorted(ran) == sorted(everything) and len(ran) == len(set(ran))  # every job ran exactly once
    print(f"\n{len(ran)} jobs, each run once; worker {holder} SIGKILLed -> dora's job failed {lapsed:.1f} s later "
          f"(lease {LEASE} s)")


def test_the_scheduler_moves_when_the_server_running_it_dies(cluster):
    leads = lambda name: "now runs the scheduler" in cluster.servers[name].log_path.read_text()  # noqa: E731
    leader = wait_for(lambda: [n for n in ("A", "B") if leads(n)], timeout=10, what="a server to schedule")
    assert len(leader) == 1, "both servers ran the scheduler"
    leader, other = leader[0], "B" if leader[0] == "A" else "A"
    cluster.servers[leader].proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    cluster.servers[leader].proc.wait(10)
    wait_for(lambda: leads(other), timeout=15, what="the other server to take the scheduler")
    moved = time.monotonic() - killed
    erin = cluster.user("erin", answers=1)
    wait_for(lambda: cluster.store.jobs.list(erin), timeout=15, what="the new holder to queue erin's job")
    print(f"\nserver {leader} SIGKILLed -> server {other} runs the scheduler {moved:.2f} s later")
