"""One training job end to end, normally in its own process:

    python -m personalize.job --data-dir D [--db URL] [--adapter-store URL] --job-id J [--model M] [--threads T]
        [--config JSON] [--worker-id W]

``--worker-id``: a ``launch.py worker`` (``personalize.worker``) claimed the job and started this process for it;
the process takes the job over instead of claiming it, and the worker holds its lease meanwhile.

The job row names the user. Steps: build the user's examples, load a fresh base model, answer
the anchor prompts once (cached), continue from the active adapter (same base model) or start a
new LoRA, mix new examples + reservoir + anchors, train (keeping the best checkpoint within the
anchor margin, personalize.checkpoint), score the gate on what was kept, then publish
(``save_pretrained`` into a staging folder, fsync, rename to ``v<N>``, switch the active pointer
in one transaction, prune to ``keep_versions``; with an adapter store the upload comes first, ``storage.adapters``)
or record the rejection. Any exception marks
the job failed with its message. A kill at any point leaves no ``v<N>`` and no pointer change:
the staging folder is swept by the next job or by ``personalize.runner.fail_stale``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from assistant.engines.llamacpp import gguf_lora
from assistant.errors import ModelError
from assistant.file_checks import adapter_problem
from assistant.model import EMBEDDED, ModelConfig, resolve_model_dir
from personalize import ability, gate, replay, style
from personalize.checkpoint import BestCheckpoint, selection_split
from personalize.config import TrainConfig
from personalize.dataset import build_examples, is_new
from personalize.errors import TrainingError
from personalize.train import attach_adapter, attention, load_base, resolve, train
from storage.adapters import staging_dir
from storage.config import StoreConfig
from storage.db import Store
from storage.errors import AttuneError, StorageError
from storage.objects import AdapterStoreConfig
from storage.paths import remove_tree

log = logging.getLogger("attune.personalize")


def base_model_id(model_path: Path) -> str:
    """Identifies the base weights an adapter belongs to: folder name + hash of config and weight sizes."""
    model_path = Path(model_path)
    h = hashlib.sha256((model_path / "config.json").read_bytes() if (model_path / "config.json").is_file() else b"")
    for p in sorted(model_path.glob("*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return f"{Path(model_path).name}-{h.hexdigest()[:10]}"


def _held(store: Store, row: dict) -> bool:
    """Whether version ``row``'s files are in this data dir, downloading one kept in the adapter store; a version
    that cannot be had is not continued from (the job starts afresh, and says why in the log)."""
    try:
        return bool(row.get("path")) and store.adapters.fetch(row) is not None
    except StorageError as e:
        log.warning("v%s cannot be continued from, starting afresh: %s", row["version"], e)
        return False


def _skip(store: Store, job_id: int, code: str, reason: str, metrics: dict) -> dict:
    result = {"published": False, "version": None, "code": code, "reason": reason, "metrics": metrics,
              "job_id": job_id}
    store.jobs.finish(job_id, "rejected", result)
    return result


class _Phases:
    """Names what the job is doing in its row and times it: ``with phases("training", "train_s"):``."""

    def __init__(self, store: Store, job_id: int):
        self.store, self.job_id = store, job_id
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str, timing: str | None = None) -> Iterator[None]:
        self.store.jobs.phase(self.job_id, phase)
        t = time.perf_counter()
        yield
        if timing:
            self.timings[timing] = time.perf_counter() - t

    def total(self) -> dict[str, float]:
        """Every phase's seconds and the job's total so far, rounded."""
        self.timings["total_s"] = round(time.perf_counter() - self.started, 2)
        return {k: round(v, 2) for k, v in self.timings.items()}


# Over 60 lines on purpose: the job's phases in order, each a `with phases(...)` block over the same model and data.
def run_job(store: Store, job_id: int, model_cfg: ModelConfig, cfg: TrainConfig,
            on_progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Run a claimed (running) job to its end and record it; returns the JSON-able result."""
    phases = _Phases(store, job_id)
    user_id = store.jobs.load(job_id)["user_id"]
    store.adapters.sweep(user_id, keep_staging={job_id})
    data = build_examples(store, user_id, cfg)
    active = store.adapters.active(user_id)
    user_train = [e for e in data.train if e.kind in ("sft", "pair", "undesirable")]
    counts = data.counts()
    if len(user_train) < cfg.min_examples or not data.of("sft", heldout=True):
        return _skip(store, job_id, "not_enough", f"Not enough examples yet ({len(user_train)} to train on, "
                     f"{len(data.heldout)} held out; need {cfg.min_examples} and 1): chat more, give feedback or "
                     "import history, then train again.", counts)

    with phases("loading model", "load_s"):
        base_id = base_model_id(resolve_model_dir(model_cfg.model, store.data_dir))
        # Continue from the active adapter if it belongs to this base model and its files are whole
        # (assistant.file_checks; downloaded first when it is kept in the adapter store); else start afresh.
        continuing = active if active and active.get("base_model") == base_id and _held(store, active) and \
            adapter_problem(Path(active["path"])) is None else None
        watermark = continuing["metrics"].get("watermark") if continuing else None
        if continuing and not any(is_new(e, watermark) for e in user_train):
            return _skip(store, job_id, "nothing_new",
                         f"Nothing new to learn since v{continuing['version']}; keeping it.", counts)
        device, quant, bf16 = resolve(cfg, model_cfg)
        loaded = load_base(model_cfg, cfg, store.data_dir)

    with phases("answering anchor prompts", "anchors_s"):
        anchors = replay.anchor_set(loaded.model, loaded.tokenizer, loaded.path, store.data_dir, cfg)
        anchor_train, anchor_eval = replay.split_anchors(anchors, cfg)
        anchor_train, anchor_monitor = replay.split_monitor(anchor_train, cfg)
        # a style taught through corrections goes on every target the user did not write (personalize.style)
        user_style = style.of_user(data.train + data.heldout)
        data.train, data.heldout, anchor_train, anchor_monitor, anchor_eval = (
            style.carry(user_style, x) for x in (data.train, data.heldout, anchor_train, anchor_monitor, anchor_eval))
        reservoir = store.replay.sample(user_id) if continuing else []
        examples, mix = replay.compose(data, watermark, reservoir, anchor_train, cfg)

    with phases("scoring the current version", "eval_before_s"):
        model = attach_adapter(loaded.model, cfg, quant, Path(continuing["path"]) if continuing else None)
        tok = loaded.tokenizer
        select, heldout = selection_split(data.of("sft", heldout=True)[-cfg.max_eval_examples:])
        base_heldout, base_anchor = gate.base_losses(
            model, tok, heldout, anchor_eval, cfg, device, replay.loss_cache(store.data_dir, loaded.path, cfg),
            f"{device}|{quant}|{attention(cfg, device)}")
        before = gate.heldout_loss(model, tok, heldout, cfg, device) if continuing else base_heldout
        pairs = data.of("pair", heldout=True)[-cfg.max_eval_examples:]
        pref_before = gate.preference_margin(model, tok, pairs, cfg, device)
        checks = ability.load_checks(limit=cfg.ability_checks) if cfg.ability_checks else []
        checks_base = ability.base_answers(model, tok, checks, cfg,
                                           replay.checks_cache(store.data_dir, loaded.path, cfg)) if checks else []

    with phases("training"):
        best = BestCheckpoint(model, tok, cfg, device, select, anchor_monitor, bf16, reshaped=user_style.reshapes)
        stats = train(model, tok, examples, cfg, device, bf16, on_progress or (
            lambda step, total, loss: store.jobs.progress(job_id, step, total, loss)), best)

    with phases("evaluating", "eval_after_s"):
        after = gate.heldout_loss(model, tok, heldout, cfg, device)
        anchor_after = gate.heldout_loss(model, tok, anchor_eval, cfg, device)
        baseline = f"v{continuing['version']}" if continuing else "base"
        kept = ability.measure(model, tok, checks, cfg, checks_base) if checks else None
        verdict = gate.decide(before, after, base_anchor, anchor_after, cfg, baseline, kept, user_style.reshapes)
        pref_after = gate.preference_margin(model, tok, pairs, cfg, device)

    parent = continuing["version"] if continuing else None
    metrics = {
        **verdict.to_dict(), "heldout_loss_base": base_heldout, "heldout_examples": len(heldout),
        "selection_examples": len(select), "selection_shared": select is heldout,
        "anchor_eval_examples": len(anchor_eval), "anchor_monitor_examples": len(anchor_monitor),
        "examples": {**counts, **mix}, "selection": stats.selection,
        "heldout_pref_margin_before": pref_before, "heldout_pref_margin": pref_after,
        "train": {"steps": stats.steps, "tokens": stats.tokens, "seconds": round(stats.seconds, 2),
                  "tokens_per_s": round(stats.tokens_per_s, 1), "final_loss": stats.final_loss},
        "watermark": data.watermark, "base_model": base_id, "device": device, "quant": quant, "bf16": bf16,
        "continued_from": parent, "config": cfg.to_dict(),
        "style": user_style.to_dict(),
    }
    new = [e for e in user_train if is_new(e, watermark)]
    return _record(store, job_id, user_id, model, verdict, metrics, phases, new, cfg, loaded.path)


