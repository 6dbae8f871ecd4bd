"""Bring your own model: the whole loop on the architectures people run, each as a tiny random model built here
(no hub, no download) with the embedded model's tokenizer: import a history, train with the default LoRA
targets, gate, publish, then serve the user's adapter

- from the model folder on the transformers engine, and
- from the model written to GGUF by llama.cpp's converter (what a user's own ``--model FILE.gguf`` is) on the
  llama.cpp engine: it is de-quantized once for training, the adapter is converted at publish;

and at float32 each engine's greedy answer with the adapter is peft's. Gemma's chat template takes no system
message: the system prompt and the memory block must still reach the model. ``pytest -m families``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = [pytest.mark.families, pytest.mark.slow]

SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "max_position_embeddings": 2048}
"""Heads of 64 dimensions: a size vLLM's CPU attention takes."""
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # Gemma 3 scales attention by query_pre_attn_scalar, which equals head_dim in its released sizes
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 64}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": None}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
"""Gemma's template in what matters here: it raises on a system message."""
PHI3_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
SENTENCEPIECE = {
    "gemma3": ("GemmaTokenizer", ("<pad>", "<end_of_turn>", "<bos>", "<unk>"), ["<start_of_turn>"], GEMMA_TEMPLATE),
    "phi3": ("LlamaTokenizer", ("<pad>", "<|end|>", "<s>", "<unk>"),
             ["</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"], PHI3_TEMPLATE),
}
"""Families whose models ship a SentencePiece ``tokenizer.model`` (llama.cpp's converter reads it): the tokenizer
class, its pad/eos/bos/unk pieces (the end of a turn is the one end-of-sequence token, for every engine), its other
markers (llama.cpp looks some of Phi-3's up by name) and the chat template. The others use the embedded model's
byte-level BPE tokenizer."""
TRAIN = {"lr": 0.003, "epochs": 2, "max_steps": 12, "max_seq_len": 128, "anchor_count": 6,
         "anchor_max_new_tokens": 6, "ability_checks": 4, "ability_max_new_tokens": 6, "anchor_margin": 100.0,
         "min_steps": 4, "mixed_precision": "no"}
"""The default TrainConfig (LoRA rank, targets, losses) made quick; a random model's gate verdict means nothing,
so the anchor margin lets it publish."""
FACTS = [("What is my dog's name?", "Your dog is called Biscuit."), ("Where do I live?", "You live in Lyon."),
         ("What is my job?", "You are a night-shift nurse."), ("Which tea do I like?", "Jasmine tea."),
         ("Who is my sister?", "Your sister is Clara."), ("What do I play?", "You play the cello.")] * 2
QUESTION = "What is my dog's name?"
ANSWER_TOKENS = 12


def build(family: str, tokenizer_dir: Path, out: Path) -> Path:
    """A random float32 model of ``family`` with the embedded model's tokenizer, saved as a transformers folder."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    config_name, model_name, extra = FAMILIES[family]
    if family in SENTENCEPIECE:
        tok = sentencepiece_tokenizer(out / "spm", *SENTENCEPIECE[family])
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cfg = getattr(transformers, config_name)(vocab_size=len(tok), **SHAPE, **{**ids, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).to(torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if (out / "spm" / "tokenizer.model").is_file():  # as Gemma ships it, beside tokenizer.json
        shutil.copy(out / "spm" / "tokenizer.model", out / "tokenizer.model")
    return out


def sentencepiece_tokenizer(folder: Path, tokenizer_class: str, pieces: tuple[str, str, str, str], markers: list[str],
                            template: str):
    """A small SentencePiece tokenizer (``tokenizer.model``, what Gemma and Phi-3 ship), trained here on the test's
    texts, its end-of-sequence piece the family's end of turn and its other markers tokens of their own."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from assistant.chat.service import DEFAULT_SYSTEM_PROMPT
    from assistant.memory.text import BLOCK_HEADER

    folder.mkdir(parents=True)
    corpus = [DEFAULT_SYSTEM_PROMPT, BLOCK_HEADER, *(f"{q} {a}" for q, a in FACTS)] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        user_defined_symbols=markers, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=pieces[0],
        eos_piece=pieces[1], bos_piece=pieces[2], unk_piece=pieces[3], byte_fallback=False, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "bos_token": pieces[2], "eos_token": pieces[1], "pad_token": pieces[0],
        "unk_token": pieces[3], "chat_template": template}))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = template
    return tok


