"""The engine seam: token ids and an adapter reference in, streamed text out. Every engine (``engines/hf``:
transformers in this process, ``engines/llamacpp``, ``engines/vllm``: a vLLM server) implements
:class:`ChatBackend`; the chat service and the API/UI know only this module, never a concrete engine.

Engines never see a user: the chat service resolves the user's active adapter version and passes an
:class:`AdapterRef` (or None for the base model), like vLLM's ``LoRARequest``."""

from __future__ import annotations

import queue
import reprlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from storage.errors import InputError


@dataclass(frozen=True)
class AdapterRef:
    """One published adapter version as an engine sees it: engines get this, never a user id."""

    name: str
    """Unique engine-side name ``u<user>-v<N>-<tag>``; engines cache adapters under it (never reused)."""
    version: int
    """The version number, reported back with the answer."""
    path: str
    """The peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""


MAX_NEW_TOKENS = 4096
"""The most tokens one answer may ask for, whatever the engine."""
SETTING_RANGES: dict[str, tuple[int | float, int | float]] = {
    "max_new_tokens": (1, MAX_NEW_TOKENS), "temperature": (0, 2), "top_p": (0, 1), "repetition_penalty": (0.5, 2),
    # 0 to 2**63 - 1: what every engine's generator takes (torch overflows past 2**64, numpy refuses < 0)
    "seed": (0, 2**63 - 1)}
"""Each generation setting's lowest and highest value (top_p's lowest excluded): checked here, shown by the UI's
sliders and the API's schema."""


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
        def within(name: str, kind, noun: str = "a number", low_open: bool = False) -> tuple[str, bool, str]:
            value, (low, high) = getattr(self, name), SETTING_RANGES[name]
            ok = kind(value) and (low < value if low_open else low <= value) and value <= high
            return name, ok, f"{noun} in ({low}, {high}]" if low_open else f"{noun} from {low} to {high}"

        checks = [within("max_new_tokens", lambda x: isinstance(x, int), "an integer"),
                  within("temperature", is_number), within("top_p", is_number, low_open=True),
                  within("repetition_penalty", is_number),
                  ("seed", self.seed is None or within("seed", _is_int)[1], "an integer from 0 to 2**63 - 1, or null")]
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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A real number (int or float), not a bool."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def context_cap(requested: int | None, model_limit: int | None) -> int:
    """The context an engine serves: the tokens asked for (``ChatConfig.context_tokens``; None: all), capped by
    the model's own limit (2048 when the model does not say)."""
    limit = model_limit or 2048
    return min(requested or limit, limit)


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
class Request:
    """One queued generation as a :class:`QueuedBackend` worker sees it (what ``stream`` was given, plus the
    decoding state the worker keeps for it)."""

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
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._active: dict[int, Request] = {}  # requests being streamed, so shutdown can stop them

    def stream(self, prompt_ids, settings, stop, stats, adapter: AdapterRef | None = None):
        req = Request(list(prompt_ids), settings, stop, stats, adapter)
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

    def _flush(self, req: Request, final: bool) -> None:
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

    def _finish(self, req: Request) -> None:
        if req.finished:
            return
        req.finished = True
        if req.error is None:
            self._flush(req, final=True)
        req.pieces.put(None)
        req.done.set()

    def _token(self, req: Request, token: int) -> None:
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
