"""The whole Store API on SQLite and on PostgreSQL (``--db``): every repository through one scripted story, run on
each database and compared, plus what a person running Attune on PostgreSQL notices: two processes on one
database see each other's writes, a bad URL or an unreachable server is one clear error, one open job per user.

PostgreSQL tests are skipped, saying why, where its server binaries are not installed (``conftest.postgres_server``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage import AuthError, InputError, NotFound, StorageError, Store
from storage.errors import TooManyAttempts
from storage.throttle import Throttle, ThrottleConfig
from storage.transfer import delete_user, export_user, import_history

ROOT = Path(__file__).resolve().parent.parent
LONG = "I keep a diary. " * 1250  # 20,000 characters: more than PostgreSQL can put in one index entry


def _users(store: Store, out: dict) -> tuple:
    alice, bob = store.users.create("alice", "correct horse"), store.users.create("bob", "battery staple")
    with pytest.raises(InputError, match="taken"):
        store.users.create("ALICE", "whatever123")
    key = store.users.new_api_key(alice.id, "laptop")
    out["by_key"] = store.users.by_api_key(key).name
    out["by_name_any_case"] = store.users.by_name("Alice").id == alice.id
    out["keys"] = [k["name"] for k in store.users.api_keys(alice.id)]
    store.users.revoke_api_key(alice.id, key)
    out["key_live_after_revoke"] = store.users.api_key_live(key.split("-")[1])
    with pytest.raises(AuthError):
        store.users.by_api_key(key)
    with pytest.raises(NotFound):
        store.users.revoke_api_key(alice.id, key)
    store.users.set_personalization(bob.id, False)
    store.users.change_password(bob.id, "battery staple", "new password")
    out["bob"] = (store.users.authenticate("bob", "new password").personalization, store.users.count())
    return alice, bob


def _chats(store: Store, uid: int, out: dict) -> dict:
    cid = store.chats.create_conversation(uid)
    q = store.chats.add_message(uid, cid, "user", "My dog is called Biscuit and I'm 100% sure_of it.")
    a1 = store.chats.add_message(uid, cid, "assistant", "Nice!", memory_ids=[7], gen_settings={"t": 0.5},
                                 ttft_ms=12.5, prompt_tokens=30, model="tiny")
    a2 = store.chats.add_message(uid, cid, "assistant", "What a name.", replaces=a1)
    store.chats.add_feedback(uid, a2, "like")
    store.chats.add_feedback(uid, a2, "correction", "Biscuit is a lovely name.")
    q2 = store.chats.add_message(uid, cid, "user", "Which breed suits flats?")
    a3 = store.chats.add_message(uid, cid, "assistant", "A husky.")
    store.chats.add_feedback(uid, a3, "dislike")
    new_q, replaced = store.chats.branch(uid, cid, q2, "Which small breed suits flats?")
    store.chats.rename_conversation(uid, cid, "Dogs")
    out["chat"] = {
        "shown": [(m["role"], m["content"]) for m in store.chats.messages(uid, cid)],
        "all": len(store.chats.messages(uid, cid, include_replaced=True)), "replaced": len(replaced),
        "a1": {k: store.chats.message(uid, a1)[k] for k in ("memory_ids", "gen_settings", "ttft_ms", "prompt_tokens",
                                                            "replaced_by", "model")},
        "list": [(c["title"], c["n_messages"]) for c in store.chats.conversations(uid)],
        "ratings": sorted(store.chats.ratings(uid, cid).values()), "corrections": list(
            store.chats.corrections(uid, cid).values()), "state": store.chats.feedback_state(uid, a2),
    }
    return {"cid": cid, "q": q, "a2": a2, "a3": a3, "new_q": new_q}


def _memories(store: Store, uid: int, ids: dict, out: dict) -> None:
    mem = store.memories
    old = mem.add(uid, "statement", "My dog is called Rex.", message_id=ids["q"], topic="dog")
    new = mem.add(uid, "statement", "My dog is called Biscuit and I'm 100% sure_of it.", message_id=ids["q"],
                  topic="dog", context="ctx")
    mem.replace(uid, [old], new)
    long = mem.add(uid, "statement", LONG, message_id=ids["q"])
    fact = mem.add(uid, "fact", "I live in Porto.", cue=None, asked="Where do you live?")
    corr = mem.add(uid, "correction", "Biscuit is a lovely name.", message_id=ids["a2"], cue="What a name.")
    with pytest.raises(Exception, match="never change"):  # the trigger, on both databases
        with store.write() as db:
            db.execute("UPDATE memories SET text = 'changed' WHERE id = ?", [fact])
    out["mem_queries"] = {q: [m.id for m in mem.list(uid, q)] for q in ("biscuit", "100%", "sure_of", "_", "REX")}
    out["mem_current"] = (mem.ids(uid), mem.max_id(uid), mem.fingerprint(uid).to_list(), mem.count(uid),
                          mem.count(uid, "dog"), [m.id for m in mem.on_topic(uid, "dog")], mem.replaced_by(uid, [new]))
    out["mem_texts"] = [(i, t[:2]) for batch in mem.iter_texts(uid, batch=2) for i, t in batch]
    out["mem_get_many"] = sorted(mem.get_many(uid, [old, new, long, 99999], current=True))
    mem.delete(uid, long)
    mem.delete(uid, new)  # the replaced one is current again
    out["mem_after_delete"] = (mem.ids(uid), sorted(t for _, t in mem.excluded_texts(uid, [ids["q"]])) == sorted(
        [LONG, "My dog is called Biscuit and I'm 100% sure_of it."]))
    out["mem_derived"] = [m.id for m in mem.derived_for(uid, [ids["q"], ids["a2"]])]
    out["mem_conversations"] = mem.conversations_of(uid, [old, corr, fact])
    turn = mem.source_turn(uid, ids["a2"])
    out["mem_turn"] = (turn.question, turn.rating, turn.correction, turn.sibling_ids, turn.replaced)
    out["mem_answers"] = (mem.answers_to(uid, ids["q"]), mem.answer_ids(uid))
    out["mem_revive"] = mem.delete_many(uid, [corr])
    out["mem_policy"] = mem.delete_derived_below(uid, 2)
    out["mem_all"] = (mem.delete_all(uid), mem.count(uid), mem.excluded(uid, ids["a3"]))


def _jobs(store: Store, uid: int, out: dict) -> None:
    jobs = store.jobs
    j = jobs.create(uid, "ui")
    with pytest.raises(InputError, match="already queued"):
        jobs.create(uid)
    jobs.set_pid(j, 4321)
    jobs.claim(j, 4322)
    with pytest.raises(InputError, match="not queued"):
        jobs.claim(j, 1)
    jobs.progress(j, 1, 4, 2.5, phase="training", detail={"a": 1, "b": None})
    jobs.progress(j, 2, 4, None)
    jobs.phase(j, "evaluating")
    job = jobs.load(j)
    out["job_running"] = ({k: v for k, v in job["progress"].items() if k != "updated_at"}, job["losses"], job["pid"],
                          jobs.open_job(uid)["id"] == j, [o["id"] for o in jobs.open_jobs()])
    jobs.finish(j, "published", {"version": 1})
    out["job_done"] = (jobs.get(uid, j)["status"], jobs.get(uid, j)["result"], jobs.open_job(uid), jobs.last(uid)["id"],
                       len(jobs.list(uid)), jobs.events_since(uid, None), jobs.events_since(uid, "9999"))
    k = jobs.create(uid, "scheduler")
    out["job_fail_open"] = (jobs.fail_open(k, "stale"), jobs.fail_open(k, "again"), jobs.load(k)["error"])


def _adapters(store: Store, uid: int, out: dict) -> None:
    ad = store.adapters

    def staged(n: int) -> Path:
        folder = store.data_dir.staging(uid, n)
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        return folder

    gate = {"base_model": "tiny", "gate_reason": "ok", "parent_version": None, "job_id": None}
    v1 = ad.publish(uid, staged(1), metrics={"loss": 1.0}, **gate)
    v2 = ad.reject(uid, metrics={"loss": 2.0}, **{**gate, "gate_reason": "worse"})
    v3 = ad.publish(uid, staged(3), metrics={"loss": 0.5}, keep=5, **gate)
    ad.set_active(uid, v1)
    out["ad_damaged"] = ad.mark_damaged(uid, v1, "truncated", fallback=v3)
    with pytest.raises(InputError, match="damaged"):
        ad.set_active(uid, v1)
    out["ad_choose"] = (ad.choose(uid, "base"), ad.choose(uid, f"v{v3}")["active_version"])
    out["ad_list"] = [(r["version"], r["status"], r["active"], r["metrics"], bool(r["path"])) for r in ad.list(uid)]
    ov = ad.overview(uid)
    out["ad_overview"] = (ov["active_version"], len(ov["versions"]), ov["replay_examples"], ad.next_version(uid), v2)
    v4 = ad.publish(uid, staged(4), metrics={}, **gate)
    out["ad_prune"] = (ad.prune(uid, 1), ad.active_version(uid) == v4, sorted(ad.sweep(uid)))


def _replay_sessions_throttle(store: Store, uid: int, ids: dict, out: dict) -> None:
    msgs = [m["id"] for m in store.chats.messages(uid, ids["cid"], include_replaced=True)]
    examples = [{"message_id": m, "text": f"example {m}"} for m in msgs]
    out["replay"] = (store.replay.offer(uid, examples, 3), store.replay.offer(uid, examples[:2], 3),
                     [e["message_id"] for e in store.replay.sample(uid)], store.replay.count(uid))
    store.replay.clear(uid)
    from datetime import timedelta

    sessions = store.sessions
    t1, t2, t3 = (sessions.create(uid, timedelta(days=1)) for _ in range(3))
    gone = sessions.create(uid, timedelta(seconds=-1))
    sessions.revoke(t1)
    out["sessions"] = (sessions.user(t1), sessions.user(t2).id == uid, sessions.user(gone),
                       sessions.revoke_all(uid, keep=t3), sessions.user(t3).id == uid, sessions.purge())
    clock = [1000.0]
    throttle = Throttle(store, ThrottleConfig(name_failures=2, key_failures=2), clock=lambda: clock[0])
    throttle.failed_password("Alice", "10.0.0.1")
    throttle.failed_password("alice", "10.0.0.2")
    with pytest.raises(TooManyAttempts) as locked:
        throttle.check_password("alice", "10.0.0.3")
    clock[0] += 16 * 60
    throttle.check_password("alice", "10.0.0.3")
    throttle.failed_key("10.0.0.9")
    throttle.failed_key("10.0.0.9")
    with pytest.raises(TooManyAttempts):
        throttle.check_key("10.0.0.9")
    throttle.signed_in("alice")
    out["throttle"] = locked.value.retry_after


def story(store: Store, tmp: Path) -> dict:
    """Every repository's calls, as Attune makes them; returns what they answered (no times, no paths)."""
    out: dict = {}
    alice, bob = _users(store, out)
    ids = _chats(store, alice.id, out)
    _memories(store, alice.id, ids, out)
    _jobs(store, alice.id, out)
    _adapters(store, alice.id, out)
    _replay_sessions_throttle(store, alice.id, ids, out)
    history = tmp / "history.jsonl"
    history.write_text(json.dumps({"messages": [{"role": "user", "content": "I drink tea."},
                                                {"role": "assistant", "content": "Noted.", "feedback": "like"}]}))
    out["import"] = import_history(store, bob.id, history)
    exported = export_user(store, bob.id)
    out["export"] = ([m["content"] for c in exported["conversations"] for m in c["messages"]],
                     [f["kind"] for f in exported["feedback"]], exported["user"]["name"])
    delete_user(store, bob.id)
    out["after_forget"] = (store.users.count(), store.db.execute("SELECT COUNT(*) FROM messages WHERE user_id = ?",
                                                                 [bob.id]).fetchone()[0])
    return out


