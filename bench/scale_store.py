"""The ``scale`` section's shared-store measurements (``bench.scale``): what a serving process pays for the shared
database and the adapter store.

Owns: publish -> first token on another server (a default-rank adapter of the embedded model uploaded by one Store
with an S3 adapter store, then on a second Store with its own data dir: the version resolved and downloaded as a
turn does, and the engine's first token with it, split into download and load); the per-turn active-version lookup
on PostgreSQL vs SQLite; one scheduler pass (the due-users query) at growing numbers of users on both. Must not know
the queue (``bench.scale_queue``). Rows for the database sizes are written in bulk with the schema's own columns.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
PROMPT = "What should I cook tonight?"
RANK = 16  # TrainConfig's default rank, all linear layers: about 19 MB in fp32 on the embedded model
LOOKUP_USERS = 200
ENGINES = (("llama.cpp (what serve picks here)", "llamacpp", None), ("llama.cpp, 1 thread", "llamacpp", 1),
           ("transformers", "transformers", None), ("transformers, 1 thread", "transformers", 1))
"""(label, engine, threads): each engine as serve runs it (every core) and with one thread, which a busy shared
machine slows far less."""


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


# publish -> first token --------------------------------------------------------------------------------------------
def publish_to_first_token(url: str, s3_url: str, endpoint: str, repeats: int) -> dict:
    """In its own process (engines' threads): ``repeats`` versions published per engine, each served once on the
    other server, after one more version that is the first adapter the engine serves (a llama.cpp slot's context is
    made then; not counted, kept in the results). Times in seconds, medians."""
    from assistant.engines.llamacpp.backend import available
    from assistant.engines.llamacpp.gguf_lora import converter_dir
    from assistant.model import resolve_model_dir
    from bench.common import fresh_data_dir
    from storage import Store
    from storage.objects import AdapterStoreConfig

    a = Store(fresh_data_dir("attune-scale-a-"), url, AdapterStoreConfig(s3_url, endpoint))
    b = Store(fresh_data_dir("attune-scale-b-"), url, AdapterStoreConfig("", endpoint))
    model_dir = resolve_model_dir("embedded", a.data_dir)
    uid = a.users.create("alice", "correct horse").id
    template = _adapter(a.data_dir.root / "template", model_dir)
    mb = {"safetensors": (template / "adapter_model.safetensors").stat().st_size / 1e6,
          "gguf": (template / "adapter.gguf").stat().st_size / 1e6 if (template / "adapter.gguf").exists() else 0.0}
    engines = [e for e in ENGINES if e[1] == "transformers" or (available() and converter_dir())]
    out: dict = {"rank": RANK, "mb": mb, "repeats": repeats, "engines": {}}
    n = 0
    for label, engine, threads in engines:
        runs = []
        backend = _warm_backend(b, engine, threads)
        for _ in range(repeats + 1):  # the first: the first adapter this engine serves at all (not counted)
            n += 1
            runs.append(_publish_and_serve(a, b, uid, template, n, backend))
        backend.close()
        out["engines"][label] = {k: statistics.median(r[k] for r in runs[1:]) for k in runs[0]} | {
            "first_adapter_ever": runs[0], "runs": runs[1:]}
    for store in (a, b):
        store.close()
        shutil.rmtree(store.data_dir.root, ignore_errors=True)  # its models/ is a link to the bench's: kept
    return out


def _adapter(folder: Path, model_dir: Path) -> Path:
    """A random non-zero rank-16 LoRA on every linear layer of the base model (the default training shape), saved as
    peft saves it, plus the GGUF LoRA a publish writes for llama.cpp when its converter is installed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from assistant.engines.llamacpp.gguf_lora import convert, converter_dir

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False))
    for p in peft.parameters():
        if p.requires_grad:
            p.data *= 0.05  # small, like a trained adapter
    peft.save_pretrained(folder)
    if converter_dir() is not None:
        convert(folder, model_dir)
    return folder


