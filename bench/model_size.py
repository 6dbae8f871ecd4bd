"""What a bigger model costs here: random-weight models of the SmolLM2 family's three shapes (135M, 360M, 1.7B;
configs written below, nothing downloaded), each served by llama.cpp from a Q8_0 GGUF with a user's adapter and
trained a few LoRA steps as a job trains (float32 master weights, bf16 autocast where the CPU has it, the default
rank and targets).

Per size, each phase in a fresh process (its peak memory is its own): decode tokens/s with an adapter (greedy, one
user), LoRA training tokens/s and seconds per step, peak RSS of each, the GGUF's and the adapter's size on disk.
The implied minutes for a 100-answer job scale the training bench's measured job (its total time at 135M) by
the training speed measured here against the 135M shape: on paper, not a run of the job at that size.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # SmolLM2's published configs (hidden, intermediate, layers, heads, kv heads)
    "135M": (576, 1536, 30, 9, 3),
    "360M": (960, 2560, 32, 15, 5),
    "1.7B": (2048, 8192, 24, 32, 32),
}
DECODE_TOKENS = 64
STEP_BATCH = 4
STEP_TOKENS = 80
"""Sequences per step and tokens per sequence: the training bench's 100-answer job trained 26,943 tokens in 84
steps of 4 (80 tokens a sequence on average)."""
STEPS = 3  # the first is a warm-up, not timed
QUICK_SHAPES = ("135M",)


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def build(size: str, tokenizer_dir: Path, out: Path) -> dict:
    """The random model as a bf16 transformers folder, its Q8_0 GGUF, and a random default-rank LoRA (peft files
    and its GGUF), as training would publish it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from assistant.engines.llamacpp.gguf_lora import BASE_SCRIPT, convert, converter_dir
    from personalize.config import TrainConfig

    hidden, inter, layers, heads, kv = SHAPES[size]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    folder = out / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    gguf = out / "model.q8_0.gguf"
    subprocess.run([sys.executable, str(converter_dir() / BASE_SCRIPT), "--outtype", "q8_0", "--outfile", str(gguf),
                    str(folder)], check=True, capture_output=True, timeout=3600)
    train = TrainConfig()
    peft = get_peft_model(model.float(), LoraConfig(r=train.rank, lora_alpha=train.alpha, task_type="CAUSAL_LM",
                                                    target_modules=train.peft_targets(), init_lora_weights=False))
    adapter = out / "adapter"
    peft.save_pretrained(adapter)
    convert(adapter, folder)
    return {"parameters": params, "gguf_mb": round(gguf.stat().st_size / 2**20, 1),
            "adapter_mb": round((adapter / "adapter_model.safetensors").stat().st_size / 2**20, 1),
            "build_peak_mb": _peak_mb()}


def decode(out: Path) -> dict:
    """One user's greedy answer with their adapter through the llama.cpp engine, as serving runs it."""
    import threading

    from assistant.engines.base import AdapterRef, GenerationSettings, StreamStats
    from assistant.engines.llamacpp.backend import LlamaCppBackend
    from assistant.model import render_chat

    backend = LlamaCppBackend(out / "model.q8_0.gguf", out / "model", "size")
    try:
        ids = render_chat(backend.tokenizer, [{"role": "user", "content": "Tell me about the history of tea."}],
                          tokenize=True)
        ref = AdapterRef("size-v1", 1, str(out / "adapter"))
        settings = GenerationSettings(max_new_tokens=DECODE_TOKENS, temperature=0, repetition_penalty=1.0)
        rates = []
        for _ in range(2):  # the first loads the adapter and warms the caches
            stats = StreamStats()
            started = time.perf_counter()
            pieces = list(backend.stream(ids, settings, threading.Event(), stats, ref))
            rates.append(stats.completion_tokens / (time.perf_counter() - started))
        return {"decode_tok_s": round(rates[-1], 1), "tokens": stats.completion_tokens, "pieces": len(pieces),
                "serve_peak_mb": _peak_mb()}
    finally:
        backend.close()


