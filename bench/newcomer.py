"""A long newcomer prompt on the llama.cpp engine: how long the answers already decoding wait for their next token.

Four answers decode (the embedded model, greedy); a fifth request arrives with a prompt of about 2,000 tokens. Its
prefill either runs in one go (the engine before: all its ``prefill_tokens`` calls in a row) or one call per round
(the engine now), the others getting a token between calls. Measured:
the longest wait of a decoding answer for its next token while the newcomer prefills, against their usual gap
between tokens, and the newcomer's time to first token."""

from __future__ import annotations

import statistics
import threading
import time

BUSY = 4
NEWCOMERS = 3
"""Newcomers per setting, one after another (each while the four answers decode); the worst wait is reported."""
PROMPT_TOKENS = 1950
"""The newcomer's prompt (the engine's context is 2,048 tokens, as served)."""


def run(quick: bool = False) -> dict:
    from assistant.engines.llamacpp.backend import LlamaCppConfig, available

    if not available():
        return {"skipped": "llama-cpp-python is not installed (make setup builds it)"}
    out = {"busy": BUSY, "newcomers": 1 if quick else NEWCOMERS, "call_tokens": LlamaCppConfig().prefill_tokens}
    for name in ("whole", "chunked"):
        out[name] = _measure(name == "whole", out["newcomers"])
    return out


def _prompt(tok, target: int, k: int) -> list[int]:
    """About ``target`` tokens of notes, their first line unique to ``k`` (so no slot holds a prefix of it)."""
    from assistant.chat.service import DEFAULT_SYSTEM_PROMPT
    from assistant.model import render_chat

    colours = ["red", "green", "blue", "yellow", "white", "black", "orange", "grey"]
    lines = [f"Inventory {k}."]
    while True:
        i = len(lines)
        lines.append(f"Note {i}: the {colours[i % 8]} box on shelf {i // 8} holds {i * 7 % 97} marbles.")
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                    {"role": "user", "content": " ".join(lines) + " Which shelf has the most marbles?"}]
        ids = render_chat(tok, messages, tokenize=True)
        if len(ids) >= target:
            return ids


def _measure(whole: bool, newcomers: int) -> dict:
    from assistant.engines.base import GenerationSettings, StreamStats
    from assistant.engines.llamacpp.backend import LlamaCppBackend, LlamaCppConfig
    from assistant.model import embedded_gguf, resolve_model_dir
    from bench.common import fresh_data_dir

    class Whole(LlamaCppBackend):  # the engine before: a newcomer's whole prompt prefilled at once
        def _chunk(self, slot, others_busy):
            return len(slot.prompt)

    data = fresh_data_dir("attune-newcomer-")
    backend = (Whole if whole else LlamaCppBackend)(embedded_gguf(), resolve_model_dir("embedded", data), "smol",
                                                    LlamaCppConfig(), context_tokens=2048)
    tok = backend.tokenizer
    log: list[tuple[object, float]] = []
    token = backend._token
    backend._token = lambda req, t: (log.append((req, time.monotonic())), token(req, t))
    stop = threading.Event()
    long = GenerationSettings(max_new_tokens=3000, temperature=0, repetition_penalty=1.1)
    stories = [f"Write a very long story about {t}, with many chapters." for t in ("a lighthouse", "a fox",
                                                                                 "the sea", "a clock")]
    busy = [threading.Thread(target=lambda p=p: [None for _ in backend.stream(
        _prompt_short(tok, p), long, stop, StreamStats())]) for p in stories[:BUSY]]
    for t in busy:
        t.start()
    while len({id(r) for r, _ in log}) < BUSY:
        time.sleep(0.01)
    time.sleep(1.0)  # all four in their stride
    decoding = {id(r) for r, _ in log}
    waits, usual, ttfts, lengths = [], [], [], []
    for k in range(newcomers):
        ids = _prompt(tok, PROMPT_TOKENS, k)
        lengths.append(len(ids))
        before = time.monotonic()
        time.sleep(0.5)
        arrived = time.monotonic()
        stats = StreamStats()
        for _ in backend.stream(ids, GenerationSettings(max_new_tokens=1, temperature=0), threading.Event(), stats):
            pass
        first = arrived + stats.ttft_ms / 1000
        ttfts.append(stats.ttft_ms)
        for rid in decoding:
            times = [t for r, t in log if id(r) == rid]
            usual += [b - a for a, b in zip(times, times[1:]) if before <= a and b < arrived]
            during = [t for t in times if arrived <= t <= first]
            edges = [max([t for t in times if t < arrived], default=arrived)] + during + \
                [min([t for t in times if t > first], default=first)]
            waits.append(max(b - a for a, b in zip(edges, edges[1:])))
        time.sleep(0.3)
    stop.set()
    for t in busy:
        t.join()
    backend.close()
    return {"prompt_tokens": statistics.median(lengths), "usual_gap_ms": statistics.median(usual) * 1000,
            "worst_wait_ms": max(waits) * 1000, "newcomer_ttft_ms": statistics.median(ttfts)}


def _prompt_short(tok, text: str) -> list[int]:
    from assistant.chat.service import DEFAULT_SYSTEM_PROMPT
    from assistant.model import render_chat

    return render_chat(tok, [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": text}],
                       tokenize=True)


def render(r: dict) -> str:
    from bench.report import table

    if "skipped" in r:
        return f"Not measured: {r['skipped']}."
    rows = [[label, r[k]["prompt_tokens"], r[k]["usual_gap_ms"], r[k]["worst_wait_ms"],
             r[k]["worst_wait_ms"] - r[k]["usual_gap_ms"], r[k]["newcomer_ttft_ms"]]
            for k, label in (("whole", "prefilled in one go (before)"),
                             ("chunked", f"prefilled {r['call_tokens']} tokens per round between the others' tokens "
                                         "(now)"))]
    delay = r["chunked"]["worst_wait_ms"] - r["chunked"]["usual_gap_ms"]
    return "\n".join([
        f"The llama.cpp engine on the embedded model (Q4_1, 2 threads), {r['busy']} answers decoding (greedy), "
        f"{r['newcomers']} newcomer(s) one after another, each with a prompt of its own (nothing of it cached); the "
        "others' worst wait for a token while a newcomer prefills, and their usual gap between tokens.", "",
        table(["newcomer's prompt", "tokens", "others' usual gap ms", "others' worst wait ms", "delay ms",
               "newcomer TTFT ms"], rows), "",
        f"A long newcomer delays the others' next token by **{delay:.0f} ms** at worst (target ≤ 250 ms: "
        f"{'met' if delay <= 250 else 'not met'}). The wait is one prefill call at the end of a long prompt; "
        "llama.cpp cannot put the newcomer's prompt and the others' tokens in one call here (each slot is a context "
        "of its own, for its own adapter), and smaller calls prefill no faster than decoding on this CPU."])
