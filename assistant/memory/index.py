"""One user's memory vectors in FAISS: exact search while small, approximate (IVF) once large.

Vectors are unit length, so inner product is cosine similarity. The ids are the SQLite memory
row ids (never reused), which makes an index a cache of SQLite that can always be rebuilt.

- Below ``approx_threshold`` vectors: ``IndexIDMap2(IndexFlatIP)``, exact.
- From it on: ``IndexIVFFlat`` (inner product, nlist ≈ sqrt(n)) trained on the vectors it holds,
  with a hash-table direct map so single ids can be removed and vectors reconstructed (to retrain
  without re-embedding). HNSW searches faster still but cannot remove ids; see bench/memory_bench.py.
- It is retrained once it has grown ``retrain_growth`` times past what it was trained on, and goes
  back to exact search when it shrinks below half the threshold.

Saved as ``<name>.faiss`` (faiss.serialize_index) plus a ``<name>.json`` sidecar holding the
embedder, dimension, the ids' fingerprint (count, max, sum) and a checksum of the index bytes;
each file is written atomically.

Not thread-safe: the memory service serializes access per user.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from storage.paths import atomic_write_bytes

# Measured on this shared 2-core CPU (bench/memory_bench.py: 384-d MiniLM vectors, one query, k=5,
# 1 OpenMP thread). Flat search p50: 1k 0.02 ms, 10k 0.29 ms, 20k 0.82 ms, 50k 2.6 ms, 100k 6.6 ms
# (linear). IVF (nlist ≈ sqrt(n), nprobe 32): 0.03-0.55 ms up to 100k, recall@5 0.99. IVF is
# already faster from ~2k, but there both cost a few hundredths of a millisecond next to a ~13 ms
# query embedding; flat reaches ~1 ms at 20k, so it stays (exact, no training) up to 20k and IVF
# takes over from there. HNSW: 0.2 ms at 100k, recall 0.96, but 19 s to build and no removal.
# With e5-small vectors (the default embedder since 2026-12-06): flat 8.0 ms at 100k, 0.76 ms at 20k (the
# crossover holds); IVF nprobe 32 recall@5 0.91, nprobe 64 0.96 (e5's narrow cosine band), so nprobe is 64.
DEFAULT_APPROX_THRESHOLD = 20_000
FORMAT = 1
SPREAD_SAMPLE = 512
"""Vectors kept aside (a uniform reservoir sample) to estimate how a question scores against a user's memories
in general (``VectorIndex.spread``): exact up to this many memories, an estimate beyond (about 0.1 ms)."""


@dataclass
class IndexConfig:
    """When and how a user's index switches from exact to approximate search."""

    approx_threshold: int = DEFAULT_APPROX_THRESHOLD
    """Vectors from which the index is IVF instead of exact flat (measured crossover, see above)."""
    nprobe: int = 64
    """IVF lists searched per query: more = higher recall, slower (bench, 100k, MiniLM: 16 → recall@5 0.93,
    0.28 ms; 32 → 0.99, 0.55 ms; 64 → 1.0, 1.1 ms; e5: 32 → 0.91, 64 → 0.96)."""
    retrain_growth: float = 4.0
    """Retrain the IVF quantizer once the index holds this many times the vectors it was trained on."""
    search_threads: int = 1
    """OpenMP threads per search. 1: on this shared 2-core machine, 2 threads made a one-query flat
    search 8-30x slower (100k vectors: 48 ms vs 6 ms) from thread hand-off and oversubscription."""

    def __post_init__(self):
        if not isinstance(self.approx_threshold, int) or self.approx_threshold < 1000:
            raise ValueError(f"approx_threshold: must be an integer of at least 1000, got {self.approx_threshold!r}")
        if not isinstance(self.nprobe, int) or self.nprobe < 1:
            raise ValueError(f"nprobe: must be a positive integer, got {self.nprobe!r}")
        if not isinstance(self.retrain_growth, int | float) or self.retrain_growth < 1.5:
            raise ValueError(f"retrain_growth: must be a number of at least 1.5, got {self.retrain_growth!r}")
        if not isinstance(self.search_threads, int) or self.search_threads < 1:
            raise ValueError(f"search_threads: must be a positive integer, got {self.search_threads!r}")


