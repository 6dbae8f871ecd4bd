"""The llama.cpp engine on the real embedded model: per-user adapters give peft's greedy answers, requests with
different adapters interleave (a late one starts while another decodes), and an adapter published without
a GGUF is converted on first use. Skipped, with the reason, where llama-cpp-python or llama.cpp's converter is
not installed (`make setup` builds both)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from assistant.engines.base import AdapterRef, GenerationSettings, StreamStats
from assistant.engines.llamacpp.backend import LlamaCppBackend, LlamaCppConfig, available
from assistant.engines.llamacpp.gguf_lora import BASE_NAME, GGUF_NAME, convert, converter_dir, serving_weights

pytestmark = [
    pytest.mark.skipif(not available(), reason="llama-cpp-python is not installed (make setup builds it)"),
    pytest.mark.skipif(converter_dir() is None, reason="llama.cpp's converter is not installed (make setup keeps it)"),
]
SYSTEM = "You are Attune, a helpful personal assistant. Answer clearly and concisely."
PROMPTS = ["Explain in a few sentences why the sky is blue.", "What is the capital of France?",
           "Give me three tips for sleeping better.", "Write a haiku about autumn.", "How do I boil an egg?",
           "What is 12 times 7?", "Name a few uses of baking soda.", "Who wrote Hamlet?"]
GREEDY = GenerationSettings(max_new_tokens=24, temperature=0, repetition_penalty=1.1)


def _adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A random rank-16 LoRA on every linear layer, strong enough to change greedy answers, saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.mul_(0.4)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, embedded_models_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.engines.hf.backend import TransformersBackend
    from assistant.model import LoadedModel, embedded_gguf

    model_dir = next(p for p in embedded_models_dir.iterdir() if (p / "config.json").is_file())
    tmp = tmp_path_factory.mktemp("llamacpp")
    refs = []
    for i in (1, 2):
        path = _adapter(model_dir, tmp / f"u{i}" / "v1", seed=i)
        convert(path, model_dir)  # what a publish does
        refs.append(AdapterRef(f"u{i}-v1-test", 1, str(path)))
    # the same weights as llama.cpp reads them at full precision: the "precision used" of the comparison
    f32 = tmp / "base-f32.gguf"
    subprocess.run([sys.executable, str(converter_dir() / "convert_hf_to_gguf.py"), "--outtype", "f32", "--outfile",
                    str(f32), str(model_dir)], check=True, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    peft = TransformersBackend(LoadedModel(model, tok, "smol", model_dir, "cpu", "none", 0.0, "float32"), 2048)
    fast32 = LlamaCppBackend(f32, model_dir, "smol-f32")
    served = LlamaCppBackend(embedded_gguf(), model_dir, "smol")  # what `serve` runs by default
    yield {"refs": refs, "peft": peft, "fast32": fast32, "served": served, "tok": tok, "model_dir": model_dir,
           "tmp": tmp, "f32": f32}
    for backend in (peft, fast32, served):
        backend.close()


def _ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _answer(backend, ids, ref, settings=GREEDY) -> tuple[str, StreamStats]:
    stats = StreamStats()
    return "".join(backend.stream(ids, settings, threading.Event(), stats, ref)), stats


def test_adapters_on_llama_cpp_give_pefts_greedy_answers(world):
    """At full precision each user's adapter answers as under peft: the LoRA math is the same."""
    tok, refs = world["tok"], world["refs"]
    base = [_answer(world["peft"], _ids(tok, p), None)[0] for p in PROMPTS]
    for ref in [None, *refs]:
        want = [_answer(world["peft"], _ids(tok, p), ref)[0] for p in PROMPTS]
        got = []
        for p in PROMPTS:
            text, stats = _answer(world["fast32"], _ids(tok, p), ref)
            got.append(text)
            assert stats.adapter_version == (ref.version if ref else None) and stats.completion_tokens > 0
        same = sum(a == b for a, b in zip(want, got, strict=True))
        assert same >= 7, (ref, list(zip(want, got, strict=True)))
        if ref is not None:  # the adapter really changes answers, in both engines
            assert sum(a != b for a, b in zip(want, base, strict=True)) >= 3


