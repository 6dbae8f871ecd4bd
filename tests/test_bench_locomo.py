"""The LoCoMo bench's pure helpers (no model, no data file): the first-person rewrite of a question, the
answer F1, and how a speaker's sessions become an importable history."""

from __future__ import annotations

import pytest

from bench.memory_locomo import answer_f1, first_person, speaker_history


def test_first_person_rewrites_the_speaker_only():
    assert first_person("What are Caroline's plans for the summer?", "Caroline") == "What are my plans for the summer?"
    assert first_person("How does Melanie relax?", "Melanie") == "How do I relax?"
    assert first_person("What is Jon excited about?", "Jon") == "What am I excited about?"
    assert first_person("How long has Tim been surfing?", "Tim") == "How long have I been surfing?"
    assert first_person("Did Nate adopt a turtle?", "Nate") == "Did I adopt a turtle?"
    assert first_person("What agency is the one Caroline is considering?", "Caroline") == \
        "What agency is the one I am considering?"
    assert first_person("Which song motivates Caroline to sing?", "Caroline") == "Which song motivates me to sing?"
    assert first_person("What book did Tim give to John?", "Tim") == "What book did I give to John?"
    assert first_person("What book did Tim give to John?", "John") == "What book did Tim give to me?"
    assert first_person("Which team John supports?", "John") == "Which team I support?"
    assert first_person("Maria's dog is called what?", "Maria") == "My dog is called what?"
    assert first_person("What did Marian say?", "Maria") == "What did Marian say?"  # whole names only


def test_answer_f1_normalizes_like_locomo():
    assert answer_f1("The mental health.", "mental health") == 1.0
    assert answer_f1("", "mental health") == 0.0
    assert answer_f1("something else", "mental health") == 0.0
    assert answer_f1("It raised awareness for mental health", "mental health") == pytest.approx(0.5)  # P 2/6, R 1
    assert answer_f1("2022", 2022) == 1.0  # some gold answers are numbers


def test_speaker_history_alternates_roles_and_keeps_dia_ids():
    session = [{"speaker": "B", "dia_id": "D1:1", "text": "Hi A"},
               {"speaker": "A", "dia_id": "D1:2", "text": "Hi B"},
               {"speaker": "A", "dia_id": "D1:3", "text": "I got a dog."},
               {"speaker": "B", "dia_id": "D1:4", "text": "Nice!"}]
    convs, ids = speaker_history([session], "A")
    assert [m["role"] for m in convs[0]["messages"]] == ["assistant", "user", "assistant"]
    assert convs[0]["messages"][1]["content"] == "Hi B\nI got a dog."
    assert ids == [[["D1:1"], ["D1:2", "D1:3"], ["D1:4"]]]
