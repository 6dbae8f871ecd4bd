"""The vLLM engine against a real vLLM server (``make test-vllm``): per-user adapters in concurrent
requests answer exactly like the transformers engine (greedy, float32), a newly published version
answers the next turn, a base-model request in a mixed batch is right, a bad adapter is a clear error,
and ``launch.py serve --engine vllm`` serves the API with per-user adapters.

Skipped, with the reason, when the vLLM venv (``make vllm``) is absent: never faked. One server for the
module (it takes about a minute to start), stopped at the end.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from assistant.chat.service import TurnOptions
from assistant.engines.base import GenerationSettings
from conftest import seed_models
from helpers import ROOT, Server, cli

VENV = Path(os.environ.get("ATTUNE_VLLM_VENV", ROOT / ".venv-vllm"))
pytestmark = [
    pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(not (VENV / "bin" / "python").is_file(),
                       reason=f"no vLLM venv at {VENV}: run `make vllm`, then `make test-vllm`"),
]
GREEDY = GenerationSettings(max_new_tokens=20, temperature=0, repetition_penalty=1.0)
PROMPTS = ["What is the capital of France?", "Name a fruit that is yellow.", "Say hello to my dog Biscuit.",
           "What colour is the sky?"]


@pytest.fixture(scope="module")
def vllm_dd(embedded_models_dir, tmp_path_factory):
    """A data dir holding the converted embedded model, shared by the module's stores and the server."""
    from storage import DataDir

    dd = DataDir(tmp_path_factory.mktemp("vllm-data")).ensure()
    seed_models(dd.root, embedded_models_dir)
    return dd


@pytest.fixture(scope="module")
def vllm_url(vllm_dd):
    from assistant.engines.vllm.backend import VLLMConfig
    from assistant.engines.vllm.server import VLLMServer
    from assistant.model import resolve_model_dir

    cfg = VLLMConfig(venv=str(VENV), dtype="float32", max_loras=4, max_loaded=8, nice=5)
    server = VLLMServer(cfg, resolve_model_dir("embedded", vllm_dd), 1024, vllm_dd.root / "vllm.log")
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="module")
def hf_loaded(vllm_dd):
    from assistant.model import ModelConfig, load_model

    return load_model(ModelConfig(quant="none", device="cpu", dtype="float32"), vllm_dd)


@pytest.fixture
def vstore(vllm_dd, tmp_path):
    from storage import Store

    seed_models(tmp_path / "data", vllm_dd.models)
    s = Store(tmp_path / "data")
    yield s
    s.close()


def engines(store, vllm_url, hf_loaded, max_loaded: int = 8):
    """(vLLM engine, transformers engine) over the same store: the same ChatService, two backends."""
    from assistant.chat.service import ChatConfig, ChatService
    from assistant.engines.hf.backend import BatchConfig, TransformersBackend
    from assistant.engines.hf.registry import AdapterRegistry
    from assistant.engines.vllm.backend import VLLMBackend, VLLMConfig
    from assistant.model import resolve_model_dir

    cfg = ChatConfig(context_tokens=1024, defaults=GREEDY)
    vllm = VLLMBackend(VLLMConfig(url=vllm_url, max_loaded=max_loaded), resolve_model_dir("embedded", store.data_dir),
                       store.data_dir, "SmolLM2-135M-Instruct", 1024)
    hf = TransformersBackend(hf_loaded, 1024, AdapterRegistry(hf_loaded.model), BatchConfig(max_batch=1))
    return ChatService(store, vllm, cfg), ChatService(store, hf, cfg)


