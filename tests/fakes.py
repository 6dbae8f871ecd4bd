"""Fakes for tests where the model is not the point: a scripted chat backend and a char tokenizer.

``FakeBackend`` is a ``ChatBackend`` whose answers a test scripts in advance, as simonw/llm's
``MockModel`` does::

    fake = FakeBackend()
    fake.enqueue(["Hello", " world"])          # the next answer streams these two pieces
    turn = run(ChatService(store, fake).send(alice.id, None, "Hi"))
    assert turn.text == "Hello world"
    assert "Hi" in fake.calls[-1].prompt       # what the engine sent, decoded
    assert fake.calls[-1].adapter is None      # and with which adapter (engines never see users)

Each piece counts as one token, so ``max_new_tokens`` cuts a script short (finish reason ``length``)
and a set ``stop`` event ends it (``cancelled``), like the real backend. No torch, no weights.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from assistant.engines.base import AdapterRef, ChatBackend, GenerationSettings, StreamStats

DEFAULT_ANSWER = ("I am", " a scripted", " answer.")


class CharTokenizer:
    """One token per character (its code point), with a ChatML chat template: enough for ChatService to
    build, measure and cut prompts, and for tests to read them back exactly."""

    eos_token_id = 0
    pad_token_id = 0
    chat_template = "chatml"

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> list[int] | str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i)


@dataclass
class FakeCall:
    """One ``stream`` call as the backend received it."""

    prompt_ids: list[int]
    prompt: str
    """The prompt decoded back to text (ChatML)."""
    settings: GenerationSettings
    adapter: AdapterRef | None
    """The adapter reference ChatService resolved for this turn; None for the base model."""

    @property
    def adapter_version(self) -> int | None:
        return self.adapter.version if self.adapter else None


class FakeBackend(ChatBackend):
    """A scripted, thread-safe chat backend. ``enqueue`` scripts answers (used first in, first out);
    with nothing queued, it answers ``DEFAULT_ANSWER``. ``fail`` scripts an error instead of an answer.
    Adapters come as references resolved by ChatService: give a user one with :func:`activate_version`."""

    def __init__(self, name: str = "fake-model", context_tokens: int = 4096, piece_seconds: float = 0.0):
        self.name = name
        self.context_tokens = context_tokens
        self.piece_seconds = piece_seconds
        """Time each piece takes to "decode" (0: instant), for tests of what happens while an answer streams."""
        self.tokenizer = CharTokenizer()
        self.calls: list[FakeCall] = []
        self._script: deque[list[str] | BaseException] = deque()
        self._lock = threading.Lock()

    def enqueue(self, pieces: list[str]) -> FakeBackend:
        """Script the next answer as these streamed pieces (one token each)."""
        with self._lock:
            self._script.append(list(pieces))
        return self

    def fail(self, error: BaseException) -> FakeBackend:
        """Script the next call to raise ``error`` before its first piece."""
        with self._lock:
            self._script.append(error)
        return self

    @property
    def prompts(self) -> list[str]:
        """Every prompt received so far, decoded."""
        return [c.prompt for c in self.calls]

    def stream(self, prompt_ids: list[int], settings: GenerationSettings, stop: threading.Event,
               stats: StreamStats, adapter: AdapterRef | None = None) -> Iterator[str]:
        started = time.monotonic()
        version = adapter.version if adapter else None
        with self._lock:
            self.calls.append(FakeCall(list(prompt_ids), self.tokenizer.decode(prompt_ids), settings, adapter))
            script = self._script.popleft() if self._script else list(DEFAULT_ANSWER)
        stats.prompt_tokens, stats.adapter_version = len(prompt_ids), version
        try:
            if isinstance(script, BaseException):
                raise script
            for piece in script:
                if stop.is_set():
                    stats.finish_reason = "cancelled"
                    return
                if stats.completion_tokens >= settings.max_new_tokens:
                    stats.finish_reason = "length"
                    return
                if stats.ttft_ms is None:
                    stats.ttft_ms = (time.monotonic() - started) * 1000
                stats.completion_tokens += 1
                time.sleep(self.piece_seconds)
                yield piece
            if stop.is_set():
                stats.finish_reason = "cancelled"
        finally:
            stats.latency_ms = max((time.monotonic() - started) * 1000, 0.001)


def activate_version(store, user_id: int, version: int) -> None:
    """Record a published adapter version and make it the user's active one, as training leaves it: its row and
    a stand-in folder whose files are whole (ChatService checks them; the fake backend loads no weights)."""
    from storage.common import utcnow

    path = store.data_dir.adapters(user_id) / f"v{version}"
    write_stand_in_adapter(path)
    with store.write() as db:
        db["adapter_versions"].insert({"user_id": user_id, "version": version, "base_model": "fake",
                                       "path": str(path.relative_to(store.data_dir.root)), "status": "published",
                                       "created_at": utcnow()})
        db.execute("INSERT INTO active_adapters (user_id, version, updated_at) VALUES (?, ?, ?) ON CONFLICT(user_id) "
                   "DO UPDATE SET version = excluded.version", [user_id, version, utcnow()])


def write_stand_in_adapter(path) -> None:
    """A peft adapter folder whose files pass Attune's checks (a config and a one-tensor safetensors file) but
    hold no real weights: for the fake backend, which never loads them."""
    import json
    import struct
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "target_modules": ["q"]}))
    header = json.dumps({"stand_in": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