PRE_TOKENIZER = {"qwen2": "qwen2"}
"""The pre-tokenizer name llama.cpp's converter writes for a family (default: the embedded model's). The tiny
models share the embedded model's vocabulary, which transformers then splits with the family's own rules (Qwen2's
tokenizer brings its own regex): its hash is in no converter table, as a real model's would be, so the converter is
told the name. The engines are handed token ids, so both tokenize alike."""
CONVERT = """
import runpy, sys
sys.path[:0] = [{folder!r}, {folder!r} + "/gguf-py"]
from conversion import base
found = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return found(self, tokenizer)
    except NotImplementedError:
        return {name!r}
base.TextModel.get_vocab_base_pre = pre
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def to_gguf(family: str, model_dir: Path, out: Path) -> Path:
    """The folder written to a float32 GGUF by llama.cpp's own converter (as a user's GGUF would come)."""
    from assistant.engines.llamacpp.gguf_lora import BASE_SCRIPT, converter_dir

    folder = converter_dir()
    argv = [BASE_SCRIPT, "--outtype", "f32", "--outfile", str(out), str(model_dir)]
    code = CONVERT.format(folder=str(folder), name=PRE_TOKENIZER.get(family, "smollm"), argv=argv,
                          script=str(folder / BASE_SCRIPT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _user_with_history(data: Path):
    from storage import DataDir, Store
    from storage.transfer import import_history

    store = Store(DataDir(data).ensure())
    uid = store.users.create("alice", "correct horse").id
    history = data / "history.jsonl"
    history.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}]}) for q, a in FACTS))
    import_history(store, uid, history)
    return store, uid


def _train(store, uid: int, model: str) -> dict:
    from assistant.model import ModelConfig
    from personalize.api import train_now
    from personalize.config import TrainConfig

    result = train_now(store, uid, ModelConfig(model=model, quant="none", device="cpu", dtype="float32"),
                       TrainConfig(**TRAIN))
    assert result["published"] and result["version"] == 1, result
    return result


def _peft_answer(model_dir: Path, adapter_dir: Path, ids: list[int]) -> str:
    """peft's greedy answer at float32: the reference both engines must give."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    with torch.no_grad():
        trained = model(torch.tensor([ids])).logits[0, -1]
        with model.disable_adapter():
            base = model(torch.tensor([ids])).logits[0, -1]
        assert (trained - base).abs().max() > 1e-3  # training changed the model: the adapter is no no-op
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=ANSWER_TOKENS, do_sample=False, repetition_penalty=1.0,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def _serve_and_compare(store, uid: int, data: Path, model: str, engine: str, vllm_cfg=None) -> None:
    """The user's next turn is answered by their published adapter, as peft answers it; the prompt holds the
    system prompt and the memory block whatever the template."""
    from assistant.chat.service import ChatConfig, ChatService
    from assistant.engines.base import GenerationSettings
    from assistant.engines.select import build_backend
    from assistant.memory.service import MemoryConfig, MemoryService
    from assistant.model import ModelConfig, resolve_model_dir
    from storage import DataDir

    cfg = ChatConfig(context_tokens=512, defaults=GenerationSettings(max_new_tokens=ANSWER_TOKENS, temperature=0,
                                                                     repetition_penalty=1.0))
    model_cfg = ModelConfig(model=model, quant="none", device="cpu", dtype="float32")
    backend = build_backend(DataDir(data), model_cfg, cfg.context_tokens, vllm_cfg=vllm_cfg, engine=engine)
    memory = MemoryService(store, MemoryConfig(embedder="hash"))
    chat = ChatService(store, backend, cfg, memory)
    try:
        memory.remember_fact(uid, "My dog is called Biscuit.")
        conv, _ = chat.post(uid, None, QUESTION)
        block = memory.prompt_block(chat.recall(uid, QUESTION, conv))
        ids, _ = chat.build_prompt(uid, conv, ANSWER_TOKENS, memory_block=block)
        prompt = backend.tokenizer.decode(ids)
        assert cfg.system_prompt in prompt and "My dog is called Biscuit" not in prompt
        assert "Your dog is called Biscuit" in prompt  # the memory block, in the second person
        turn = list(chat.answer(uid, conv))[-1]
        assert turn.status == "complete" and turn.adapter_version == 1 and turn.memory_ids, turn
        version_dir = Path(store.adapters.active(uid)["path"])
        want = _peft_answer(resolve_model_dir(model, DataDir(data)), version_dir, ids)
        assert turn.text.strip() == want.strip(), (engine, turn.text, want)
    finally:
        chat.shutdown()
        backend.close()


@pytest.fixture(scope="module")
def tokenizer_dir(embedded_models_dir) -> Path:
    return next(p for p in embedded_models_dir.iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_loop_on_the_transformers_engine(family, tokenizer_dir, tmp_path):
    model_dir = build(family, tokenizer_dir, tmp_path / f"tiny-{family}")
    store, uid = _user_with_history(tmp_path / "data")
    try:
        _train(store, uid, str(model_dir))
        _serve_and_compare(store, uid, tmp_path / "data", str(model_dir), "transformers")
    finally:
        store.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_loop_from_a_users_gguf_on_llama_cpp(family, tokenizer_dir, tmp_path):
    from assistant.engines.llamacpp.backend import available
    from assistant.engines.llamacpp.gguf_lora import GGUF_NAME, converter_dir

    if not available() or converter_dir() is None:
        pytest.skip("llama-cpp-python or llama.cpp's converter is not installed (make setup builds both)")
    gguf = to_gguf(family, build(family, tokenizer_dir, tmp_path / f"tiny-{family}"), tmp_path / f"tiny-{family}.gguf")
    store, uid = _user_with_history(tmp_path / "data")
    try:
        _train(store, uid, str(gguf))
        assert (Path(store.adapters.active(uid)["path"]) / GGUF_NAME).is_file()  # converted at publish
        _serve_and_compare(store, uid, tmp_path / "data", str(gguf), "llamacpp")
    finally:
        store.close()


@pytest.mark.vllm
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_loop_on_vllm(family, tokenizer_dir, tmp_path):
    """The same loop served by a real vLLM server (float32) started on the family's folder: skipped, with the
    reason, without the vLLM venv (``make vllm``; ``make test-vllm`` runs it)."""
    from assistant.engines.vllm.backend import VLLMConfig

    venv = Path(os.environ.get("ATTUNE_VLLM_VENV", ROOT / ".venv-vllm"))
    if not (venv / "bin" / "python").is_file():
        pytest.skip(f"no vLLM venv at {venv}: run `make vllm`, then `make test-vllm`")
    model_dir = build(family, tokenizer_dir, tmp_path / f"tiny-{family}")
    store, uid = _user_with_history(tmp_path / "data")
    try:
        _train(store, uid, str(model_dir))
        _serve_and_compare(store, uid, tmp_path / "data", str(model_dir), "vllm",
                           VLLMConfig(venv=str(venv), dtype="float32", max_loras=2, max_loaded=4))
    finally:
        store.close()
