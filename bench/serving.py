"""Serving speed on the embedded model, both in-process engines side by side in one run: time to first token
and decode tok/s for the base model and with a LoRA adapter, N concurrent users with different adapters vs
the same requests serialized, the time to first token of requests arriving while the engine is busy, adapter
cold load / warm switch / publish-to-first-use; plain llama-cpp-python on the same GGUF as the anchor.
The llama.cpp engine rows need ``llama-cpp-python`` and llama.cpp's converter (``make setup``)."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from assistant.engines.llamacpp.gguf_lora import converter_dir

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
    from assistant.engines.base import GenerationSettings, StreamStats

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

    from assistant.chat.adapters import resolve_adapter
    from assistant.engines.hf.backend import BatchConfig, TransformersBackend
    from assistant.engines.hf.registry import AdapterRegistry
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

    def ref(user_id):  # what ChatService does on every turn: the user's active version, read from SQLite
        return resolve_adapter(store, user_id)

    batched = TransformersBackend(loaded, 2048, registry)  # BatchConfig defaults, as `serve` runs it
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
        for engine in (batched, serial):  # warm-up: cold adapter loads are measured above, not here
            _concurrent(engine, ids, 4, group)
        out["concurrency"].append({"users": n, "batched": _concurrent(batched, ids, tokens, group),
                                   "serialized": _concurrent(serial, ids, tokens, group)})
    out["late_arrival"] = {"transformers": _late(batched, ids, tokens, [ref(u) for u in users[1:9]], quick)}
    batched.close()
    serial.close()
    out["llama_cpp"] = _llama_cpp(tokens) if not quick else None
    from assistant.engines.llamacpp.backend import available

    if available() and converter_dir() is not None:
        # its own process, as `serve --engine llamacpp` runs it: torch's worker threads of the measurements above
        # would otherwise compete with llama.cpp's for the 2 cores (measured: 35 vs 100 tok/s with an adapter)
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        for part in ("engine", "q8_0"):  # each in a fresh process: no llama.cpp threads left from the other
            child = ctx.Process(target=_llamacpp_child, args=(part, str(data.root), users, str(loaded.path), ids,
                                                             tokens, repeats, quick, results))
            child.start()
            out.setdefault("llamacpp_engine", {}).update(results.get())
            child.join()
        out["late_arrival"]["llamacpp"] = out["llamacpp_engine"].pop("late")
    return out


def _llamacpp_child(part: str, root: str, users: list[int], model_dir: str, ids, tokens: int, repeats: int,
                    quick: bool, results) -> None:
    from assistant.chat.adapters import resolve_adapter
    from storage import DataDir, Store

    store = Store(DataDir(Path(root)))
    if part == "engine":
        results.put(_llamacpp_engine(store, users, Path(model_dir), ids, tokens, repeats, quick,
                                     lambda u: resolve_adapter(store, u)))
        return
    refs = [resolve_adapter(store, u) for u in users[1:9]]
    results.put({"q8_0": _q8(Path(model_dir), ids, tokens, _short_prompts(Path(model_dir)), refs, quick)})


LATE = 8
"""Requests that arrive, one every ``LATE_GAP_S``, while the engine decodes 8 users' answers."""
LATE_GAP_S = 0.25


