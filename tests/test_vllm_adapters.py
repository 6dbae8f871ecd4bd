"""vLLM-clean adapters, checked without vLLM: what training publishes passes ``vllm_problems``; every
kind of adapter vLLM refuses is named; the zero adapter is exactly the base model; the vLLM engine's
config and flags fail with messages that say what to do. (The engine itself: tests/test_vllm.py.)"""

from __future__ import annotations

import json

import pytest

from assistant.engines.vllm.adapters import ALLOWED_RANKS, check_vllm_adapter, vllm_problems, write_zero_adapter
from assistant.engines.vllm.backend import VLLMConfig
from assistant.engines.vllm.server import VLLMServer
from assistant.errors import ModelError
from assistant.model import ModelConfig, resolve_model_dir
from helpers import cli
from personalize.config import TrainConfig


def lora(tiny_model_dir, path, **kw):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(**{"r": 8, "target_modules": "all-linear", **kw})).save_pretrained(path)
    return path


def test_what_training_publishes_is_vllm_clean(store, alice, tiny_model_dir, tmp_path):
    from test_personalize import write_history

    from personalize.api import train_now
    from storage.transfer import import_history

    import_history(store, alice.id, write_history(tmp_path / "h.jsonl"))
    model_cfg = ModelConfig(model=str(tiny_model_dir))
    # TrainConfig's defaults for what the adapter looks like (rank, targets); small sizes for speed only.
    cfg = TrainConfig(epochs=1, max_steps=4, batch_size=4, max_seq_len=128, anchor_count=4, anchor_max_new_tokens=4,
                      anchor_margin=100.0, mixed_precision="no")
    assert cfg.rank in ALLOWED_RANKS
    result = train_now(store, alice.id, model_cfg, cfg)
    assert result["published"], result["reason"]
    path = store.adapters.active(alice.id)["path"]
    served = str(resolve_model_dir(model_cfg.model, store.data_dir))
    assert vllm_problems(path, served) == []
    adapter_cfg = json.loads((store.data_dir.adapters(alice.id) / "v1" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == served  # exactly what the engine serves
    assert adapter_cfg["bias"] == "none" and not adapter_cfg.get("modules_to_save")


@pytest.mark.parametrize("kw, problem", [
    ({"bias": "lora_only"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 4}, "rank"),
    ({"use_dora": True}, "DoRA"),
])
def test_adapters_vllm_refuses_are_named(tiny_model_dir, tmp_path, kw, problem):
    path = lora(tiny_model_dir, tmp_path / "a", **kw)
    problems = vllm_problems(path, str(tiny_model_dir))
    assert any(problem in p for p in problems), problems
    with pytest.raises(ModelError, match="cannot be served by vLLM.*--rollback"):
        check_vllm_adapter(path, str(tiny_model_dir), version=3)


def test_base_model_mismatch_and_missing_files(tiny_model_dir, tmp_path):
    path = lora(tiny_model_dir, tmp_path / "a")
    assert vllm_problems(path, str(tiny_model_dir)) == []
    assert vllm_problems(path, "/elsewhere/" + tiny_model_dir.name) == []  # a moved data dir: same model
    assert "base_model_name_or_path" in vllm_problems(path, "/models/other-model")[0]
    (path / "adapter_model.safetensors").unlink()
    assert "missing" in vllm_problems(path)[0]
    assert "missing" in vllm_problems(tmp_path / "nothing")[0]


def test_zero_adapter_is_exactly_the_base_model(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = write_zero_adapter(tiny_model_dir, tmp_path / "zero")
    assert write_zero_adapter(tiny_model_dir, tmp_path / "zero") == path  # written once
    assert vllm_problems(path, str(tiny_model_dir)) == []
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        want = base(ids).logits
        got = PeftModel.from_pretrained(base, str(path))(ids).logits
    assert torch.equal(want, got)


@pytest.mark.parametrize("field, value", [("url", "localhost:8000"), ("max_lora_rank", 4), ("max_loaded", 0),
                                          ("dtype", "int4"), ("nice", 40), ("start_timeout_s", 0)])
def test_vllm_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        VLLMConfig(**{field: value})


def test_missing_vllm_venv_says_to_run_make_vllm(tmp_path):
    server = VLLMServer(VLLMConfig(venv=str(tmp_path / "nope")), tmp_path, 512, tmp_path / "vllm.log")
    with pytest.raises(ModelError, match="make vllm"):
        server.command()


def test_vllm_url_needs_engine_vllm(tmp_path):
    r = cli("serve", "--vllm-url", "http://127.0.0.1:9", data_dir=tmp_path)
    assert r.returncode == 2 and "--engine vllm" in r.stderr


def test_unreachable_vllm_url_is_one_clear_error(tmp_path, embedded_models_dir):
    from conftest import seed_models

    seed_models(tmp_path, embedded_models_dir)
    r = cli("serve", "--engine", "vllm", "--vllm-url", "http://127.0.0.1:9", "--no-personalizer", "--no-memory",
            data_dir=tmp_path)
    assert r.returncode == 2 and "No vLLM server answers at http://127.0.0.1:9" in r.stderr, r.stderr
