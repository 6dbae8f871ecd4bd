"""Damaged files recover (issue 28, item 4): the adapter files of a user's active version cut in half or garbage, a
corrupt FAISS index of a user's memories, a deleted or damaged model cache, and a full disk while publishing.

Each stays the problem of the user it belongs to: their turn is still answered (by the previous version, the base
model, or without memories) with a notice, the other user keeps being answered with their own adapter, and a
restart with the damage still there starts and serves. Tiny random models and the scripted fake backend where the
model is not the point; the real embedded model only where its converted copy is what is damaged."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest
import sqlite_utils
from test_personalize import tiny_cfg, write_history

from assistant.chat.service import ChatConfig, ChatService, TurnOptions
from assistant.engines.base import GenerationSettings
from assistant.engines.hf.backend import TransformersBackend
from assistant.engines.hf.registry import AdapterConfig, AdapterRegistry
from assistant.errors import ModelError
from assistant.memory import index as memory_index
from assistant.memory.service import MemoryConfig, MemoryService
from assistant.model import ModelConfig, load_model
from assistant.ui.render import damage_notice
from helpers import ROOT, Server, cli
from personalize.api import train_now
from personalize.runner import queue_job
from storage import DataDir, InputError, Store
from storage.common import utcnow
from storage.transfer import import_history

GREEDY = GenerationSettings(max_new_tokens=10, temperature=0, repetition_penalty=1.0)
QUESTION = "Hello there"


def publish_random(store, model_dir, user_id: int, version: int, seed: int) -> None:
    """A LoRA with random (non-zero) weights published where training publishes it, and made active."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    path = store.data_dir.adapters(user_id) / f"v{version}"
    peft.save_pretrained(path)
    with store.write() as db:
        db["adapter_versions"].insert({"user_id": user_id, "version": version, "base_model": "tiny",
                                       "path": str(path.relative_to(store.data_dir.root)), "status": "published",
                                       "created_at": utcnow()})
        db["active_adapters"].upsert({"user_id": user_id, "version": version, "updated_at": utcnow()}, pk="user_id")


def cut_in_half(folder) -> None:
    f = folder / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def garbage_config(folder) -> None:
    (folder / "adapter_config.json").write_text("{'r': 4, garbage")


DAMAGES = {"cut_in_half": (cut_in_half, "adapter_model.safetensors is cut short"),
           "garbage_config": (garbage_config, "adapter_config.json is not valid JSON")}


def tiny_engine(store, model_dir, tmp_path) -> ChatService:
    """A fresh serving process's engine: the tiny model loaded anew (adapters are injected into it)."""
    loaded = load_model(ModelConfig(model=str(model_dir), quant="none", device="cpu", dtype="float32"),
                        DataDir(tmp_path / "m").ensure())
    backend = TransformersBackend(loaded, 512, AdapterRegistry(loaded.model, AdapterConfig()))
    return ChatService(store, backend, ChatConfig(context_tokens=512, defaults=GREEDY))


def ask(engine, user, text=QUESTION, **kw):
    turn = None
    for turn in engine.send(user.id, None, text, TurnOptions(GREEDY, **kw)):
        pass
    return turn


def references(store, model_dir, tmp_path, alice, bob) -> dict:
    """What each version answers QUESTION, from an engine that never met any damage."""
    engine = tiny_engine(store, model_dir, tmp_path)
    out = {"bob": ask(engine, bob).text, "base": ask(engine, alice, use_adapter=False).text}
    for v in (2, 1):
        store.adapters.choose(alice.id, v)
        out[v] = ask(engine, alice).text
    engine.backend.close()
    assert len({out[1], out[2], out["base"]}) == 3  # the versions answer differently: who answered shows
    return out