def train_steps(out: Path) -> dict:
    """A few LoRA steps as a job takes them (the job's own loading and adapter code; AdamW)."""
    import tempfile

    import torch

    from assistant.model import ModelConfig
    from personalize.config import TrainConfig
    from personalize.train import attach_adapter, load_base, resolve
    from storage import DataDir

    cfg = TrainConfig()
    model_cfg = ModelConfig(model=str(out / "model"), quant="none", device="cpu")
    _, quant, bf16 = resolve(cfg, model_cfg)
    loaded = load_base(model_cfg, cfg, DataDir(Path(tempfile.mkdtemp(prefix="attune-size-"))).ensure())
    model = attach_adapter(loaded.model, cfg, quant, None)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(STEPS):
        ids = torch.randint(0, loaded.tokenizer.vocab_size, (STEP_BATCH, STEP_TOKENS), generator=gen)
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    step = sum(times[1:]) / len(times[1:])
    return {"step_s": round(step, 2), "train_tok_s": round(STEP_BATCH * STEP_TOKENS / step, 1), "bf16": bf16,
            "train_peak_mb": _peak_mb()}


def _phase(name: str, *args) -> dict:
    from bench.common import in_fresh_process

    return in_fresh_process(_call, name, *args)


def _call(name: str, *args) -> dict:
    return globals()[name](*args)


def _job_seconds() -> float | None:
    """The training bench's measured 100-answer job at 135M (its total), if it has run."""
    path = Path(__file__).resolve().parent / "results.json"
    try:
        runs = json.loads(path.read_text())["training"]["runs"]
        return next(r["timings"]["total_s"] for r in runs if r["answers"] == 100)
    except (OSError, KeyError, StopIteration, ValueError):
        return None


def run(quick: bool = False) -> dict:
    import tempfile

    from assistant.model import EMBEDDED, resolve_model_dir
    from bench.common import models_dir
    from storage import DataDir

    started = time.perf_counter()
    tokenizer_dir = resolve_model_dir(EMBEDDED, DataDir(models_dir()).ensure())
    rows = {}
    for size in QUICK_SHAPES if quick else SHAPES:
        out = Path(tempfile.mkdtemp(prefix=f"attune-size-{size}-"))
        try:
            row = {"size": size, **_phase("build", size, tokenizer_dir, out)}
            row |= _phase("decode", out)
            row |= _phase("train_steps", out)
            rows[size] = row
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(f"model_size: {json.dumps(rows[size])}", file=sys.stderr, flush=True)
    job = _job_seconds()
    base = rows.get("135M")
    for row in rows.values():
        row["job_min"] = (round(job / 60 * base["train_tok_s"] / row["train_tok_s"], 1)
                          if job and base else None)
    return {"rows": list(rows.values()), "job_s_135m": job, "decode_tokens": DECODE_TOKENS,
            "step": [STEP_BATCH, STEP_TOKENS], "cores": os.cpu_count(),
            "seconds": round(time.perf_counter() - started, 1)}


def render(r: dict) -> str:
    from bench.report import table

    rows = [[x["size"], f"{x['parameters'] / 1e6:.0f}M", x["gguf_mb"], x["adapter_mb"], x["decode_tok_s"],
             x["serve_peak_mb"], x["step_s"], x["train_tok_s"], x["train_peak_mb"], x["job_min"]] for x in r["rows"]]
    job = r.get("job_s_135m")
    return "\n".join([
        "Random-weight models of the SmolLM2 family's shapes (`bench/model_size.py`; configs in the bench, nothing "
        "downloaded), the embedded model's tokenizer. Served by the llama.cpp engine from a Q8_0 GGUF with one "
        f"user's default-rank adapter (greedy, {r['decode_tokens']} new tokens, after a warm-up answer); trained as "
        f"a job trains (float32 master weights, bf16 autocast, eager attention, AdamW), steps of "
        f"{r['step'][0]} x {r['step'][1]} tokens; each phase in its own process (peak RSS is that phase's).", "",
        table(["shape", "parameters", "GGUF Q8_0 MB", "adapter MB", "decode tok/s (adapter)", "serve peak MB",
               "train s/step", "train tok/s", "train peak MB", "100-answer job, min (implied)"], rows), "",
        (f"The implied job time scales the training bench's measured 100-answer job at 135M ({job / 60:.1f} min, "
         "anchors and gate included) by the training speed against the 135M shape here; on paper, not a run. "
         if job else "The training bench has not run, so no job time is implied. ") +
        "Serving's peak is the whole process's: the weights, the engine's contexts (a KV cache each, one kept ready "
        "for the next request; the 1.7B shape has no grouped-query attention) and the tokenizer. On a GPU: not "
        "measured (none lent).",
        "", f"Time: {r['seconds'] / 60:.1f} min.",
    ])
