"""The vLLM engine: the same ``ChatBackend`` seam, served by a vLLM OpenAI server (multi-LoRA,
continuous batching) for when one process is not enough.

Attune keeps everything vLLM does not have (the log, memory, training, the gate, versions) and the
prompt: it sends the exact token ids it built (``/v1/completions`` with a token-id prompt), so prompts
are identical across engines. Each published version is loaded into vLLM at run time under its
unique :attr:`AdapterRef.name` (``/v1/load_lora_adapter``, needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``);
the least recently used ones are unloaded beyond ``max_loaded``. Base-model requests go through an
all-zero adapter (a CPU bug corrupts no-adapter rows batched with adapter rows; notes/engines.md).

``url`` None starts a server from Attune's vLLM venv (``make vllm``) and stops it on ``close()``
(:mod:`assistant.engines.vllm.server`). Knows no users: it gets adapter references.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from assistant.engines.base import AdapterRef, ChatBackend, GenerationSettings, StreamStats, context_cap
from assistant.engines.vllm.adapters import ALLOWED_RANKS, check_vllm_adapter, write_zero_adapter
from assistant.errors import ModelError
from storage.errors import CLI

log = logging.getLogger("attune.vllm")
ZERO = "attune-zero"
"""vLLM name of the all-zero adapter that base-model requests use."""


@dataclass
class VLLMConfig:
    """The vLLM engine (``launch.py serve --engine vllm``)."""

    url: str | None = None
    """Base URL of a running vLLM OpenAI server (e.g. http://127.0.0.1:8000); None starts one from ``venv``."""
    venv: str = ".venv-vllm"
    """The vLLM virtualenv (``make vllm``); relative paths are from Attune's folder."""
    dtype: str = "auto"
    """Weights dtype of a started server: ``auto`` (Attune's choice, like ``--dtype auto``), ``float32``,
    ``bfloat16``, ``float16``."""
    max_loaded: int = 16
    """Adapters kept loaded in vLLM; the least recently used are unloaded first (``--max-cpu-loras``)."""
    max_loras: int = 8
    """Distinct adapters in one batch (vLLM's ``--max-loras``) of a started server."""
    max_lora_rank: int = 64
    """Largest adapter rank a started server accepts; one of vLLM's allowed ranks."""
    kv_cache_gib: int = 1
    """KV cache of a started CPU server in GiB (``VLLM_CPU_KVCACHE_SPACE``)."""
    start_timeout_s: float = 600.0
    """How long a started server may take to become ready."""
    request_timeout_s: float = 600.0
    """Longest wait for the next piece of an answer."""
    nice: int = 0
    """Niceness of a started server (0: as Attune)."""

    def __post_init__(self):
        if self.url is not None and not str(self.url).startswith(("http://", "https://")):
            raise ValueError(f"url: must start with http:// or https://, got {self.url!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        for name in ("max_loaded", "max_loras", "kv_cache_gib"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an integer of at least 1, got {value!r}")
        if self.max_lora_rank not in ALLOWED_RANKS:
            raise ValueError(f"max_lora_rank: must be one of {ALLOWED_RANKS}, got {self.max_lora_rank!r}")
        for name in ("start_timeout_s", "request_timeout_s"):
            if not isinstance(getattr(self, name), int | float) or getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be a positive number of seconds, got {getattr(self, name)!r}")
        if not isinstance(self.nice, int) or not 0 <= self.nice <= 19:
            raise ValueError(f"nice: must be an integer from 0 to 19, got {self.nice!r}")


class _Slots:
    """Which adapters the vLLM server holds: load on first use, pin while answering, LRU unload."""

    def __init__(self, backend: VLLMBackend, max_loaded: int):
        self.backend, self.max_loaded = backend, max_loaded
        self.loaded: OrderedDict[str, AdapterRef] = OrderedDict()
        self.pins: dict[str, int] = {}
        self.lock = threading.Lock()  # held while loading: loads are rare and must not race

    def acquire(self, ref: AdapterRef) -> None:
        with self.lock:
            if ref.name not in self.loaded:
                self.backend._load(ref)
                self.loaded[ref.name] = ref
            self.loaded.move_to_end(ref.name)
            self.pins[ref.name] = self.pins.get(ref.name, 0) + 1
            self._evict()

    def release(self, ref: AdapterRef) -> None:
        with self.lock:
            self.pins[ref.name] -= 1
            if not self.pins[ref.name]:
                del self.pins[ref.name]

    def forget(self, ref: AdapterRef) -> None:
        """The server lost it (e.g. it restarted): load it again on next use."""
        with self.lock:
            self.loaded.pop(ref.name, None)

    def _evict(self) -> None:
        for name in list(self.loaded):
            if len(self.loaded) <= self.max_loaded:
                return
            if name in self.pins or name == ZERO:
                continue
            self.backend._unload(name)
            del self.loaded[name]


class VLLMBackend(ChatBackend):
    """Streams answers from a vLLM server; thread-safe (vLLM batches concurrent requests itself)."""

    def __init__(self, config: VLLMConfig, model_dir: Path, data_dir, name: str, context_tokens: int | None = None):
        import httpx

        from assistant.model import load_tokenizer

        self.config = config
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.name = name
        model_cfg = json.loads((self.model_dir / "config.json").read_text())
        self.context_tokens = context_cap(context_tokens, model_cfg.get("max_position_embeddings"))
        self.eos = sorted({t for t in _as_list(model_cfg.get("eos_token_id")) + [self.tokenizer.eos_token_id]
                           if t is not None})
        self.server = None
        if config.url is None:
            from assistant.engines.vllm.server import VLLMServer

            self.server = VLLMServer(config, self.model_dir, self.context_tokens, Path(data_dir.root) / "vllm.log")
            self.url = self.server.start()
        else:
            self.url = config.url.rstrip("/")
        self.http = httpx.Client(timeout=httpx.Timeout(config.request_timeout_s, connect=10.0),
                                 limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self._active: dict[int, threading.Event] = {}
        try:
            self.served_model = self._served_model()
            zero = write_zero_adapter(self.model_dir, Path(data_dir.models) / f"{self.model_dir.name}-zero-lora")
            self.zero = AdapterRef(ZERO, 0, str(zero))
            self.slots = _Slots(self, config.max_loaded)
            self.slots.acquire(self.zero)  # pinned for good: never unloaded
        except BaseException:
            self.close()  # a server started here must not outlive a failed start
            raise

    # the seam ----------------------------------------------------------------------------------
    def stream(self, prompt_ids, settings: GenerationSettings, stop: threading.Event, stats: StreamStats,
               adapter: AdapterRef | None = None) -> Iterator[str]:
        stats.prompt_tokens = len(prompt_ids)
        stats.adapter_version = adapter.version if adapter else None
        ref = adapter or self.zero
        started = time.monotonic()
        self._active[id(stop)] = stop
        try:
            for attempt in (1, 2):
                self.slots.acquire(ref)
                try:
                    yield from self._complete(list(prompt_ids), settings, stop, stats, ref, started)
                    return
                except _Unknown:
                    self.slots.forget(ref)  # the server no longer has it: load again, once
                    if attempt == 2:
                        raise ModelError(f"vLLM at {self.url} does not serve adapter {ref.name} even after loading "
                                         "it; check the server log.") from None
                finally:
                    self.slots.release(ref)
        finally:
            self._active.pop(id(stop), None)
            stats.latency_ms = (time.monotonic() - started) * 1000
            if stop.is_set() and stats.finish_reason != "length":
                stats.finish_reason = "cancelled"

    def cancel_all(self) -> None:
        for stop in list(self._active.values()):
            stop.set()

    def close(self) -> None:
        self.http.close()
        if self.server is not None:
            self.server.stop()

    # internals ---------------------------------------------------------------------------------
    def _body(self, prompt_ids: list[int], s: GenerationSettings, name: str) -> dict:
        greedy = s.temperature == 0
        return {"model": name, "prompt": prompt_ids, "max_tokens": s.max_new_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0.0 if greedy else s.temperature,
                "top_p": 1.0 if greedy else s.top_p, "repetition_penalty": s.repetition_penalty, "seed": s.seed,
                "stop_token_ids": self.eos, "skip_special_tokens": True}

    def _complete(self, prompt_ids, settings, stop, stats, ref: AdapterRef, started: float) -> Iterator[str]:
        import httpx

        try:
            with self.http.stream("POST", f"{self.url}/v1/completions",
                                  json=self._body(prompt_ids, settings, ref.name)) as r:
                if r.status_code != 200:
                    self._raise(r.status_code, r.read().decode(errors="replace"), ref)
                for line in r.iter_lines():
                    if stop.is_set():
                        return  # closing the stream makes vLLM abort the request
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise ModelError(f"vLLM failed while answering: {_message(chunk)}. Try again.")
                    for choice in chunk.get("choices") or []:
                        stats.completion_tokens += 1  # one engine step; the final usage chunk corrects it
                        if choice.get("finish_reason") == "length":
                            stats.finish_reason = "length"
                        if choice.get("text"):
                            if stats.ttft_ms is None:
                                stats.ttft_ms = (time.monotonic() - started) * 1000
                            yield choice["text"]
                    if chunk.get("usage"):
                        stats.completion_tokens = chunk["usage"].get("completion_tokens", stats.completion_tokens)
        except httpx.TransportError as e:
            raise ModelError(f"The vLLM server at {self.url} is not reachable ({type(e).__name__}: {e}). Start it, "
                             "or serve without --vllm-url to let Attune start one.") from e

    def _raise(self, status: int, text: str, ref: AdapterRef) -> None:
        message = _message(text)
        if status == 404 and ref.name in message:
            raise _Unknown(message)
        if status == 400 and "maximum context length" in message:
            raise ModelError(f"The prompt does not fit vLLM's context: {message}. Shorten it or start a new "
                             "conversation.")
        raise ModelError(f"vLLM refused the request ({status}): {message}. Check the vLLM server log.")

    def _served_model(self) -> str:
        """The base model id the server serves (the first model without a parent)."""
        try:
            models = self.http.get(f"{self.url}/v1/models").raise_for_status().json()["data"]
        except Exception as e:
            raise ModelError(f"No vLLM server answers at {self.url} ({e}). Start one, or serve without "
                             "--vllm-url to let Attune start one.") from e
        base = next((m["id"] for m in models if not m.get("parent")), None)
        if base is None:
            raise ModelError(f"The vLLM server at {self.url} lists no base model.")
        if Path(base).name != self.model_dir.name:
            log.warning("vLLM serves %s but Attune's model is %s: answers and adapters may not match", base,
                        self.model_dir)
        return base

    def _load(self, ref: AdapterRef) -> None:
        check_vllm_adapter(ref.path, str(self.model_dir), ref.version if ref is not self.zero else None)
        r = self.http.post(f"{self.url}/v1/load_lora_adapter", json={"lora_name": ref.name, "lora_path": ref.path})
        if r.status_code == 200 or "already been loaded" in r.text:
            log.info("vLLM loaded adapter %s", ref.name)
            return
        hint = (" Start the server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora."
                if r.status_code in (404, 405) else "")
        raise ModelError(f"vLLM could not load adapter v{ref.version} from {ref.path}: {_message(r.text)}.{hint} "
                         f"Roll back with `{CLI} adapters NAME --rollback VERSION`.")

    def _unload(self, name: str) -> None:
        r = self.http.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code != 200:
            log.warning("vLLM could not unload adapter %s: %s", name, _message(r.text))


class _Unknown(Exception):
    """vLLM answered 404 for an adapter name Attune thought was loaded."""


def _message(payload) -> str:
    """The human part of a vLLM error body (JSON ``{"error": {"message"}}``, ``{"message"}`` or text)."""
    try:
        data = json.loads(payload) if isinstance(payload, str) else payload
    except ValueError:
        return str(payload).strip()[:500]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return str(data)[:500]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]