@pytest.mark.parametrize("when", ["while_loaded", "before_start"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_active_version_falls_back_for_its_user_only(store, tiny_model_dir, tmp_path, alice, bob, damage,
                                                               when):
    spoil, words = DAMAGES[damage]
    for user, version, seed in ((alice, 1, 1), (alice, 2, 2), (bob, 1, 3)):
        publish_random(store, tiny_model_dir, user.id, version, seed)
    ref = references(store, tiny_model_dir, tmp_path, alice, bob)
    store.adapters.choose(alice.id, 2)
    engine = tiny_engine(store, tiny_model_dir, tmp_path)
    if when == "while_loaded":  # v2 is in the engine's memory when its files break
        assert ask(engine, alice).text == ref[2]
    spoil(store.data_dir.adapters(alice.id) / "v2")

    turn = ask(engine, alice)
    assert (turn.status, turn.text, turn.adapter_version) == ("complete", ref[1], 1)
    assert turn.damaged_version == 2 and words in turn.damaged_what
    assert "version 2 is damaged on disk" in turn.notice and "so version 1 answered" in turn.notice
    assert damage_notice("zh-CN", turn).startswith("你的个人版本 2 在磁盘上已损坏")
    row = store.adapters.get(alice.id, 2)
    assert row["status"] == "damaged" and words in row["damage"] and store.adapters.active_version(alice.id) == 1
    stored = store.chats.message(alice.id, turn.assistant_message_id)
    assert stored["adapter_version"] == 1 and stored["gen_settings"]["adapter_damaged"] == 2
    with pytest.raises(InputError, match="damaged .* roll back to another version or train a new one"):
        store.adapters.choose(alice.id, 2)

    other = ask(engine, bob)  # everyone else: their own adapter, same answer as before
    assert (other.text, other.adapter_version, other.notice) == (ref["bob"], 1, None)
    again = ask(engine, alice)
    assert (again.text, again.adapter_version, again.notice) == (ref[1], 1, None)

    restarted = tiny_engine(store, tiny_model_dir, tmp_path)  # a restart with the damage still on disk
    assert (ask(restarted, alice).text, ask(restarted, bob).text) == (ref[1], ref["bob"])
    spoil(store.data_dir.adapters(alice.id) / "v1")  # the previous version breaks too: the base model answers
    last = ask(restarted, alice)
    assert (last.status, last.text, last.adapter_version) == ("complete", ref["base"], None)
    assert "so the base model answered" in last.notice and store.adapters.active_version(alice.id) is None
    assert ask(restarted, bob).text == ref["bob"]
    for e in (engine, restarted):
        e.backend.close()


@pytest.mark.parametrize("first", ["alice", "bob"])
def test_an_adapter_peft_cannot_load_leaves_the_shared_model_as_it_was(store, tiny_model_dir, tmp_path, alice, bob,
                                                                        first):
    """Files that pass the checks but that peft cannot load (a config whose rank is not the weights'): peft has
    already injected layers into the shared model (into the base model itself on a first load); they are taken
    back, so the fallback and everyone else answer exactly as before."""
    carol = store.users.create("carol", "correct horse")  # no adapter: the base model
    for user, version, seed in ((alice, 1, 1), (alice, 2, 2), (bob, 1, 3)):
        publish_random(store, tiny_model_dir, user.id, version, seed)
    ref = references(store, tiny_model_dir, tmp_path, alice, bob)
    store.adapters.choose(alice.id, 2)
    config = store.data_dir.adapters(alice.id) / "v2" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 8}))
    engine = tiny_engine(store, tiny_model_dir, tmp_path)
    order = [alice, bob] if first == "alice" else [bob, alice]
    turns = {u.name: ask(engine, u) for u in order}
    assert (turns["alice"].text, turns["alice"].adapter_version, turns["alice"].damaged_version) == (ref[1], 1, 2)
    assert "peft could not load it" in store.adapters.get(alice.id, 2)["damage"]
    assert (turns["bob"].text, turns["bob"].adapter_version) == (ref["bob"], 1)
    assert ask(engine, carol).text == ref["base"]
    assert not [n for n in engine.backend.registry.model.peft_config if n.startswith(f"u{alice.id}-v2-")]
    engine.backend.close()


# memories ---------------------------------------------------------------------------------------------------
def memory_engine(store, fake) -> ChatService:
    memory = MemoryService(store, MemoryConfig(embedder="hash", min_score=0.2, relative_margin=2.0, k=3))
    return ChatService(store, fake, ChatConfig(context_tokens=2048, defaults=GREEDY), memory=memory)


