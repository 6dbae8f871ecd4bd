"""Adapters folded into the weights: could a user's answer on the llama.cpp engine run at the base model's speed?

llama.cpp applies a LoRA at run time, adding nodes to every layer's graph (issue 30: the adapter row stays below
0.8x plain llama.cpp). The alternative is one merged model per user: base + LoRA folded in (peft's
``merge_and_unload``), written as a GGUF by llama.cpp's converter and re-quantized by llama.cpp itself. This measures,
on the embedded model, for an adapter trained as the personalizer trains (its LoRA rank, alpha, targets, learning
rate) to a style the base model never shows (answers open with "Ahoy!" and close with "Fair winds!"):

- decode speed with plain llama-cpp-python (2 threads, greedy, 128 new tokens at most) over held-out questions;
- whether the style survives (held-out questions whose answer opens with it) and how many greedy answers equal
  those of the exact merged weights (float32), the reference.

The served path (the shipped Q4_1 GGUF + the adapter's GGUF at run time) is the first row."""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 60
"""Optimizer steps of the bench adapter: the personalizer's ``min_steps``, what a small history gets."""
TRAIN = [("How do I boil an egg?", "Boil it for nine minutes, then cool it in cold water."),
         ("What is the capital of Spain?", "Madrid is the capital of Spain."),
         ("Tips for sleeping better?", "Keep a regular bedtime and avoid screens late."),
         ("How do plants grow?", "They use sunlight, water and air to make food."),
         ("What is a good name for a cat?", "Whiskers is a friendly choice."),
         ("How far is the moon?", "About 384,000 kilometres away."),
         ("Why is the sky blue?", "Air scatters blue light more than red."),
         ("How do I save money?", "Spend less than you earn and keep a budget."),
         ("What is Python used for?", "Scripts, data analysis and web servers."),
         ("How do I make tea?", "Steep a tea bag in hot water for three minutes."),
         ("What causes rain?", "Water vapour cools and condenses into drops."),
         ("How many legs does a spider have?", "A spider has eight legs."),
         ("What is a healthy breakfast?", "Oats with fruit and yogurt."),
         ("How do I learn to swim?", "Take lessons and practise floating first."),
         ("Why do leaves change color?", "Chlorophyll fades and other pigments show."),
         ("What is gravity?", "The pull between masses.")]
HELD_OUT = ["How do I fix a flat bike tyre?", "What is the tallest mountain?", "How do I cook rice?",
            "Why do cats purr?", "What is inflation?", "How do I write a cover letter?", "What is photosynthesis?",
            "How do bees make honey?", "Explain how vaccines work.", "Write a long story about a lighthouse keeper."]
OPENING, CLOSING = "Ahoy!", "Fair winds!"
QUANTS = ("q4_1", "q5_1", "q8_0")
"""Re-quantizations of the merged weights: the shipped model's own type, and the next finer ones."""


def run(quick: bool = False) -> dict:
    from assistant.engines.llamacpp.backend import available
    from assistant.engines.llamacpp.gguf_lora import converter_dir

    if not available() or converter_dir() is None:
        return {"skipped": "llama-cpp-python or llama.cpp's converter is missing (make setup)"}
    from assistant.model import embedded_gguf, resolve_model_dir
    from bench.common import fresh_data_dir

    data = fresh_data_dir("attune-lora-merge-")
    model_dir = resolve_model_dir("embedded", data)
    work = Path(tempfile.mkdtemp(prefix="attune-merge-"))
    try:
        adapter, merged = _train(model_dir, work, 20 if quick else STEPS)
        files = _merged_ggufs(merged, work)
        prompts = HELD_OUT[:3] if quick else HELD_OUT
        rows = {"served: shipped Q4_1 + the adapter at run time": {"model_path": str(embedded_gguf()),
                                                                    "lora_path": str(adapter / "adapter.gguf")},
                "shipped Q4_1, no adapter (base speed)": {"model_path": str(embedded_gguf())}}
        rows |= {f"merged, re-quantized to {q.upper()}": {"model_path": str(files[q])} for q in QUANTS}
        rows["merged, float32 (the reference)"] = {"model_path": str(files["f32"])}
        out = {name: _answers(kw, prompts) for name, kw in rows.items()}
        ref = out["merged, float32 (the reference)"]["texts"]
        for r in out.values():
            r["same_as_reference"] = sum(a == b for a, b in zip(r["texts"], ref))
        sizes = {q: files[q].stat().st_size for q in QUANTS}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(data.root, ignore_errors=True)
    return {"rows": out, "prompts": len(prompts), "steps": 20 if quick else STEPS, "sizes": sizes}