def _record(store: Store, job_id: int, user_id: int, model, verdict: gate.GateResult, metrics: dict,
            phases: _Phases, new: list, cfg: TrainConfig, base_dir: Path) -> dict:
    """Publish the trained adapter (then keep its new examples in the replay reservoir) or record the
    rejection; finish the job row. Returns the job's result. A published version also gets its GGUF for the
    llama.cpp engine when llama.cpp's converter is installed (assistant.engines.llamacpp.gguf_lora). A disk that
    fills up while publishing fails the job with a ``StorageError`` that says so;
    nothing half-written stays (:func:`_publish`)."""
    base_id, parent = metrics["base_model"], metrics["continued_from"]
    with phases("publishing" if verdict.passed else "recording the rejection"):
        if verdict.passed:
            version = _publish(store, job_id, user_id, model, verdict, metrics, phases, cfg, base_dir)
            try:
                replay.remember(store, user_id, new, cfg)
            except Exception as e:  # the version is published; the reservoir only misses this run's examples
                if not _disk_full(e):
                    raise
                log.warning("v%s is published, but its examples were not kept for replay: %s", version, e)
        else:
            metrics["timings"] = phases.total()
            version = store.adapters.reject(user_id, base_model=base_id, metrics=metrics,
                                            gate_reason=verdict.reason, parent_version=parent, job_id=job_id)
    result = {"published": verdict.passed, "version": version if verdict.passed else None,
              "candidate_version": version, "code": verdict.code, "reason": verdict.reason, "metrics": metrics,
              "job_id": job_id}
    store.jobs.finish(job_id, "published" if verdict.passed else "rejected", result)
    return result


