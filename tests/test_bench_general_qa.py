"""bench.general_qa: enough distinct questions per split, usable keywords, and no overlap between DEV and TEST
or with the anchor prompts and the other benches' general questions (no model)."""

from __future__ import annotations

import pytest

from bench import general_qa
from bench.general_qa import DEV, TEST, hits, overlaps, questions


def test_no_overlaps():
    assert overlaps() == []


@pytest.mark.parametrize("split", ["dev", "test"])
def test_split_sizes_and_keywords(split):
    qa = questions(split)
    asked = [q for q, _ in qa]
    assert len(asked) == len(set(asked)), "duplicate question"
    assert len(set(asked)) >= 60
    for q, keywords in qa:
        assert q.strip() and keywords and all(k.strip() for k in keywords), q
    assert 0.05 <= sum(general_qa._chinese(q) for q in asked) / len(asked) <= 0.2


def test_questions_returns_the_splits():
    assert questions("dev") == DEV and questions("TEST") == TEST
    assert len({q for q, _ in questions("all")}) == len(DEV) + len(TEST)
    with pytest.raises(ValueError):
        questions("train")


def test_hits_whole_words_and_chinese_anywhere():
    assert hits("It has SEVEN days.", ["seven", "7"]) == ["seven"]
    assert hits("Women, not men.", ["men"]) == ["men"]
    assert hits("women", ["men"]) == []
    assert hits("答案是北京。", ["北京", "Beijing"]) == ["北京"]


def test_overlaps_catches_a_shared_run(monkeypatch):
    monkeypatch.setattr(general_qa, "TEST", TEST + [("Quick one: name the capital city of Peru.", ["Lima"])])
    monkeypatch.setattr(general_qa, "DEV", DEV + [("北京是哪个国家的首都城市呢？", ["中国"])])
    found = overlaps()
    assert any("'name the capital city'" in line for line in found)
    assert not any("北京是哪个国家的首都城市" in line for line in found)
    monkeypatch.setattr(general_qa, "TEST", TEST + [("我想问：北京是哪个国家的首都城市呀？", ["中国"])])
    assert any("北京是哪个国家的首都" in line for line in overlaps())
    monkeypatch.setattr(general_qa, "TEST", TEST + [("Who painted the Mona Lisa, anyway?", ["Leonardo"])])
    assert any("anchor" in line for line in overlaps())