def test_seeded_sampling_on_llama_cpp_is_the_transformers_engines(world):
    """Both in-process engines pick tokens with one code (``engines.sampling``: penalty, temperature, the model's
    top-k, top-p, a generator per seed): at full precision the same seed gives the same sampled answer; another
    seed, other answers."""
    tok, ref = world["tok"], world["refs"][0]
    seeded = [GenerationSettings(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=seed) for seed in (7, 8)]
    want = [_answer(world["peft"], _ids(tok, p), ref, seeded[0])[0] for p in PROMPTS]
    got = [_answer(world["fast32"], _ids(tok, p), ref, seeded[0])[0] for p in PROMPTS]
    assert sum(a == b for a, b in zip(want, got, strict=True)) >= 6, list(zip(want, got, strict=True))
    other = [_answer(world["fast32"], _ids(tok, p), ref, seeded[1])[0] for p in PROMPTS]
    assert sum(a != b for a, b in zip(got, other, strict=True)) >= 6


def _loss(gguf: Path, lora: Path | None, pairs) -> float:
    """Mean negative log-likelihood (nats/token) of each (prompt, answer) pair's answer under llama.cpp."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=512, logits_all=True,
                verbose=False)
    total, n = 0.0, 0
    for ids, answer in pairs:
        llm.reset()
        llm.eval(ids + answer)
        logits = np.asarray(llm.scores[len(ids) - 1:len(ids) + len(answer) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(logp[np.arange(len(answer)), answer].sum())
        n += len(answer)
    return total / n


def test_served_weights_lose_no_more_with_an_adapter_than_without(world):
    """In the precision served (the shipped Q4_1), greedy text drifts from peft's (llama.cpp quantizes the
    activations too, with or without an adapter), so the check is the loss of peft's own answers: under the
    served weights it is within 0.02 nats/token of full precision for each user's adapter and for the base."""
    from assistant.model import embedded_gguf

    tok, gguf = world["tok"], embedded_gguf()
    for ref in [None, *world["refs"]]:
        pairs = []
        for p in PROMPTS:
            ids = _ids(tok, p)
            pairs.append((ids, tok.encode(_answer(world["peft"], ids, ref)[0], add_special_tokens=False)))
        lora = Path(ref.path) / GGUF_NAME if ref else None
        full, served = _loss(world["f32"], lora, pairs), _loss(gguf, lora, pairs)
        assert served - full < 0.02, (ref, full, served)


