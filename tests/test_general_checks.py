"""personalize/general_checks.txt (the gate's general-ability questions): well formed, enough checks, about 10%
Chinese, and independent of what is trained on or benchmarked: no question or 4-word / 8-character Chinese run
shared with the anchor prompts, bench.general_qa or the other benches' general questions, no answer keyword shared
with bench.general_qa or bench.quality_users (so no fact is asked twice), and no question giving away its own
keyword (no model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.general_qa import _chinese, _others, _shared, hits, questions
from bench.quality_users import GENERAL_QA

CHECKS = Path(__file__).resolve().parent.parent / "personalize" / "general_checks.txt"


def _checks() -> list[tuple[str, list[str]]]:
    out = []
    for n, line in enumerate(CHECKS.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#"):
            continue
        assert line.count("\t") == 1, f"line {n}: expected question<TAB>keywords: {line!r}"
        question, keywords = line.split("\t")
        kws = keywords.split("|")
        assert question.strip() == question and question, f"line {n}: empty or padded question {line!r}"
        assert kws and all(k.strip() == k and k for k in kws), f"line {n}: empty or padded keyword {line!r}"
        out.append((question, kws))
    return out


def test_file_has_a_header_and_well_formed_checks():
    assert CHECKS.read_text(encoding="utf-8").startswith("#")
    checks = _checks()
    assert len(checks) >= 64
    asked = [re.sub(r"\s+", " ", q.lower()) for q, _ in checks]
    assert len(asked) == len(set(asked)), "duplicate question"
    assert 0.05 <= sum(_chinese(q) for q, _ in checks) / len(checks) <= 0.2


def test_the_loader_reads_every_check():
    ability = pytest.importorskip("personalize.ability")
    assert ability.load_checks(CHECKS) == _checks()


def test_no_question_contains_its_own_keyword():
    assert [(q, hits(q, kws)) for q, kws in _checks() if hits(q, kws)] == []


def test_no_shared_question_or_run_with_anchors_or_benches():
    others = [("bench.general_qa", q) for q, _ in questions("all")] + _others()
    found = []
    for q, _ in _checks():
        for source, other in others:
            if q.strip().lower() == other.strip().lower():
                found.append(f"{q!r} is in {source}")
            elif run := _shared(q, other):
                found.append(f"{q!r} ~ {source} {other!r}: {run!r}")
    assert found == []


def test_no_keyword_shared_with_the_benches_general_answers():
    theirs = {k.lower(): q for q, kws in questions("all") + list(GENERAL_QA) for k in kws}
    found = [(q, k, theirs[k.lower()]) for q, kws in _checks() for k in kws if k.lower() in theirs]
    assert found == []


def test_the_overlap_check_catches_a_shared_run():
    assert _shared("Quick: what sound does a horse make?", "Bit of a silly one: what sound does a dog make?")
    assert _shared("我想问：北京是哪个国家的首都城市呀？", "北京是哪个国家的首都城市呢？")
    assert not _shared("Which bird goes quack?", "What animal says moo?")
