"""Serving speed on the embedded model: time to first token and decode tok/s for the base model,
with a LoRA adapter, and N concurrent users with different adapters (one mixed-adapter batch) vs
the same requests serialized; adapter cold load / warm switch / publish-to-first-use; llama.cpp
on the same GGUF as the anchor when ``llama-cpp-python`` is installed."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "Explain in a few sentences why the sky is blue, and give one everyday example."


def _publish(store, user_id: int, version: int, model_path: Path, seed: int) -> None:
    """A random (non-zero) rank-16 LoRA on all linear layers, published as the user's active version."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from storage.db import utcnow

    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                          LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    for p in peft.parameters():
        if p.requires_grad:
            p.data *= 0.05  # small, like a trained adapter
    path = store.data_dir.adapters(user_id) / f"v{version}"
    peft.save_pretrained(path)
    with store.write() as db:
        db["adapter_versions"].insert({"user_id": user_id, "version": version,
                                       "path": str(path.relative_to(store.data_dir.root)), "base_model": "bench",
                                       "status": "published", "created_at": utcnow()})
        db["active_adapters"].upsert({"user_id": user_id, "version": version, "updated_at": utcnow()},
                                     pk="user_id")


def _one(backend, ids, tokens, adapter=None):
    from assistant.backend import GenerationSettings, StreamStats

    stats = StreamStats()
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    started = time.perf_counter()
    for _ in backend.stream(ids, settings, threading.Event(), stats, adapter):
        pass
    total = time.perf_counter() - started
    decode = (stats.completion_tokens - 1) / max(total - stats.ttft_ms / 1000, 1e-9)
    return {"ttft_ms": stats.ttft_ms, "decode_tok_s": decode, "tokens": stats.completion_tokens, "total_s": total,
            "adapter": stats.adapter_version}