def test_every_repository_answers_as_a_user_expects(any_store, tmp_path):
    out = story(any_store, tmp_path)
    assert out["by_key"] == "alice" and out["by_name_any_case"] and out["keys"] == ["laptop"]
    assert out["key_live_after_revoke"] is False and out["bob"] == (False, 2)
    assert out["chat"]["shown"] == [("user", "My dog is called Biscuit and I'm 100% sure_of it."),
                                    ("assistant", "What a name."), ("user", "Which small breed suits flats?")]
    assert out["chat"]["a1"] == {"memory_ids": [7], "gen_settings": {"t": 0.5}, "ttft_ms": 12.5, "prompt_tokens": 30,
                                 "replaced_by": out["chat"]["a1"]["replaced_by"], "model": "tiny"}
    assert out["chat"]["list"] == [("Dogs", 6)] and out["chat"]["ratings"] == ["dislike", "like"]
    # ids 1-5: Rex (replaced), Biscuit, the 20k-character one, the fact, the correction; % and _ are literal
    assert out["mem_queries"] == {"biscuit": [5, 2], "100%": [2], "sure_of": [2], "_": [2], "REX": [1]}
    assert out["mem_current"][:2] == ([2, 3, 4, 5], 5) and out["mem_after_delete"] == ([1, 4, 5], True)
    assert out["job_running"][0] == {"step": 2, "total": 4, "phase": "evaluating", "detail": {"a": 1}}
    assert out["job_running"][1] == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": None}]
    assert out["job_done"][:3] == ("published", {"version": 1}, None) and out["job_fail_open"] == (True, False, "stale")
    assert out["ad_damaged"] == 3 and out["ad_choose"] == ({"active_version": None}, 3)
    assert [v[:3] for v in out["ad_list"]] == [(3, "published", True), (2, "rejected", False),
                                               (1, "damaged", False)]
    assert out["ad_prune"][0] == [3] and out["ad_prune"][1] and out["ad_prune"][2] == ["v1"]
    assert out["sessions"][0] is None and out["sessions"][1] and out["sessions"][2] is None
    assert out["replay"][0] == 3 and out["replay"][3] == 3 and out["throttle"] > 0
    assert out["import"] == {"conversations": 1, "messages": 2, "feedback": 1}
    assert out["export"] == (["I drink tea.", "Noted."], ["like"], "bob") and out["after_forget"] == (1, 0)