def _publish(store: Store, job_id: int, user_id: int, model, verdict: gate.GateResult, metrics: dict,
             phases: _Phases, cfg: TrainConfig, base_dir: Path) -> int:
    """Save the adapter into the job's staging folder and publish it as the user's next version; returns it.
    Nothing half-written outlives a failure: staging is removed, a folder renamed to ``v<N>`` whose row never
    committed is removed by ``Adapters.publish``, and the active version stays. A full disk (or one refusing the
    write) is a ``StorageError`` that says so and what to do."""
    staging = staging_dir(store, user_id, job_id)
    remove_tree(staging)
    try:
        model.save_pretrained(str(staging))
        _to_gguf(staging, base_dir, phases)
        metrics["timings"] = phases.total()
        return store.adapters.publish(user_id, staging, base_model=metrics["base_model"], metrics=metrics,
                                      gate_reason=verdict.reason, parent_version=metrics["continued_from"],
                                      job_id=job_id, keep=cfg.keep_versions)
    except Exception as e:
        if not _disk_full(e):
            raise
        mine = [v["version"] for v in store.adapters.list(user_id)
                if v["job_id"] == job_id and v["status"] == "published"]
        if mine:  # committed: only pruning older versions failed after it (the next publish prunes them)
            log.warning("v%s is published, but older versions were not pruned: %s", mine[0], e)
            return mine[0]
        active = store.adapters.active_version(user_id)
        raise StorageError(
            f"The disk is full (or refused the write: {_first_line(e)}), so the new version could not be saved. "
            f"Nothing was published and the half-written files were removed; "
            f"{f'version {active}' if active else 'the base model'} still answers. Free space under "
            f"{store.data_dir.root} and train again.") from e
    finally:
        remove_tree(staging)


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_WORDS = ("no space left", "disk is full", "quota exceeded", "file too large", "os error 28",
                    "os error 27", "os error 122")