def _concurrent(backend, ids, tokens, adapters) -> dict:
    """One request per adapter reference, all at once."""
    results, barrier = {}, threading.Barrier(len(adapters))

    def go(i):
        barrier.wait()
        results[i] = _one(backend, ids, tokens, adapters[i])

    started = time.perf_counter()
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(adapters))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    produced = sum(r["tokens"] for r in results.values())
    return {"wall_s": wall, "tokens": produced, "aggregate_tok_s": produced / wall,
            "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in results.values())}


# Over 60 lines on purpose: one measurement script, its steps in run order, sharing one loaded model and users.
def run(quick: bool = False) -> dict:
    import torch

    from assistant.adapters import AdapterRegistry, resolve_adapter
    from assistant.backend import BatchConfig, TransformersBackend
    from assistant.model import ModelConfig, load_model
    from bench.common import models_dir
    from storage import DataDir, Store

    tokens, repeats = (16, 1) if quick else (64, 3)
    data = DataDir(Path(tempfile.mkdtemp(prefix="attune-serving-"))).ensure()
    (data.root / "models").rmdir()
    (data.root / "models").symlink_to(models_dir() / "models")
    store = Store(data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(ModelConfig(quant="auto", device=device), data)
    users = [store.users.create(f"user{i}", "correct horse").id for i in range(9)]
    for i, u in enumerate(users[1:], 1):
        _publish(store, u, 1, loaded.path, seed=i)
    registry = AdapterRegistry(loaded.model)

    def ref(user_id):  # what ChatEngine does on every turn: the user's active version, read from SQLite
        return resolve_adapter(store, user_id)

    batched = TransformersBackend(loaded, 2048, registry, BatchConfig(max_batch=8, window_ms=20))
    ids = batched.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    out: dict = {"device": device, "quant": loaded.quant, "dtype": loaded.dtype, "prompt_tokens": len(ids),
                 "new_tokens": tokens}

    # Adapters: cold load (first use), warm switch (already loaded).
    started = time.perf_counter()
    adapter = registry.acquire(ref(users[1]))
    out["adapter_cold_load_ms"] = (time.perf_counter() - started) * 1000
    registry.release(adapter)
    warm = []
    for _ in range(20):
        started = time.perf_counter()
        adapter = registry.acquire(ref(users[1]))
        warm.append((time.perf_counter() - started) * 1000)
        registry.release(adapter)
    out["adapter_warm_switch_ms"] = statistics.median(warm)
    _one(batched, ids, 4)  # warm-up

    def median_of(fn):
        runs = [fn() for _ in range(repeats)]
        return {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "decode_tok_s", "total_s")}

    out["base"] = median_of(lambda: _one(batched, ids, tokens, ref(users[0])))
    out["adapter"] = median_of(lambda: _one(batched, ids, tokens, ref(users[1])))

    # Publish-to-first-use: a new version lands in SQLite; the next request loads it and answers.
    _publish(store, users[1], 2, loaded.path, seed=99)
    started = time.perf_counter()
    first = _one(batched, ids, 1, ref(users[1]))
    out["publish_to_first_token_ms"] = (time.perf_counter() - started) * 1000
    assert first["adapter"] == 2

    serial = TransformersBackend(loaded, 2048, registry, BatchConfig(max_batch=1, window_ms=0))
    out["concurrency"] = []
    for n in (1, 4) if quick else (1, 4, 8):
        group = [ref(u) for u in (users[1:n + 1] if n > 1 else users[1:2])]
        _concurrent(batched, ids, 4, group)  # warm-up: cold adapter loads are measured above, not here
        out["concurrency"].append({"users": n, "batched": _concurrent(batched, ids, tokens, group),
                                   "serialized": _concurrent(serial, ids, tokens, group)})
    # Last: merging touches the shared base weights (restored exactly afterwards, but measured after the rest).
    out["adapter_merged"] = _merged(registry, ref(users[1]), lambda: median_of(lambda: _one(batched, ids, tokens,
                                                                                              ref(users[1]))))
    batched.close()
    serial.close()
    out["llama_cpp"] = _llama_cpp(tokens) if not quick else None
    return out


def _merged(registry, ref, measure) -> dict:
    """A lone user's adapter merged into the base weights (no LoRA matmuls per layer): its speed, and
    whether unmerging gives the base weights back exactly (other users share them)."""
    import torch

    model = registry.model
    adapter = registry.acquire(ref)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    try:
        model.merge_adapter(adapter_names=[adapter.name])
        speed = measure()
    finally:
        model.unmerge_adapter()
        registry.release(adapter)
    params = dict(model.named_parameters())
    with torch.no_grad():
        changed = sum(int((params[n] != w).sum()) for n, w in before.items())
        for n, w in before.items():  # put the exact base weights back for the rest of the bench
            params[n].copy_(w)
    return {**speed, "changed_after_unmerge": changed, "base_weights": sum(w.numel() for w in before.values()),
            "dtype": str(next(iter(before.values())).dtype).removeprefix("torch.")}


def _llama_cpp(tokens: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from assistant.model import embedded_gguf

    llm = Llama(model_path=str(embedded_gguf()), n_threads=os.cpu_count() or 1, n_ctx=1024, verbose=False)
    messages = [{"role": "user", "content": PROMPT}]
    llm.create_chat_completion(messages, max_tokens=4, temperature=0)
    runs = []
    for _ in range(3):
        llm.reset()  # no reuse of the previous run's prompt cache: TTFT includes the prefill
        started = time.perf_counter()
        first, n = None, 0
        for chunk in llm.create_chat_completion(messages, max_tokens=tokens, temperature=0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                n += 1  # one chunk per generated token
                first = first or time.perf_counter()
        end = time.perf_counter()
        runs.append({"ttft_ms": (first - started) * 1000, "decode_tok_s": (n - 1) / (end - first), "tokens": n})
    import llama_cpp

    return {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "decode_tok_s", "tokens")} | {
        "version": llama_cpp.__version__, "threads": os.cpu_count() or 1}


def render(r: dict) -> str:
    from bench.report import table

    rows = [["base model", r["base"]["ttft_ms"], r["base"]["decode_tok_s"]],
            ["with a LoRA adapter (r=16, all linear)", r["adapter"]["ttft_ms"], r["adapter"]["decode_tok_s"]]]
    merged = r.get("adapter_merged")
    if merged:
        rows.append(["the adapter merged into the weights (a lone user)", merged["ttft_ms"], merged["decode_tok_s"]])
    anchor = r.get("llama_cpp")
    if anchor:
        rows.append([f"llama.cpp {anchor.get('version', '')}, same GGUF (Q4_1), {anchor.get('threads', 2)} threads "
                     "(anchor)", anchor["ttft_ms"], anchor["decode_tok_s"]])
    conc = [[c["users"], c["batched"]["aggregate_tok_s"], c["serialized"]["aggregate_tok_s"],
             c["batched"]["aggregate_tok_s"] / c["serialized"]["aggregate_tok_s"], c["batched"]["ttft_ms_p50"],
             c["serialized"]["ttft_ms_p50"]] for c in r["concurrency"]]
    if merged:
        gain = merged["decode_tok_s"] / r["adapter"]["decode_tok_s"]
        ratio_merge = (f"Merging a lone user's adapter into the weights decodes at {gain:.2f}× the unmerged adapter's "
                       "speed here")
        if merged["changed_after_unmerge"]:
            ratio_merge += (f", and unmerging in {merged['dtype']} does not give the shared base weights back "
                            f"({merged['changed_after_unmerge']:,} of {merged['base_weights']:,} differ afterwards), "
                            "which would drift every other user's base model with each switch")
        ratio_merge += "; so Attune keeps adapters unmerged and routes rows through them (peft `adapter_names`)."
    else:
        ratio_merge = ""
    ratio = (f"Ours vs llama.cpp decode: **{r['base']['decode_tok_s'] / anchor['decode_tok_s']:.2f}×** (llama.cpp "
             "reads 4-bit Q4_1 weights with hand-tuned kernels; Attune de-quantizes them to "
             f"{r.get('dtype', 'float32')} so that peft adapters apply; bitsandbytes 4-bit is slower on CPU, "
             "see the configuration search above)."
             if anchor else "llama.cpp anchor: not measured in this run (install the `anchor` extra, "
             "`pip install llama-cpp-python`, then `python -m bench --only serving`).")
    return "\n".join([
        f"Embedded SmolLM2-135M-Instruct, `--quant {r['quant']}` ({r.get('dtype', 'float32')}) on {r['device']}, "
        f"{r['prompt_tokens']}-token "
        f"prompt, {r['new_tokens']} new tokens, greedy; through Attune's backend (streaming included).", "",
        table(["", "TTFT ms", "decode tok/s"], rows), "", ratio, *([ratio_merge] if ratio_merge else []), "",
        "Concurrent users, each with their own adapter, one mixed-adapter batch vs the same requests serialized:", "",
        table(["users", "batched tok/s", "serialized tok/s", "gain", "batched TTFT p50 ms", "serialized TTFT p50 ms"],
              conc), "",
        table(["adapter cold load ms", "warm switch ms", "publish → first token ms"],
              [[r["adapter_cold_load_ms"], r["adapter_warm_switch_ms"], r["publish_to_first_token_ms"]]]),
    ])