def _warm_backend(store, engine: str, threads: int | None):
    """The engine as ``serve --engine ENGINE`` builds it on the second server (``threads``: torch's or llama.cpp's
    threads, None for every core), having answered one request already."""
    from assistant.engines.llamacpp.backend import LlamaCppConfig
    from assistant.engines.select import build_backend
    from assistant.model import ModelConfig

    backend = build_backend(store.data_dir, ModelConfig(threads=threads if engine == "transformers" else None), 2048,
                            engine=engine, llamacpp_cfg=LlamaCppConfig(threads=threads))
    _first_token(backend, None)
    return backend


def _first_token(backend, ref, turn: int = 0) -> None:
    from assistant.engines.base import GenerationSettings, StreamStats
    from assistant.model import render_chat

    question = f"{PROMPT} ({turn})"  # a new question each turn: no prefix already in the engine's caches
    ids = render_chat(backend.tokenizer, [{"role": "user", "content": question}], tokenize=True)
    for _ in backend.stream(ids, GenerationSettings(max_new_tokens=1, temperature=0), threading.Event(),
                            StreamStats(), ref):
        pass


def _load_seconds(backend) -> list[float]:
    registry = getattr(backend, "registry", None)
    return getattr(backend, "load_seconds", None) or getattr(registry, "load_seconds", [])


def _publish_and_serve(a, b, uid: int, template: Path, n: int, backend) -> dict:
    """Server A publishes a copy of ``template`` (upload, marker, one transaction); then server B takes the user's
    next turn: resolve the active version, download it (``ready``), stream the first token with it."""
    from assistant.chat.adapters import ready, resolve_adapter

    staging = a.data_dir.staging(uid, n)
    shutil.copytree(template, staging, dirs_exist_ok=True)
    started = time.perf_counter()
    a.adapters.publish(uid, staging, base_model="bench", metrics={}, gate_reason="bench", parent_version=None,
                       job_id=None)
    published = time.perf_counter()
    ref = resolve_adapter(b, uid)
    assert ref is not None and ref.version == n and not Path(ref.path).exists(), ref
    ready(b, uid, ref)
    downloaded = time.perf_counter()
    loads = len(_load_seconds(backend))
    _first_token(backend, ref, n)
    served = time.perf_counter()
    load = _load_seconds(backend)[loads:]
    assert len(load) == 1, f"the engine loaded {len(load)} adapters for one new version"
    return {"upload_s": published - started, "download_s": downloaded - published, "load_s": load[0],
            "first_token_s": served - downloaded - load[0], "total_s": served - published}


# the shared database ------------------------------------------------------------------------------------------------
def lookups_and_passes(pg, cfg, tmp: Path) -> dict:
    """One data dir, its SQLite file and a PostgreSQL database holding the same rows: a scheduler pass at each size
    of ``cfg.users``, then the per-turn lookups at the largest."""
    from storage import DataDir, Store

    data = DataDir(tmp / "data").ensure()
    stores = {"sqlite": Store(data), "postgresql": Store(data, pg.new_database(migrated=True))}
    passes, done = {}, 0
    try:
        for n in cfg.users:
            for store in stores.values():
                _populate(store, done, n)
            done = n
            passes[str(n)] = _passes(stores, cfg.passes)
        lookups = _lookups(stores, data, done, cfg.lookups)
    finally:
        for store in stores.values():
            store.close()
    return {"passes": passes, "passes_each": cfg.passes, "answers": "0-11", "lookups": lookups}


def _rows(start: int, end: int) -> dict[str, tuple[list[str], list[tuple]]]:
    """Users ``start+1 .. end``: one conversation each with ``id % 12`` answers (and their questions) from the last
    hour, a like on the first answer of every third, and a job two days ago for every second."""
    now = datetime.now(UTC)
    at = lambda **kw: (now - timedelta(**kw)).isoformat(timespec="milliseconds")  # noqa: E731
    rows: dict = {"users": (["id", "name", "password_hash", "created_at"], []),
                  "conversations": (["id", "user_id", "created_at", "updated_at"], []),
                  "messages": (["id", "conversation_id", "user_id", "role", "content", "created_at"], []),
                  "feedback": (["user_id", "message_id", "kind", "created_at"], []),
                  "jobs": (["user_id", "status", "created_at", "finished_at"], [])}
    for uid in range(start + 1, end + 1):
        rows["users"][1].append((uid, f"user{uid}", "-", at(days=3)))
        rows["conversations"][1].append((uid, uid, at(hours=1), at(minutes=1)))
        for i in range(uid % 12):
            mid = uid * 100 + 2 * i
            rows["messages"][1].extend([(mid, uid, uid, "user", f"question {i}", at(minutes=50 - i)),
                                        (mid + 1, uid, uid, "assistant", f"answer {i}", at(minutes=50 - i))])
            if i == 0 and uid % 3 == 0:
                rows["feedback"][1].append((uid, mid + 1, "like", at(minutes=40)))
        if uid % 2 == 0:
            rows["jobs"][1].append((uid, "rejected", at(days=2), at(days=2)))
    return rows


