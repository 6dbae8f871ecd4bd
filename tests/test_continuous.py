"""Continuous batching in the transformers engine: a request joins the rows being decoded at the next step and
leaves them the step it ends, with its own adapter and sampling settings, and answers exactly as it would alone."""

from __future__ import annotations

import threading
import time

import pytest

from assistant.engines.base import AdapterRef, GenerationSettings, StreamStats
from assistant.engines.hf.backend import BatchConfig, TransformersBackend
from assistant.engines.hf.registry import AdapterRegistry
from assistant.errors import ModelError
from assistant.model import ModelConfig, load_model
from storage import DataDir

PENALIZED = GenerationSettings(max_new_tokens=24, temperature=0, repetition_penalty=1.3)


def _random_adapter(tiny_model_dir, path, seed: int, **lora) -> AdapterRef:
    """A random (non-zero) LoRA on every linear layer, as a peft folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(target_modules="all-linear", init_lora_weights=False, **{"r": 4, "lora_alpha": 32,
                                                                                               **lora}))
    peft.save_pretrained(path)
    return AdapterRef(f"{path.name}-test", 1, str(path))


@pytest.fixture(scope="module")
def refs(tiny_model_dir, tmp_path_factory) -> list[AdapterRef]:
    """Two plain LoRAs (ranks 4 and 8: stacked rows pad the smaller one)."""
    tmp = tmp_path_factory.mktemp("adapters")
    return [_random_adapter(tiny_model_dir, tmp / "a1", 1), _random_adapter(tiny_model_dir, tmp / "a2", 2, r=8)]


@pytest.fixture
def backend(tiny_model_dir, tmp_path):
    loaded = load_model(ModelConfig(model=str(tiny_model_dir), quant="none", device="cpu", dtype="float32"),
                        DataDir(tmp_path / "m").ensure())
    backend = TransformersBackend(loaded, 512, AdapterRegistry(loaded.model), BatchConfig(window_ms=0))
    yield backend
    backend.close()


def _ids(backend, text: str) -> list[int]:
    return backend.tokenizer.encode(text, add_special_tokens=False)


def _answer(backend, ids, settings, adapter=None, out: dict | None = None, key=None):
    stats = StreamStats()
    try:
        text = "".join(backend.stream(ids, settings, threading.Event(), stats, adapter))
    except ModelError as e:
        text = e
    if out is not None:
        out[key] = (text, stats)
    return text, stats


def _generate_alone(tiny_model_dir, refs, ids, settings, adapter) -> str:
    """What transformers' own ``generate`` answers for one request alone (peft, the same adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), refs[0].path,
                                      adapter_name=refs[0].name)
    for ref in refs[1:]:
        model.load_adapter(ref.path, adapter_name=ref.name)
    model.eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                     max_new_tokens=settings.max_new_tokens,
                                     repetition_penalty=settings.repetition_penalty, pad_token_id=tok.pad_token_id)
        else:
            model.set_adapter(adapter.name)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=settings.max_new_tokens,
                                 repetition_penalty=settings.repetition_penalty, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_requests_joining_and_leaving_mid_decode_answer_as_generate_does_alone(backend, refs, tiny_model_dir):
    """Five requests of different lengths, adapters and answer limits join one at a time while the others decode
    (each after 3 more tokens of the batch), a sixth whose adapter is missing fails alone, and a seventh's reader
    goes away after its first piece: every other answer is exactly what ``generate`` gives for it alone, with
    the repetition penalty applied to the answer so far."""
    prompts = ["Hello there", "My dog is called Biscuit and he likes long walks", "The capital of France",
               "I prefer tea", "Tell me a story about a lighthouse keeper who"]
    adapters = [refs[0], refs[1], None, refs[0], refs[1]]
    limits = [24, 10, 20, 6, 16]
    settings = [GenerationSettings.from_request(PENALIZED, max_new_tokens=n) for n in limits]
    ids = [_ids(backend, p) for p in prompts]
    missing = AdapterRef("gone-test", 1, str(tiny_model_dir / "no-such-adapter"))
    jobs = [(ids[i], settings[i], adapters[i], i) for i in range(5)] + [(ids[0], PENALIZED, missing, "missing")]
    results: dict = {}
    threads: list[threading.Thread] = []
    log, token = [], backend._token

    def logged(req, tok):  # starts the next request every 3 tokens decoded, from inside the engine's worker
        log.append(req)
        token(req, tok)
        if len(log) % 3 == 0 and len(threads) < len(jobs):
            threads.append(threading.Thread(target=_answer, args=(backend, *jobs[len(threads)][:3], results,
                                                                   jobs[len(threads)][3])))
            threads[-1].start()

    backend._token = logged
    stream = backend.stream(ids[2], PENALIZED, threading.Event(), StreamStats(), refs[1])
    next(stream)  # a reader that goes away after its first piece
    stream.close()
    deadline = time.monotonic() + 60
    while len(threads) < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(threads) == len(jobs), "decoding stopped before every request was started"
    for t in threads:
        t.join()
    assert isinstance(results["missing"][0], ModelError)
    expected = [_generate_alone(tiny_model_dir, refs, ids[i], settings[i], adapters[i]) for i in range(5)]
    assert [results[i][0] for i in range(5)] == expected
    assert [results[i][1].adapter_version for i in range(5)] == [1, 1, None, 1, 1]
    assert max(backend.batch_sizes) >= 3 and len(backend.batch_sizes) >= 5  # they joined at different steps