def _disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or what caused it is the disk refusing a write (full, over quota, over a file size limit).
    safetensors and SQLite raise their own exception types for it, with the OS's words in the message."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(w in str(e).lower() for w in _DISK_FULL_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _to_gguf(staging: Path, base_dir: Path, phases: _Phases) -> None:
    """The version's llama.cpp GGUF next to its peft files; without it the engine converts on first use."""
    if gguf_lora.converter_dir() is None:
        return
    started = time.perf_counter()
    try:
        gguf_lora.convert(staging, base_dir)
    except (ModelError, OSError, subprocess.SubprocessError) as e:
        log.warning("no GGUF for the llama.cpp engine (it converts on first use instead): %s", e)
    phases.timings["gguf_s"] = time.perf_counter() - started


def execute(store: Store, job_id: int, model_cfg: ModelConfig, cfg: TrainConfig,
            on_progress: Callable[[int, int, float], None] | None = None, worker_id: str | None = None) -> dict:
    """Claim the job for this process (take it over from ``worker_id``, the worker that claimed it), run it, and
    mark it failed (then re-raise) on any error."""
    job = store.jobs.hand_over(job_id, worker_id, os.getpid()) if worker_id else store.jobs.claim(job_id, os.getpid())
    try:
        return run_job(store, job_id, model_cfg, cfg, on_progress)
    except BaseException as e:
        message = str(e) if isinstance(e, AttuneError) else _describe(e)
        store.jobs.finish(job_id, "failed", {"published": False, "version": None, "code": "failed",
                                             "reason": message, "job_id": job_id}, error=message)
        remove_tree(staging_dir(store, job["user_id"], job_id))
        if isinstance(e, AttuneError):
            raise
        if isinstance(e, Exception):
            raise TrainingError(message) from e
        raise


def _describe(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt | SystemExit):
        return "The training job was stopped (interrupted or terminated); no version was published."
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return (f"Training ran out of memory ({type(e).__name__}). Lower batch_size or max_seq_len, or train on "
                "another device.")
    return f"Training failed: {type(e).__name__}: {e}. The active version is unchanged; see the server log."


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m personalize.job", description="Run one Attune training job.")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--db", default=StoreConfig.db, metavar="URL", help="the server's --db (default: attune.db in the "
                   "data dir)")
    p.add_argument("--adapter-store", default=AdapterStoreConfig.adapter_store, metavar="URL",
                   help="the server's --adapter-store (default: the data dir only)")
    p.add_argument("--s3-endpoint", default=AdapterStoreConfig.s3_endpoint, metavar="URL",
                   help="the server's --s3-endpoint")
    p.add_argument("--job-id", required=True, type=int)
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--quant", default="auto", help="the serving --quant ('none' keeps training off 4-bit)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (TrainConfig.device wins if set)")
    p.add_argument("--dtype", default="auto", help="the serving --dtype (training on CPU always keeps float32)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--config", default="{}", help="TrainConfig fields as a JSON object")
    p.add_argument("--worker-id", default=None, help="the worker that claimed the job and holds its lease")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="attune job: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SystemExit: marked failed, then exit
    try:
        cfg = TrainConfig.from_dict(json.loads(args.config))
        model_cfg = ModelConfig(model=args.model, quant=args.quant, device=args.device, threads=args.threads,
                                dtype=args.dtype)
        objects = AdapterStoreConfig(args.adapter_store, args.s3_endpoint)
    except (ValueError, TypeError) as e:
        Store(args.data_dir, args.db).jobs.finish(args.job_id, "failed", error=f"Bad training configuration: {e}.")
        print(f"attune job {args.job_id}: bad configuration: {e}", file=sys.stderr)
        return 2
    store = Store(args.data_dir, args.db, objects)
    try:
        result = execute(store, args.job_id, model_cfg, cfg, worker_id=args.worker_id)
    except AttuneError as e:
        print(f"attune job {args.job_id}: {e}", file=sys.stderr)
        if e.__cause__ is not None:  # an unexpected error: its traceback is for the server log
            traceback.print_exception(e.__cause__, file=sys.stderr)
        return 1
    print(json.dumps({k: result[k] for k in ("job_id", "published", "version", "reason")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
