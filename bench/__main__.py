"""``python -m bench [--quick] [--only NAME ...]``: run benchmarks, update results.json and BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import sys

from bench.common import in_fresh_process, run_section
from bench.report import save
from bench.sections import SECTIONS, write


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="small sizes, for a CI smoke run")
    p.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    args = p.parse_args(argv)
    results = {}
    for name in args.only or list(SECTIONS):
        print(f"bench: {name}...", file=sys.stderr, flush=True)
        data = in_fresh_process(run_section, name, args.quick)  # sections must not slow each other
        results = save(name, {"quick": args.quick, **data})
        print(json.dumps({name: data}, default=str)[:2000], flush=True)
    write(results)
    print("bench: wrote BENCHMARKS.md and bench/results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
