"""Adapters in object storage (issue 27, item 3): ``--adapter-store s3://BUCKET/PREFIX``.

A training job uploads the version (completion marker last), then one transaction records it and makes it active;
a second serving process with its own data dir on the same database downloads it on the user's next turn and
serves it. An upload without its marker is never served; a corrupted or missing object falls back with a notice, as
damaged files do; a store that cannot be reached serves an older version held here for that turn only; forgetting a
user deletes their objects; without an adapter store nothing changes. S3 is moto_server on loopback (conftest
``s3_server``), spoken to with plain boto3."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_damage import GREEDY, alice_history, ask, tiny_engine
from test_personalize import tiny_cfg

from assistant.chat.account import forget_user
from assistant.chat.service import ChatConfig, ChatService
from assistant.model import ModelConfig
from fakes import write_stand_in_adapter
from helpers import ROOT
from personalize.api import train_now
from personalize.runner import JobRunner
from storage import NotFound, Store
from storage.objects import MARKER, AdapterStoreConfig, ObjectsIncomplete, open_store


def stores(tmp_path, s3_server, url, db=None) -> tuple[Store, Store]:
    """Two processes' stores on one database: A publishes to ``url``; B has its own data dir (its cache) and reads
    each version from where its row says. ``db`` None: a SQLite file both open."""
    db = db or f"sqlite:///{tmp_path / 'shared.db'}"
    a = Store(tmp_path / "a", db, AdapterStoreConfig(url, s3_server.endpoint))
    b = Store(tmp_path / "b", db, AdapterStoreConfig("", s3_server.endpoint))
    return a, b


def publish_stand_in(store: Store, user_id: int, job_id: int, keep: int | None = None) -> int:
    staging = store.data_dir.staging(user_id, job_id)
    write_stand_in_adapter(staging)
    (staging / "adapter.gguf").write_bytes(b"GGUF" + bytes([job_id]) * 64)  # what publish converts for llama.cpp
    return store.adapters.publish(user_id, staging, base_model="fake", metrics={}, gate_reason="ok",
                                  parent_version=None, job_id=job_id, keep=keep)


def fake_service(store, fake) -> ChatService:
    return ChatService(store, fake, ChatConfig(context_tokens=512, defaults=GREEDY))


# the whole story -------------------------------------------------------------------------------
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_job_publishes_to_s3_and_another_server_serves_it_on_the_next_turn(tmp_path, s3_server, s3_url,
                                                                             tiny_model_dir, db, request):
    a, b = stores(tmp_path, s3_server, s3_url, request.getfixturevalue("pg_url") if db == "postgresql" else None)
    alice = a.users.create("alice", "correct horse")
    alice_history(a, alice, tmp_path)
    result = train_now(a, alice.id, ModelConfig(model=str(tiny_model_dir)), tiny_cfg(max_steps=4))
    assert result["published"] and result["version"] == 1, result["reason"]

    row = b.adapters.get(alice.id, 1)  # one row, written by A after the upload
    name = row["location"].rsplit("/", 1)[1]
    assert row["location"] == f"{s3_url}/u{alice.id}/{name}" and name.startswith("v1-")
    keys = [k.split("/", 3)[3] for k in s3_server.keys(s3_url) if f"/u{alice.id}/{name}/" in k]
    assert MARKER in keys and set(keys) - {MARKER} == set(row["files"])
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json"} <= set(row["files"])
    assert row["path"] == str(b.data_dir.root / "adapters" / f"u{alice.id}" / name)
    assert (a.data_dir.root / "adapters" / f"u{alice.id}" / name / "adapter_model.safetensors").is_file()
    assert not (b.data_dir.root / "adapters" / f"u{alice.id}").exists()  # B holds nothing yet

    served_a = ask(tiny_engine(a, tiny_model_dir, tmp_path / "ea"), alice)
    engine_b = tiny_engine(b, tiny_model_dir, tmp_path / "eb")  # a real transformers + peft engine on B
    served_b = ask(engine_b, alice)
    assert (served_b.status, served_b.adapter_version, served_b.notice) == ("complete", 1, None)
    assert served_b.text == served_a.text  # the same adapter answers on both servers
    base = ask(engine_b, alice, use_adapter=False)
    assert base.adapter_version is None
    for f, meta in row["files"].items():  # B's copy is byte for byte what A published
        held = b.data_dir.root / "adapters" / f"u{alice.id}" / name / f
        assert held.stat().st_size == meta["bytes"]
    engine_b.backend.close()


def test_rollback_and_switching_work_with_versions_this_server_does_not_hold(tmp_path, s3_server, s3_url, fake):
    a, b = stores(tmp_path, s3_server, s3_url)
    alice = a.users.create("alice", "password1")
    for job in (1, 2, 3):
        publish_stand_in(a, alice.id, job)
    service = fake_service(b, fake)
    assert ask(service, alice).adapter_version == 3
    assert b.adapters.choose(alice.id, 1)["active_version"] == 1  # v1 is only in the store: its marker is there
    turn = ask(service, alice)
    assert turn.adapter_version == 1 and fake.calls[-1].adapter.path.startswith(str(b.data_dir.root))
    assert b.adapters.choose(alice.id, "base") == {"active_version": None}
    assert ask(service, alice).adapter_version is None


# what is never served ----------------------------------------------------------------------------
def test_an_upload_that_never_wrote_its_marker_is_not_published_and_never_served(tmp_path, s3_server, s3_url, fake,
                                                                                 monkeypatch):
    from storage import objects

    a, b = stores(tmp_path, s3_server, s3_url)
    alice = a.users.create("alice", "password1")
    publish_stand_in(a, alice.id, 1)
    put_bytes = objects.S3Store._put_bytes

    def cut_before_marker(self, name, data):
        if name == MARKER:
            raise objects.ObjectStoreUnavailable("the connection dropped")
        return put_bytes(self, name, data)

    monkeypatch.setattr(objects.S3Store, "_put_bytes", cut_before_marker)
    with pytest.raises(objects.ObjectStoreUnavailable):
        publish_stand_in(a, alice.id, 2)
    monkeypatch.undo()
    assert [v["version"] for v in a.adapters.list(alice.id)] == [1] and a.adapters.active_version(alice.id) == 1
    assert all("/v2-" not in k for k in s3_server.keys(s3_url))  # the half upload was deleted again
    assert ask(fake_service(b, fake), alice).adapter_version == 1

    # objects without a marker are never downloaded, whoever asks
    remote = open_store(s3_url, s3_server.endpoint).child("u9/v1-deadbeef")
    write_stand_in_adapter(tmp_path / "half")
    for f in (tmp_path / "half").iterdir():
        remote._put(f.name, f)
    with pytest.raises(ObjectsIncomplete, match="no completion marker"):
        remote.download(tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("damage", ["corrupted", "missing", "marker_gone"])
def test_a_corrupted_or_missing_object_falls_back_with_a_notice(tmp_path, s3_server, s3_url, fake, damage):
    a, b = stores(tmp_path, s3_server, s3_url)
    alice, bob = a.users.create("alice", "password1"), a.users.create("bob", "password1")
    publish_stand_in(a, alice.id, 1)
    publish_stand_in(a, alice.id, 2)
    publish_stand_in(a, bob.id, 3)
    location = a.adapters.get(alice.id, 2)["location"]
    bucket, prefix = location[len("s3://"):].split("/", 1)
    s3 = s3_server.client()
    if damage == "corrupted":  # same size, other bytes: only the SHA-256 tells
        size = a.adapters.get(alice.id, 2)["files"]["adapter_model.safetensors"]["bytes"]
        s3.put_object(Bucket=bucket, Key=f"{prefix}/adapter_model.safetensors", Body=b"\1" * size)
    else:
        gone = "adapter_model.safetensors" if damage == "missing" else MARKER
        s3.delete_object(Bucket=bucket, Key=f"{prefix}/{gone}")
    words = {"corrupted": "is not what was published", "missing": "adapter_model.safetensors is missing",
             "marker_gone": "no completion marker"}[damage]

    service = fake_service(b, fake)
    turn = ask(service, alice)
    assert (turn.status, turn.adapter_version, turn.damaged_version) == ("complete", 1, 2)
    assert words in turn.damaged_what and "so version 1 answered" in turn.notice
    assert b.adapters.get(alice.id, 2)["status"] == "damaged" and b.adapters.active_version(alice.id) == 1
    assert not any(p.name.startswith("v2-") for p in (b.data_dir.root / "adapters" / f"u{alice.id}").iterdir())
    assert ask(service, bob).adapter_version == 1 and ask(service, alice).notice is None


def test_a_store_that_cannot_be_reached_serves_a_held_version_for_that_turn_only(tmp_path, s3_server, s3_url, fake):
    from helpers import free_port

    a, b = stores(tmp_path, s3_server, s3_url)
    alice = a.users.create("alice", "password1")
    publish_stand_in(a, alice.id, 1)
    assert ask(fake_service(b, fake), alice).adapter_version == 1  # B now holds v1
    publish_stand_in(a, alice.id, 2)
    cut_off = Store(b.data_dir.root, b.config, AdapterStoreConfig("", f"http://127.0.0.1:{free_port()}"))
    turn = ask(fake_service(cut_off, fake), alice)
    assert (turn.status, turn.adapter_version, turn.unavailable_version) == ("complete", 1, 2)
    assert "could not be downloaded from the adapter store" in turn.notice and "tried again" in turn.notice
    assert cut_off.adapters.get(alice.id, 2)["status"] == "published" and b.adapters.active_version(alice.id) == 2
    turn = ask(fake_service(b, fake), alice)  # the store answers again: v2 is fetched and served
    assert (turn.adapter_version, turn.notice) == (2, None)


# deleting -------------------------------------------------------------------------------------
def test_forget_deletes_the_users_objects_and_prune_the_pruned_ones(tmp_path, s3_server, s3_url):
    a, b = stores(tmp_path, s3_server, s3_url)
    alice, bob = a.users.create("alice", "password1"), a.users.create("bob", "password1")
    for job in (1, 2, 3):
        publish_stand_in(a, alice.id, job, keep=2)
    publish_stand_in(a, bob.id, 4)
    assert a.adapters.get(alice.id, 1)["status"] == "pruned"
    versions = {k.split("/")[2].split("-")[0] for k in s3_server.keys(s3_url) if k.startswith(f"adapters/u{alice.id}/")}
    assert versions == {"v2", "v3"}  # v1's objects went with it
    a.adapters.objects.child(f"u{alice.id}/v9-orphan")._put_bytes("x", b"left by a crash before COMMIT")
    bobs = [k for k in s3_server.keys(s3_url) if k.startswith(f"adapters/u{bob.id}/")]

    forget_user(b, alice.id)  # from the other server, which publishes nowhere: each row says where
    assert [k for k in s3_server.keys(s3_url) if k.startswith(f"adapters/u{alice.id}/")] == ["adapters/u1/v9-orphan/x"]
    forget_user(a, bob.id)  # the publishing server also clears u<id>/ of its store
    assert s3_server.keys(s3_url) == ["adapters/u1/v9-orphan/x"] and bobs
    with pytest.raises(NotFound):
        b.users.by_id(alice.id)


def test_a_crash_mid_upload_leaves_orphans_the_users_next_job_deletes(tmp_path, s3_server, s3_url, tiny_model_dir,
                                                                      caplog):
    """A worker killed mid-upload (objects, no marker, no row), one killed between its upload and the transaction
    (a whole upload, no row) and a prune whose delete failed (a pruned row) leave objects nobody serves: the
    user's next job deletes them as it starts (``Adapters.sweep``), and nothing a row still points at."""
    from helpers import free_port

    a, _ = stores(tmp_path, s3_server, s3_url)
    alice, bob = a.users.create("alice", "password1"), a.users.create("bob", "password1")
    for job in (1, 2):
        publish_stand_in(a, alice.id, job)
    publish_stand_in(a, bob.id, 3)
    with a.write() as db:  # as if prune's delete had failed after marking the row
        db.execute("UPDATE adapter_versions SET status = 'pruned' WHERE user_id = ? AND version = 1", [alice.id])
    mine = a.adapters.objects.child(f"u{alice.id}")
    half, whole = mine.child("v3-dead0001"), mine.child("v3-dead0002")
    write_stand_in_adapter(tmp_path / "v3")
    half._put("adapter_config.json", tmp_path / "v3" / "adapter_config.json")
    whole.upload(tmp_path / "v3")
    before = s3_server.keys(s3_url)

    def under(url: str) -> list[str]:
        return [k for k in s3_server.keys(s3_url) if k.startswith(url.split("/", 3)[3] + "/")]

    cut_off = Store(a.data_dir.root, a.config, AdapterStoreConfig(s3_url, f"http://127.0.0.1:{free_port()}"))
    with caplog.at_level("WARNING", logger="attune.storage"):
        swept = cut_off.adapters.sweep(alice.id)  # the pruned v1's local folder goes; the objects are left
    assert not [name for name in swept if "://" in name]  # unreachable: logged, left for the next job
    assert "not swept this time" in caplog.text and s3_server.keys(s3_url) == before

    result = train_now(a, alice.id, ModelConfig(model=str(tiny_model_dir)), tiny_cfg(max_steps=1))
    assert not result["published"] and "Not enough examples" in result["reason"]  # the job started, then stopped
    for url in (a.adapters.get(alice.id, 1)["location"], half.url, whole.url):
        assert not under(url), url
    for row in (a.adapters.get(alice.id, 2), a.adapters.get(bob.id, 1)):
        assert under(row["location"])
    assert a.adapters.sweep(alice.id) == [] and a.adapters.active_version(alice.id) == 2


