"""Serving per-user adapters: lazy load, hot reload, LRU, per-request switch, mixed-adapter batches."""

from __future__ import annotations

import threading

import pytest

from assistant.chat.adapters import resolve_adapter
from assistant.chat.service import ChatConfig, ChatService, TurnOptions
from assistant.engines.base import GenerationSettings
from assistant.engines.hf.backend import BatchConfig, TransformersBackend
from assistant.engines.hf.registry import AdapterConfig, AdapterRegistry
from assistant.model import ModelConfig, load_model
from storage import DataDir
from storage.db import utcnow

GREEDY = GenerationSettings(max_new_tokens=10, temperature=0, repetition_penalty=1.0)


def publish_random_adapter(store, tiny_model_dir, user_id: int, version: int, seed: int) -> None:
    """A LoRA with random (non-zero) weights written where the personalizer publishes, made active."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear",
                                           init_lora_weights=False))
    path = store.data_dir.adapters(user_id) / f"v{version}"
    peft.save_pretrained(path)
    with store.write() as db:
        db["adapter_versions"].insert({"user_id": user_id, "version": version, "path": str(path),
                                       "base_model": "tiny", "status": "published", "created_at": utcnow()})
        db["active_adapters"].upsert({"user_id": user_id, "version": version, "updated_at": utcnow()},
                                     pk="user_id")


@pytest.fixture
def serving(store, tiny_model_dir, tmp_path):
    def make(max_batch=8, max_loaded=16):
        loaded = load_model(ModelConfig(model=str(tiny_model_dir), quant="none", device="cpu", dtype="float32"),
                            DataDir(tmp_path / "m").ensure())
        registry = AdapterRegistry(loaded.model, AdapterConfig(max_loaded=max_loaded))
        backend = TransformersBackend(loaded, 512, registry, BatchConfig(max_batch=max_batch, window_ms=200))
        return ChatService(store, backend, ChatConfig(context_tokens=512, defaults=GREEDY))
    return make


def answer(engine, user, text, **kw):
    turn = None
    for turn in engine.send(user.id, None, text, TurnOptions(GREEDY, **kw)):
        pass
    return turn


def make_users(store, n):
    return [store.users.create(f"user{i}", "correct horse") for i in range(n)]


def test_active_adapter_is_served_and_hot_reloaded(serving, store, tiny_model_dir, alice):
    engine = serving()
    base = answer(engine, alice, "Hello there")
    assert base.adapter_version is None
    publish_random_adapter(store, tiny_model_dir, alice.id, 1, seed=1)
    v1 = answer(engine, alice, "Hello there")
    assert v1.adapter_version == 1 and v1.text != base.text
    assert store.chats.message(alice.id, v1.assistant_message_id)["adapter_version"] == 1
    publish_random_adapter(store, tiny_model_dir, alice.id, 2, seed=2)  # published while serving
    v2 = answer(engine, alice, "Hello there")
    assert v2.adapter_version == 2
    off = answer(engine, alice, "Hello there", use_adapter=False)
    assert off.adapter_version is None and off.text == base.text
    store.users.set_personalization(alice.id, False)
    assert answer(engine, alice, "Hello there").adapter_version is None


def test_lru_keeps_the_loaded_count_bounded(serving, store, tiny_model_dir):
    engine = serving(max_loaded=2)
    users = make_users(store, 3)
    for i, u in enumerate(users):
        publish_random_adapter(store, tiny_model_dir, u.id, 1, seed=10 + i)
        assert answer(engine, u, "Hi").adapter_version == 1
    assert engine.backend.registry.loaded() == [resolve_adapter(store, u.id).name for u in users[1:]]


def test_mixed_adapter_batch_matches_each_user_alone(serving, store, tiny_model_dir):
    users = make_users(store, 4)
    for i, u in enumerate(users[:3]):  # the 4th user has no adapter: base rows in the same batch
        publish_random_adapter(store, tiny_model_dir, u.id, 1, seed=20 + i)
    prompts = ["Hello there", "My dog is called Biscuit", "The capital of France", "I prefer tea"]
    alone_engine = serving(max_batch=1)
    alone = [answer(alone_engine, u, p).text for u, p in zip(users, prompts, strict=True)]
    engine = serving(max_batch=8)
    results: dict[int, object] = {}
    barrier = threading.Barrier(4)

    def run(i):
        barrier.wait()
        results[i] = answer(engine, users[i], prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(engine.backend.batch_sizes) > 1  # really batched together
    assert [results[i].text for i in range(4)] == alone
    assert [results[i].adapter_version for i in range(4)] == [1, 1, 1, None]
