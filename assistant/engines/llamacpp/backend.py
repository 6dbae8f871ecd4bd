"""The llama.cpp engine (llama-cpp-python): the fast path on a CPU.

The base model is the GGUF file itself (the embedded model's Q4_1 file, or ``--model X.gguf``): llama.cpp
reads the quantized weights with its own kernels (BENCHMARKS.md, "Serving"). A user's adapter is a GGUF LoRA
(``assistant.engines.llamacpp.gguf_lora``), loaded once with ``llama_adapter_lora_init`` and applied per request
with ``llama_set_adapters_lora``; like every engine this one gets adapter references, never users.

llama.cpp applies one adapter set to a whole context, so rows with different adapters cannot share a decode
batch. Requests are served in slots, each its own llama context (own KV cache, own adapter): the worker
decodes one token of every active slot in turn, and a request that arrives meanwhile is prefilled after the
group of slots being decoded (``admit_every``), not after the whole turn (continuous batching: nobody waits for
another answer to end). A slot keeps its KV cache after a
request, so the same user's next turn (same adapter, same conversation so far) prefills only the new tokens.
Sampling (repetition penalty, temperature, the model's top-k, top-p, seed) is done on llama.cpp's logits by
``assistant.engines.sampling``, the transformers engine's own code, so both engines pick tokens alike.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.engines.base import QueuedBackend, Request, context_cap
from assistant.engines.llamacpp.gguf_lora import convert, gguf_path
from assistant.errors import ModelError

if TYPE_CHECKING:
    from assistant.engines.base import AdapterRef

log = logging.getLogger("attune.llamacpp")


WEIGHTS = ("q8_0", "shipped")


@dataclass
class LlamaCppConfig:
    """How the llama.cpp engine runs."""

    threads: int | None = None
    """llama.cpp threads per decode; None uses every core."""
    slots: int = 16
    """Requests decoded at once, interleaved token by token; each slot is a llama context with its own KV cache
    (47 MB at 2,048 tokens for the embedded model). A request that finds every slot busy waits for one."""
    max_loaded: int = 16
    """Adapters kept loaded (the least recently used unpinned ones are freed first)."""
    prefill_tokens: int = 512
    """Prompt tokens per ``llama_decode`` call while prefilling; while others decode, a newcomer gets one call per
    round, they a token between two (BENCHMARKS.md, "A long newcomer prompt": smaller calls prefill slower here)."""
    admit_every: int = 4
    """Busy slots decoded between two looks at the queue: a request that arrives during a turn is prefilled after
    at most this many other tokens, not after the whole turn (16 busy slots are ~130 ms a turn here)."""
    parallel: int | None = None
    """Slots decoded at the same moment when several are busy, the threads split between them (one llama.cpp
    thread per core each); 1 decodes them one after another with all threads; None: one per core. Measured with
    8 users on 2 cores: 124-129 tok/s in all with 2, 81 with 1 (single user: 93-99 either way)."""

    weights: str = "shipped"
    """The base weights llama.cpp serves: shipped (the model's own GGUF; for the embedded model exactly the weights
    adapters are trained on) or q8_0 (llama.cpp's Q8_0 of those weights, written once next to them: prompts
    prefill 1.7x faster here, but answers lose 0.02-0.03 nats/token; BENCHMARKS.md "Serving")."""

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights: must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        counts = ("slots", "max_loaded", "prefill_tokens", "admit_every")
        for name in counts + (("parallel",) if self.parallel is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an integer of at least 1, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: must be an integer of at least 1 or unset, got {self.threads!r}")


def available() -> bool:
    """llama-cpp-python is installed (``make setup`` builds it; the engine is picked by ``--engine auto``)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def selftest(gguf: Path | None = None) -> None:
    """Prefill a prompt and decode a few tokens of the embedded model (or ``gguf``) with llama.cpp. ``make setup``
    runs it in its own process after building llama.cpp: a build that dies here (an instruction this CPU reports
    but will not run, as AMX on some virtual machines) is removed again, and Attune serves with transformers."""
    from llama_cpp import Llama

    from assistant.model import embedded_gguf

    llm = Llama(str(gguf or embedded_gguf()), n_ctx=256, n_batch=64, verbose=False)
    text = llm("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]
    if not text.strip():
        raise SystemExit("llama.cpp produced no text from the embedded model")
    print(f"attune: llama.cpp runs here (the embedded model says: {text.strip()!r})")


class _StaleGGUF(Exception):
    """An adapter's GGUF could not be loaded and was removed: it is converted again and the request waits."""


@dataclass
class _Slot:
    ctx: object
    adapter: str | None = None
    """The adapter (name) set on this context; its KV cache was computed under it."""
    tokens: list[int] = field(default_factory=list)
    """The tokens the KV cache holds, in order."""
    req: Request | None = None
    pending: int | None = None
    """The last sampled token, decoded at this slot's next turn."""
    prompt: list[int] = field(default_factory=list)
    """Prompt tokens still to prefill (a slice per round while others decode); the first token is sampled after."""
    seen: object = None
    """Which tokens the slot has seen (prompt and answer): a bool tensor [1, vocab] for the repetition penalty."""
    rng: object = None
    """The request's own torch generator when it asked for a seed."""
    threads: int = 0
    """llama.cpp threads this context decodes with now."""


class LlamaCppBackend(QueuedBackend):
    """llama.cpp over one GGUF base model, per-request LoRA adapters, slots interleaved token by token."""

    def __init__(self, gguf: Path, model_dir: Path, name: str, config: LlamaCppConfig | None = None,
                 context_tokens: int | None = None):
        import llama_cpp
        from llama_cpp._internals import LlamaModel
        from transformers import AutoTokenizer, GenerationConfig

        self.config = config or LlamaCppConfig()
        self.name, self.model_dir = name, Path(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        try:
            generation = GenerationConfig.from_pretrained(model_dir)
            gen_eos, self.top_k = generation.eos_token_id, generation.top_k
        except OSError:  # no generation_config.json: the tokenizer's end of sequence only, no top-k
            gen_eos, self.top_k = None, None
        super().__init__(tokenizer, gen_eos)
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's own log: errors only
        llama_cpp.llama_backend_init()
        self._llama = llama_cpp
        self.model = LlamaModel(path_model=str(gguf), params=llama_cpp.llama_model_default_params(), verbose=False)
        self.context_tokens = context_cap(context_tokens, llama_cpp.llama_model_n_ctx_train(self.model.model))
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)
        self.slots: list[_Slot] = []
        self._adapters: OrderedDict[str, object] = OrderedDict()  # name -> llama_adapter_lora pointer
        self._pins: dict[str, int] = {}
        self._converting: dict[str, Future] = {}
        self._rewritten: set[str] = set()  # adapters whose damaged GGUF was written again once
        self._converter = ThreadPoolExecutor(1, thread_name_prefix="attune-gguf")
        self.threads = self.config.threads or _cores()
        self.parallel = max(1, min(self.config.parallel or _cores(), self.threads))
        # Every llama.cpp computation runs on these threads, lane 0 taking all multi-threaded work: one caller
        # thread per OpenMP team keeps libgomp from throttling its spin-waits (see _step_all).
        self._lanes = [ThreadPoolExecutor(1, thread_name_prefix=f"attune-llama{i}") for i in range(self.parallel)]
        self._lock = threading.Lock()  # request, slot and adapter bookkeeping while slots decode in parallel
        self.load_seconds: list[float] = []

    def close(self) -> None:
        super().close()
        self._converter.shutdown(wait=False, cancel_futures=True)
        for lane in self._lanes:
            lane.shutdown(wait=True)

    # worker --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        waiting: deque[Request] = deque()
        closing = False
        while True:
            idle = not waiting and not any(s.req for s in self.slots)
            if idle and closing:
                return
            closing = self._let_in(waiting, block=idle) or closing  # block only when there is nothing to decode
            busy = [s for s in self.slots if s.req is not None]
            if not busy and waiting:  # every waiting request needs an adapter still being converted
                time.sleep(0.02)
            step, shared = self.config.admit_every, len(busy) > 1
            for i in range(0, len(busy), step):  # one token each; newcomers are let in between the groups
                if i:
                    closing = self._let_in(waiting, block=False) or closing
                self._step_all(busy[i:i + step], shared)
            if busy and len(self.slots) < self.config.slots and all(s.req for s in self.slots):
                self.slots.append(_Slot(self._new_context()))  # the next arrival finds a context ready

    def _let_in(self, waiting: deque[Request], block: bool) -> bool:
        """Move what the queue holds to ``waiting`` (waiting for the first item when ``block``) and start what can
        start; True when close() was asked."""
        closing = False
        try:
            item = self._queue.get() if block else self._queue.get_nowait()
            while True:
                if item is None:
                    closing = True
                else:
                    waiting.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        self._admit(waiting)
        return closing

    def _step_all(self, busy: list[_Slot], shared: bool) -> None:
        """One token for every busy slot: one after another with every thread, or ``parallel`` at a time (GIL
        released inside llama.cpp) with the threads split between them. Always on the lanes, never on this thread:
        llama.cpp's OpenMP build gives each calling thread its own thread team, and once libgomp manages more
        threads than cores it stops spin-waiting, which slowed a lone user from 104 to 80 tok/s after the first
        parallel turn when this worker also decoded."""
        if self.parallel == 1 or len(busy) < 2:
            for slot in busy:
                self._threads(slot, self.threads)
            self._lanes[0].submit(lambda: [self._step(slot, shared) for slot in busy]).result()
            return
        groups = [busy[i::self.parallel] for i in range(min(self.parallel, len(busy)))]
        for group in groups:
            for slot in group:
                self._threads(slot, max(1, self.threads // len(groups)))
        for job in [lane.submit(lambda g=g: [self._step(slot, shared) for slot in g])
                    for lane, g in zip(self._lanes, groups)]:
            job.result()

    def _threads(self, slot: _Slot, n: int) -> None:
        if slot.threads != n:
            self._llama.llama_set_n_threads(slot.ctx.ctx, n, self.threads)
            slot.threads = n

    def _admit(self, waiting: deque[Request]) -> None:
        """Start waiting requests in free slots (in arrival order; one whose adapter is still being converted
        to GGUF waits without holding up the others)."""
        for req in list(waiting):
            if req.stop.is_set():
                waiting.remove(req)
                self._finish(req)
                continue
            ready = self._gguf_ready(req)
            if ready is None:
                continue
            if ready is not True:  # its adapter could not be converted: that request learns why
                waiting.remove(req)
                req.error = ready
                self._finish(req)
                continue
            try:
                slot = self._free_slot(req)
            except ValueError as e:  # llama.cpp could not create another context (memory): the worker lives on
                waiting.remove(req)
                req.error = ModelError(f"llama.cpp could not open another request slot ({e}); lower slots or "
                                       "wait for an answer to finish.")
                self._finish(req)
                continue
            if slot is None:
                return
            waiting.remove(req)
            self._threads(slot, self.threads)
            if self._lanes[0].submit(self._start, slot, req).result() is False:  # its GGUF is converted again
                waiting.appendleft(req)

    def _free_slot(self, req: Request) -> _Slot | None:
        """The free slot whose KV cache shares the longest prefix with this prompt under the same adapter; else an
        empty one (the spare the worker keeps ready: no context to create now); a new slot while there are fewer
        than ``slots``; else the least recently used free one."""
        name = req.adapter.name if req.adapter else None
        free = [s for s in self.slots if s.req is None]
        best = max(free, key=lambda s: _common(s.tokens, req.prompt_ids) if s.adapter == name else -1, default=None)
        if best is not None and best.adapter == name and _common(best.tokens, req.prompt_ids):
            return best
        empty = next((s for s in free if not s.tokens), None)
        if empty is not None:
            return empty
        if len(self.slots) < self.config.slots:
            self.slots.append(_Slot(self._new_context()))
            return self.slots[-1]
        return free[0] if free else None

    def _new_context(self):
        from llama_cpp._internals import LlamaContext

        params = self._llama.llama_context_default_params()
        params.n_ctx = self.context_tokens
        params.n_batch = params.n_ubatch = self.config.prefill_tokens
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        return LlamaContext(model=self.model, params=params, verbose=False)

    def _start(self, slot: _Slot, req: Request) -> bool | None:
        """Set the request's adapter on the slot, keep what its KV cache shares with the prompt, prefill the first
        slice of the rest now (``_step`` the next ones) and sample the first token once all is in. False: the
        adapter's GGUF was damaged and is being written again from the peft files (the request waits)."""
        try:
            name = self._acquire(req.adapter)
        except _StaleGGUF:
            return False
        except ModelError as e:
            req.error = e
            self._finish(req)
            return
        req.stats.adapter_version = req.adapter.version if req.adapter else None
        import torch

        from assistant.engines.sampling import generator

        slot.req, slot.rng = req, generator(req.settings.seed)
        slot.seen = torch.zeros((1, self.n_vocab), dtype=torch.bool)
        slot.seen[0, [t for t in req.prompt_ids if 0 <= t < self.n_vocab]] = True
        try:
            if len(req.prompt_ids) + 1 >= self.context_tokens:
                raise ModelError(f"The prompt ({len(req.prompt_ids)} tokens) does not fit the model's context of "
                                 f"{self.context_tokens} tokens; start a new conversation.")
            self._set_adapter(slot, name)
            keep = min(_common(slot.tokens, req.prompt_ids), len(req.prompt_ids) - 1)
            if not self._llama.llama_memory_seq_rm(slot.ctx.memory, 0, keep, -1):
                self._llama.llama_memory_clear(slot.ctx.memory, True)
                keep = 0
            slot.tokens, slot.prompt = list(req.prompt_ids[:keep]), list(req.prompt_ids[keep:])
            token = self._prefill(slot, any(s.req for s in self.slots if s is not slot))
            if token is not None:  # the whole prompt in this first slice: its first token now, as it arrived
                self._emit(slot, token)
        except BaseException as e:  # that request learns why; the slot starts clean next time
            self._fail(slot, e)

    def _step(self, slot: _Slot, shared: bool) -> None:
        """Prefill the next slice of the slot's prompt (``shared``: others decode too), or decode its last token; then
        sample the next (llama.cpp, then ``engines.sampling``; the bookkeeping under the lock)."""
        req = slot.req
        if req.stop.is_set() or req.finished or len(slot.tokens) + 1 >= self.context_tokens:
            with self._lock:
                if not (req.stop.is_set() or req.finished):
                    req.stats.finish_reason = "length"
                self._release(slot)
            return
        try:
            if slot.prompt:
                token = self._prefill(slot, shared)
                if token is None:
                    return
            else:
                self._decode(slot, [slot.pending])
                token = self._sample(slot)
        except BaseException as e:
            with self._lock:
                self._fail(slot, e)
            return
        with self._lock:
            self._emit(slot, token)

    def _chunk(self, slot: _Slot, others_busy: bool) -> int:
        """Prompt tokens to prefill in the slot's next round: all alone, one call's worth while others decode."""
        return self.config.prefill_tokens if others_busy else len(slot.prompt)

    def _prefill(self, slot: _Slot, others_busy: bool) -> int | None:
        """Prefill the slot's next slice of its prompt (``prefill_tokens`` per llama.cpp call); the first token of
        the answer once the prompt is all in, else None."""
        chunk = self._chunk(slot, others_busy)
        while slot.prompt and chunk > 0:
            n = min(chunk, self.config.prefill_tokens)
            self._decode(slot, slot.prompt[:n])
            slot.prompt, chunk = slot.prompt[n:], chunk - n
        return None if slot.prompt else self._sample(slot)

    def _emit(self, slot: _Slot, token: int) -> None:
        slot.seen[0, token] = True
        slot.pending = token
        self._token(slot.req, token)
        if slot.req.finished:
            self._release(slot)

    def _release(self, slot: _Slot) -> None:
        req, slot.req, slot.pending, slot.prompt = slot.req, None, None, []
        self._finish(req)
        self._unpin(req.adapter.name if req.adapter else None)

    def _fail(self, slot: _Slot, error: BaseException) -> None:
        slot.req.error = error if isinstance(error, ModelError) else ModelError(f"llama.cpp failed: {error}")
        self._llama.llama_memory_clear(slot.ctx.memory, True)
        slot.tokens = []
        self._release(slot)

    def _decode(self, slot: _Slot, tokens: list[int]) -> None:
        arr = (self._llama.llama_token * len(tokens))(*tokens)
        rc = self._llama.llama_decode(slot.ctx.ctx, self._llama.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise ModelError(f"llama_decode returned {rc} (context full or out of memory); start a new "
                             "conversation or lower max_new_tokens.")
        slot.tokens.extend(tokens)

    def _sample(self, slot: _Slot) -> int:
        """The next token from the slot's last logits, picked as the transformers engine picks it."""
        import numpy as np
        import torch

        from assistant.engines.sampling import Sampling, sample

        ptr = self._llama.llama_get_logits_ith(slot.ctx.ctx, -1)
        logits = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())[None]
        return int(sample(logits, slot.seen, [Sampling.of(slot.req.settings)], [slot.rng], self.top_k)[0])

    # adapters ------------------------------------------------------------------------------------
    def _gguf_ready(self, req: Request):
        """True when the request can start (base model, or its adapter's GGUF exists), None while it is being
        converted, or the conversion's error."""
        ref = req.adapter
        if ref is None or ref.name in self._adapters or gguf_path(Path(ref.path)).is_file():
            return True
        job = self._converting.get(ref.name)
        if job is None:
            if not (Path(ref.path) / "adapter_config.json").is_file():
                return ModelError(f"Adapter v{ref.version} is missing at {ref.path}; roll back to another version.")
            log.info("converting adapter %s to GGUF (published before the llama.cpp engine)", ref.name)
            self._converting[ref.name] = self._converter.submit(convert, Path(ref.path), self.model_dir)
            return None
        if not job.done():
            return None
        del self._converting[ref.name]
        error = job.exception()
        return True if error is None else error if isinstance(error, ModelError) else ModelError(str(error))

    def _acquire(self, ref: AdapterRef | None) -> str | None:
        """Load (once) and pin the adapter; returns its name (None: the base model)."""
        if ref is None:
            return None
        if ref.name not in self._adapters:
            started = time.perf_counter()
            path = gguf_path(Path(ref.path))
            ptr = self._llama.llama_adapter_lora_init(self.model.model, str(path).encode())
            if not ptr and ref.name not in self._rewritten:  # a derived file: written again from the peft adapter
                self._rewritten.add(ref.name)
                log.warning("llama.cpp could not load %s (damaged?); converting adapter v%s again", path, ref.version)
                path.unlink(missing_ok=True)
                raise _StaleGGUF(ref.name)
            if not ptr:
                raise ModelError(f"llama.cpp could not load adapter v{ref.version} ({path}), even written again "
                                 "from its peft files; roll back to another version or train a new one.")
            self.load_seconds.append(time.perf_counter() - started)
            self._adapters[ref.name] = ptr
            self._evict()
        self._adapters.move_to_end(ref.name)
        self._pins[ref.name] = self._pins.get(ref.name, 0) + 1
        return ref.name

    def _unpin(self, name: str | None) -> None:
        if name is None:
            return
        self._pins[name] -= 1
        if not self._pins[name]:
            del self._pins[name]
        self._evict()

    def _evict(self) -> None:
        for name in list(self._adapters):
            if len(self._adapters) <= self.config.max_loaded:
                return
            if name in self._pins:
                continue
            for slot in self.slots:  # a context must not point at a freed adapter
                if slot.adapter == name:
                    self._set_adapter(slot, None)
            self._llama.llama_adapter_lora_free(self._adapters.pop(name))

    def _set_adapter(self, slot: _Slot, name: str | None) -> None:
        if slot.adapter == name:
            return
        llama = self._llama
        if name is None:
            rc = llama.llama_set_adapters_lora(slot.ctx.ctx, None, 0, None)
        else:
            adapters = (llama.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            rc = llama.llama_set_adapters_lora(slot.ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        if rc:
            raise ModelError(f"llama.cpp could not set adapter {name} (code {rc}).")
        llama.llama_memory_clear(slot.ctx.memory, True)  # its KV cache was computed under the other adapter
        slot.adapter, slot.tokens = name, []

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