def test_postgresql_answers_exactly_as_sqlite(tmp_path, pg_url):
    """The same story on both databases gives the same answers, ids included."""
    answers = {}
    for kind, db in (("sqlite", None), ("postgresql", pg_url)):
        store = Store(tmp_path / kind / "data", db)
        (tmp_path / kind / "files").mkdir()
        answers[kind] = story(store, tmp_path / kind / "files")
        store.close()
    assert answers["sqlite"] == answers["postgresql"]


def test_the_sqlite_default_is_untouched(tmp_path):
    """No --db: attune.db in the data dir, as before; sqlite:/// names another file; psycopg is never imported."""
    code = ("import sys, json; from storage import Store; s = Store(sys.argv[1]); s.users.create('alice', 'pw123456');"
            "t = Store(sys.argv[2], 'sqlite:///' + sys.argv[3]);"
            "names = [r[0] for r in s.db.execute('SELECT name FROM _sqlite_migrations')];"
            "print(json.dumps([str(s.path), s.kind, names,"
            "str(t.path), t.users.count(), 'psycopg' in sys.modules, 'storage.postgres.store' in sys.modules]))")
    other = tmp_path / "elsewhere.db"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d1"), str(tmp_path / "d2"), str(other)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    path, kind, migrations, other_path, other_users, psycopg, pg_module = json.loads(done.stdout)
    assert (path, kind) == (str(tmp_path / "d1" / "attune.db"), "sqlite")
    assert migrations[0] == "m001_initial" and migrations[-1] == "m014_memory_epochs" and len(migrations) == 13
    assert (other_path, other_users) == (str(other), 0) and other.is_file()
    assert not (tmp_path / "d2" / "attune.db").exists()
    assert psycopg is False and pg_module is False


