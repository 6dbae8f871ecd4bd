"""Security promises that need no browser: no outbound network at run time, the UI's internal
events are not a callable API, another user's data is unreachable by id or file path."""

from __future__ import annotations

import ipaddress
import json
import socket

import pytest

from assistant.backend import GenerationSettings
from storage import DataDir, NotFound
from storage.paths import _uid


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection beyond loopback raises (and is recorded)."""
    attempts = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host in ("localhost",) or isinstance(address, str)  # unix sockets are local
        if not loopback:
            attempts.append(address)
            raise OSError(f"blocked outbound connection to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns(socket.getaddrinfo, attempts))
    return attempts


def _no_dns(real, attempts):
    def lookup(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            attempts.append(("dns", host))
            raise socket.gaierror(f"blocked DNS lookup of {host!r}")
        return real(host, *args, **kwargs)
    return lookup


def test_full_chat_memory_and_training_without_network(no_network, store, alice, tiny_model_dir, tmp_path):
    from assistant.backend import TransformersBackend
    from assistant.engine import ChatConfig, ChatEngine
    from assistant.memory import MemoryConfig, MemoryService
    from assistant.model import ModelConfig, load_model
    from personalize.api import train_now
    from personalize.config import TrainConfig
    from storage.transfer import import_history

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), quant="none", device="cpu"),
                        DataDir(tmp_path / "m").ensure())
    memory = MemoryService(store, MemoryConfig())  # the real packaged MiniLM, offline
    engine = ChatEngine(store, TransformersBackend(loaded, 512), ChatConfig(context_tokens=512), memory)
    turn = None
    for turn in engine.send(alice.id, None, "My dog is called Biscuit.", GenerationSettings(max_new_tokens=4)):
        pass
    assert turn.status == "complete" and store.memories.count(alice.id) == 1
    history = tmp_path / "h.jsonl"
    history.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                          {"role": "assistant", "content": f"Answer {i}."}]})
                                 for i in range(8)))
    import_history(store, alice.id, history)
    result = train_now(store, alice.id, ModelConfig(model=str(tiny_model_dir), quant="none", device="cpu"),
                       TrainConfig(rank=4, alpha=8, epochs=1, max_steps=4, max_seq_len=64, anchor_count=4,
                                   anchor_max_new_tokens=4, anchor_margin=100.0, mixed_precision="no"))
    assert result["job_id"] and result["reason"]
    assert no_network == []


def test_ui_events_are_not_a_public_api(engine):
    from fastapi.testclient import TestClient

    from assistant.server import build_app

    client = TestClient(build_app(engine))
    info = client.get("/gradio_api/info")
    assert info.status_code == 200
    assert info.json()["named_endpoints"] == {} and info.json()["unnamed_endpoints"] == {}


def test_user_ids_never_become_free_form_paths(tmp_path):
    dd = DataDir(tmp_path)
    assert dd.adapters(7).name == "u7" and dd.memory_index(7).name == "u7.faiss"
    for bad in ("../../etc", "7", -1, 0, True, 2.5):
        with pytest.raises(ValueError):
            _uid(bad)


def test_ids_of_another_user_look_like_missing_ones(store, alice, bob):
    cid = store.chats.create_conversation(alice.id)
    mid = store.chats.add_message(alice.id, cid, "user", "private")
    for getter in (lambda: store.chats.message(bob.id, mid), lambda: store.chats.messages(bob.id, cid),
                   lambda: store.memories.get(bob.id, 1), lambda: store.jobs.get(bob.id, 1),
                   lambda: store.adapters.get(bob.id, 1)):
        with pytest.raises(NotFound):
            getter()