def _nlist(n: int) -> int:
    """IVF lists for ``n`` training vectors: about sqrt(n), with ≥ 39 vectors per list (faiss's minimum)."""
    return max(8, min(int(math.sqrt(n)), n // 39, 65536))


class VectorIndex:
    """A user's vectors keyed by memory id, exact or IVF depending on size."""

    def __init__(self, dim: int, config: IndexConfig | None = None):
        self.dim = dim
        self.config = config or IndexConfig()
        self.index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.ids: set[int] = set()
        self._max_id = 0
        self._id_sum = 0
        self._sample: dict[int, np.ndarray] = {}  # id -> vector: a uniform sample of at most SPREAD_SAMPLE
        self._sample_seen = 0  # vectors offered to the reservoir since it was last filled
        self._sample_matrix: np.ndarray | None = None
        self._sample_stale = False  # loaded from bytes: refilled from the whole index before first use
        self._rng = random.Random(0)  # reproducible samples

    # properties --------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def max_id(self) -> int:
        return self._max_id

    def id_sum(self) -> int:
        return self._id_sum

    def fingerprint(self) -> list[int]:
        """(count, max id, sum of ids) of the vectors held, kept as they change: what
        ``storage.memories.Memories.fingerprint`` gives for the same set of rows."""
        return [self.ntotal, self._max_id, self._id_sum]

    # changes -----------------------------------------------------------------------------------
    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Add vectors under ids; ids already present are skipped (a memory's text never changes)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        fresh = np.array([i not in self.ids for i in ids.tolist()], dtype=bool)
        if not fresh.any():
            return
        ids, vectors = ids[fresh], vectors[fresh]
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("add: the same id appears twice in one call")
        self.index.add_with_ids(vectors, ids)
        self.ids.update(ids.tolist())
        self._max_id = max(self._max_id, int(ids.max()))
        self._id_sum += sum(ids.tolist())
        self._offer(ids.tolist(), vectors)
        self._reshape()

    def remove(self, ids: list[int]) -> int:
        """Remove those ids that are present; returns how many were removed."""
        present = [int(i) for i in ids if int(i) in self.ids]
        if not present:
            return 0
        self.index.remove_ids(np.asarray(present, dtype=np.int64))
        self.ids.difference_update(present)
        self._id_sum -= sum(present)
        for i in present:
            if self._sample.pop(i, None) is not None:
                self._sample_matrix = None
        self._max_id = max(self.ids, default=0)
        self._reshape()
        return len(present)

    # reads -------------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to ``k`` (id, cosine) pairs, best first."""
        if not self.ids or k < 1:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, self.dim)
        faiss.omp_set_num_threads(self.config.search_threads)  # per OS thread in OpenMP: set on every call
        scores, ids = self.index.search(query, min(k, self.ntotal))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def spread(self, vector: np.ndarray) -> tuple[float, float, int]:
        """How ``vector`` scores against this user's memories in general: (mean, standard deviation, count) of
        its cosines with all of them (with a uniform sample of ``SPREAD_SAMPLE`` once there are more)."""
        if not self.ids:
            return 0.0, 0.0, 0
        if self._sample_stale or len(self._sample) < max(1, min(self.ntotal, SPREAD_SAMPLE) // 2):
            self._refill()
        if self._sample_matrix is None:
            self._sample_matrix = np.stack(list(self._sample.values()))
        scores = self._sample_matrix @ np.asarray(vector, dtype=np.float32).reshape(self.dim)
        return float(scores.mean()), float(scores.std()), self.ntotal

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, vectors), to retrain or convert without re-embedding."""
        if not self.ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        if self.kind == "flat":
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            return ids, self.index.index.reconstruct_n(0, self.ntotal)
        ids = np.fromiter(sorted(self.ids), dtype=np.int64)
        return ids, self.index.reconstruct_batch(ids)

    # persistence -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, dim: int, config: IndexConfig | None = None) -> VectorIndex:
        """Load what ``to_bytes`` wrote; ValueError if it is not such an index of ``dim`` dimensions."""
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise ValueError(f"not a FAISS index ({str(e).splitlines()[0] if str(e) else e!r})") from e
        out = cls(dim, config)
        if index.d != dim:
            raise ValueError(f"index has {index.d} dimensions, the embedder {dim}")
        if isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexFlatIP):
            ids = faiss.vector_to_array(index.id_map).tolist()
        elif isinstance(index, faiss.IndexIVFFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT:
            ids = _ivf_ids(index)
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
            index.nprobe = out.config.nprobe
        else:
            raise ValueError(f"unexpected index type {type(index).__name__}")
        out.index, out.ids, out._sample_stale = index, set(ids), True
        if len(out.ids) != index.ntotal:
            raise ValueError("index holds duplicate ids")
        out._max_id, out._id_sum = max(out.ids, default=0), sum(out.ids)
        return out

    # internals ---------------------------------------------------------------------------------
    def _offer(self, ids: list[int], vectors: np.ndarray) -> None:
        """Reservoir sampling: each vector ever added stays in the sample with the same chance (a loaded index has
        no sample yet: it is drawn from all its vectors when first needed, so it never holds only the new ones)."""
        if self._sample_stale:
            return
        for i, v in zip(ids, vectors, strict=True):
            self._sample_seen += 1
            if len(self._sample) < SPREAD_SAMPLE:
                self._sample[i] = v.copy()
            elif self._rng.randrange(self._sample_seen) < SPREAD_SAMPLE:
                del self._sample[self._rng.choice(list(self._sample))]
                self._sample[i] = v.copy()
            else:
                continue
            self._sample_matrix = None

    def _refill(self) -> None:
        """A fresh uniform sample (after loading, or once removals emptied half of it)."""
        chosen = sorted(self.ids) if self.ntotal <= SPREAD_SAMPLE else self._rng.sample(sorted(self.ids),
                                                                                       SPREAD_SAMPLE)
        ids = np.asarray(chosen, dtype=np.int64)
        vectors = (self.index.reconstruct_batch(ids) if self.kind == "ivf"
                   else np.stack([self.index.reconstruct(int(i)) for i in ids]))
        self._sample = {int(i): v for i, v in zip(ids, vectors, strict=True)}
        self._sample_seen, self._sample_matrix, self._sample_stale = self.ntotal, None, False

    def _reshape(self) -> None:
        n, cfg = self.ntotal, self.config
        if self.kind == "flat" and n >= cfg.approx_threshold:
            self._to_ivf()
        elif self.kind == "ivf":
            trained_on = self.index.nlist ** 2  # _nlist ≈ sqrt(training size)
            if n < cfg.approx_threshold // 2:
                self._to_flat()
            elif n > cfg.retrain_growth * max(trained_on, cfg.approx_threshold):
                self._to_ivf()

    def _to_ivf(self) -> None:
        ids, vectors = self.vectors()
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, _nlist(len(ids)), faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234  # deterministic k-means
        index.train(vectors)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.add_with_ids(vectors, ids)
        index.nprobe = self.config.nprobe
        self.index = index

    def _to_flat(self) -> None:
        ids, vectors = self.vectors()
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if len(ids):
            index.add_with_ids(vectors, ids)
        self.index = index


def _ivf_ids(index: faiss.IndexIVF) -> list[int]:
    invlists = index.invlists
    out: list[int] = []
    for list_no in range(index.nlist):
        size = invlists.list_size(list_no)
        if size:
            out.extend(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).tolist())
    return out


def build(ids: np.ndarray | list[int], vectors: np.ndarray, dim: int, config: IndexConfig | None = None) -> VectorIndex:
    """A fresh index holding exactly these vectors (flat or IVF by size)."""
    out = VectorIndex(dim, config)
    if len(ids):
        out.add(ids, vectors)
    return out


def sidecar(index_path: Path) -> Path:
    return index_path.with_suffix(".json")


def _checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def save(index: VectorIndex, index_path: Path, embedder: str) -> None:
    """Write the index, then its sidecar, each atomically (OSError if the disk refuses)."""
    data = index.to_bytes()
    meta = {"format": FORMAT, "embedder": embedder, "dim": index.dim, "kind": index.kind,
            "fingerprint": index.fingerprint(), "checksum": _checksum(data)}
    atomic_write_bytes(index_path, data)
    atomic_write_bytes(sidecar(index_path), json.dumps(meta).encode())


def load(index_path: Path, embedder: str, dim: int, config: IndexConfig | None = None) -> tuple[VectorIndex, list]:
    """The saved index and the fingerprint it was saved with. FileNotFoundError if there is none;
    ValueError saying what is wrong if it is unreadable, corrupt or from another embedder."""
    try:
        data, meta = index_path.read_bytes(), json.loads(sidecar(index_path).read_text("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError("in an unknown format")
    if meta.get("embedder") != embedder or meta.get("dim") != dim:
        raise ValueError(f"from another embedder ({meta.get('embedder')!r}, now {embedder!r})")
    if meta.get("checksum") != _checksum(data):
        raise ValueError("corrupt (checksum mismatch)")
    fingerprint = meta.get("fingerprint")
    if not isinstance(fingerprint, list) or len(fingerprint) != 3:
        raise ValueError("missing its fingerprint")
    index = VectorIndex.from_bytes(data, dim, config)
    if index.ntotal != fingerprint[0]:
        raise ValueError("inconsistent with its sidecar")
    return index, fingerprint