def test_two_processes_on_one_postgresql_see_each_others_writes(tmp_path, pg_url):
    here = Store(tmp_path / "a", pg_url)
    there = Store(tmp_path / "b", pg_url)  # another server's data dir, the same database
    alice = here.users.create("alice", "correct horse")
    assert there.users.by_name("alice").id == alice.id
    key = there.users.new_api_key(alice.id)
    assert here.users.by_api_key(key).id == alice.id
    code = ("import sys; from storage import Store; s = Store(sys.argv[1], sys.argv[2]); u = s.users.by_name('alice');"
            "c = s.chats.create_conversation(u.id); s.chats.add_message(u.id, c, 'user', 'from the other process');"
            "s.jobs.create(u.id, 'scheduler'); print(c)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c"), pg_url], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    cid = int(done.stdout)
    assert [m["content"] for m in here.chats.messages(alice.id, cid)] == ["from the other process"]
    with pytest.raises(InputError, match="already queued"):  # the other process's open job counts here
        there.jobs.create(alice.id)
    here.close()
    there.close()


def test_postgresql_migrations_run_once_and_match_sqlites_schema(tmp_path, postgres_server):
    url = postgres_server.new_database()  # empty
    first = Store(tmp_path / "a", url)
    applied = [r[0] for r in first.db.execute("SELECT name FROM _attune_migrations ORDER BY name")]
    assert applied[0] == "p001_initial" and first.integrity_ok()
    Store(tmp_path / "b", url).close()  # re-opening applies nothing twice
    assert first.db.execute("SELECT COUNT(*) FROM _attune_migrations").fetchone()[0] == len(applied)
    lite = Store(tmp_path / "lite")
    for table in [t for t in lite.db.table_names() if not t.startswith(("_", "sqlite_"))]:
        sqlite_columns = [r[1] for r in lite.db.execute(f"PRAGMA table_info({table})")]
        pg_columns = [r[0] for r in first.db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ? ORDER BY ordinal_position", [table])]
        assert pg_columns == sqlite_columns, table
    first.close()


@pytest.mark.parametrize("url,match", [
    ("mysql://root@localhost/attune", "not a database URL Attune knows"),
    ("attune.db", "not a database URL Attune knows"),
    ("sqlite://attune.db", "names no database"),
])
def test_a_bad_url_is_one_clear_error(tmp_path, url, match):
    with pytest.raises(ValueError, match=f"db: .*{match}"):
        Store(tmp_path, url)


def test_an_unreachable_server_says_what_to_check_and_hides_the_password(tmp_path, postgres_server):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StorageError, match="Cannot connect to the PostgreSQL database .*server is running") as e:
        Store(tmp_path, f"postgresql://attune:s3cret@127.0.0.1:{port}/attune")
    assert "s3cret" not in str(e.value) and ":***@" in str(e.value)
    with pytest.raises(StorageError, match="does not exist"):
        Store(tmp_path, postgres_server.url("no_such_database"))