# the default and the wiring ----------------------------------------------------------------------
def test_without_an_adapter_store_nothing_changes_and_boto3_is_never_imported(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from fakes import write_stand_in_adapter
from storage import Store
store = Store({str(tmp_path / 'd')!r})
user = store.users.create("alice", "password1")
staging = store.data_dir.staging(user.id, 1)
write_stand_in_adapter(staging)
store.adapters.publish(user.id, staging, base_model="fake", metrics={{}}, gate_reason="", parent_version=None,
                       job_id=1)
row = store.adapters.active(user.id)
print(row["path"], row["location"], row["files"], "boto3" in sys.modules, "botocore" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path / "d" / "adapters" / "u1" / "v1"), "None", "None", "False", "False"]


@pytest.mark.parametrize("url,field", [("s3://", "adapter_store"), ("ftp://host/x", "adapter_store"),
                                       ("bucket/prefix", "adapter_store")])
def test_a_bad_adapter_store_is_one_clear_error_naming_the_field(url, field):
    with pytest.raises(ValueError, match=f"^{field}: .*s3://BUCKET/PREFIX or file:///FOLDER"):
        AdapterStoreConfig(url)
    with pytest.raises(ValueError, match="^s3_endpoint: .*http"):
        AdapterStoreConfig("s3://b/p", "127.0.0.1:9000")