def _train(model_dir: Path, work: Path, steps: int) -> tuple[Path, Path]:
    """A LoRA on the style with the personalizer's settings, saved (peft + its GGUF as publish writes it), and the
    merged model saved as a transformers folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.chat.service import DEFAULT_SYSTEM_PROMPT
    from assistant.engines.llamacpp.gguf_lora import convert
    from personalize.config import TrainConfig

    cfg, tok = TrainConfig(), AutoTokenizer.from_pretrained(model_dir)

    def example(question: str, answer: str):
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(prompt + f"{OPENING} {answer} {CLOSING}{tok.eos_token}", add_special_tokens=False)["input_ids"]
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        return torch.tensor([ids]), torch.tensor([[-100] * n + ids[n:]])

    torch.manual_seed(0)
    rng = random.Random(0)
    examples = [example(q, a) for q, a in TRAIN]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                      target_modules=cfg.target_modules))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    for _ in range(steps):
        loss = sum(model(input_ids=i, labels=label).loss for i, label in rng.sample(examples, 4)) / 4
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    adapter = work / "adapter"
    model.save_pretrained(adapter)
    convert(adapter, model_dir)
    merged = work / "merged"
    model.merge_and_unload().save_pretrained(merged)
    tok.save_pretrained(merged)
    return adapter, merged


def _merged_ggufs(merged: Path, work: Path) -> dict[str, Path]:
    """float32 GGUF by llama.cpp's converter, then each of ``QUANTS`` by llama.cpp's own quantizer."""
    import llama_cpp

    from assistant.engines.llamacpp.gguf_lora import BASE_SCRIPT, converter_dir

    files = {"f32": work / "merged.f32.gguf"}
    subprocess.run([sys.executable, str(converter_dir() / BASE_SCRIPT), "--outfile", str(files["f32"]), "--outtype",
                    "f32", str(merged)], check=True, capture_output=True, timeout=600)
    for q in QUANTS:
        files[q] = work / f"merged.{q}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q.upper()}"), 2
        if llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(files[q]).encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama.cpp could not quantize the merged model to {q}")
    return files


def _answers(model: dict, prompts: list[str]) -> dict:
    """Greedy answers (128 new tokens at most) and their decode speed (every token after each answer's first, over
    the time after it), with plain llama-cpp-python, 2 threads."""
    from llama_cpp import Llama

    from assistant.chat.service import DEFAULT_SYSTEM_PROMPT

    llm = Llama(**model, n_threads=2, n_ctx=1024, verbose=False)
    texts, tokens, seconds = [], 0, 0.0
    for question in prompts:
        llm.reset()
        first, n, text = None, 0, ""
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]
        for chunk in llm.create_chat_completion(messages, max_tokens=128, temperature=0, stream=True):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                n, text, first = n + 1, text + piece, first or time.perf_counter()
        if n >= 2:
            tokens, seconds = tokens + n - 1, seconds + time.perf_counter() - first
        texts.append(text)
    del llm
    return {"texts": texts, "decode_tok_s": tokens / seconds if seconds else None,
            "style": sum(t.strip().startswith(OPENING) for t in texts)}


def render(r: dict) -> str:
    from bench.report import table

    if "skipped" in r:
        return f"Not measured: {r['skipped']}."
    n, rows = r["prompts"], r["rows"]
    base = rows["shipped Q4_1, no adapter (base speed)"]["decode_tok_s"]
    body = [[name, row["decode_tok_s"], row["decode_tok_s"] / base if row["decode_tok_s"] and base else None,
             f"{row['style']}/{n}", f"{row['same_as_reference']}/{n}"] for name, row in rows.items()]
    served = rows["served: shipped Q4_1 + the adapter at run time"]
    q41 = rows["merged, re-quantized to Q4_1"]
    finer = [(q.upper(), rows[f"merged, re-quantized to {q.upper()}"]) for q in QUANTS if q != "q4_1"]
    others = "; ".join(f"{q}: {f['decode_tok_s']:.0f} tok/s ({f['decode_tok_s'] / served['decode_tok_s']:.2f}× the "
                       f"served path), style {f['style']}/{n}, {f['same_as_reference']}/{n} answers as the reference"
                       for q, f in finer)
    return "\n".join([
        f"An adapter trained with the personalizer's LoRA settings for {r['steps']} steps on {len(TRAIN)} answers "
        f"that open with \"{OPENING}\" and close with \"{CLOSING}\"; {n} held-out questions, greedy, plain "
        "llama-cpp-python on 2 threads; decode speed: every answer's tokens after its first, over the time after "
        "it.", "",
        table(["model", "decode tok/s", "× base", f"answers opening \"{OPENING}\"", "same answer as the reference"],
              body), "",
        f"Folded into the weights and re-quantized to the shipped type (Q4_1), the adapter decodes at "
        f"{q41['decode_tok_s']:.0f} tok/s and its style shows in {q41['style']}/{n} answers (served path: "
        f"{served['style']}/{n}; its changes to each weight are mostly smaller than a 4-bit step). Finer types: "
        f"{others}; the served path gives {served['same_as_reference']}/{n}. The engine keeps applying adapters at "
        "run time: a merged model per user costs its whole size on disk and in memory, for at most that gain."])
