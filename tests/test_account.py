"""assistant/chat/account.py and the storage helpers under it: forgetting a user as one use case."""

from __future__ import annotations

import subprocess
import sys

import pytest

from assistant.chat.account import forget_user, stop_training
from assistant.memory.service import MemoryConfig, MemoryService
from storage import NotFound
from storage.common import as_int, row_or_not_found


def test_forget_stops_training_drops_memory_and_deletes_everything(store, alice, bob):
    memory = MemoryService(store, MemoryConfig(embedder="hash"))
    assert memory.remember_fact(alice.id, "My dog is called Biscuit.")
    memory.flush(alice.id)
    assert store.data_dir.memory_index(alice.id).is_file()
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.jobs.create(alice.id, "cli", pid=worker.pid)
        staging = store.data_dir.staging(alice.id, 1)
        staging.mkdir(parents=True)
        forget_user(store, alice.id, memory)
        assert worker.wait(timeout=5) is not None  # SIGTERMed, not left training on deleted data
    finally:
        worker.kill()
    assert not any(p.exists() for p in store.data_dir.user_files(alice.id))
    assert not store.data_dir.adapters(alice.id).exists()
    assert list(store.data_dir.root.joinpath("memory").glob("u1.*")) == []
    with pytest.raises(NotFound):
        store.users.by_id(alice.id)
    assert store.users.by_id(bob.id).name == "bob"


def test_forget_an_unknown_user_stops_nothing(store):
    with pytest.raises(NotFound):
        forget_user(store, 99)


def test_stop_training_never_signals_this_process(store, alice):
    import os

    store.jobs.create(alice.id, "cli", pid=os.getpid())
    assert stop_training(store, alice.id, timeout=0.1) == []


def test_user_files_belong_to_one_user_only(store):
    for name in ("u1.faiss", "u1.json", "u10.faiss", "u11.json"):
        (store.data_dir.root / "memory" / name).write_text("x")
    assert [p.name for p in store.data_dir.user_files(1)] == ["u1", "u1.faiss", "u1.json"]


@pytest.mark.parametrize("value", [0, -1, 2**63, 1.5, True, "x", None, [1]])
def test_as_int_refuses_what_is_no_id(value):
    with pytest.raises(NotFound, match="not a valid"):
        as_int(value)


def test_row_or_not_found(store, alice):
    assert row_or_not_found(store.db, "SELECT name FROM users WHERE id = ?", [alice.id], "gone")["name"] == "alice"
    with pytest.raises(NotFound, match="^gone, add one$"):
        row_or_not_found(store.db, "SELECT name FROM users WHERE id = ?", [alice.id + 1], "gone, add one")
