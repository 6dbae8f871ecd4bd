"""Attune's benchmarks: each module measures one thing and renders its BENCHMARKS.md section.

``python -m bench [--quick] [--only NAME ...]`` runs them, merges into bench/results.json and
rewrites BENCHMARKS.md. Numbers are never typed in by hand. The list of sections and the page are in
``bench.sections``, results.json and the table helper in ``bench.report``; this package imports nothing.
"""
