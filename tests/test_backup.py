"""Backup while serving and restore into an empty data dir (issue 28, item 2), as an operator runs them:
``launch.py backup`` against a live server under API load, ``launch.py restore``, then the restored Attune."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx
from test_adapters import publish_random_adapter

from helpers import Server, cli
from storage import Store

TABLES = ("users", "api_keys", "conversations", "messages", "feedback", "memories", "adapter_versions",
          "active_adapters")


def rows(path, table):
    con = sqlite3.connect(path)
    try:
        return {r[0]: r for r in con.execute(f"SELECT * FROM {table} ORDER BY 1")}
    finally:
        con.close()


def test_backup_under_load_restores_the_same_data_and_answers(tmp_path, tiny_model_dir):
    data, copy, restored = tmp_path / "data", tmp_path / "backup", tmp_path / "restored"
    cli("users", "add", "alice", data_dir=data, stdin="correct horse\n")
    key = cli("users", "key", "alice", data_dir=data).stdout.strip()
    store = Store(data)
    publish_random_adapter(store, tiny_model_dir, store.users.by_name("alice").id, 1, seed=3)
    store.close()
    flags = ("--model", str(tiny_model_dir), "--quant", "none", "--dtype", "float32", "--no-personalizer")
    ask = {"messages": [{"role": "user", "content": "Say something about boats."}], "max_tokens": 8,
           "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"}
    with Server(data, *flags) as srv:
        before = httpx.post(srv.base + "/v1/chat/completions", json=ask, headers=headers, timeout=60).json()
        stop, acknowledged, errors = threading.Event(), [], []

        def client(n):
            while not stop.is_set():
                body = {"messages": [{"role": "user", "content": f"client {n} at {time.time()}"}], "max_tokens": 4}
                r = httpx.post(srv.base + "/v1/chat/completions", json=body, headers=headers, timeout=60)
                (acknowledged if r.status_code == 200 else errors).append(r.json())

        threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
        for t in threads:
            t.start()
        time.sleep(2)
        done_before = len(acknowledged)
        result = cli("backup", str(copy), data_dir=data)  # while the 10 clients keep writing
        stop.set()
        for t in threads:
            t.join(60)
    assert result.returncode == 0, result.stderr
    assert not errors and done_before > 0 and len(acknowledged) > done_before
    snapshot = copy / "attune.db"
    assert (copy / "adapters").is_dir() and not (copy / "models").exists() and not (copy / "memory").exists()
    assert cli("restore", str(copy), data_dir=data).returncode == 2  # never into a data dir that holds anything
    out = cli("restore", str(copy), data_dir=restored)
    assert out.returncode == 0, out.stderr
    for table in TABLES:  # the restored rows are the snapshot's, and every one of them was in the live data dir
        got, live = rows(restored / "attune.db", table), rows(data / "attune.db", table)
        assert got == rows(snapshot, table) or table == "adapter_versions"
        if table == "messages":
            assert set(got) <= set(live) and all(got[i] == live[i] for i in got)
            answered = {a["attune"]["message_id"] for a in acknowledged[:done_before]}
            assert answered <= set(got)  # every answer acknowledged before the backup began is in it
    assert rows(restored / "attune.db", "active_adapters").keys() == rows(data / "attune.db", "active_adapters").keys()
    with Server(restored, *flags) as again:
        after = httpx.post(again.base + "/v1/chat/completions", json=ask, headers=headers, timeout=60).json()
    assert after["system_fingerprint"] == before["system_fingerprint"] == "attune-adapter-v1"
    assert after["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]


def test_restore_refuses_a_damaged_backup(tmp_path):
    data, copy = tmp_path / "data", tmp_path / "backup"
    cli("users", "add", "bob", data_dir=data, stdin="battery staple\n")
    assert cli("backup", str(copy), data_dir=data).returncode == 0
    assert cli("backup", str(copy), data_dir=data).returncode == 2  # an existing backup is never overwritten
    with open(copy / "attune.db", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    out = cli("restore", str(copy), data_dir=tmp_path / "fresh")
    assert out.returncode == 2 and "damaged" in out.stderr
    assert not (tmp_path / "fresh" / "attune.db").exists()


def test_restore_of_a_folder_that_is_no_backup(tmp_path):
    (tmp_path / "nothing").mkdir()
    out = cli("restore", str(tmp_path / "nothing"), data_dir=tmp_path / "fresh")
    assert out.returncode == 2 and "attune-backup.json" in out.stderr