def publish(store, user_id: int, seed: int, **lora) -> int:
    """A random rank-8 LoRA on all linear layers, published through storage like training does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from assistant.model import resolve_model_dir

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir("embedded", store.data_dir), dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                                              "init_lora_weights": False, **lora}))
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.mul_(0.3)  # strong enough to change answers, not so strong they become noise
    staging = store.data_dir.adapters(user_id) / f".staging-j{seed}"
    peft.save_pretrained(staging)
    return store.adapters.publish(user_id, staging, base_model="test", metrics={}, gate_reason="test",
                                  parent_version=None, job_id=None)


def ask(engine, user_id: int, text: str, **kw):
    turn = None
    for turn in engine.send(user_id, None, text, TurnOptions(GREEDY, **kw)):
        pass
    return turn


def concurrently(engine, jobs: list[tuple[int, str]]) -> list:
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(jobs))

    def run(i):
        barrier.wait()
        results[i] = ask(engine, *jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(jobs))]


def test_three_users_concurrently_answer_like_transformers(vstore, vllm_url, hf_loaded):
    users = [vstore.users.create(f"user{i}", "correct horse").id for i in range(3)]
    for i, u in enumerate(users):  # different versions: user i has i + 1 published versions
        for v in range(i + 1):
            publish(vstore, u, seed=10 * i + v)
    vllm, hf = engines(vstore, vllm_url, hf_loaded)
    jobs = [(u, p) for u, p in zip(users, PROMPTS, strict=False)]
    got = concurrently(vllm, jobs)
    want = [ask(hf, u, p) for u, p in jobs]
    assert [t.status for t in got] == ["complete"] * 3, [t.error for t in got]
    assert [t.adapter_version for t in got] == [1, 2, 3] == [t.adapter_version for t in want]
    assert [t.text for t in got] == [t.text for t in want]
    base = [ask(hf, u, p, use_adapter=False).text for u, p in jobs]
    assert [t.text for t in got] != base  # the adapters really changed the answers
    vllm.backend.close()


def test_new_version_answers_the_next_turn(vstore, vllm_url, hf_loaded):
    alice = vstore.users.create("alice", "correct horse").id
    publish(vstore, alice, seed=1)
    vllm, hf = engines(vstore, vllm_url, hf_loaded)
    assert ask(vllm, alice, PROMPTS[0]).adapter_version == 1
    publish(vstore, alice, seed=2)  # published while serving
    turn = ask(vllm, alice, PROMPTS[0])
    assert turn.adapter_version == 2 and turn.text == ask(hf, alice, PROMPTS[0]).text
    vllm.backend.close()


def test_a_version_from_the_adapter_store_is_downloaded_and_served(vllm_dd, vllm_url, hf_loaded, tmp_path, s3_server,
                                                                   s3_url):
    """Issue 27, item 3 on vLLM: a worker's machine (A) publishes to S3; a vLLM serving machine (B: its own data
    dir, the same database) has never held the version, downloads it on the user's next turn, and vLLM answers
    with it exactly as transformers does with A's copy."""
    from storage import Store
    from storage.objects import AdapterStoreConfig

    db = f"sqlite:///{tmp_path / 'shared.db'}"
    for name in ("a", "b"):
        seed_models(tmp_path / name, vllm_dd.models)
    a = Store(tmp_path / "a", db, AdapterStoreConfig(s3_url, s3_server.endpoint))
    b = Store(tmp_path / "b", db, AdapterStoreConfig("", s3_server.endpoint))
    alice = a.users.create("alice", "correct horse").id
    assert publish(a, alice, seed=7) == 1
    row = b.adapters.get(alice, 1)
    assert row["location"].startswith("s3://") and not b.data_dir.adapters(alice).exists()
    vllm, _ = engines(b, vllm_url, hf_loaded)
    unused, hf = engines(a, vllm_url, hf_loaded)  # A's transformers engine, on A's own copy
    unused.backend.close()
    turn = ask(vllm, alice, PROMPTS[2])
    assert (turn.status, turn.adapter_version, turn.notice) == ("complete", 1, None), turn.error
    assert (b.data_dir.adapters(alice) / row["location"].rsplit("/", 1)[1] / "adapter_config.json").is_file()
    assert turn.text == ask(hf, alice, PROMPTS[2]).text != ask(hf, alice, PROMPTS[2], use_adapter=False).text
    vllm.backend.close()
    a.close()
    b.close()


def test_base_request_in_a_mixed_batch_is_correct(vstore, vllm_url, hf_loaded):
    users = [vstore.users.create(f"mixed{i}", "correct horse").id for i in range(3)]
    publish(vstore, users[1], seed=5)
    publish(vstore, users[2], seed=6)
    vllm, hf = engines(vstore, vllm_url, hf_loaded)
    jobs = [(users[0], PROMPTS[3]), (users[1], PROMPTS[1]), (users[2], PROMPTS[2])]
    for _ in range(2):  # the base row shares the batch with adapter rows
        got = concurrently(vllm, jobs)
        assert got[0].adapter_version is None
        assert [t.text for t in got] == [ask(hf, u, p).text for u, p in jobs]
    off = ask(vllm, users[1], PROMPTS[3], use_adapter=False)  # the per-request switch: base model
    assert off.adapter_version is None and off.text == ask(hf, users[0], PROMPTS[3]).text
    vllm.backend.close()


