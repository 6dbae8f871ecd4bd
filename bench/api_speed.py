"""Speed through the API: one user's answer streamed through ``/v1/chat/completions`` (the OpenAI client, a real
``serve`` process on loopback, memory on as served by default) beside the same engine at its seam and plain
llama-cpp-python on the same GGUF, all in one run: the gap between the engine and the client stays visible.

Decode speed is completion tokens after the first over the time after it: from the answer's own row (what the
server logged) and as the client saw the chunks arrive. Greedy, the serving defaults otherwise. The llama.cpp
engine (what ``--engine auto`` serves on a CPU; it needs ``make setup``), and the transformers engine at its seam
and through the API beside it; the browser UI on the llama.cpp server (headless Chromium), from the answers' rows."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper and a storm."


def run(quick: bool = False) -> dict:
    from assistant.engines.llamacpp.backend import available
    from assistant.engines.llamacpp.gguf_lora import converter_dir

    if not available() or converter_dir() is None:
        return {"skipped": "llama-cpp-python or llama.cpp's converter is missing (make setup)"}
    tokens, repeats = (32, 2) if quick else (128, 5)
    data, key, ref = _user_with_adapter()
    out: dict = {"new_tokens": tokens, "repeats": repeats}
    from bench.common import in_fresh_process
    from bench.serving import _llama_cpp

    # each in-process leg in a process of its own: one engine's threads and OpenMP runtime slow the next
    out["seam"] = in_fresh_process(_seam, data, ref, tokens, repeats)
    out["plain_llamacpp"] = in_fresh_process(_llama_cpp, tokens, PROMPT)
    out["api"] = _api(data, key, tokens, repeats)
    out["transformers"] = {"seam": in_fresh_process(_seam, data, ref, tokens, repeats, "transformers"),
                           "api": _api(data, key, tokens, repeats, "transformers")}
    return out


def _user_with_adapter():
    """A data dir with the bench's converted model, user alice with an API key and a published adapter (its GGUF
    converted as a publish converts it)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from assistant.chat.adapters import resolve_adapter
    from assistant.engines.llamacpp.gguf_lora import convert
    from assistant.model import resolve_model_dir
    from bench.common import fresh_data_dir
    from bench.serving import _publish
    from helpers import cli
    from storage.db import Store

    data = fresh_data_dir("attune-api-speed-")
    cli("users", "add", "alice", data_dir=data.root, stdin="correct horse\n")
    key = cli("users", "key", "alice", data_dir=data.root).stdout.strip()
    store = Store(data)
    alice = store.users.by_name("alice").id
    model_dir = resolve_model_dir("embedded", data)
    _publish(store, alice, 1, model_dir, seed=0)
    ref = resolve_adapter(store, alice)
    convert(Path(ref.path), model_dir)
    store.close()
    return data, key, ref


def _seam(data, ref, tokens: int, repeats: int, engine: str = "llamacpp") -> dict:
    """The engine in this process as ``serve`` builds it (``engine``: llamacpp or transformers, the serving
    defaults), on the default system prompt and the question (the API's prompt may also carry a memory block)."""
    from assistant.chat.service import ChatConfig
    from assistant.engines.base import GenerationSettings, StreamStats
    from assistant.engines.select import build_backend
    from assistant.model import ModelConfig, render_chat

    backend = build_backend(data, ModelConfig(), 2048, engine=engine)
    messages = [{"role": "system", "content": ChatConfig().system_prompt}, {"role": "user", "content": PROMPT}]
    ids = render_chat(backend.tokenizer, messages, tokenize=True)

    def once(adapter) -> float:
        stats = StreamStats()
        for _ in backend.stream(ids, GenerationSettings(max_new_tokens=tokens, temperature=0), threading.Event(),
                                stats, adapter):
            pass
        return (stats.completion_tokens - 1) / ((stats.latency_ms - stats.ttft_ms) / 1000)

    once(None), once(ref)  # warm-up: a context, the adapter loaded
    out = {name: statistics.median(once(adapter) for _ in range(repeats))
           for name, adapter in (("base", None), ("adapter", ref))}
    backend.close()
    return out


def _api(data, key: str, tokens: int, repeats: int, engine: str = "llamacpp") -> dict:
    """``serve --engine ENGINE`` (memory on; no personalizer, so no training job starts mid-run) and the OpenAI
    client streaming one answer at a time."""
    import openai

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import Server
    from storage.db import Store

    out = {}
    with Server(data.root, "--engine", engine, "--no-personalizer") as server:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)
        store = Store(data)
        for name, use_adapter in (("base", False), ("adapter", True)):
            rows, seen = [], []
            for i in range(repeats + 1):
                first = last = usage = None
                for chunk in client.chat.completions.create(
                        model="attune", messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens,
                        temperature=0, stream=True, extra_body={"use_adapter": use_adapter}):
                    if chunk.choices and chunk.choices[0].delta.content:
                        first, last = first or time.perf_counter(), time.perf_counter()
                    usage = getattr(chunk, "usage", None) or usage
                if not i:
                    continue  # warm-up
                n, latency, ttft = store.db.execute(
                    "SELECT completion_tokens, latency_ms, ttft_ms FROM messages WHERE role = 'assistant' "
                    "ORDER BY id DESC LIMIT 1").fetchone()
                rows.append((n - 1) / ((latency - ttft) / 1000))
                seen.append((usage.completion_tokens - 1) / (last - first))
            out[name] = {"row_tok_s": statistics.median(rows), "client_tok_s": statistics.median(seen)}
        if engine == "llamacpp":
            out["ui"] = _ui(server, store, tokens, repeats)
        store.close()
    return out


