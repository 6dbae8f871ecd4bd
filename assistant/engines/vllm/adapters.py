"""What vLLM needs of a peft adapter folder, checked without loading it, and the all-zero adapter that
base-model requests go through on vLLM.

vLLM serves plain LoRA only: ``bias="none"``, no ``modules_to_save`` (full copies of lm_head or the
embeddings), no DoRA, no PiSSA/OLoRA/LoftQ/CorDA initialisation, a rank in its allowed set, and a
``base_model_name_or_path`` naming the model it serves (notes/engines.md). Every published version
must pass :func:`vllm_problems`; a test checks it on what training publishes.

The zero adapter: on vLLM's CPU build a request without an adapter that shares a batch with adapter
requests is corrupted after its first token (the no-LoRA slot index wraps to the last adapter), so the
vLLM engine sends base-model requests through a LoRA whose weights are all zero: exactly the base model.
Knows nothing of torch until :func:`write_zero_adapter` is called.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from assistant.errors import ModelError
from storage.errors import CLI
from storage.paths import publish_dir, remove_tree

ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""LoRA ranks vLLM accepts (``--max-lora-rank`` must be one of them and at least every adapter's rank)."""
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Llama linear layers vLLM applies LoRA to."""
_BAD_INITS = ("pissa", "olora", "loftq", "corda", "eva")


def vllm_problems(path: str | Path, served_model: str | None = None) -> list[str]:
    """Why vLLM would refuse (or mis-serve) the adapter in ``path``; empty when it is vLLM-clean.

    ``served_model``: the ``--model`` string the engine serves; the adapter's ``base_model_name_or_path``
    must equal it (a folder moved to another machine may differ in its parent path only)."""
    path = Path(path)
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        return [f"adapter_config.json is missing or unreadable in {path}: {e}"]
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}; vLLM serves plain LoRA only")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias is {cfg.get('bias')!r}; vLLM needs bias='none'")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save is {cfg['modules_to_save']!r}; vLLM cannot load full module copies")
    if cfg.get("use_dora"):
        problems.append("use_dora is set; vLLM does not serve DoRA")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BAD_INITS):
        problems.append(f"init_lora_weights is {init!r}; vLLM cannot serve it (it changes the base weights)")
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    if any(r not in ALLOWED_RANKS for r in ranks):
        problems.append(f"rank {sorted({r for r in ranks if r not in ALLOWED_RANKS}, key=str)} is not one of "
                        f"vLLM's {ALLOWED_RANKS}")
    base = cfg.get("base_model_name_or_path")
    if served_model is not None and base != str(served_model) and Path(str(base)).name != Path(served_model).name:
        problems.append(f"base_model_name_or_path is {base!r}, but the engine serves {served_model!r}")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        problems.append(f"{weights.name} is missing (vLLM loads safetensors adapters)")
    else:
        try:
            odd = [k for k in _safetensors_keys(weights) if ".lora_A." not in k and ".lora_B." not in k]
        except (OSError, ValueError, struct.error) as e:
            return [*problems, f"{weights.name} is damaged ({type(e).__name__}: {e})"]
        if odd:
            problems.append(f"the weights hold non-LoRA tensors, e.g. {odd[0]!r}")
    return problems


def check_vllm_adapter(path: str | Path, served_model: str | None = None, version: int | None = None) -> None:
    """Raise a ``ModelError`` that says what to do when the adapter cannot be served by vLLM."""
    problems = vllm_problems(path, served_model)
    if problems:
        which = f"Adapter v{version}" if version is not None else f"The adapter in {path}"
        raise ModelError(f"{which} cannot be served by vLLM: {'; '.join(problems)}. Roll back with "
                         f"`{CLI} adapters NAME --rollback VERSION`, or serve with --engine transformers.")


def _safetensors_keys(path: Path) -> list[str]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return [k for k in header if k != "__metadata__"]


def _shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """``{"model.layers.0.self_attn.q_proj": (out, in), ...}`` read from the safetensors headers."""
    shapes = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, meta in header.items():
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEAR_TARGETS:
                shapes[module] = tuple(meta["shape"])
    return shapes


def write_zero_adapter(model_dir: str | Path, out_dir: str | Path, rank: int = 8) -> Path:
    """An all-zero LoRA on every linear layer of the model in ``model_dir`` (written once, atomically)."""
    out_dir = Path(out_dir)
    if (out_dir / "adapter_model.safetensors").is_file():
        return out_dir
    import torch
    from safetensors.torch import save_file

    shapes = _shapes(Path(model_dir))
    if not shapes:
        raise ModelError(f"No Llama-style linear layers found in {model_dir}; the vLLM engine needs one.")
    tensors = {}
    for module, (rows, cols) in shapes.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(rank, cols)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(rows, rank)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "bias": "none", "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes}),
              "modules_to_save": None, "use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": str(model_dir)}
    staging = out_dir.with_name(f".{out_dir.name}.tmp")
    remove_tree(staging)
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / "adapter_model.safetensors"))
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=1))
    publish_dir(staging, out_dir)
    return out_dir
