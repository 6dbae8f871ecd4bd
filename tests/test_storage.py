"""storage/: schema, users, messages, feedback, import/export/forget — on a real SQLite file and, each test once
more, on a real PostgreSQL database (``any_store``: skipped, saying why, without PostgreSQL's binaries)."""

import json
import sqlite3
import threading

import pytest

from storage import AuthError, InputError, NotFound, Store
from storage.transfer import delete_user, export_user, import_history


@pytest.fixture
def store(any_store):
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_store


@pytest.fixture
def sqlite_store(tmp_path):
    s = Store(tmp_path / "sqlite")
    yield s
    s.close()


def test_database_is_wal_with_all_migrations(sqlite_store):
    store = sqlite_store
    assert store.kind == "sqlite" and store.path == store.data_dir.root / "attune.db"
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"users", "api_keys", "conversations", "messages", "feedback"} <= set(store.db.table_names())
    applied = [r["name"] for r in store.db.query("SELECT name FROM _sqlite_migrations")]
    assert applied[0] == "m001_initial"
    Store(store.data_dir)  # re-opening applies nothing twice
    assert len(list(store.db.query("SELECT name FROM _sqlite_migrations"))) == len(applied)


def test_passwords_are_salted_scrypt_hashes(store, alice):
    row = next(store.db.query("SELECT password_hash FROM users WHERE id = ?", [alice.id]))
    assert row["password_hash"].startswith("scrypt$") and "correct horse" not in row["password_hash"]
    bob = store.users.create("bob", "correct horse")
    other = next(store.db.query("SELECT password_hash FROM users WHERE id = ?", [bob.id]))
    assert other["password_hash"] != row["password_hash"]  # salted
    assert store.users.authenticate("alice", "correct horse").id == alice.id
    with pytest.raises(AuthError, match="Wrong user name or password"):
        store.users.authenticate("alice", "wrong password")
    with pytest.raises(AuthError, match="Wrong user name or password"):
        store.users.authenticate("nobody", "correct horse")


@pytest.mark.parametrize("name", ["", " ", "../etc", "a/b", "x" * 40, "-dash", "名字"])
def test_user_names_that_could_reach_a_path_are_refused(store, name):
    with pytest.raises(InputError, match="User names"):
        store.users.create(name, "long enough")


def test_duplicate_user_and_short_password(store, alice):
    with pytest.raises(InputError, match="taken"):
        store.users.create("ALICE", "whatever123")
    with pytest.raises(InputError, match="at least 8"):
        store.users.create("carol", "short")


def test_api_keys_are_hashed_and_decide_the_user(store, alice, bob):
    key = store.users.new_api_key(alice.id)
    assert store.users.by_api_key(key).id == alice.id
    secret = key.split("-", 2)[2]  # token_urlsafe may hold "-" and "_" (a LIKE wildcard): split as the code does
    hashes = [r["secret_hash"] for r in store.db.query("SELECT secret_hash FROM api_keys")]
    assert secret and hashes and not any(secret in h for h in hashes)
    for bad in ["", "att-nope-nope", key[:-1] + ("A" if key[-1] != "A" else "B"), "Bearer x"]:
        with pytest.raises(AuthError, match="Invalid API key"):
            store.users.by_api_key(bad)


def test_messages_and_feedback_are_scoped_to_their_user(store, alice, bob):
    cid = store.chats.create_conversation(alice.id)
    store.chats.add_message(alice.id, cid, "user", "My secret is 4321")
    aid = store.chats.add_message(alice.id, cid, "assistant", "Noted.", memory_ids=[3], gen_settings={"t": 0})
    assert store.chats.message(alice.id, aid)["memory_ids"] == [3]
    with pytest.raises(NotFound):
        store.chats.messages(bob.id, cid)
    with pytest.raises(NotFound):
        store.chats.message(bob.id, aid)
    with pytest.raises(NotFound):
        store.chats.add_feedback(bob.id, aid, "like")
    with pytest.raises(NotFound):
        store.chats.add_message(bob.id, cid, "user", "sneaking in")
    with pytest.raises(NotFound):
        store.chats.delete_conversation(bob.id, cid)
    assert store.chats.conversations(bob.id) == []
    assert len(store.chats.messages(alice.id, cid)) == 2


