"""The chat backend seam: token ids in, streamed text out. One implementation today (transformers,
in process); the seam exists so the same adapters can later be served by vLLM."""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from storage.errors import InputError


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
        for field, ok, what in checks:
            if not ok:
                raise ValueError(f"{field}: must be {what}, got {getattr(self, field)!r}")

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


class ChatBackend(ABC):
    """Generates text for one prompt at a time; implementations must be thread-safe."""

    name: str
    tokenizer: object
    context_tokens: int

    @abstractmethod
    def stream(self, prompt_ids: list[int], settings: GenerationSettings, stop: threading.Event,
               stats: StreamStats) -> Iterator[str]:
        """Yield text pieces as they are decoded; fill ``stats``; end early when ``stop`` is set."""


class TransformersBackend(ChatBackend):
    """A transformers causal LM in this process. Generation runs in a worker thread per request;
    a lock keeps one generation on the model at a time."""

    def __init__(self, loaded, context_tokens: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        limit = getattr(self.model.config, "max_position_embeddings", 2048) or 2048
        self.context_tokens = min(context_tokens or limit, limit)
        self._lock = threading.Lock()

    def stream(self, prompt_ids, settings, stop, stats):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        started = time.monotonic()
        stats.prompt_tokens = len(prompt_ids)
        pieces: queue.Queue = queue.Queue()
        tokenizer = self.tokenizer
        gen_eos = self.model.generation_config.eos_token_id
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) | {tokenizer.eos_token_id}
        eos.discard(None)

        class Streamer:
            """Decodes incrementally (whole words only, like TextIteratorStreamer) and counts tokens."""

            def __init__(self):
                self.ids: list[int] = []
                self.sent = 0
                self.first = True

            def put(self, value):
                if self.first:  # generate() first hands over the prompt
                    self.first = False
                    return
                new = [int(t) for t in value.reshape(-1).tolist() if int(t) not in eos]
                if stats.ttft_ms is None:
                    stats.ttft_ms = (time.monotonic() - started) * 1000
                stats.completion_tokens += value.numel()
                self.ids.extend(new)
                text = tokenizer.decode(self.ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    return
                cut = text.rfind(" ") if not text.endswith(("\n", " ")) else len(text)
                if cut > self.sent:
                    pieces.put(text[self.sent:cut])
                    self.sent = cut

            def end(self):
                text = tokenizer.decode(self.ids, skip_special_tokens=True)
                if len(text) > self.sent:
                    pieces.put(text[self.sent:])
                pieces.put(None)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        errors: list[BaseException] = []

        def run():
            try:
                with self._lock, torch.inference_mode():
                    ids = torch.tensor([prompt_ids], device=self.model.device)
                    kwargs = dict(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
                        streamer=streamer, stopping_criteria=StoppingCriteriaList([Stop()]),
                        pad_token_id=tokenizer.pad_token_id, repetition_penalty=settings.repetition_penalty,
                    )
                    if settings.temperature > 0:
                        if settings.seed is not None:
                            torch.manual_seed(settings.seed)
                        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
                    else:
                        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                    self.model.generate(**kwargs)
            except BaseException as e:  # re-raised in the consumer thread below
                errors.append(e)
                pieces.put(None)

        streamer = Streamer()
        worker = threading.Thread(target=run, name="attune-generate", daemon=True)
        worker.start()
        try:
            while True:
                piece = pieces.get()
                if piece is None:
                    break
                yield piece
        finally:
            stop_requested = stop.is_set()
            stop.set()  # also ends generation when the consumer went away
            worker.join()
            stats.latency_ms = (time.monotonic() - started) * 1000
            if stop_requested:
                stats.finish_reason = "cancelled"
            elif stats.completion_tokens >= settings.max_new_tokens:
                stats.finish_reason = "length"
        if errors:
            raise errors[0]
