"""Several serving processes on one PostgreSQL (issue 27, items 4 and 5).

In process: two memory services with their own data dirs (their own FAISS files) on one database, as two
``launch.py serve`` processes have; a memory one adds, deletes, replaces or brings back is found or dropped by the
other's next retrieval. Across processes (the ``make test-scale`` story): PostgreSQL and moto_server on loopback, two
``launch.py worker`` and two ``launch.py serve --workers external`` processes with their own data dirs, driven through
the official ``openai`` client; every process is stopped by its PID.
"""

from __future__ import annotations

import pytest
from test_memory import make_service

from storage import Store


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