def test_stop_ends_the_stream_and_keeps_the_text(vstore, vllm_url, hf_loaded):
    dana = vstore.users.create("dana", "correct horse").id
    publish(vstore, dana, seed=11)
    vllm, _ = engines(vstore, vllm_url, hf_loaded)
    stop = threading.Event()
    long = GenerationSettings(max_new_tokens=400, temperature=0.7, seed=3)
    turn = None
    for turn in vllm.send(dana, None, "Tell me a long story about a dog.", TurnOptions(long, stop=stop)):
        if turn.text:
            stop.set()
    assert turn.status == "stopped" and turn.text and turn.stats.completion_tokens < 400
    assert vstore.chats.message(dana, turn.assistant_message_id)["status"] == "stopped"
    assert ask(vllm, dana, PROMPTS[0]).status == "complete"  # the server is fine afterwards
    vllm.backend.close()


def test_lru_unloads_old_versions(vstore, vllm_url, hf_loaded):
    users = [vstore.users.create(f"lru{i}", "correct horse").id for i in range(3)]
    for i, u in enumerate(users):
        publish(vstore, u, seed=30 + i)
    vllm, _ = engines(vstore, vllm_url, hf_loaded, max_loaded=2)  # the zero adapter + one user adapter
    for u in users:
        assert ask(vllm, u, PROMPTS[0]).adapter_version == 1
    assert len(vllm.backend.slots.loaded) == 2
    import httpx

    served = {m["id"] for m in httpx.get(f"{vllm_url}/v1/models").json()["data"]}
    from assistant.chat.adapters import resolve_adapter

    assert resolve_adapter(vstore, users[2]).name in served and resolve_adapter(vstore, users[0]).name not in served
    vllm.backend.close()


def test_an_adapter_vllm_cannot_serve_is_a_clear_error_and_a_damaged_one_falls_back(vstore, vllm_url, hf_loaded):
    bob = vstore.users.create("bob", "correct horse").id
    publish(vstore, bob, seed=7, r=4)  # rank 4: not one vLLM serves
    vllm, _ = engines(vstore, vllm_url, hf_loaded)
    turn = ask(vllm, bob, PROMPTS[0])
    assert turn.status == "error" and "cannot be served by vLLM" in turn.error and "--rollback" in turn.error
    assert vstore.chats.message(bob, turn.assistant_message_id)["status"] == "error"  # logged, like any turn
    carol = vstore.users.create("carol", "correct horse").id
    publish(vstore, carol, seed=8)
    publish(vstore, carol, seed=10)
    weights = Path(vstore.adapters.active(carol)["path"]) / "adapter_model.safetensors"
    raw = weights.read_bytes()  # cut short: found before vLLM reads it, and the version before it answers
    weights.write_bytes(raw[:8 + int.from_bytes(raw[:8], "little") + 64])
    turn = ask(vllm, carol, PROMPTS[0])
    assert turn.status == "complete" and turn.text and vstore.adapters.active_version(carol) == 1, turn.error
    publish(vstore, carol, seed=9)
    (Path(vstore.adapters.active(carol)["path"]) / "adapter_model.safetensors").write_bytes(b"garbage")
    turn = ask(vllm, carol, PROMPTS[0])
    assert turn.status == "complete" and turn.text and vstore.adapters.active_version(carol) == 1, turn.error
    vllm.backend.close()


def test_serve_engine_vllm_serves_the_api_and_ui(vllm_dd, vllm_url, tmp_path):
    data = tmp_path / "srv"
    seed_models(data, vllm_dd.models)
    assert cli("users", "add", "carol", data_dir=data, stdin="correct horse\n").returncode == 0
    key = cli("users", "key", "carol", data_dir=data).stdout.strip()
    from storage import Store

    store = Store(data)
    publish(store, store.users.by_name("carol").id, seed=9)
    store.close()
    from openai import OpenAI

    with Server(data, "--engine", "vllm", "--vllm-url", vllm_url, "--no-personalizer", "--no-memory",
                "--dtype", "float32", timeout=300) as srv:
        client = OpenAI(base_url=srv.base + "/v1", api_key=key)
        r = client.chat.completions.create(model="attune", messages=[{"role": "user", "content": PROMPTS[0]}],
                                           temperature=0, max_tokens=12)
        assert r.choices[0].message.content and r.system_fingerprint == "attune-adapter-v1"
        chunks = list(client.chat.completions.create(model="attune", stream=True, max_tokens=8, temperature=0,
                                                     messages=[{"role": "user", "content": PROMPTS[1]}],
                                                     extra_body={"use_adapter": False}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        import urllib.request

        assert b"<html" in urllib.request.urlopen(srv.base + "/", timeout=30).read().lower()
    logged = json.loads(cli("export", "carol", data_dir=data).stdout)
    assert {m.get("adapter_version") for c in logged["conversations"] for m in c["messages"]
            if m["role"] == "assistant"} == {1, None}