def _late(backend, ids, tokens: int, busy: list, quick: bool) -> dict:
    """TTFT of requests arriving while ``len(busy)`` answers of ``tokens`` tokens are being decoded."""
    from assistant.engines.base import GenerationSettings, StreamStats

    long = GenerationSettings(max_new_tokens=tokens * 2, temperature=0, repetition_penalty=1.0)
    threads = [threading.Thread(target=lambda r=r: [None for _ in backend.stream(ids, long, threading.Event(),
                                                                                 StreamStats(), r)]) for r in busy]
    for t in threads:
        t.start()
    time.sleep(1.0)  # they are decoding now
    ttfts: list[float] = []
    late = []
    for i in range(2 if quick else LATE):
        def one(ref=busy[i % len(busy)]):
            ttfts.append(_one(backend, ids, 4, ref)["ttft_ms"])
        late.append(threading.Thread(target=one))
        late[-1].start()
        time.sleep(LATE_GAP_S)
    for t in late + threads:
        t.join()
    ttfts.sort()
    return {"n": len(ttfts), "busy": len(busy), "ttft_ms_p50": statistics.median(ttfts),
            "ttft_ms_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))], "ttft_ms_max": ttfts[-1]}


# Over 60 lines on purpose: the llama.cpp engine's measurements in run order, on the users run() published.
def _llamacpp_engine(store, users: list[int], model_dir: Path, ids, tokens: int, repeats: int, quick: bool,
                     ref) -> dict:
    """The llama.cpp engine (assistant.engines.llamacpp.backend) on the shipped GGUF, with the same users' adapters
    converted as a publish converts them."""
    from assistant.engines.llamacpp.backend import LlamaCppBackend, LlamaCppConfig
    from assistant.engines.llamacpp.gguf_lora import convert, gguf_path
    from assistant.model import embedded_gguf

    started = time.perf_counter()
    for u in users[1:9]:
        convert(Path(ref(u).path), model_dir)
    out: dict = {"convert_s_per_adapter": (time.perf_counter() - started) / 8}
    fast = LlamaCppBackend(embedded_gguf(), model_dir, "smol", LlamaCppConfig(), 2048)
    _one(fast, ids, 4)  # warm-up (first context)
    started = time.perf_counter()
    first = _one(fast, ids, 1, ref(users[1]))
    out["adapter_cold_load_ms"] = fast.load_seconds[0] * 1000
    out["adapter_first_request_ms"] = (time.perf_counter() - started) * 1000
    assert first["adapter"] == ref(users[1]).version

    def median_of(fn):
        runs = [fn() for _ in range(repeats)]
        return {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "decode_tok_s", "total_s")}

    # the same prompt again: a slot that holds it prefills only its last token (TTFT of a repeated prompt)
    out["base"] = median_of(lambda: _one(fast, ids, tokens, None))
    out["adapter"] = median_of(lambda: _one(fast, ids, tokens, ref(users[1])))
    # a new question each time (only the chat template's opening is in a KV cache): TTFT of a short prompt
    short = _short_prompts(model_dir)
    out["ttft_short_ms"] = statistics.median(
        _one(fast, list(s["input_ids"] if hasattr(s, "keys") else s), 2, ref(users[1]))["ttft_ms"] for s in short)
    out["short_prompt_tokens"] = len(short[0]["input_ids"] if hasattr(short[0], "keys") else short[0])
    out["concurrency"] = []
    for n in (1, 4) if quick else (1, 4, 8):
        group = [ref(u) for u in users[1:n + 1]]
        _concurrent(fast, ids, 4, group)
        out["concurrency"].append({"users": n, "batched": _concurrent(fast, ids, tokens, group),
                                   "serialized": _serial(fast, ids, tokens, group)})
    out["late"] = _late(fast, ids, tokens, [ref(u) for u in users[1:9]], quick)
    out["gguf_mb"] = gguf_path(Path(ref(users[1]).path)).stat().st_size / 1e6
    fast.close()
    return out