def corrupt_garbage(path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def corrupt_truncated_with_matching_sidecar(path) -> None:
    """Past the checksum: FAISS's own reader meets the cut file."""
    data = path.read_bytes()[:-40]
    path.write_bytes(data)
    meta = json.loads(memory_index.sidecar(path).read_text())
    memory_index.sidecar(path).write_text(json.dumps({**meta, "checksum": memory_index._checksum(data)}))


def corrupt_sidecar(path) -> None:
    memory_index.sidecar(path).write_text("\x00garbage")


@pytest.mark.parametrize("corrupt", [corrupt_garbage, corrupt_truncated_with_matching_sidecar, corrupt_sidecar])
def test_a_corrupt_memory_index_is_rebuilt_from_sqlite_and_the_turn_answered(store, fake, alice, bob, corrupt):
    engine = memory_engine(store, fake)
    engine.memory.remember_fact(alice.id, "My dog is called Biscuit.")
    engine.memory.remember_fact(bob.id, "My cat is called Tiger.")
    engine.memory.close()  # saved: what a restart finds
    index_path = store.data_dir.memory_index(alice.id)
    corrupt(index_path)

    engine = memory_engine(store, fake)  # the restart
    turn = ask(engine, alice, "What is my dog called?")
    assert turn.status == "complete" and turn.notice is None and len(turn.memory_ids) == 1
    assert "Biscuit" in fake.calls[-1].prompt and "Tiger" not in fake.calls[-1].prompt
    index, fingerprint = memory_index.load(index_path, engine.memory.embedder.name, engine.memory.embedder.dim)
    assert index.ntotal == fingerprint[0] == 1  # rebuilt from the memories rows, and saved whole
    other = ask(engine, bob, "What is my cat called?")
    assert "Tiger" in fake.calls[-1].prompt and "Biscuit" not in fake.calls[-1].prompt and other.memory_ids
    engine.memory.close()


def test_memories_that_cannot_be_searched_leave_the_turn_answered_without_them(store, fake, alice, bob, monkeypatch):
    engine = memory_engine(store, fake)
    engine.memory.remember_fact(alice.id, "My dog is called Biscuit.")
    engine.memory.remember_fact(bob.id, "My cat is called Tiger.")
    engine.memory.close()
    corrupt_garbage(store.data_dir.memory_index(alice.id))
    engine = memory_engine(store, fake)
    real = engine.memory.cache._embed_all

    def broken(user_id):  # the rebuild itself fails (say the embedder cannot run)
        if user_id == alice.id:
            raise RuntimeError("embedder crashed")
        return real(user_id)

    monkeypatch.setattr(engine.memory.cache, "_embed_all", broken)
    turn = ask(engine, alice, "What is my dog called?")
    assert turn.status == "complete" and turn.text == "I am a scripted answer." and turn.memory_ids == []
    assert "memories could not be searched" in turn.notice and "memory rebuild NAME" in turn.notice
    assert "Biscuit" not in fake.calls[-1].prompt
    assert damage_notice("en", turn).startswith("Your memories could not be searched")
    assert ask(engine, bob, "What is my cat called?").memory_ids and "Tiger" in fake.calls[-1].prompt
    monkeypatch.setattr(engine.memory.cache, "_embed_all", real)  # the next turn tries again
    assert ask(engine, alice, "What is my dog called?").memory_ids and "Biscuit" in fake.calls[-1].prompt
    engine.memory.close()


# the model cache ----------------------------------------------------------------------------------------------
def test_a_damaged_local_model_folder_is_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match=r"is damaged \(model.safetensors is cut short .*\)\. Restore that folder"):
        load_model(ModelConfig(model=str(folder), quant="none", device="cpu"), DataDir(tmp_path / "d").ensure())


