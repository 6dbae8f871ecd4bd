"""GGUF files for the llama.cpp engine (``assistant.engines.llamacpp.backend``): the base model's serving weights and
peft LoRA adapters.

On request (``LlamaCppConfig.weights``) the base model is served as llama.cpp's Q8_0 of the transformers weights
that training uses (``convert_hf_to_gguf.py``, once per model folder, ~10 s). The converters are llama.cpp's own:
not in any wheel, but they ship inside llama-cpp-python's source package, and ``make setup`` keeps a copy (with
their ``gguf-py`` and ``conversion`` packages) in ``<venv>/share/attune/llama.cpp`` (``$ATTUNE_LLAMA_CPP_DIR``
overrides). A version's GGUF lives in its own folder next to the peft files, so it is pruned and deleted with the
version: the training job writes it at publish; the engine converts a version published before (or without the
converter) on first use.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from assistant.errors import ModelError

GGUF_NAME = "adapter.gguf"
BASE_NAME = "model.q8_0.gguf"
CONVERTER_ENV = "ATTUNE_LLAMA_CPP_DIR"
SCRIPT = "convert_lora_to_gguf.py"
BASE_SCRIPT = "convert_hf_to_gguf.py"
log = logging.getLogger(__name__)


def converter_dir() -> Path | None:
    """The folder holding ``convert_lora_to_gguf.py`` and its packages, or None when it is not installed."""
    env = os.environ.get(CONVERTER_ENV)
    for folder in ([Path(env)] if env else []) + [Path(sys.prefix) / "share" / "attune" / "llama.cpp"]:
        if (folder / SCRIPT).is_file():
            return folder
    return None


def gguf_path(adapter_dir: Path) -> Path:
    return Path(adapter_dir) / GGUF_NAME


def convert(adapter_dir: Path, base_dir: Path, timeout: float = 300) -> Path:
    """Write ``adapter_dir/adapter.gguf`` (f32) from the peft adapter there; ``base_dir`` is the base model's
    transformers folder (its config names the architecture). Atomic: a reader sees no file or a whole one."""
    out = gguf_path(adapter_dir)
    _run(SCRIPT, ["--base", str(base_dir), "--outtype", "f32", str(adapter_dir)], out, timeout,
         f"Could not convert the adapter in {adapter_dir} to GGUF")
    return out


def serving_weights(model_dir: Path, shipped: Path, timeout: float = 600) -> Path:
    """The GGUF the llama.cpp engine serves: ``model_dir/model.q8_0.gguf`` (written once from the transformers
    folder ``model_dir``), or ``shipped`` (the model's own GGUF) when the converter is missing or fails."""
    out = Path(model_dir) / BASE_NAME
    if out.is_file():
        return out
    try:
        log.info("writing llama.cpp's Q8_0 of %s (once)", model_dir)
        _run(BASE_SCRIPT, ["--outtype", "q8_0", str(model_dir)], out, timeout,
             f"Could not convert {model_dir} to a Q8_0 GGUF")
    except ModelError as e:
        log.warning("%s; serving %s as shipped.", e, shipped.name)
        return shipped
    return out


def _run(script: str, args: list[str], out: Path, timeout: float, failure: str) -> None:
    """Run one of llama.cpp's converters writing ``out`` atomically (a reader sees no file or a whole one)."""
    folder = converter_dir()
    if folder is None:
        raise ModelError(f"llama.cpp's converter is not installed; run `make setup` (it keeps llama.cpp's {script}) "
                         f"or set {CONVERTER_ENV} to a llama.cpp source folder.")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        proc = subprocess.run([sys.executable, str(folder / script), "--outfile", str(tmp), *args],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not tmp.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelError(f"{failure}: {' | '.join(tail)}. Serve with --engine transformers meanwhile.")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