def _short_prompts(model_dir: Path) -> list:
    """New short questions (only the chat template's opening is in a KV cache): TTFT of a short prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.apply_chat_template([{"role": "user", "content": f"Name {w} animals of the sea."}],
                                    add_generation_prompt=True, tokenize=True)
            for w in ("two", "three", "four", "five", "six")]


def _serial(backend, ids, tokens, adapters) -> dict:
    """The same requests one at a time on the same engine (each waits for the one before: its TTFT includes that)."""
    started, waited, ttfts, produced = time.perf_counter(), 0.0, [], 0
    for ref in adapters:
        one = _one(backend, ids, tokens, ref)
        ttfts.append(waited * 1000 + one["ttft_ms"])
        waited += one["total_s"]
        produced += one["tokens"]
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": produced, "aggregate_tok_s": produced / wall,
            "ttft_ms_p50": statistics.median(ttfts)}


def _q8(model_dir: Path, ids, tokens: int, short, busy: list, quick: bool) -> dict | None:
    """The llama.cpp engine on ``--llamacpp-weights q8_0`` (llama.cpp's Q8_0 of the transformers weights)."""
    from assistant.engines.llamacpp.backend import LlamaCppBackend, LlamaCppConfig
    from assistant.engines.llamacpp.gguf_lora import BASE_NAME, serving_weights
    from assistant.model import embedded_gguf

    written = (model_dir / BASE_NAME).is_file()
    started = time.perf_counter()
    weights = serving_weights(model_dir, embedded_gguf())
    if weights.name != BASE_NAME:
        return None
    out = {"convert_s": None if written else time.perf_counter() - started}
    q8 = LlamaCppBackend(weights, model_dir, "smol-q8", LlamaCppConfig(weights="q8_0"), 2048)
    _one(q8, ids, 4, busy[0])
    out["adapter"] = {k: statistics.median(r[k] for r in [_one(q8, ids, tokens, busy[0]) for _ in range(3)])
                      for k in ("ttft_ms", "decode_tok_s")}
    out["ttft_short_ms"] = statistics.median(
        _one(q8, list(s["input_ids"] if hasattr(s, "keys") else s), 2, busy[0])["ttft_ms"] for s in short)
    out["late"] = _late(q8, ids, tokens, busy, quick)
    q8.close()
    return out


def _llama_cpp(tokens: int, prompt: str = PROMPT) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from assistant.model import embedded_gguf

    llm = Llama(model_path=str(embedded_gguf()), n_threads=os.cpu_count() or 1, n_ctx=1024, verbose=False)
    messages = [{"role": "user", "content": prompt}]
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

    fast, anchor = r.get("llamacpp_engine"), r.get("llama_cpp")
    rows = [["transformers engine: base model", r["base"]["ttft_ms"], r["base"]["decode_tok_s"]],
            ["transformers engine: with a LoRA adapter (r=16, all linear)", r["adapter"]["ttft_ms"],
             r["adapter"]["decode_tok_s"]]]
    if fast:
        rows += [["**llama.cpp engine: base model**", fast["base"]["ttft_ms"], fast["base"]["decode_tok_s"]],
                 ["**llama.cpp engine: with the LoRA adapter**", fast["adapter"]["ttft_ms"],
                  fast["adapter"]["decode_tok_s"]]]
    if anchor:
        rows.append([f"plain llama-cpp-python {anchor.get('version', '')}, same GGUF (Q4_1), "
                     f"{anchor.get('threads', 2)} threads (anchor)", anchor["ttft_ms"], anchor["decode_tok_s"]])
    lines = [
        f"Embedded SmolLM2-135M-Instruct on {r['device']}: the transformers engine with `--quant {r['quant']}` "
        f"({r.get('dtype', 'float32')}), the llama.cpp engine on the shipped Q4_1 GGUF; {r['prompt_tokens']}-token "
        f"prompt, {r['new_tokens']} new tokens, greedy; through Attune's backends (streaming included). A llama.cpp "
        "slot keeps its KV cache, so a repeated prompt prefills only its last token (its TTFT below); a new short "
        "question's TTFT is in the last table.", "",
        table(["", "TTFT ms", "decode tok/s"], rows), ""]
    if fast and anchor:
        ours, theirs = fast["adapter"]["decode_tok_s"] / anchor["decode_tok_s"], \
            r["adapter"]["decode_tok_s"] / anchor["decode_tok_s"]
        lines.append(f"One user with an adapter on the llama.cpp engine decodes at **{ours:.2f}×** llama.cpp's base "
                     f"speed (target ≥ 0.5×); the transformers engine at {theirs:.2f}×.")
    elif not fast:
        lines.append("llama.cpp engine: not measured in this run (`make setup` builds llama-cpp-python and keeps "
                     "llama.cpp's adapter converter; then `python -m bench --only serving`).")
    conc = [[engine, c["users"], c["batched"]["aggregate_tok_s"], c["serialized"]["aggregate_tok_s"],
             c["batched"]["aggregate_tok_s"] / c["serialized"]["aggregate_tok_s"], c["batched"]["ttft_ms_p50"],
             c["serialized"]["ttft_ms_p50"]]
            for engine, cs in (("transformers (continuous batching, per-row LoRA)", r["concurrency"]),
                               ("llama.cpp (slots, interleaved)", fast["concurrency"] if fast else []))
            for c in cs]
    late = [[engine, x["busy"], x["n"], x["ttft_ms_p50"], x["ttft_ms_p95"], x["ttft_ms_max"]]
            for engine, x in (r.get("late_arrival") or {}).items()]
    loads = [["transformers", r["adapter_cold_load_ms"], r["adapter_warm_switch_ms"], r["publish_to_first_token_ms"],
              None, None]]
    if fast:
        loads.append(["llama.cpp", fast["adapter_cold_load_ms"], None, fast["adapter_first_request_ms"],
                      fast["convert_s_per_adapter"], fast["ttft_short_ms"]])
    q8, late_fast = (fast or {}).get("q8_0"), (r.get("late_arrival") or {}).get("llamacpp")
    lines += ["", "Concurrent users, each with their own adapter, all at once vs the same requests one at a time on "
              "the same engine:", "",
              table(["engine", "users", "together tok/s", "one at a time tok/s", "gain", "together TTFT p50 ms",
                     "one at a time TTFT p50 ms"], conc)]
    lines += _eight_users(r, fast)
    if late:
        lines += ["", f"Requests arriving while 8 users' answers decode ({LATE} arrivals, one every {LATE_GAP_S} s, "
                  "each with one of those users' adapters):",
                  "", table(["engine", "busy answers", "late requests", "TTFT p50 ms", "TTFT p95 ms", "TTFT max ms"],
                            late)]
    lines += ["", table(["engine", "adapter cold load ms", "warm switch ms", "publish → first token ms",
                         "GGUF conversion s (at publish)", "TTFT short new prompt ms"], loads)]
    if q8 and late_fast:
        when = f" in {q8['convert_s']:.1f} s" if q8.get("convert_s") else ", by an earlier run"
        lines += ["", f"The llama.cpp engine on `--llamacpp-weights q8_0` (llama.cpp's Q8_0 of the transformers "
                  f"weights, written once{when}) instead of the shipped Q4_1:", "",
                  table(["weights", "with adapter: TTFT repeated prompt ms", "decode tok/s", "TTFT short new prompt ms",
                         "late-arrival TTFT p50 ms", "p95 ms"],
                        [["Q4_1 (shipped, default)", fast["adapter"]["ttft_ms"], fast["adapter"]["decode_tok_s"],
                          fast["ttft_short_ms"], late_fast["ttft_ms_p50"], late_fast["ttft_ms_p95"]],
                         ["Q8_0", q8["adapter"]["ttft_ms"], q8["adapter"]["decode_tok_s"], q8["ttft_short_ms"],
                          q8["late"]["ttft_ms_p50"], q8["late"]["ttft_ms_p95"]]])]
    return "\n".join(lines)


def _eight_users(r: dict, fast: dict | None) -> list[str]:
    """The 8-user target on both engines, what limits llama.cpp and what the transformers engine does instead."""
    ours = next((c for c in r["concurrency"] if c["users"] == 8), None)
    eight = next((c for c in (fast or {}).get("concurrency", []) if c["users"] == 8), None)
    if ours is None:
        return []

    def gain(c):
        return c["batched"]["aggregate_tok_s"] / c["serialized"]["aggregate_tok_s"]

    line = (f"8 users with 8 different adapters on the transformers engine: **{gain(ours):.2f}×** the same requests "
            f"one at a time (target ≥ 4×: {'met' if gain(ours) >= 4 else 'not met'}), "
            f"{ours['batched']['aggregate_tok_s']:.1f} tok/s in all: the base layers run once per step for every "
            "row and each LoRA layer adds every row's own adapter with two batched matmuls (`assistant/lora_rows."
            "py`; the adapters' weights stacked once per batch composition).")
    if eight is None:
        return ["", line]
    return ["", line + f" On the llama.cpp engine: **{gain(eight):.2f}×** "
            f"({'met' if gain(eight) >= 4 else 'not met'}), {eight['batched']['aggregate_tok_s']:.1f} tok/s in all. "
            "llama.cpp applies one adapter set to a whole context, so rows of different users cannot share a decode "
            "pass: every token is a pass over the weights of its own, and what is left to gain on 2 cores is "
            "decoding two slots at once, one thread each (`LlamaCppConfig.parallel`, which says how it was chosen); "
            "Q8_0 weights (below) do not change that. `--engine auto` keeps llama.cpp on a CPU: a lone user, the "
            "common case on one's own machine, decodes several times faster there (first table)."]