def test_serve_help_names_the_adapter_store_and_jobs_get_it(tmp_path, s3_server):
    import launch

    parser, _ = launch.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--adapter-store URL" in serve and "s3://BUCKET/PREFIX" in serve and "--s3-endpoint URL" in serve
    args = launch.parse_args(["forget", "x", "--adapter-store", "s3://b/p", "--s3-endpoint", s3_server.endpoint])
    assert launch.config_from(args, AdapterStoreConfig) == AdapterStoreConfig("s3://b/p", s3_server.endpoint)
    store = Store(tmp_path / "d", None, AdapterStoreConfig("s3://b/p", s3_server.endpoint))
    cmd = JobRunner(store, ModelConfig(), tiny_cfg()).command(7)
    assert cmd[cmd.index("--adapter-store") + 1] == "s3://b/p" and cmd[cmd.index("--s3-endpoint") + 1] == \
        s3_server.endpoint
    assert "--adapter-store" not in JobRunner(Store(tmp_path / "e"), ModelConfig(), tiny_cfg()).command(7)


def test_a_shared_folder_is_an_adapter_store_too(tmp_path, fake):
    shared = tmp_path / "shared"
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    a = Store(tmp_path / "a", db, AdapterStoreConfig(shared.as_uri()))
    b = Store(tmp_path / "b", db)
    alice = a.users.create("alice", "password1")
    publish_stand_in(a, alice.id, 1)
    row = b.adapters.get(alice.id, 1)
    assert row["location"].startswith(shared.as_uri()) and (shared / f"u{alice.id}").is_dir()
    turn = ask(fake_service(b, fake), alice)
    assert turn.adapter_version == 1 and json.loads((tmp_path / "b" / "adapters" / f"u{alice.id}" /
                                                     row["location"].rsplit("/", 1)[1] / "metrics.json"
                                                     ).read_text())["version"] == 1
    forget_user(a, alice.id)
    assert not any(shared.rglob("*"))
