"""Base-model quantization on this device: load time, memory, time to first token, decode tok/s.

This is what ``--quant auto`` is chosen from (see assistant/model.py resolve_quant)."""

from __future__ import annotations

import statistics
import time

PROMPT = "Explain in a few sentences why the sky is blue, and give one everyday example."


def measure(quant: str, device: str, new_tokens: int, repeats: int) -> dict:
    import torch

    from assistant.model import ModelConfig, load_model
    from bench.common import models_dir
    from storage import DataDir

    dd = DataDir(models_dir()).ensure()
    loaded = load_model(ModelConfig(quant=quant, device=device), dd)
    model, tok = loaded.model, loaded.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).to(model.device)
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, **kw)  # warm-up
        ttft, decode = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(**ids, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = time.perf_counter()
            model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            t2 = time.perf_counter()
            ttft.append((t1 - t0) * 1000)
            decode.append((new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    return {"quant": loaded.quant, "device": loaded.device, "load_s": loaded.load_seconds,
            "memory_mb": model.get_memory_footprint() / 1e6, "prompt_tokens": int(ids["input_ids"].shape[1]),
            "ttft_ms": statistics.median(ttft), "decode_tok_s": statistics.median(decode)}


def run(quick: bool = False) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [measure(q, device, new_tokens=16 if quick else 64, repeats=1 if quick else 3)
            for q in ("none", "nf4", "int8")]
    return {"rows": rows, "note": "SmolLM2-135M-Instruct (embedded), greedy, batch 1, "
            f"{'16' if quick else '64'} new tokens; ttft = prefill + first token."}


def render(r: dict) -> str:
    from bench.report import table

    best = max(r["rows"], key=lambda x: x["decode_tok_s"])
    small = min(r["rows"], key=lambda x: x["memory_mb"])
    return "\n".join([
        r["note"], "",
        table(["quant", "device", "load s", "memory MB", "prompt tok", "TTFT ms", "decode tok/s"],
              [[x["quant"], x["device"], x["load_s"], x["memory_mb"], x["prompt_tokens"], x["ttft_ms"],
                x["decode_tok_s"]] for x in r["rows"]]),
        "", f"Fastest decode in this run: **{best['quant']}**; smallest: **{small['quant']}**. On CPU the NF4 row is "
            "measured as Attune serves it: without bitsandbytes' fast CPU repack, which corrupts the weights once a "
            "peft adapter is loaded after the first forward pass (bitsandbytes 0.50; regression test in "
            "tests/test_model.py). So `--quant auto` is fp32 (`none`) on CPU and NF4 on CUDA. Anchor: llama.cpp runs "
            "the same GGUF at about 85 tok/s decode with 2 threads here (DESIGN.md; not measured in this run).",
    ])


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
