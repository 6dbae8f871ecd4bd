"""The chat backend seam: token ids and an adapter reference in, streamed text out. Two engines
implement it: transformers in this process (here) and a vLLM server (``assistant.vllm_backend``).
Engines never see a user: ChatEngine resolves the user's active adapter version and passes an
``AdapterRef`` (or None for the base model)."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from storage.errors import InputError

if TYPE_CHECKING:
    from assistant.adapters import AdapterRef


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
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= 4096,
             "an integer from 1 to 4096"),
            ("temperature", _num(self.temperature) and 0 <= self.temperature <= 2, "a number from 0 to 2"),
            ("top_p", _num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("repetition_penalty", _num(self.repetition_penalty) and 0.5 <= self.repetition_penalty <= 2,
             "a number from 0.5 to 2"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or null"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"{name}: must be {what}, got {getattr(self, name)!r}")

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
    """How concurrent requests are batched on the model (one generate call serves several users)."""

    max_batch: int = 8
    """Most requests decoded together; 1 serializes generation."""
    window_ms: float = 15.0
    """How long the worker waits for more requests before starting a batch."""

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

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share one generate call."""
        s = self.settings
        if s.seed is not None:
            return ("seeded", id(self))
        return (s.temperature > 0, s.temperature, s.top_p, s.repetition_penalty)


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
    """A transformers causal LM in this process. One worker thread owns the model: it gathers
    concurrent requests into batches (peft mixed-adapter batches when users have adapters),
    decodes them together and streams each row to its own request."""

    def __init__(self, loaded, context_tokens: int | None = None, registry=None, batch: BatchConfig | None = None):
        from assistant.adapters import AdapterRegistry

        super().__init__(loaded.tokenizer, loaded.model.generation_config.eos_token_id)
        self.loaded = loaded
        self.name = loaded.name
        self.registry = registry or AdapterRegistry(loaded.model)
        self.batch = batch or BatchConfig()
        limit = getattr(loaded.model.config, "max_position_embeddings", 2048) or 2048
        self.context_tokens = min(context_tokens or limit, limit)
        self.batch_sizes: list[int] = []

    # worker ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        pending: list[_Request] = []
        while True:
            if not pending:
                pending.append(self._queue.get())
            deadline = time.monotonic() + self.batch.window_ms / 1000
            while len(pending) < self.batch.max_batch * 2:
                try:
                    pending.append(self._queue.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
            if None in pending:  # close(): serve what is queued, then stop
                for group in _groups([r for r in pending if r is not None], self.batch.max_batch):
                    self._run(group)
                return
            key = pending[0].key
            group = [r for r in pending if r.key == key][: self.batch.max_batch]
            pending = [r for r in pending if r not in group]
            self._run(group)

    def _run(self, group: list[_Request]) -> None:
        """Serve one batch: pin each user's adapter, generate together, release."""
        adapters = []
        ready = []
        for req in group:
            try:
                adapter = self.registry.acquire(req.adapter)
                req.stats.adapter_version = adapter.version if adapter else None
                adapters.append(adapter)
                ready.append(req)
            except BaseException as e:  # reported to that request only
                req.error = e
                self._finish(req)
        try:
            if ready:
                self.batch_sizes.append(len(ready))
                self._generate(ready, [a.name if a else None for a in adapters])
        except BaseException as e:  # e.g. out of memory: every request of the batch learns why
            for req in ready:
                if not req.finished:
                    req.error = e
                    self._finish(req)
        finally:
            for adapter in adapters:
                self.registry.release(adapter)

    def _generate(self, reqs: list[_Request], names: list[str | None]) -> None:
        """Decode one batch with one ``generate`` call; each row streams to its own request."""
        import torch

        model = self.registry.model
        ids, mask, pad = self._batch_inputs(reqs, model.device)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.settings.max_new_tokens for r in reqs),
                      streamer=_BatchStreamer(self, reqs), stopping_criteria=_stopping(reqs, ids.shape[1]),
                      pad_token_id=pad, **_sampling(reqs[0].settings))
        context = self._adapter_context(names, kwargs)
        with torch.inference_mode(), context:
            model.generate(**kwargs)

    def _batch_inputs(self, reqs: list[_Request], device) -> tuple:
        """Left-padded prompt ids, their attention mask, and the pad id."""
        import torch

        tok = self.tokenizer
        width = max(len(r.prompt_ids) for r in reqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos))
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs],
                            device=device)
        return ids, mask, pad

    def _adapter_context(self, names: list[str | None], kwargs: dict):
        """Route the batch's rows through their adapters: returns the context to generate in (and may add
        ``adapter_names`` to ``kwargs`` for a mixed-adapter batch)."""
        model = self.registry.model
        if not self.registry.is_peft:
            return contextlib.nullcontext()
        if set(names) == {None}:  # nobody uses an adapter: skip the LoRA layers entirely
            return model.disable_adapter()
        if len(set(names)) == 1:  # one adapter for the whole batch: no per-row routing
            model.set_adapter(names[0])
        else:  # a mixed-adapter batch: peft routes each row through its own adapter
            from assistant.adapters import BASE

            kwargs["adapter_names"] = [n or BASE for n in names]
        return contextlib.nullcontext()

def _groups(reqs: list[_Request], size: int) -> list[list[_Request]]:
    """Requests split into batches of compatible sampling settings."""
    out: list[list[_Request]] = []
    for req in reqs:
        for group in out:
            if group[0].key == req.key and len(group) < size:
                group.append(req)
                break
        else:
            out.append([req])
    return out


def _sampling(s: GenerationSettings) -> dict:
    """``generate`` keyword arguments for one batch's (shared) sampling settings."""
    kwargs: dict = {"repetition_penalty": s.repetition_penalty}
    if s.temperature > 0:
        if s.seed is not None:
            import torch

            torch.manual_seed(s.seed)
        kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


class _BatchStreamer:
    """The streamer ``generate`` calls with each step's tokens (one per row): hands each row's token to
    its request, ends rows at EOS, at their own length limit or when stopped."""

    def __init__(self, backend: TransformersBackend, reqs: list[_Request]):
        self.backend, self.reqs, self.first = backend, reqs, True

    def put(self, value) -> None:
        if self.first:  # generate() first hands over the prompt
            self.first = False
            return
        for req, token in zip(self.reqs, value.reshape(-1).tolist(), strict=True):
            if not req.finished:
                self.backend._token(req, token)

    def end(self) -> None:
        for req in self.reqs:
            self.backend._finish(req)


def _stopping(reqs: list[_Request], width: int):
    """Per-row stopping criteria: a row is done when finished, stopped or at its own length limit."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class PerRowStop(StoppingCriteria):
        """Runs before the step's tokens reach the streamer; ``input_ids`` already holds them."""

        def __call__(self, input_ids, scores, **kwargs):
            steps = input_ids.shape[1] - width
            done = [r.finished or r.stop.is_set() or steps >= r.settings.max_new_tokens for r in reqs]
            return torch.tensor(done, device=input_ids.device)

    return StoppingCriteriaList([PerRowStop()])
