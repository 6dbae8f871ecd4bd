"""peft LoRA adapters as GGUF files for the llama.cpp engine (``assistant.llamacpp_backend``).

The conversion is llama.cpp's own ``convert_lora_to_gguf.py``: it is not in any wheel, but it ships inside
llama-cpp-python's source package, and ``make setup`` keeps a copy (with its ``gguf-py`` and ``conversion``
packages) in ``<venv>/share/attune/llama.cpp`` (``$ATTUNE_LLAMA_CPP_DIR`` overrides). A version's GGUF lives
in its own folder next to the peft files, so it is pruned and deleted with the version: the training job
writes it at publish; the engine converts a version published before (or without the converter) on first use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from assistant.errors import ModelError

GGUF_NAME = "adapter.gguf"
CONVERTER_ENV = "ATTUNE_LLAMA_CPP_DIR"
SCRIPT = "convert_lora_to_gguf.py"


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
    folder = converter_dir()
    if folder is None:
        raise ModelError("The llama.cpp adapter converter is not installed; run `make setup` (it keeps llama.cpp's "
                         f"{SCRIPT}) or set {CONVERTER_ENV} to a llama.cpp source folder.")
    out = gguf_path(adapter_dir)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [sys.executable, str(folder / SCRIPT), "--base", str(base_dir), "--outfile", str(tmp), "--outtype", "f32",
           str(adapter_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not tmp.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelError(f"Could not convert the adapter in {adapter_dir} to GGUF: {' | '.join(tail)}. Serve "
                             "with --engine transformers meanwhile.")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