def _populate(store, start: int, end: int) -> None:
    """Write :func:`_rows` in one transaction with ``executemany`` (both databases), then move PostgreSQL's id
    sequences past the ids given."""
    from storage.postgres.sql import PGDatabase, translate

    with store.write() as db:
        pg = isinstance(db, PGDatabase)
        for table, (columns, rows) in _rows(start, end).items():
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            if pg:
                db.conn.cursor().executemany(translate(sql), rows)
            else:
                db.conn.executemany(sql, rows)
        for table in ("users", "conversations", "messages", "feedback", "jobs") if pg else ():
            db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))")
    store.db.execute("ANALYZE")  # fresh statistics for the planner, as after a day of ordinary writes


def _passes(stores: dict, passes: int) -> dict:
    """The scheduler's query with its default thresholds, timed ``passes`` times after one warm-up (median, ms)."""
    from personalize.scheduler import SchedulerConfig

    sc = SchedulerConfig()
    cutoff = (datetime.now(UTC) - timedelta(minutes=sc.min_interval_minutes)).isoformat(timespec="milliseconds")
    out: dict = {}
    for name, store in stores.items():
        due = store.jobs.due_users(cutoff, sc.min_new_events)
        times = []
        for _ in range(passes):
            started = time.perf_counter()
            assert store.jobs.due_users(cutoff, sc.min_new_events) == due
            times.append((time.perf_counter() - started) * 1000)
        out[f"{name}_ms"], out[f"{name}_due"] = statistics.median(times), len(due)
    assert out["sqlite_due"] == out["postgresql_due"], out
    return out | {"due": out["sqlite_due"]}


def _lookups(stores: dict, data, users: int, n: int) -> dict:
    """``LOOKUP_USERS`` users spread over all get a published version (a stand-in adapter folder, held here); then
    ``n`` turns' lookups on each database, interleaved: ``resolve_adapter`` + ``ready`` (ms)."""
    sys.path.insert(0, str(TESTS))
    from assistant.chat.adapters import ready, resolve_adapter
    from fakes import write_stand_in_adapter
    from storage.common import utcnow

    chosen = list(range(1, users + 1, max(1, users // LOOKUP_USERS)))[:LOOKUP_USERS]
    for uid in chosen:
        write_stand_in_adapter(data.adapters(uid) / "v1")
    for store in stores.values():
        with store.write() as db:
            for uid in chosen:
                db["adapter_versions"].insert({"user_id": uid, "version": 1, "path": f"adapters/u{uid}/v1",
                                               "base_model": "bench", "status": "published", "created_at": utcnow()})
                db["active_adapters"].insert({"user_id": uid, "version": 1, "updated_at": utcnow()})
    times: dict[str, list[float]] = {name: [] for name in stores}
    for i in range(len(chosen) + n):  # the first pass over the users warms the adapter check's cache
        uid = chosen[i % len(chosen)]
        for name, store in stores.items():
            started = time.perf_counter()
            ref = resolve_adapter(store, uid)
            ready(store, uid, ref)
            if i >= len(chosen):
                times[name].append((time.perf_counter() - started) * 1000)
            assert ref is not None and ref.version == 1
    return {"n": len(chosen), "users": users, "lookups": n} | {
        name: {"p50_ms": statistics.median(t), "p95_ms": _p95(t)} for name, t in times.items()}
