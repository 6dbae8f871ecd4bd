"""The chat backend seam: token ids and an adapter reference in, streamed text out. Two engines
implement it: transformers in this process (here) and a vLLM server (``assistant.vllm_backend``).
Engines never see a user: ChatEngine resolves the user's active adapter version and passes an
``AdapterRef`` (or None for the base model)."""

from __future__ import annotations

import collections
import contextlib
import queue
import reprlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from assistant.errors import ModelError
from storage.errors import CLI, InputError

if TYPE_CHECKING:
    from assistant.adapters import AdapterRef


MAX_NEW_TOKENS = 4096
"""The most tokens one answer may ask for, whatever the engine."""


@dataclass
class GenerationSettings:
    """Per-request sampling settings (the UI's sliders, the API's body fields)."""

    max_new_tokens: int = 256
    """Most tokens in one answer."""
    temperature: float = 0.7
    """0 means greedy decoding (deterministic)."""
    top_p: float = 0.9
    """Nucleus sampling mass, in (0, 1]."""
    repetition_penalty: float = 1.1
    """>1 discourages repeating tokens; 1 turns it off."""
    seed: int | None = None
    """Sampling seed for reproducible answers; None draws one."""

    def __post_init__(self):
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS,
             f"an integer from 1 to {MAX_NEW_TOKENS}"),
            ("temperature", _num(self.temperature) and 0 <= self.temperature <= 2, "a number from 0 to 2"),
            ("top_p", _num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("repetition_penalty", _num(self.repetition_penalty) and 0.5 <= self.repetition_penalty <= 2,
             "a number from 0.5 to 2"),
            # 0 to 2**63 - 1: what every engine's generator takes (torch overflows past 2**64, numpy refuses < 0)
            ("seed", self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                           and 0 <= self.seed < 2**63), "an integer from 0 to 2**63 - 1, or null"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"{name}: must be {what}, got {reprlib.repr(getattr(self, name))}")

    @classmethod
    def from_request(cls, base: GenerationSettings, **overrides) -> GenerationSettings:
        """``base`` with the non-None ``overrides``; bad values become an ``InputError`` naming the field."""
        values = asdict(base)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise InputError(f"Invalid generation setting: {e}") from e

    def to_dict(self) -> dict:
        return asdict(self)


def _num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass
class StreamStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    finish_reason: str = "stop"  # stop | length | cancelled
    adapter_version: int | None = None


class ChatBackend(ABC):
    """Generates text for one prompt at a time; implementations must be thread-safe."""

    name: str
    tokenizer: object
    context_tokens: int

    @abstractmethod
    def stream(self, prompt_ids: list[int], settings: GenerationSettings, stop: threading.Event,
               stats: StreamStats, adapter: AdapterRef | None = None) -> Iterator[str]:
        """Yield text pieces as they are decoded with ``adapter`` (None: the base model); fill ``stats``
        (incl. ``adapter_version``); end early when ``stop`` is set."""

    def cancel_all(self) -> None:  # noqa: B027 (optional hook)
        """Stop every answer being generated now (on shutdown)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the backend's threads and resources."""


@dataclass
class BatchConfig:
    """How concurrent requests share the in-process model: their rows are decoded together, step by step."""

    max_batch: int = 16
    """Most requests decoding together (more wait for a row to end); 1 serializes generation. 16, like the
    llama.cpp engine's slots: 8 users decoding still leave room for a newcomer to join at the next step."""
    window_ms: float = 15.0
    """When the engine is idle, how long it waits after a first request for others to start with it (a request
    arriving while others decode joins them at the next step, without waiting)."""

    def __post_init__(self):
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch: must be an integer of at least 1, got {self.max_batch!r}")
        if not _num(self.window_ms) or self.window_ms < 0:
            raise ValueError(f"window_ms: must be a number >= 0, got {self.window_ms!r}")


@dataclass
class _Request:
    prompt_ids: list[int]
    settings: GenerationSettings
    stop: threading.Event
    stats: StreamStats
    adapter: AdapterRef | None
    started: float = field(default_factory=time.monotonic)
    pieces: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    """Characters of ``text`` already streamed."""
    text: str = ""
    """Decoded answer so far (incremental; see ``_flush``)."""
    prefix: int = 0
    read: int = 0
    finished: bool = False
    error: BaseException | None = None


