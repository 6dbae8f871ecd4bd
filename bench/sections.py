"""The sections of BENCHMARKS.md (name -> title and renderer, in page order) and the page rendered from
bench/results.json.

Owns which benchmarks exist and the page's layout. Must not know how any section measures (each
module's ``run``, called by name through ``bench.common.run_section``) or how results.json is kept
(``bench.report``).
"""

from __future__ import annotations

from pathlib import Path

from bench import (
    adapter_passing,
    adapter_style,
    api_speed,
    load,
    lora_merge,
    memory_bench,
    memory_locomo,
    memory_options,
    memory_passing,
    memory_quality,
    model_size,
    newcomer,
    quality,
    quant,
    reliability,
    scale,
    serving,
    training,
    vllm_engine,
)

SECTIONS = {
    "quant": ("Serving configuration search (chooses `--quant auto` and `--dtype auto`)", quant.render),
    "serving": ("Serving: time to first token, decode speed, concurrent users, adapter switching", serving.render),
    "api_speed": ("Speed through the API: one user's streamed answer vs the engine at its seam and plain llama.cpp",
                  api_speed.render),
    "lora_merge": ("Adapters folded into the weights: merged and re-quantized per user vs applied at run time "
                   "(llama.cpp)", lora_merge.render),
    "newcomer": ("A long newcomer prompt: how long the answers already decoding wait for their next token (llama.cpp)",
                 newcomer.render),
    "memory_bench": ("Memory: retrieval latency per user (chooses `approx_threshold`)", memory_bench.render),
    "memory_quality": ("Memory quality: what is kept, what is retrieved, recall and general answers with memory on",
                       memory_quality.render),
    "memory_locomo": ("Memory on LoCoMo (public long conversations, dev half): kept, evidence served, answer F1",
                      memory_locomo.render),
    "memory_passing": ("Memory on facts said once in passing (dev users tune, test users report): served, recalled",
                       memory_passing.render),
    "memory_options": ("Memory retrieval options on dev data: hybrid lexical + vector, statement rewriting, another "
                       "embedder", memory_options.render),
    "load": ("Load: concurrent API chats while a training job runs", load.render),
    "training": ("Training: tokens/s and minutes to personalize 100/500 examples, vs plain TRL", training.render),
    "quality": ("Quality: personal recall, leakage across users, general-ability retention", quality.render),
    "adapter_style": ("Style taught through corrections: short answers, bullet lists, Chinese (dev users tune, "
                      "test users report)", adapter_style.render),
    "adapter_passing": ("Adapters on natural histories: facts said once in passing, updates, never-told questions "
                        "(dev users tune, test users report)", adapter_passing.render),
    "model_size": ("What a bigger model costs here: SmolLM2-family shapes (135M, 360M, 1.7B) served and trained",
                   model_size.render),
    "reliability": ("Reliability: kill -9 under load, API fuzzing, damaged files, backup, throttling",
                    reliability.render),
    "vllm_engine": ("Engines side by side: Attune's transformers backend vs vLLM, 1/4/8 users with their own adapters",
                    vllm_engine.render),
    "scale": ("Beyond one machine: PostgreSQL job queue and workers, adapters in S3, the shared database",
              scale.render),
}
"""name -> (section title, renderer), in the order of the page; ``python -m bench --only`` takes these names.
The runner imports each module's ``run()`` by name."""

REPORT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def render(results: dict) -> str:
    out = ["# Attune benchmarks", "",
           "Written by `make bench` (`python -m bench`); every number below was measured by it on the machine",
           "named in its section. Raw numbers: `bench/results.json`.", ""]
    for name, (title, renderer) in SECTIONS.items():
        if name not in results:
            continue
        r = results[name]
        out += [f"## {title}", "", measured(r["machine"]), "", renderer(r), ""]
        for extra in r.get("also", []):  # a run of part of the section on its own (kept until the next full run)
            out += [f"### Also: {extra['label']}", "", measured(extra["machine"]), "", renderer(extra), ""]
    return "\n".join(out)


def measured(m: dict) -> str:
    """The line saying where and when a run was measured."""
    return (f"_Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['memory']}"
            f"{', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}), torch {m['packages'].get('torch')}, "
            f"transformers {m['packages'].get('transformers')}, commit {m.get('commit')}._")


def write(results: dict) -> None:
    REPORT.write_text(render(results))
