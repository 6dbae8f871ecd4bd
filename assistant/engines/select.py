"""Which engine generates, decided in one place: ``--engine`` names it (:data:`ENGINES`), ``auto`` picks
(:func:`pick_engine`), and :func:`build_backend` starts it. The only module outside an engine's folder that
names a concrete engine (each imported lazily: a user without llama.cpp or vLLM never loads them)."""

from __future__ import annotations

import time
from pathlib import Path

from assistant.engines.base import ChatBackend
from assistant.errors import ModelError
from assistant.model import ModelConfig, load_model

ENGINES = ("auto", "llamacpp", "transformers", "vllm")
"""Who generates: ``llamacpp`` (llama.cpp in this process; ``assistant.engines.llamacpp``), ``transformers`` in
this process (``assistant.engines.hf``), or ``vllm`` (a vLLM server; ``assistant.engines.vllm``); ``auto`` picks
with :func:`pick_engine`."""


def pick_engine(engine: str, model_cfg: ModelConfig) -> str:
    """``auto``: llama.cpp where it serves this model fastest (installed, a GGUF model, on the CPU; BENCHMARKS.md
    "Serving"), else transformers. Any other name is kept."""
    if engine != "auto":
        return engine
    from assistant.engines.llamacpp.backend import available
    from assistant.model import gguf_source, resolve_device

    fast = available() and resolve_device(model_cfg.device) == "cpu" and gguf_source(model_cfg.model) is not None
    return "llamacpp" if fast else "transformers"


def build_backend(data_dir: Path, model_cfg: ModelConfig, context_tokens: int, vllm_cfg=None, engine: str = "auto",
                  llamacpp_cfg=None) -> ChatBackend:
    """The engine behind the chat service: vLLM when ``vllm_cfg`` is given (a ``VLLMConfig``: a running server's URL,
    or one started from the vLLM venv), else ``engine`` (:func:`pick_engine`) in this process (the llama.cpp
    one with ``llamacpp_cfg``, a ``LlamaCppConfig``)."""
    from assistant.engines.hf.backend import TransformersBackend
    from assistant.engines.hf.registry import AdapterRegistry

    if vllm_cfg is None and pick_engine(engine, model_cfg) == "llamacpp":
        return _llamacpp(data_dir, model_cfg, context_tokens, llamacpp_cfg)
    if vllm_cfg is not None:
        from assistant.engines.vllm.backend import VLLMBackend
        from assistant.model import EMBEDDED, EMBEDDED_NAME, resolve_model_dir

        name = EMBEDDED_NAME if model_cfg.model == EMBEDDED else model_cfg.model
        backend = VLLMBackend(vllm_cfg, resolve_model_dir(model_cfg.model, data_dir), data_dir, name,
                              context_tokens)
        print(f"attune: model {name} served by vLLM at {backend.url}", flush=True)
        return backend
    loaded = load_model(model_cfg, data_dir)
    print(f"attune: model {loaded.name} on {loaded.device} (quant {loaded.quant}, {loaded.dtype}) ready in "
          f"{loaded.load_seconds:.1f} s", flush=True)
    return TransformersBackend(loaded, context_tokens, AdapterRegistry(loaded.model))


def _llamacpp(data_dir: Path, model_cfg: ModelConfig, context_tokens: int, cfg=None) -> ChatBackend:
    from assistant.engines.llamacpp.backend import LlamaCppBackend, LlamaCppConfig, available
    from assistant.engines.llamacpp.gguf_lora import serving_weights
    from assistant.model import EMBEDDED, EMBEDDED_NAME, gguf_source, resolve_model_dir

    gguf = gguf_source(model_cfg.model)
    if gguf is None:
        raise ModelError("--engine llamacpp serves GGUF models (the embedded one, or --model FILE.gguf); use "
                         "--engine transformers for this model.")
    if not available():
        raise ModelError("llama-cpp-python is not installed: run `make setup` (it builds llama.cpp), or use "
                         "--engine transformers.")
    started = time.monotonic()
    cfg = cfg or LlamaCppConfig(threads=model_cfg.threads)
    name = EMBEDDED_NAME if model_cfg.model == EMBEDDED else gguf.stem
    model_dir = resolve_model_dir(model_cfg.model, data_dir)
    if cfg.weights == "q8_0":
        gguf = serving_weights(model_dir, gguf)
    backend = LlamaCppBackend(gguf, model_dir, name, cfg, context_tokens)
    print(f"attune: model {name} served by llama.cpp from {gguf.name} (--quant/--dtype do not apply: the GGUF's own "
          f"weights) ready in {time.monotonic() - started:.1f} s", flush=True)
    return backend