class QueuedBackend(ChatBackend):
    """An engine whose one worker thread owns the model: ``stream`` queues a request and yields the pieces the
    worker hands it. Subclasses implement ``_loop`` (take requests off ``_queue``; None means close) and call
    ``_token`` for each decoded token and ``_finish`` when a request ends."""

    def __init__(self, tokenizer, generation_eos: int | list[int] | None):
        """``generation_eos``: the model's generation config end-of-sequence id(s), the tokenizer's is added."""
        self.tokenizer = tokenizer
        extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        self.eos = ({tokenizer.eos_token_id} | set(extra)) - {None}
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._active: dict[int, _Request] = {}  # requests being streamed, so shutdown can stop them

    def stream(self, prompt_ids, settings, stop, stats, adapter: AdapterRef | None = None):
        req = _Request(list(prompt_ids), settings, stop, stats, adapter)
        stats.prompt_tokens = len(req.prompt_ids)
        self._ensure_worker()
        self._active[id(req)] = req
        self._queue.put(req)
        try:
            while True:
                piece = req.pieces.get()
                if piece is None:
                    break
                yield piece
        finally:
            stop_requested = stop.is_set()
            stop.set()  # also ends this row when the consumer went away
            req.done.wait()
            self._active.pop(id(req), None)
            stats.latency_ms = (time.monotonic() - req.started) * 1000
            if stop_requested and stats.finish_reason != "length":
                stats.finish_reason = "cancelled"
        if req.error is not None:
            raise req.error

    def cancel_all(self) -> None:
        """Stop every answer being generated now (each ends as ``stopped``, with what it has so far)."""
        for req in list(self._active.values()):
            req.stop.set()

    def close(self) -> None:
        """Stop the worker thread once the requests already queued are served."""
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()

    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name=f"attune-{self.name}", daemon=True)
                self._worker.start()

    @abstractmethod
    def _loop(self) -> None:
        """The worker: serve queued requests until a None arrives."""

    def _flush(self, req: _Request, final: bool) -> None:
        """Send the newly decoded text of a row; whole words only until the end.

        Decoding is incremental (a few tokens per step, not the whole answer): the text of
        ``ids[prefix:]`` minus that of ``ids[prefix:read]`` is what the new tokens added, decoded with
        a little left context so byte-level and sentencepiece tokenizers join pieces correctly."""
        decode = self.tokenizer.decode
        if final:  # one full decode at the end: the answer is exactly what the tokenizer says
            text = decode(req.ids, skip_special_tokens=True)
            req.text = text
        else:
            before = decode(req.ids[req.prefix:req.read], skip_special_tokens=True)
            after = decode(req.ids[req.prefix:], skip_special_tokens=True)
            if after.endswith("\ufffd") or len(after) <= len(before):  # half a character, or nothing yet
                return
            req.text += after[len(before):]
            req.prefix, req.read = req.read, len(req.ids)
            text = req.text
        cut = len(text) if final or text.endswith(("\n", " ")) else text.rfind(" ", req.sent)
        if cut > req.sent:
            req.pieces.put(text[req.sent:cut])
            req.sent = cut

    def _finish(self, req: _Request) -> None:
        if req.finished:
            return
        req.finished = True
        if req.error is None:
            self._flush(req, final=True)
        req.pieces.put(None)
        req.done.set()

    def _token(self, req: _Request, token: int) -> None:
        """One decoded token of ``req``: ends it at EOS, at its length limit or when stopped, else streams it."""
        if req.stats.ttft_ms is None:
            req.stats.ttft_ms = (time.monotonic() - req.started) * 1000
        if token in self.eos:
            self._finish(req)
            return
        req.stats.completion_tokens += 1
        req.ids.append(token)
        if req.stats.completion_tokens >= req.settings.max_new_tokens:
            req.stats.finish_reason = "length"
            self._finish(req)
        elif req.stop.is_set():
            self._finish(req)
        else:
            self._flush(req, final=False)


