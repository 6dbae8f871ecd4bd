"""The transformers engine: a causal LM in this process, continuously batched (``continuous``), each row with
its own peft adapter (``registry``, ``lora_rows``)."""

from __future__ import annotations

import collections
import contextlib
import queue
import time
from dataclasses import dataclass

from assistant.engines.base import AdapterRef, QueuedBackend, Request, context_cap, is_number
from assistant.errors import ModelError
from storage.errors import CLI


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
        if not is_number(self.window_ms) or self.window_ms < 0:
            raise ValueError(f"window_ms: must be a number >= 0, got {self.window_ms!r}")


class TransformersBackend(QueuedBackend):
    """A transformers causal LM in this process. One worker thread owns the model and decodes every request in
    one continuously batched set of rows (:mod:`assistant.engines.hf.continuous`): a request arriving while
    others decode joins them at the next step, each row with its own adapter (rows of different adapters share
    each pass over the base weights: :mod:`assistant.engines.hf.lora_rows`) and its own sampling settings, and
    leaves the batch the step it ends."""

    def __init__(self, loaded, context_tokens: int | None = None, registry=None, batch: BatchConfig | None = None):
        from assistant.engines.hf.lora_rows import RowLora
        from assistant.engines.hf.registry import AdapterRegistry

        super().__init__(loaded.tokenizer, loaded.model.generation_config.eos_token_id)
        self.loaded = loaded
        self.name = loaded.name
        self.registry = registry or AdapterRegistry(loaded.model)
        self.batch = batch or BatchConfig()
        self.context_tokens = context_cap(context_tokens, getattr(loaded.model.config, "max_position_embeddings", None))
        self.batch_sizes: list[int] = []
        """Rows decoding together after each admission (tests and the bench read it)."""
        self._rows = RowLora()
        self._layers_off: tuple | None = None

    # worker ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        from assistant.engines.hf.continuous import RowBatch

        tok, model = self.tokenizer, self.loaded.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos))
        rows = RowBatch(self._forward, pad, getattr(model.generation_config, "top_k", None), model.device)
        reqs: list[Request] = []  # the request of each row, in row order
        waiting: collections.deque[Request] = collections.deque()
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

    def _admit(self, rows, reqs: list[Request], waiting: collections.deque) -> None:
        """Prefill as many waiting requests as there is room for, pinning their adapters, and stream each
        one's first token. A request that cannot start (its adapter fails to load, the prefill fails) is told
        why; the rows already decoding are not touched."""
        from assistant.engines.sampling import Sampling

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
                                [Sampling.of(s) for s in settings])
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

    def _step(self, rows, reqs: list[Request]) -> None:
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

    def _drop_finished(self, rows, reqs: list[Request]) -> None:
        keep = [i for i, req in enumerate(reqs) if not req.finished]
        for req in reqs:
            if req.finished:
                self.registry.release(req.adapter)
        rows.keep(keep)
        reqs[:] = [reqs[i] for i in keep]

    def _forward(self, names: list[str | None], **inputs):
        """The model's last-position logits for ``inputs``, each row through its adapter (None: the base): the
        base layers once for all rows, then each LoRA layer adds every row's own delta
        (:mod:`assistant.engines.hf.lora_rows`; the model's own LoRA layers stay switched off)."""
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
