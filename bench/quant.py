"""Serving configuration search on this device: which weights format, dtype, cache and thread count
serve the base model fastest while staying correct. ``--quant auto`` / ``--dtype auto`` are chosen
from it (assistant/model.py ``resolve_quant`` / ``resolve_dtype``).

For every candidate: load time, memory, time to first token, decode tok/s (batch 1, greedy), and
correctness against the float32 model: how many of 8 prompts get the same greedy answer, the
float32 answers' loss under the candidate (nats/token; the fp32 row is the reference), and batch
invariance (8 prompts decoded in one left-padded batch give the same greedy text as each alone).
Extra rows: torch threads, and a static KV cache + ``torch.compile`` (with its compile times)."""

from __future__ import annotations

import statistics
import time

PROMPT = "Explain in a few sentences why the sky is blue, and give one everyday example."
PROMPTS = ["Why is the sky blue?", "Write a haiku about tea.", "What is the capital of France?",
           "Give me three tips for sleeping better.", "How do I boil an egg?", "Explain recursion to a child.",
           "What is 17 times 23?", "Name a famous painter and one of their works."]
ANSWER_TOKENS = 48


def _load(quant: str, dtype: str, device: str):
    from assistant.model import ModelConfig, load_model
    from bench.common import models_dir
    from storage import DataDir

    return load_model(ModelConfig(quant=quant, device=device, dtype=dtype), DataDir(models_dir()).ensure())


def _encode(tok, prompt: str, device) -> dict:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True).to(device)


def speed(model, tok, new_tokens: int, repeats: int, **extra) -> dict:
    """Median TTFT (prefill + first token) and decode tok/s of ``generate`` at batch 1."""
    import torch

    ids = _encode(tok, PROMPT, model.device)
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, **extra)
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
    return {"prompt_tokens": int(ids["input_ids"].shape[1]), "ttft_ms": statistics.median(ttft),
            "decode_tok_s": statistics.median(decode)}


def answers(model, tok, prompts: list[str], batched: bool) -> list[list[int]]:
    """Greedy answer token ids for ``prompts``, one by one or in one left-padded batch."""
    import torch

    kw = dict(do_sample=False, max_new_tokens=ANSWER_TOKENS, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        if not batched:
            out = []
            for p in prompts:
                ids = _encode(tok, p, model.device)
                out.append(model.generate(**ids, **kw)[0, ids["input_ids"].shape[1]:].tolist())
            return [_trim(a, tok) for a in out]
        seqs = [_encode(tok, p, "cpu")["input_ids"][0].tolist() for p in prompts]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs], device=model.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=model.device)
        gen = model.generate(input_ids=ids, attention_mask=mask, **kw)
        return [_trim(row[width:].tolist(), tok) for row in gen]


