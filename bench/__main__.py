"""``python -m bench [--quick] [--only NAME ...]``: run benchmarks, update results.json and BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

from bench import SECTIONS
from bench.common import run_section
from bench.report import save, write


def _isolated(name: str, quick: bool) -> dict:
    """One section in a fresh process: what one section loads, compiles or sets (torch threads, oneDNN
    kernel caches, models) must not change what the next one measures."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_section, name, quick).result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="small sizes, for a CI smoke run")
    p.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    args = p.parse_args(argv)
    results = {}
    for name in args.only or list(SECTIONS):
        print(f"bench: {name}...", file=sys.stderr, flush=True)
        data = _isolated(name, args.quick)
        results = save(name, {"quick": args.quick, **data})
        print(json.dumps({name: data}, default=str)[:2000], flush=True)
    write(results)
    print("bench: wrote BENCHMARKS.md and bench/results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
