"""General ability judged by what the answers say, not by their wording: the gate's check that a candidate
adapter still answers everyday questions right.

``general_checks.txt`` (shipped; never trained on, sharing nothing with the anchor prompts or the benchmarks'
questions) holds questions with the keywords a right answer contains. The base model answers them once per
base model (greedy, at the repetition penalty serving uses: answers decoded otherwise are not the answers users
get; cached beside the anchor set); a candidate answers them after training. An answer is right
when it contains one of its keywords (a whole word in any case; Chinese anywhere), so an answer that is
shorter, a list, or opens with the user's greeting counts as right as long as it says the right thing: a
style the user taught does not look like forgetting, and forgetting shows as answers that stop being right.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from personalize.config import TrainConfig
from storage.paths import atomic_write_bytes

CHECKS_FILE = Path(__file__).with_name("general_checks.txt")


@dataclass
class Ability:
    """How many general checks the base model and the candidate got right, of ``total``; ``lost``: right for the
    base model and wrong for the candidate, ``gained``: the other way round."""

    base: int
    candidate: int
    total: int
    lost: int = 0
    gained: int = 0

    def kept(self, margin: int, z: float) -> bool:
        """Not worse than the base model beyond chance: at most ``margin`` more checks lost than gained, or a
        difference McNemar's test does not tell from noise (one-sided, ``lost - gained <= z * sqrt(lost +
        gained)``; a 135M model flips many greedy answers either way after any training)."""
        diff = self.lost - self.gained
        return diff <= margin or diff <= z * math.sqrt(self.lost + self.gained)

    def to_dict(self) -> dict:
        return {"base": self.base, "candidate": self.candidate, "total": self.total, "lost": self.lost,
                "gained": self.gained}


def load_checks(path: Path = CHECKS_FILE, limit: int | None = None) -> list[tuple[str, list[str]]]:
    """(question, keywords) per line ``question<TAB>kw1|kw2``; ``#`` lines are comments."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#") or "\t" not in line:
            continue
        question, keywords = line.split("\t", 1)
        out.append((question.strip(), [k.strip() for k in keywords.split("|") if k.strip()]))
    return out[:limit] if limit is not None else out


def right(answer: str, keywords: list[str]) -> bool:
    """Whether the answer contains a keyword: a whole word in any case ("365天" holds 365), a Chinese keyword
    anywhere."""
    for k in keywords:
        if any("\u4e00" <= ch <= "\u9fff" for ch in k):
            if k in answer:
                return True
        elif re.search(rf"(?<![A-Za-z0-9]){re.escape(k)}(?![A-Za-z0-9])", answer, re.IGNORECASE):
            return True
    return False


def answers(model, tokenizer, checks: list[tuple[str, list[str]]], cfg: TrainConfig) -> list[str]:
    """Greedy answers of ``model`` as it is (adapter on or off) to the checks' questions."""
    from personalize.replay import generate_answers

    return [a for a, _ in generate_answers(model, tokenizer, [q for q, _ in checks], cfg.system_prompt,
                                           cfg.ability_max_new_tokens, cfg.ability_repetition_penalty)]


def base_answers(model, tokenizer, checks: list[tuple[str, list[str]]], cfg: TrainConfig,
                 cache: Path | None) -> list[str]:
    """The base model's answers (``model`` with its adapter disabled), read from / added to ``cache``: the same
    for every user and job of one base model."""
    stored = json.loads(cache.read_text(encoding="utf-8")) if cache is not None and cache.is_file() else {}
    key = f"{cfg.ability_max_new_tokens}|{cfg.ability_repetition_penalty}|{cfg.system_prompt}|"
    todo = [c for c in checks if key + c[0] not in stored]
    if todo:
        with model.disable_adapter():
            for (q, _), a in zip(todo, answers(model, tokenizer, todo, cfg), strict=True):
                stored[key + q] = a
        if cache is not None:
            atomic_write_bytes(cache, json.dumps(stored, ensure_ascii=False).encode("utf-8"))
    return [stored[key + q] for q, _ in checks]


def measure(model, tokenizer, checks: list[tuple[str, list[str]]], cfg: TrainConfig, base: list[str]) -> Ability:
    """The candidate (``model`` with its adapter on) against the base model's ``base`` answers."""
    mine = answers(model, tokenizer, checks, cfg)
    was = [right(a, k) for a, (_, k) in zip(base, checks, strict=True)]
    now = [right(a, k) for a, (_, k) in zip(mine, checks, strict=True)]
    return Ability(sum(was), sum(now), len(checks), sum(w and not n for w, n in zip(was, now, strict=True)),
                   sum(n and not w for w, n in zip(was, now, strict=True)))