def test_a_deleted_or_damaged_model_cache_is_converted_again_on_start(tmp_path, embedded_models_dir):
    """The embedded model's converted copy under models/ is a cache: deleted, or its weights cut short, the next
    start converts it again (saying so) and serves; nothing to run by hand."""
    import shutil

    data = tmp_path / "data"
    cli("users", "add", "alice", data_dir=data, stdin="correct horse\n")
    key = cli("users", "key", "alice", data_dir=data).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    (cached,) = [p for p in embedded_models_dir.iterdir() if p.is_dir()]
    args = ("--max-new-tokens", "4", "--temperature", "0", "--no-memory", "--no-personalizer")
    for damage in ("deleted", "cut short"):
        target = data / "models" / cached.name
        if damage == "deleted":
            assert not target.exists()  # never copied: as if deleted
        else:
            weights = target / "model.safetensors"
            with open(weights, "r+b") as f:
                f.truncate(weights.stat().st_size // 2)
        with Server(data, *args, timeout=300) as srv:
            r = httpx.post(srv.base + "/v1/chat/completions", headers=headers, timeout=120,
                           json={"messages": [{"role": "user", "content": "Hi!"}]})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
            log = srv.log_path.read_text()
        assert "converting SmolLM2-135M-Instruct.Q4_1.gguf to float32 safetensors" in log
        assert "about 577 MB of disk" in log  # said up front
        assert ("is damaged (model.safetensors is cut short" in log) == (damage == "cut short")
    assert (target / "model.safetensors").stat().st_size == (cached / "model.safetensors").stat().st_size
    shutil.rmtree(target)


# a server with a damaged adapter -------------------------------------------------------------------------------
def test_a_server_keeps_serving_everyone_and_restarts_with_a_damaged_adapter(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    store = Store(data)
    alice, bob = (store.users.create(n, "correct horse") for n in ("alice", "bob"))
    keys = {u.name: store.users.new_api_key(u.id) for u in (alice, bob)}
    for user, version, seed in ((alice, 1, 1), (alice, 2, 2), (bob, 1, 3)):
        publish_random(store, tiny_model_dir, user.id, version, seed)
    args = ("--model", str(tiny_model_dir), "--engine", "transformers", "--quant", "none", "--dtype", "float32",
            "--max-new-tokens", "8", "--temperature", "0", "--no-memory", "--no-personalizer")

    notices = []

    def chat(srv, name) -> tuple[str, int | None]:
        r = httpx.post(srv.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {keys[name]}"},
                       json={"messages": [{"role": "user", "content": QUESTION}]}, timeout=60)
        assert r.status_code == 200, r.text
        notices.append((name, r.json()["attune"]["notice"]))
        return r.json()["choices"][0]["message"]["content"], r.json()["attune"]["adapter_version"]

    with Server(data, *args) as srv:
        before = {"alice": chat(srv, "alice"), "bob": chat(srv, "bob")}
        store.adapters.choose(alice.id, 1)
        alice_v1 = chat(srv, "alice")
        store.adapters.choose(alice.id, 2)
        assert before["alice"][1] == 2 and alice_v1[1] == 1 and alice_v1[0] != before["alice"][0]
        cut_in_half(store.data_dir.adapters(alice.id) / "v2")  # while the server holds it
        assert chat(srv, "alice") == alice_v1 and chat(srv, "bob") == before["bob"]
        assert srv.proc.poll() is None
        assert "version 2 is damaged on disk" in notices[-2][1] and notices[-1] == ("bob", None)  # the API says so
        assert chat(srv, "alice") == alice_v1 and notices[-1] == ("alice", None)  # once, when it happened
    for _ in range(2):  # restarts with the damage still there start and serve
        with Server(data, *args) as srv:
            assert chat(srv, "alice") == alice_v1 and chat(srv, "bob") == before["bob"]
    assert store.adapters.get(alice.id, 2)["status"] == "damaged" and store.adapters.active_version(alice.id) == 1
    store.close()


# a full disk while publishing ----------------------------------------------------------------------------------
def alice_history(store, alice, tmp_path) -> None:
    import_history(store, alice.id, write_history(tmp_path / "alice.jsonl"))


def adapter_state(store, user) -> tuple:
    """What a user would find: version rows, the active one, the folders under their adapters/."""
    folder = store.data_dir.adapters(user.id)
    return ([(v["version"], v["status"]) for v in store.adapters.list(user.id)], store.adapters.active_version(user.id),
            sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [])


DRIVER = textwrap.dedent("""
    import resource, sys
    from peft import PeftModel
    from personalize import job

    limit, save = int(sys.argv[1]), PeftModel.save_pretrained

    def save_on_a_full_disk(self, *args, **kwargs):  # files may grow to `limit` bytes while the adapter is written
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            return save(self, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    PeftModel.save_pretrained = save_on_a_full_disk
    sys.exit(job.main(sys.argv[2:]))
""")


def test_a_full_disk_while_publishing_keeps_the_previous_version(store, tiny_model_dir, tmp_path, alice, bob):
    """The job runs in its own process, as the personalizer runs it; while it writes the adapter the kernel refuses
    every byte past 4 KB (RLIMIT_FSIZE: EFBIG, what a full disk is to a writer)."""
    alice_history(store, alice, tmp_path)
    publish_random(store, tiny_model_dir, alice.id, 1, seed=1)
    publish_random(store, tiny_model_dir, bob.id, 1, seed=3)
    before_alice, before_bob = adapter_state(store, alice), adapter_state(store, bob)
    (tmp_path / "driver.py").write_text(DRIVER)
    job_id = queue_job(store, alice.id)
    command = [sys.executable, str(tmp_path / "driver.py"), "4096", "--data-dir", str(store.data_dir.root),
               "--job-id", str(job_id), "--model", str(tiny_model_dir), "--config",
               json.dumps(tiny_cfg(max_steps=4).to_dict())]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    job = store.jobs.get(alice.id, job_id)
    assert job["status"] == "failed", job
    assert job["error"].startswith("The disk is full (or refused the write: ") and "File too large" in job["error"]
    assert "Nothing was published and the half-written files were removed; version 1 still answers." in job["error"]
    assert f"Free space under {store.data_dir.root} and train again." in job["error"]
    assert adapter_state(store, alice) == before_alice == ([(1, "published")], 1, ["v1"])  # no v2 row nor folder
    assert adapter_state(store, bob) == before_bob


def test_a_database_refusing_the_publish_leaves_no_half_published_version(store, tiny_model_dir, tmp_path, alice,
                                                                         monkeypatch):
    """SQLite says the disk is full after the folder was renamed to v2: the folder goes, no row, v1 stays."""
    alice_history(store, alice, tmp_path)
    publish_random(store, tiny_model_dir, alice.id, 1, seed=1)
    before = adapter_state(store, alice)
    insert = sqlite_utils.db.Table.insert

    def full(table, record, *args, **kwargs):
        if table.name == "adapter_versions" and record.get("status") == "published":
            assert (store.data_dir.adapters(alice.id) / f"v{record['version']}").is_dir()  # renamed already
            raise sqlite3.OperationalError("database or disk is full")
        return insert(table, record, *args, **kwargs)

    monkeypatch.setattr(sqlite_utils.db.Table, "insert", full)
    with pytest.raises(Exception, match=r"The disk is full \(or refused the write: database or disk is full\)"):
        train_now(store, alice.id, ModelConfig(model=str(tiny_model_dir)), tiny_cfg(max_steps=4))
    job = store.jobs.list(alice.id, 1)[0]
    assert job["status"] == "failed" and "version 1 still answers" in job["error"]
    assert adapter_state(store, alice) == before


def test_a_publish_that_cannot_write_its_metrics_leaves_nothing(store, alice, monkeypatch):
    import errno

    from fakes import write_stand_in_adapter
    from storage import adapters as storage_adapters

    staging = store.data_dir.staging(alice.id, 7)
    write_stand_in_adapter(staging)

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(storage_adapters, "atomic_write_bytes", no_space)
    with pytest.raises(OSError, match="No space left"):
        store.adapters.publish(alice.id, staging, base_model="fake", metrics={}, gate_reason="", parent_version=None,
                               job_id=7)
    assert store.adapters.list(alice.id) == [] and store.adapters.active_version(alice.id) is None
    assert sorted(p.name for p in store.data_dir.adapters(alice.id).iterdir()) == [staging.name]  # the job removes it