def _trim(ids: list[int], tok) -> list[int]:
    return ids[:ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids


def answer_loss(model, tok, prompts: list[str], refs: list[list[int]]) -> float:
    """Mean loss (nats/token) of the reference answers given their prompts, under ``model``."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for p, ref in zip(prompts, refs, strict=True):
            prompt = _encode(tok, p, "cpu")["input_ids"][0].tolist()
            ids = torch.tensor([prompt + ref], device=model.device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum").item()
            count += len(ref)
    return total / count


def candidate(quant: str, dtype: str, device: str, new_tokens: int, repeats: int, ref: list | None) -> dict:
    loaded = _load(quant, dtype, device)
    model, tok = loaded.model, loaded.tokenizer
    row = {"quant": loaded.quant, "dtype": loaded.dtype, "device": loaded.device, "load_s": loaded.load_seconds,
           "memory_mb": model.get_memory_footprint() / 1e6, **speed(model, tok, new_tokens, repeats)}
    alone = answers(model, tok, PROMPTS, batched=False)
    ref = ref or alone
    row["same_greedy"] = sum(a == r for a, r in zip(alone, ref, strict=True))
    row["batch_invariant"] = sum(a == b for a, b in zip(alone, answers(model, tok, PROMPTS, batched=True),
                                                         strict=True))
    row["ref_loss"] = answer_loss(model, tok, PROMPTS, ref)
    row["_answers"] = alone
    return row


def _speed_with_threads(threads: int, dtype: str, device: str, new_tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    loaded = _load("none", dtype, device)
    return {"threads": threads, **speed(loaded.model, loaded.tokenizer, new_tokens, repeats)}


def threads_and_compile(dtype: str, device: str, new_tokens: int, repeats: int) -> dict:
    """The chosen dtype at 1 thread vs all, and with a static KV cache + torch.compile."""
    import os

    import torch

    from bench.common import in_fresh_process

    out: dict = {"dtype": dtype, "threads": []}
    # Each thread count in a fresh process: switching torch.set_num_threads inside one process misleads.
    for n in sorted({1, torch.get_num_threads()}):
        out["threads"].append(in_fresh_process(_speed_with_threads, n, dtype, device, new_tokens, repeats))
    out.update(in_fresh_process(_compiled, dtype, device, new_tokens, repeats))
    out["cpu_count"] = os.cpu_count()
    return out


def _compiled(dtype: str, device: str, new_tokens: int, repeats: int) -> dict:
    """Static KV cache + torch.compile, with an empty inductor cache so compile times are real."""
    import os
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="attune-inductor-")
    import torch
    from transformers import CompileConfig

    loaded = _load("none", dtype, device)
    model, tok = loaded.model, loaded.tokenizer
    out: dict = {}
    compile_cfg = CompileConfig(fullgraph=True, mode="default")
    compile_cfg._compile_all_devices = True  # transformers compiles on CUDA only unless told
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, cache_implementation="static",
              compile_config=compile_cfg)
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(**_encode(tok, PROMPT, model.device), max_new_tokens=8, **kw)
        out["compile_first_s"] = time.perf_counter() - started
        # A new prompt length and batch size, as the next users would bring: how long until it runs?
        seqs = [_encode(tok, p, "cpu")["input_ids"][0].tolist() for p in PROMPTS[:3]]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
        mask = (ids != tok.pad_token_id).long()
        started = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **kw)
        out["compile_new_shape_s"] = time.perf_counter() - started
    out["compiled"] = speed(model, tok, new_tokens, repeats, cache_implementation="static",
                            compile_config=compile_cfg)
    return out


def run(quick: bool = False) -> dict:
    import torch

    from assistant.model import cpu_has_bf16, resolve_dtype, resolve_quant
    from bench.common import in_fresh_process

    device = "cuda" if torch.cuda.is_available() else "cpu"
    new_tokens, repeats = (16, 1) if quick else (64, 3)
    configs = [("none", "float32"), ("none", "bfloat16"), ("nf4", "auto"), ("int8", "auto")]
    if device == "cpu" and not cpu_has_bf16():
        configs.remove(("none", "bfloat16"))
    rows, ref = [], None
    for quant, dtype in configs:  # each in a fresh process: one candidate's kernels must not slow the next
        row = in_fresh_process(candidate, quant, dtype, device, new_tokens, repeats, ref)
        ref = ref or row["_answers"]
        rows.append(row)
    for row in rows:
        row.pop("_answers")
    quant = resolve_quant("auto", device)
    out = {"rows": rows, "device": device, "auto": {"quant": quant, "dtype": resolve_dtype("auto", device, quant)},
           "new_tokens": new_tokens, "answer_tokens": ANSWER_TOKENS, "prompts": len(PROMPTS)}
    if not quick:
        out["tuning"] = threads_and_compile(out["auto"]["dtype"], device, new_tokens, repeats)
    return out


def render(r: dict) -> str:
    from bench.report import table

    rows = r.get("rows", [])
    if rows and "dtype" not in rows[0]:
        return "_Older run without the configuration search; run `python -m bench --only quant`._"
    ref = rows[0]
    head = (f"SmolLM2-135M-Instruct (embedded) on {r['device']}, greedy, batch 1, {r['new_tokens']} new tokens; "
            "TTFT = prefill + first token. Correctness vs the float32 row: same greedy answer "
            f"({r['answer_tokens']} tokens) on {r['prompts']} prompts; loss of the float32 answers under this "
            "configuration (nats/token); batch invariance: the same prompts in one left-padded batch give the "
            "same greedy text as alone.")
    lines = [head, "", table(
        ["quant", "dtype", "load s", "memory MB", "TTFT ms", "decode tok/s", "vs fp32", "same greedy",
         "fp32-answer loss", "batch-invariant"],
        [[x["quant"], x["dtype"], x["load_s"], x["memory_mb"], x["ttft_ms"], x["decode_tok_s"],
          f"{x['decode_tok_s'] / ref['decode_tok_s']:.2f}×", f"{x['same_greedy']}/{r['prompts']}",
          x["ref_loss"], f"{x['batch_invariant']}/{r['prompts']}"] for x in rows]), ""]
    tuning = r.get("tuning")
    if tuning:
        lines += [f"Tuning the chosen configuration ({tuning['dtype']}):", "", table(
            ["variant", "TTFT ms", "decode tok/s", "compile s"],
            [[f"torch threads = {t['threads']}", t["ttft_ms"], t["decode_tok_s"], "-"] for t in tuning["threads"]]
            + [["static KV cache + torch.compile", tuning["compiled"]["ttft_ms"], tuning["compiled"]["decode_tok_s"],
                f"{tuning['compile_first_s']:.0f} first call, {tuning['compile_new_shape_s']:.0f} for the next "
                "batch/prompt shape"]]), ""]
    auto = r["auto"]
    by = {(x["quant"], x["dtype"]): x for x in rows}
    bf16 = by.get(("none", "bfloat16"))
    why = [f"`--quant auto --dtype auto` here: **{auto['quant']} / {auto['dtype']}**."]
    if r["device"] == "cpu":
        why.append("The bitsandbytes rows are slower than unquantized weights on this CPU and lose quality (NF4 "
                   "is measured as Attune serves it, without bitsandbytes' fast CPU repack, which corrupts the "
                   "weights once a peft adapter is loaded after the first forward pass: bitsandbytes 0.50, "
                   "regression test in tests/test_model.py).")
    if bf16:
        why.append(
            f"bfloat16 halves the weight traffic: {bf16['decode_tok_s'] / ref['decode_tok_s']:.2f}× the float32 "
            f"decode speed, and the float32 answers are as likely under it (loss {bf16['ref_loss']:.3f} vs "
            f"{ref['ref_loss']:.3f} nats/token), though greedy text drifts from float32's within {r['answer_tokens']}"
            f" tokens on {r['prompts'] - bf16['same_greedy']} of {r['prompts']} prompts. Its real cost is batch "
            f"invariance ({bf16['batch_invariant']}/{r['prompts']}): activation rounding depends on the batch "
            "shape, so a greedy answer decoded next to other users' can differ from the same request alone. Use "
            "`--dtype float32` when answers must be bit-identical however requests are batched (the batching "
            "tests pin float32 for that reason); sampling (the default, temperature 0.7) hides the difference.")
    if tuning:
        threads = {t["threads"]: t["decode_tok_s"] for t in tuning["threads"]}
        compiled = tuning["compiled"]["decode_tok_s"]
        base = threads[max(threads)]
        why.append(f"A static cache + torch.compile decodes at {compiled / base:.2f}× but compiles for "
                   f"{tuning['compile_first_s']:.0f} s and again ({tuning['compile_new_shape_s']:.0f} s) for each new "
                   "batch size / prompt shape, which a server with changing users meets all the time, so it is "
                   f"not used. torch threads: {max(threads)} (all cores) decode at {base:.1f} tok/s vs "
                   f"{threads[1]:.1f} with 1.")
    lines.append(" ".join(why))
    return "\n".join(lines)


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1, default=str))