def test_without_psycopg_a_postgresql_url_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    with pytest.raises(StorageError, match=r'needs psycopg 3.*make setup.*psycopg\[binary\]'):
        Store(tmp_path, "postgresql://attune@127.0.0.1:1/attune")


def test_backup_and_restore_point_postgresql_to_pg_dump(tmp_path, pg_url):
    from storage.backup import backup, restore
    from storage.config import StoreConfig
    from storage.paths import DataDir

    with pytest.raises(StorageError, match="pg_dump"):
        backup(Store(tmp_path / "data", pg_url), tmp_path / "backup")
    with pytest.raises(InputError, match="pg_restore"):
        restore(tmp_path / "backup", DataDir(tmp_path / "new"), StoreConfig(pg_url))


def test_writers_queue_as_on_sqlite_so_checks_hold_under_concurrency(any_store):
    """Eight threads sign up the same name and queue a job for the same user at once: exactly one of each wins and
    the others get the usual message (not a database error): the write lock makes check-then-insert safe."""
    import threading

    alice = any_store.users.create("alice", "correct horse")
    barrier, outcomes = threading.Barrier(8), []

    def race(n: int) -> None:
        barrier.wait()
        for attempt in (lambda: any_store.users.create("carol", "long enough"),
                        lambda: any_store.jobs.create(alice.id, "api")):
            try:
                attempt()
                outcomes.append("won")
            except InputError as e:
                outcomes.append("taken" if "taken" in str(e) else "queued" if "already queued" in str(e) else str(e))
            except Exception as e:  # surfaced by the assertion below
                outcomes.append(repr(e))
        any_store.close()

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["queued"] * 7 + ["taken"] * 7 + ["won"] * 2
    assert len(any_store.jobs.open_jobs(alice.id)) == 1


def test_a_training_process_opens_the_servers_database(tmp_path, pg_url):
    from assistant.model import ModelConfig
    from personalize.config import TrainConfig
    from personalize.job import parse_args
    from personalize.runner import JobRunner

    command = JobRunner(Store(tmp_path / "pg", pg_url), ModelConfig(), TrainConfig()).command(7)
    assert command[command.index("--db") + 1] == pg_url and parse_args(command[3:]).db == pg_url
    default = JobRunner(Store(tmp_path / "lite"), ModelConfig(), TrainConfig()).command(7)
    assert "--db" not in default and parse_args(default[3:]).db == ""


def test_postgresql_itself_refuses_a_second_open_job_per_user(pg_url, tmp_path):
    """Whoever writes the row (a worker elsewhere, a hand-made INSERT): one queued or running job per user."""
    import psycopg

    store = Store(tmp_path, pg_url)
    alice, bob = store.users.create("alice", "correct horse"), store.users.create("bob", "battery staple")
    first = store.jobs.create(alice.id)
    insert = "INSERT INTO jobs (user_id, status, created_at) VALUES (?, ?, '2026-01-01')"
    with pytest.raises(psycopg.errors.UniqueViolation, match="idx_jobs_one_open_per_user"):
        store.db.execute(insert, [alice.id, "running"])
    store.db.execute(insert, [bob.id, "queued"])  # another user's open job is fine
    store.db.execute(insert, [alice.id, "failed"])  # and any number of finished ones
    store.jobs.claim(first, 1)
    store.jobs.finish(first, "rejected")
    assert store.jobs.get(alice.id, store.jobs.create(alice.id))["status"] == "queued"
    store.close()