def _ui(server, store, tokens: int, repeats: int) -> dict:
    """The same answer asked in the browser UI (headless Debian Chromium, a new chat each time, greedy, ``tokens``
    new tokens): decode speed from the answer's row, which the Gradio handler's pace sets."""
    from playwright.sync_api import expect, sync_playwright

    from helpers import CHROMIUM, CHROMIUM_ARGS, long_answers, open_page, send, sign_in, wait_for

    if not Path(CHROMIUM).exists():
        return {"skipped": "Debian chromium is not installed (make test installs it)"}
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = open_page(browser, server)
        sign_in(page, "alice", "correct horse")
        long_answers(page, tokens)
        temperature = page.locator("#settings input[type=number]").first
        temperature.fill("0")
        temperature.press("Tab")
        for name, use_adapter in (("base", False), ("adapter", True)):
            page.locator("#use-adapter input").set_checked(use_adapter)
            rows = []
            for i in range(repeats + 1):
                page.locator("#new-btn").click()
                before = _answers(store)
                send(page, PROMPT)
                wait_for(lambda: _answers(store) > before, 300, what="the UI's answer")
                expect(page.locator("#send-btn")).to_be_visible(timeout=300_000)
                n, latency, ttft, version = store.db.execute(
                    "SELECT completion_tokens, latency_ms, ttft_ms, adapter_version FROM messages "
                    "WHERE role = 'assistant' ORDER BY id DESC LIMIT 1").fetchone()
                if (version is not None) != use_adapter or n < tokens // 2:
                    raise RuntimeError(f"the UI answer was not what was asked (adapter v{version}, {n} tokens)")
                if i:  # the first is a warm-up
                    rows.append((n - 1) / ((latency - ttft) / 1000))
            out[name] = {"row_tok_s": statistics.median(rows)}
        browser.close()
    return out


def _answers(store) -> int:
    return store.db.execute("SELECT count(*) FROM messages WHERE role = 'assistant'").fetchone()[0]


def render(r: dict) -> str:
    from bench.report import table

    if "skipped" in r:
        return f"Not measured: {r['skipped']}."
    plain, seam, api = r["plain_llamacpp"]["decode_tok_s"], r["seam"], r["api"]
    rows = [[f"plain llama-cpp-python {r['plain_llamacpp'].get('version', '')}, same GGUF, base model (anchor)",
             plain, None, 1.0]]
    for name, label in (("base", "base model"), ("adapter", "with the user's LoRA adapter")):
        rows += [[f"llama.cpp engine at its seam: {label}", seam[name], None, seam[name] / plain],
                 [f"**through the API: {label}** (the answer's row / as the client saw it)", api[name]["row_tok_s"],
                  api[name]["client_tok_s"], api[name]["row_tok_s"] / plain]]
    ui = api.get("ui") or {}
    for name, label in (("base", "base model"), ("adapter", "with the user's LoRA adapter")) if "base" in ui else ():
        rows += [[f"through the browser UI: {label}", ui[name]["row_tok_s"], None, ui[name]["row_tok_s"] / plain]]
    hf = r.get("transformers")
    for name, label in (("base", "base model"), ("adapter", "with the user's LoRA adapter")) if hf else ():
        rows += [[f"transformers engine at its seam: {label}", hf["seam"][name], None, hf["seam"][name] / plain],
                 [f"through the API, transformers engine: {label}", hf["api"][name]["row_tok_s"],
                  hf["api"][name]["client_tok_s"], hf["api"][name]["row_tok_s"] / plain]]
    base, adapter = api["base"]["row_tok_s"] / plain, api["adapter"]["row_tok_s"] / plain
    gaps = [api[n]["row_tok_s"] / seam[n] for n in ("base", "adapter")]
    return "\n".join([
        f"One user, {r['new_tokens']} new tokens greedy, median of {r['repeats']}, all in one run; the API server "
        "serves with memory on (its default), without the personalizer (so no training job starts mid-run).", "",
        table(["", "decode tok/s", "client tok/s", "× plain llama.cpp"], rows), "",
        f"Through the API: base **{base:.2f}×** plain llama.cpp (target ≥ 0.9×: "
        f"{'met' if base >= 0.9 else 'not met'}), "
        f"with the adapter **{adapter:.2f}×** (target ≥ 0.8×: {'met' if adapter >= 0.8 else 'not met'}); the API rows "
        f"are {gaps[0]:.2f}× and {gaps[1]:.2f}× the engine-seam rows (target within 10%: "
        f"{'met' if min(gaps) >= 0.9 else 'not met'}).", *_ui_line(ui, seam), *_transformers_line(hf)])


def _ui_line(ui: dict, seam: dict) -> list[str]:
    if "base" not in ui:
        return ["", f"The browser UI: not measured ({ui.get('skipped', 'no UI leg in this run')})."]
    gaps = [ui[n]["row_tok_s"] / seam[n] for n in ("base", "adapter")]
    return ["", f"Through the browser UI (headless Chromium signed in as the user, a new chat per answer, greedy, "
                f"the same server): {gaps[0]:.2f}× (base) and {gaps[1]:.2f}× (adapter) the engine-seam rows. "
                "Chromium runs on the same 2 cores here and renders every page update, so this row is a floor: a "
                "browser on the user's own device takes nothing from the server."]


def _transformers_line(hf: dict | None) -> list[str]:
    if not hf:
        return []
    gaps = [hf["api"][n]["row_tok_s"] / hf["seam"][n] for n in ("base", "adapter")]
    return ["", f"The transformers engine (`--engine transformers`, its serving dtype on this CPU): the API rows are "
                f"{gaps[0]:.2f}× (base) and {gaps[1]:.2f}× (adapter) its seam rows."]