def test_q8_0_weights_are_written_once_and_served(world, tmp_path, monkeypatch):
    from assistant.model import embedded_gguf

    model_dir = world["model_dir"]
    weights = serving_weights(model_dir, embedded_gguf())
    assert weights == model_dir / BASE_NAME and weights.stat().st_size < world["f32"].stat().st_size / 3
    written = weights.stat().st_mtime_ns
    assert serving_weights(model_dir, embedded_gguf()).stat().st_mtime_ns == written  # reused, not redone
    q8 = LlamaCppBackend(weights, model_dir, "smol-q8")
    assert "Paris" in _answer(q8, _ids(world["tok"], PROMPTS[1]), world["refs"][0])[0]
    q8.close()
    # no converter: the shipped GGUF is served (and nothing half-written is left)
    monkeypatch.setenv("ATTUNE_LLAMA_CPP_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    fresh = tmp_path / "model"
    fresh.mkdir()
    assert serving_weights(fresh, embedded_gguf()) == embedded_gguf() and list(fresh.iterdir()) == []


def test_late_requests_start_while_others_decode_each_with_its_own_adapter(world):
    from assistant.model import embedded_gguf

    tok, (a1, a2) = world["tok"], world["refs"]
    long_ids, short_ids = _ids(tok, PROMPTS[0]), _ids(tok, PROMPTS[1])
    long_settings = GenerationSettings(max_new_tokens=96, temperature=0, repetition_penalty=1.0)
    # alone, one after the other, each prefilled from scratch in its own slot (as below)
    alone = LlamaCppBackend(embedded_gguf(), world["model_dir"], "smol")
    solo_long = _answer(alone, long_ids, a1, long_settings)[0]
    solo_short = [_answer(alone, short_ids, ref)[0] for ref in (None, a2)]
    alone.close()
    served = LlamaCppBackend(embedded_gguf(), world["model_dir"], "smol")
    results, finished = {}, {}

    def go(key, ids, ref, settings):
        results[key] = _answer(served, ids, ref, settings)
        finished[key] = time.monotonic()

    first = threading.Thread(target=go, args=("long", long_ids, a1, long_settings))
    first.start()
    time.sleep(0.3)  # the long answer is decoding now
    late = [threading.Thread(target=go, args=(f"short{i}", short_ids, ref, GREEDY)) for i, ref in enumerate((None, a2))]
    for t in late:
        t.start()
    for t in [first, *late]:
        t.join()
    assert finished["short0"] < finished["long"] and finished["short1"] < finished["long"]  # nobody waited it out
    # (their time to first token is a speed, measured in bench serving, not asserted here)
    # interleaving changes nothing: each answer is what it is alone, under its own adapter (or none)
    assert results["long"][0] == solo_long
    assert [results["short0"][0], results["short1"][0]] == solo_short
    assert solo_short[0] != solo_short[1] or solo_long != _answer(served, long_ids, None, long_settings)[0]
    served.close()


def test_a_request_arriving_mid_turn_is_let_in_before_the_turn_ends(world):
    """Busy slots decode one token each per turn; a newcomer is let in between groups of ``admit_every`` of them,
    so while 8 answers decode it gets its first token after at most one more token of theirs (the one being
    decoded when it arrived), not after the rest of the turn (up to 8). Three arrivals, so a whole-turn wait
    that happened to end early cannot pass for all three."""
    from assistant.model import embedded_gguf

    backend = LlamaCppBackend(embedded_gguf(), world["model_dir"], "smol", LlamaCppConfig(parallel=1, admit_every=1))
    log, token = [], backend._token

    def logged(req, tok):
        log.append((req, time.monotonic()))  # the request itself: an id() could be reused once a request ends
        token(req, tok)

    backend._token = logged
    tok = world["tok"]
    long = GenerationSettings(max_new_tokens=200, temperature=0, repetition_penalty=1.0)
    stories = [f"Write a long story about {t}." for t in ("a lighthouse", "a fox", "the sea", "a clock", "a city",
                                                          "a dragon", "a garden", "a train")]  # still decoding later
    busy = [threading.Thread(target=_answer, args=(backend, _ids(tok, p), None, long)) for p in stories]
    for t in busy:
        t.start()
    deadline = time.monotonic() + 60
    while len({id(r) for r, _ in log}) < len(busy) and time.monotonic() < deadline:  # all 8 are decoding
        time.sleep(0.01)
    decoding = {id(r) for r, _ in log}
    assert len(decoding) == len(busy)
    waited = []
    for i in range(3):
        arrived = time.monotonic()
        _answer(backend, _ids(tok, f"Name {i + 2} colours."), None, GenerationSettings(max_new_tokens=1))
        first = next(t for r, t in log if id(r) not in decoding and t >= arrived)
        waited.append(sum(1 for r, t in log if id(r) in decoding and arrived <= t < first))
        time.sleep(0.05)
    for t in busy:
        t.join()
    backend.close()
    assert max(waited) <= 2, f"others' tokens decoded before each newcomer's first token: {waited}"
    # the first newcomer took the spare context kept ready, the next ones the slot it left: none was created for them
    assert len(backend.slots) == len(busy) + 1


def test_a_long_newcomer_prompt_is_prefilled_in_chunks_between_the_others_tokens(world):
    """A 1,500-token prompt arriving while another answer decodes is prefilled one ``prefill_tokens`` call per round,
    the other answer getting its next token between calls, instead of waiting out the whole prefill; the newcomer's
    answer is the one it gets alone."""
    from assistant.model import embedded_gguf

    tok = world["tok"]
    notes = " ".join(f"Note {i}: the {c} box holds {i * 7} marbles." for i, c in
                     enumerate(["red", "green", "blue", "yellow", "white", "black"] * 20))
    long_ids = _ids(tok, notes + " How many marbles are in the blue boxes?")
    assert 1400 < len(long_ids) < 1900
    quick = GenerationSettings(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    story = _ids(tok, "Write a long story about a lighthouse.")
    busy_settings = GenerationSettings(max_new_tokens=400, temperature=0, repetition_penalty=1.0)

    class Whole(LlamaCppBackend):  # as before: a newcomer's whole prompt prefilled at once
        def _chunk(self, slot, others_busy):
            return len(slot.prompt)

    def others_tokens_during_prefill(engine) -> tuple[int, str]:
        backend = engine(embedded_gguf(), world["model_dir"], "smol", LlamaCppConfig(parallel=1, prefill_tokens=128))
        log, token = [], backend._token
        backend._token = lambda req, t: (log.append((req, time.monotonic())), token(req, t))
        busy = threading.Thread(target=_answer, args=(backend, story, None, busy_settings))
        busy.start()
        deadline = time.monotonic() + 60
        while len(log) < 5 and time.monotonic() < deadline:  # the story is decoding
            time.sleep(0.01)
        decoding = {id(r) for r, _ in log}
        arrived = time.monotonic()
        text = _answer(backend, long_ids, None, quick)[0]
        first = next(t for r, t in log if id(r) not in decoding and t >= arrived)
        during = sum(1 for r, t in log if id(r) in decoding and arrived <= t < first)
        for slot in backend.slots:
            if slot.req is not None:
                slot.req.stop.set()
        busy.join()
        backend.close()
        return during, text

    chunked, text = others_tokens_during_prefill(LlamaCppBackend)
    whole, alone = others_tokens_during_prefill(Whole)
    assert chunked >= 6 and whole <= 2, (chunked, whole)
    assert text == alone and text.strip()


def test_an_adapter_published_without_gguf_is_converted_on_first_use(world):
    served, tok = world["served"], world["tok"]
    path = _adapter(world["model_dir"], world["tmp"] / "u3" / "v1", seed=3)
    assert not (path / GGUF_NAME).exists()
    ref = AdapterRef("u3-v1-test", 1, str(path))
    text, stats = _answer(served, _ids(tok, PROMPTS[4]), ref)
    assert text and stats.adapter_version == 1 and (path / GGUF_NAME).is_file()
    # a version whose files are gone: a clear error for that request, the engine keeps serving
    gone = AdapterRef("u4-v1-test", 1, str(world["tmp"] / "u4" / "v1"))
    with pytest.raises(Exception, match="missing"):
        _answer(served, _ids(tok, PROMPTS[4]), gone)
    assert _answer(served, _ids(tok, PROMPTS[1]), None)[0]


def test_auto_picks_llama_cpp_for_the_embedded_model_on_a_cpu():
    from assistant.engines.select import pick_engine
    from assistant.model import ModelConfig

    assert pick_engine("auto", ModelConfig(device="cpu")) == "llamacpp"
    assert pick_engine("auto", ModelConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")) == "transformers"
    assert pick_engine("transformers", ModelConfig(device="cpu")) == "transformers"


def test_a_damaged_adapter_gguf_is_written_again_from_the_peft_files(world):
    served, tok = world["served"], world["tok"]
    path = _adapter(world["model_dir"], world["tmp"] / "u5" / "v1", seed=5)
    convert(path, world["model_dir"])
    good = (path / GGUF_NAME).read_bytes()
    (path / GGUF_NAME).write_bytes(good[: len(good) // 3])  # cut short, as a full disk or a crash leaves it
    ref = AdapterRef("u5-v1-test", 1, str(path))
    text, stats = _answer(served, _ids(tok, PROMPTS[2]), ref)
    assert text and stats.adapter_version == 1 and (path / GGUF_NAME).read_bytes() == good
    assert text != _answer(served, _ids(tok, PROMPTS[2]), None)[0]  # the adapter's answer, not the base model's
    written = (path / GGUF_NAME).stat().st_mtime_ns
    # served from the rewritten file from now on (another prompt: the same one would reuse the first answer's KV
    # cache, whose shorter evaluation rounds differently at 4 bits on some CPUs and drifts a greedy answer)
    again, stats = _answer(served, _ids(tok, PROMPTS[3]), ref)
    assert stats.adapter_version == 1 and again != _answer(served, _ids(tok, PROMPTS[3]), None)[0]
    assert (path / GGUF_NAME).stat().st_mtime_ns == written