class TransformersBackend(QueuedBackend):
    """A transformers causal LM in this process. One worker thread owns the model and decodes every request in
    one continuously batched set of rows (:mod:`assistant.continuous`): a request arriving while others decode
    joins them at the next step, each row with its own adapter (rows of different adapters share each pass over
    the base weights: :mod:`assistant.lora_rows`) and its own sampling settings, and leaves the batch the step it
    ends."""

    def __init__(self, loaded, context_tokens: int | None = None, registry=None, batch: BatchConfig | None = None):
        from assistant.adapters import AdapterRegistry
        from assistant.lora_rows import RowLora

        super().__init__(loaded.tokenizer, loaded.model.generation_config.eos_token_id)
        self.loaded = loaded
        self.name = loaded.name
        self.registry = registry or AdapterRegistry(loaded.model)
        self.batch = batch or BatchConfig()
        limit = getattr(loaded.model.config, "max_position_embeddings", 2048) or 2048
        self.context_tokens = min(context_tokens or limit, limit)
        self.batch_sizes: list[int] = []
        """Rows decoding together after each admission (tests and the bench read it)."""
        self._rows = RowLora()
        self._layers_off: tuple | None = None

    # worker ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        from assistant.continuous import RowBatch

        tok, model = self.tokenizer, self.loaded.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos))
        rows = RowBatch(self._forward, pad, getattr(model.generation_config, "top_k", None), model.device)
        reqs: list[_Request] = []  # the request of each row, in row order
        waiting: collections.deque[_Request] = collections.deque()
        closing = False
        while True:
            closing = self._take(waiting, block=not (reqs or waiting or closing)) or closing
            if waiting and len(reqs) < self.batch.max_batch:
                self._admit(rows, reqs, waiting)
            if reqs:
                self._step(rows, reqs)
            elif closing and not waiting:  # close(): everything queued before it was served
                return

    def _take(self, waiting: collections.deque, block: bool) -> bool:
        """Move queued requests to ``waiting``. With ``block`` (nothing to decode) wait for one, then up to
        ``window_ms`` for company so they start together. True once close() was asked."""
        closing, deadline = False, None
        while True:
            try:
                if block and not waiting:
                    item = self._queue.get()
                elif block and len(waiting) < self.batch.max_batch:
                    deadline = deadline or time.monotonic() + self.batch.window_ms / 1000
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                return closing
            if item is None:
                closing, block = True, False
            else:
                waiting.append(item)

    def _admit(self, rows, reqs: list[_Request], waiting: collections.deque) -> None:
        """Prefill as many waiting requests as there is room for, pinning their adapters, and stream each
        one's first token. A request that cannot start (its adapter fails to load, the prefill fails) is told
        why; the rows already decoding are not touched."""
        from assistant.continuous import Sampling

        ready = []
        while waiting and len(reqs) + len(ready) < self.batch.max_batch:
            req = waiting.popleft()
            if req.stop.is_set():  # cancelled before it started
                self._finish(req)
                continue
            try:
                adapter = self._acquire(req.adapter)
            except BaseException as e:  # reported to that request only
                req.error = e
                self._finish(req)
                continue
            req.stats.adapter_version = adapter.version if adapter else None
            ready.append(req)
        if not ready:
            return
        settings = [r.settings for r in ready]
        try:
            tokens = rows.admit([r.prompt_ids for r in ready], [r.adapter.name if r.adapter else None for r in ready],
                                [Sampling(s.temperature, s.top_p, s.repetition_penalty, s.seed) for s in settings])
        except BaseException as e:  # e.g. out of memory on a long prompt: these requests learn why
            for req in ready:
                req.error = e
                self._finish(req)
                self.registry.release(req.adapter)
            return
        reqs += ready
        self.batch_sizes.append(len(reqs))
        for req, token in zip(ready, tokens, strict=True):
            self._token(req, token)
        self._drop_finished(rows, reqs)

    def _acquire(self, ref: AdapterRef | None) -> AdapterRef | None:
        """Pin ``ref``'s adapter (loading it if needed); one this engine cannot serve is a clear error."""
        adapter = self.registry.acquire(ref)
        if adapter is not None and not self._rows.supports(self.registry.model, adapter.name):
            self.registry.release(adapter)
            raise ModelError(f"Adapter v{adapter.version} is not plain LoRA (DoRA or LoRA biases), which Attune "
                             f"does not serve; roll back with `{CLI} adapters NAME --rollback VERSION`.")
        return adapter

    def _step(self, rows, reqs: list[_Request]) -> None:
        """One decoding step for every row; rows whose request ended (or was stopped) leave the batch."""
        for req in reqs:
            if req.stop.is_set():
                self._finish(req)
        self._drop_finished(rows, reqs)
        if not reqs:
            return
        try:
            tokens = rows.step()
        except BaseException as e:  # every row of the batch learns why
            for req in reqs:
                req.error = e
                self._finish(req)
        else:
            for req, token in zip(reqs, tokens, strict=True):
                self._token(req, token)
        self._drop_finished(rows, reqs)

    def _drop_finished(self, rows, reqs: list[_Request]) -> None:
        keep = [i for i, req in enumerate(reqs) if not req.finished]
        for req in reqs:
            if req.finished:
                self.registry.release(req.adapter)
        rows.keep(keep)
        reqs[:] = [reqs[i] for i in keep]

    def _forward(self, names: list[str | None], **inputs):
        """The model's last-position logits for ``inputs``, each row through its adapter (None: the base): the
        base layers once for all rows, then each LoRA layer adds every row's own delta (:mod:`assistant.lora_rows`;
        the model's own LoRA layers stay switched off)."""
        import torch

        model, context = self.registry.model, contextlib.nullcontext()
        if self.registry.is_peft:
            generation = self.registry.generation
            if self._layers_off != (id(model), generation):  # a load adds LoRA layers, switched on
                model.base_model.disable_adapter_layers()
                self._layers_off = (id(model), generation)
            if any(names):
                self._rows.prepare(model, names, generation)
                context = self._rows.apply()
        with torch.inference_mode(), context:
            return model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1, :]
