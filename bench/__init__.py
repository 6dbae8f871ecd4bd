"""Attune's benchmarks: each module measures one thing and renders its BENCHMARKS.md section.

``python -m bench [--quick] [--only NAME ...]`` runs them, merges into bench/results.json and
rewrites BENCHMARKS.md. Numbers are never typed in by hand.
"""

from bench import load, memory_bench, memory_quality, quality, quant, serving, training, vllm_engine

# name -> (section title, renderer); the runner imports each module's run() by name.
SECTIONS = {
    "quant": ("Serving configuration search (chooses `--quant auto` and `--dtype auto`)", quant.render),
    "serving": ("Serving: time to first token, decode speed, concurrent users, adapter switching", serving.render),
    "memory_bench": ("Memory: retrieval latency per user (chooses `approx_threshold`)", memory_bench.render),
    "memory_quality": ("Memory quality: what is kept, what is retrieved, recall and general answers with memory on",
                       memory_quality.render),
    "load": ("Load: concurrent API chats while a training job runs", load.render),
    "training": ("Training: tokens/s and minutes to personalize 100/500 examples, vs plain TRL", training.render),
    "quality": ("Quality: personal recall, leakage across users, general-ability retention", quality.render),
    "vllm_engine": ("Engines side by side: Attune's transformers backend vs vLLM, 1/4/8 users with their own adapters",
                    vllm_engine.render),
}