def test_a_request_arriving_while_others_decode_starts_at_the_next_step(backend, refs):
    """While 8 long answers decode, each of 3 newcomers gets its first token after at most one more token of each
    of them (the step being decoded when it arrived), not after their answers end (static batching)."""
    log, token = [], backend._token

    def logged(req, tok):
        log.append((req, time.monotonic()))  # the request itself: an id() can be reused once a request ends
        token(req, tok)

    backend._token = logged
    long = GenerationSettings(max_new_tokens=300, temperature=0, repetition_penalty=1.0)
    busy = [threading.Thread(target=_answer, args=(backend, _ids(backend, f"story number {i}"), long, refs[i % 2]))
            for i in range(8)]
    for t in busy:
        t.start()
    deadline = time.monotonic() + 60
    while len({id(r) for r, _ in log}) < len(busy) and time.monotonic() < deadline:
        time.sleep(0.01)
    decoding = list({id(r): r for r, _ in log}.values())
    assert len(decoding) == len(busy)
    waited = []
    for i in range(3):
        arrived = time.monotonic()
        _answer(backend, _ids(backend, f"name {i + 2} colours"), GenerationSettings(max_new_tokens=1), refs[1])
        first = next(t for r, t in log if all(r is not d for d in decoding) and t >= arrived)
        per_row = [sum(1 for r, t in log if r is d and arrived <= t < first) for d in decoding]
        waited.append(max(per_row))
    assert not any(r.finished for r in decoding), "the long answers ended before the newcomers: make them longer"
    backend.cancel_all()
    for t in busy:
        t.join()
    assert max(waited) <= 1, f"tokens of each busy answer decoded before each newcomer's first token: {waited}"


def test_rows_with_different_sampling_settings_share_a_step_and_keep_their_answers(backend, refs):
    """A greedy answer and a seeded sampled answer (its own temperature, top-p, seed) decode in the same steps;
    each is what it is alone: a seeded row draws from its own generator, whoever it shares the batch with."""
    greedy = GenerationSettings(max_new_tokens=20, temperature=0, repetition_penalty=1.1)
    seeded = GenerationSettings(max_new_tokens=20, temperature=0.9, top_p=0.8, seed=5)
    a, b = _ids(backend, "Hello there"), _ids(backend, "I prefer tea")
    alone = [_answer(backend, a, greedy, refs[0])[0], _answer(backend, b, seeded, refs[1])[0]]
    backend.batch = BatchConfig(window_ms=500)  # the second request arrives within the window: one batch
    results: dict = {}
    threads = [threading.Thread(target=_answer, args=(backend, a, greedy, refs[0], results, 0)),
               threading.Thread(target=_answer, args=(backend, b, seeded, refs[1], results, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.batch_sizes[-1] == 2
    assert [results[0][0], results[1][0]] == alone
    other_seed = GenerationSettings.from_request(seeded, seed=6)
    assert _answer(backend, b, other_seed, refs[1])[0] != alone[1]  # the seed decides the draw


def test_an_adapter_that_is_not_plain_lora_is_a_clear_error_for_its_user_only(backend, refs, tiny_model_dir,
                                                                               tmp_path):
    """A DoRA adapter (Attune trains plain LoRA; peft cannot batch DoRA with other adapters): its request fails
    with a message naming the rollback, and a plain adapter's request in the same window answers as alone."""
    dora = _random_adapter(tiny_model_dir, tmp_path / "dora", 3, use_dora=True)
    prompts = [_ids(backend, "Hello there"), _ids(backend, "The capital of France")]
    backend.batch = BatchConfig(window_ms=500)
    results: dict = {}
    threads = [threading.Thread(target=_answer, args=(backend, prompts[0], PENALIZED, dora, results, 0)),
               threading.Thread(target=_answer, args=(backend, prompts[1], PENALIZED, refs[0], results, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    error = results[0][0]
    assert isinstance(error, ModelError) and "plain LoRA" in str(error) and "--rollback" in str(error)
    assert results[1][0] == _generate_alone(tiny_model_dir, refs, prompts[1], PENALIZED, refs[0])
    assert not backend.registry._pins  # the refused adapter is not left pinned


def test_sampling_keeps_the_tokens_transformers_keeps():
    """Repetition penalty, temperature, top-k and top-p per row give the scores transformers' own logits
    processors give for that row's settings (the same tokens kept, the same probabilities)."""
    import torch
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from assistant.engines.sampling import Sampling, penalize, warp

    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 3
    seen_ids = torch.randint(0, 500, (3, 40))
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter_(1, seen_ids, True)
    rows = [Sampling(0.7, 0.9, 1.1, None), Sampling(1.3, 0.5, 1.0, 3), Sampling(0.4, 1.0, 1.5, None)]
    ours = warp(penalize(logits, seen, [s.repetition_penalty for s in rows]), rows, top_k=50)
    for i, s in enumerate(rows):
        chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(s.repetition_penalty),
                                     TemperatureLogitsWarper(s.temperature), TopKLogitsWarper(50),
                                     TopPLogitsWarper(s.top_p)])
        theirs = chain(seen_ids[i:i + 1], logits[i:i + 1].clone())[0]
        assert torch.equal(torch.isfinite(ours[i]), torch.isfinite(theirs))
        assert torch.allclose(ours[i].softmax(-1), theirs.softmax(-1), atol=1e-6)