def test_feedback_latest_rating_wins_and_corrections_are_kept(store, alice):
    cid = store.chats.create_conversation(alice.id)
    store.chats.add_message(alice.id, cid, "user", "Which breed suits flats?")
    aid = store.chats.add_message(alice.id, cid, "assistant", "A husky.")
    store.chats.add_feedback(alice.id, aid, "like")
    store.chats.add_feedback(alice.id, aid, "dislike")
    store.chats.add_feedback(alice.id, aid, "correction", "A French bulldog.")
    assert store.chats.feedback_state(alice.id, aid) == {"rating": "dislike", "correction": "A French bulldog."}
    assert store.chats.corrections(alice.id, cid) == {aid: "A French bulldog."}
    assert store.chats.ratings(alice.id, cid) == {aid: "dislike"}
    assert [f["kind"] for f in store.chats.feedback(alice.id)] == ["like", "dislike", "correction"]
    with pytest.raises(InputError, match="empty"):
        store.chats.add_feedback(alice.id, aid, "correction", "   ")
    with pytest.raises(InputError, match="assistant"):
        store.chats.add_feedback(alice.id, aid - 1, "like")
    store.chats.add_feedback(alice.id, aid, "clear")
    assert store.chats.ratings(alice.id, cid) == {}


@pytest.mark.parametrize("bad,match", [("", "empty"), ("  \n ", "empty"), (None, "must be text"),
                                       (123, "must be text"), ("x" * 1_000_001, "limit")])
def test_bad_message_text_gets_a_clear_error_and_writes_nothing(store, alice, bad, match):
    cid = store.chats.create_conversation(alice.id)
    with pytest.raises(InputError, match=match):
        store.chats.add_message(alice.id, cid, "user", bad)
    assert store.chats.messages(alice.id, cid) == []


def test_odd_text_is_stored_intact(store, alice):
    cid = store.chats.create_conversation(alice.id)
    text = "emoji 🎉🐶 ctrl \x07\x1b[31m tab\t 中文 " + "y" * 200_000
    mid = store.chats.add_message(alice.id, cid, "user", text)
    assert store.chats.message(alice.id, mid)["content"] == text
    broken = store.chats.add_message(alice.id, cid, "user", "lone \ud800 surrogate \x00 nul")
    assert store.chats.message(alice.id, broken)["content"] == "lone \ufffd surrogate \ufffd nul"


def test_concurrent_writers_lose_nothing(store, alice):
    cid = store.chats.create_conversation(alice.id)
    errors = []

    def write(n):
        try:
            for i in range(25):
                store.chats.add_message(alice.id, cid, "user", f"thread {n} message {i}")
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    other = Store(store.data_dir, store.config)  # another connection sees every committed row
    assert other.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 200
    if store.kind == "sqlite":
        assert sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 200
    other.close()
    assert store.integrity_ok()


HISTORY = [
    {"messages": [{"role": "user", "content": "My dog is called Biscuit."},
                  {"role": "assistant", "content": "Nice name!", "feedback": "like"},
                  {"role": "user", "content": "What breed suits flats?"},
                  {"role": "assistant", "content": "A husky.", "feedback": "dislike",
                   "correction": "A French bulldog."}]},
    {"messages": [{"role": "user", "content": "I drink tea."}, {"role": "assistant", "content": "Noted."}]},
]


def test_import_export_forget_round_trip(store, alice, bob, tmp_path):
    f = tmp_path / "history.jsonl"
    f.write_text("\n".join(json.dumps(c) for c in HISTORY) + "\n")
    assert import_history(store, alice.id, f) == {"conversations": 2, "messages": 6, "feedback": 3}
    data = export_user(store, alice.id)
    assert [c["title"] for c in data["conversations"]] == ["I drink tea.", "My dog is called Biscuit."] or \
        {c["title"] for c in data["conversations"]} == {"I drink tea.", "My dog is called Biscuit."}
    assert {f["kind"] for f in data["feedback"]} == {"like", "dislike", "correction"}
    assert "password" not in json.dumps(data["user"])
    delete_user(store, alice.id)
    assert store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    store.close()
    blob = b"".join(p.read_bytes() for p in store.data_dir.root.rglob("*") if p.is_file())
    assert b"Biscuit" not in blob and b"French bulldog" not in blob
    assert store.users.by_id(bob.id).name == "bob"


@pytest.mark.parametrize("content,match", [
    ("not json\n", "line 2: not valid JSON"),
    ('{"messages": []}\n', "line 2: expected"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "role must be"),
    ('{"messages": [{"role": "user", "content": ""}]}\n', "empty"),
    ('{"messages": [{"role": "user", "content": "a", "feedback": "like"}]}\n', "assistant messages"),
    ('{"messages": [{"role": "assistant", "content": "a", "feedback": "meh"}]}\n', "feedback must be"),
])
def test_import_rejects_bad_files_and_writes_nothing(store, alice, tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(HISTORY[1]) + "\n" + content)
    with pytest.raises(InputError, match=match):
        import_history(store, alice.id, f)
    assert store.chats.conversations(alice.id) == []


def test_import_rejects_empty_file(store, alice, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(InputError, match="no conversations"):
        import_history(store, alice.id, f)


def test_import_rejects_binary(store, alice, tmp_path):
    f = tmp_path / "bin.jsonl"
    f.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(InputError, match="not UTF-8"):
        import_history(store, alice.id, f)
