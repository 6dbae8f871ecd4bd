"""Shared bench helpers: a persistent data dir for converted models so benches do not reconvert."""

from __future__ import annotations

import importlib
import os
from pathlib import Path


def models_dir() -> Path:
    """``$ATTUNE_BENCH_DIR`` or ``.bench-data/`` in the repo: holds the converted embedded model."""
    path = Path(os.environ.get("ATTUNE_BENCH_DIR") or Path(__file__).resolve().parent.parent / ".bench-data")
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh_data_dir(prefix: str):
    """A new data dir under the system temp folder whose converted models and anchor-set caches are the bench's
    persistent ones (linked), so a run neither reconverts the model nor answers the anchor prompts again."""
    import tempfile

    from storage import DataDir

    data = DataDir(Path(tempfile.mkdtemp(prefix=prefix))).ensure()
    for name in ("models", "replay"):
        (data.root / name).rmdir()
        (models_dir() / name).mkdir(parents=True, exist_ok=True)
        (data.root / name).symlink_to(models_dir() / name)
    return data


def run_section(name: str, quick: bool) -> dict:
    """``bench.<name>.run(quick)`` (a module-level function so a spawned process can call it)."""
    return importlib.import_module(f"bench.{name}").run(quick=quick)


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new (spawned) Python process. Measurements need it: what one run loads, compiles
    or sets (torch threads, oneDNN kernel caches built for a thread count, models) slows the next one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
