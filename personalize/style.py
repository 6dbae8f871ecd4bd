"""A style the user taught through corrections, carried over to the examples that cannot show it.

When most of a user's corrections add the same opening or closing words that the answers they corrected did
not have (a greeting "Ahoy!", a nickname "Hey Captain,", a sign-off "Cheers, Sam"), that text is the user's
style. Left alone, it is learned only for the prompts the user corrected: the general anchors (the base
model's own answers, with a KL term to its distributions) and the fact question/answer examples all say
"answer without it", and they outnumber the corrections. :func:`detect` finds such an opening (``head``) or
closing (``tail``); :meth:`Style.dress` puts it on a training example's target and marks it, so that

- the style words are trained (SFT) on every dressed example;
- the KL term to the base model and every evaluation loss (in-training checks, the gate's anchor slice) cover
  only the content between them: the gate still measures whether general answers got worse, not whether
  they now open with the user's greeting.

A head must end at a punctuation mark and a tail must start after the end of a sentence, so the common start
of corrections that merely answer alike ("Your dog is ...", "You live in ...") is never taken for a style.
Pure text: no model, no storage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from personalize.dataset import Example

MIN_CORRECTIONS = 3
"""Fewest corrections sharing the opening/closing before it counts as a style."""
MIN_SHARE = 0.6
"""Share of the user's corrections that must carry it."""
MAX_WORDS = 8
"""Longest opening or closing taken as a style, in words."""
_HEAD_END = re.compile(r"[!,.:;?—–-]$|[！，。：；？]$")
_SENTENCE_END = re.compile(r"[.!?…。！？]$")


@dataclass(frozen=True)
class Style:
    """The user's opening and closing text (either may be empty)."""

    head: str = ""
    tail: str = ""

    def __bool__(self) -> bool:
        return bool(self.head or self.tail)

    def to_dict(self) -> dict:
        return {"head": self.head, "tail": self.tail}

    def dress(self, example: Example) -> Example:
        """A copy of the example whose target carries the style (what it already has is not doubled; an answer
        cut at a length limit gets no closing, which would teach signing off mid-sentence)."""
        target = example.target.strip()
        head = self.head if self.head and not target.startswith(self.head) else ""
        tail = self.tail if self.tail and example.complete and not target.endswith(self.tail) else ""
        if not head and not tail:
            return example
        sep = "" if _cjk(self.head + self.tail + target[:1]) else " "
        text = (head + sep if head else "") + target + (sep + tail if tail else "")
        return replace(example, target=text, style_head=head + sep if head else "",
                       style_tail=sep + tail if tail else "")


def _cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _words(text: str) -> list[str]:
    return text.split()


def _heads(text: str) -> set[str]:
    words = _words(text)
    return {" ".join(words[:n]) for n in range(1, min(MAX_WORDS, len(words) - 1) + 1)
            if _HEAD_END.search(words[n - 1])}


def _tails(text: str) -> set[str]:
    words = _words(text)
    return {" ".join(words[-n:]) for n in range(1, min(MAX_WORDS, len(words) - 1) + 1)
            if _SENTENCE_END.search(words[-n - 1])}


def _common(corrections: list[str], originals: list[str], parts) -> str:
    """The longest candidate carried by enough corrections and by none of the originals they replaced."""
    counts: dict[str, int] = {}
    for text in corrections:
        for cand in parts(text):
            counts[cand] = counts.get(cand, 0) + 1
    banned = set().union(*(parts(o) for o in originals)) if originals else set()
    need = max(MIN_CORRECTIONS, MIN_SHARE * len(corrections))
    found = [c for c, n in counts.items() if n >= need and c not in banned]
    return max(found, key=lambda c: (len(c.split()), len(c)), default="")


def detect(pairs: list[tuple[str, str]]) -> Style:
    """The style shared by the corrections of (original answer, correction) pairs; empty when there is none."""
    corrections = [c.strip() for _, c in pairs if c and c.strip()]
    originals = [o.strip() for o, _ in pairs if o and o.strip()]
    if len(corrections) < MIN_CORRECTIONS:
        return Style()
    return Style(_common(corrections, originals, _heads), _common(corrections, originals, _tails))


def of_user(examples: list[Example]) -> Style:
    """The style of a user's corrections (their preference pairs, training and held-out)."""
    return detect([(e.rejected or "", e.target) for e in examples if e.kind == "pair"])


def carry(style: Style, examples: list[Example]) -> list[Example]:
    """The examples with answers to learn (SFT targets and anchors) dressed in the style; others as they are."""
    return [style.dress(e) if style and e.kind in ("sft", "anchor") else e for e in examples]
