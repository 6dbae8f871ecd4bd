"""A style the user taught through corrections, carried over to the examples that cannot show it.

What most of a user's corrections do to the answers they replace is the user's style:

- the same opening or closing words the answers did not have (a greeting "Ahoy!", a nickname "Hey Captain,",
  a sign-off "Cheers, Sam"): ``head`` / ``tail``;
- much shorter answers (at most half as long): ``max_words``, the longest of those corrections;
- bullet lists where the answers were prose: ``bullets``;
- Chinese answers where the answers were not (the small base model often answers a Chinese question in
  English): ``language``. Nothing is re-targeted for it (an English answer cannot be dressed in Chinese): the
  user's Chinese corrections and their Chinese questions' answers teach it; it is found so that it is said
  (My assistant) and so that a Chinese correction of a long English answer is not taken for "short answers".

Left alone, a style is learned only for the prompts the user corrected: the general anchors (the base model's
own answers, with a KL term to its distributions), the user's other answers and the fact question/answer
examples all say "answer as before", and they outnumber the corrections. :func:`detect` finds the style;
:meth:`Style.dress` re-targets a training example in it (the opening/closing put on, the answer cut after the
sentences that fit ``max_words``, its sentences made list items) and marks what the style added, so that

- the style is trained (SFT) on every dressed example, the end of a shortened answer included;
- the KL term to the base model and every evaluation loss (in-training checks, the gate's held-out and anchor
  slices) cover only the content the base model would also say: the gate still measures whether answers got
  worse, not whether they now open with the user's greeting, stop after two sentences or come as a list.

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
SHORTER = 0.5
"""A correction at most this share of the answer's length (in words) shortens it."""
MIN_SHORTENED_WORDS = 12
"""An answer shorter than this many words is not taken as shortened by its correction."""
_BULLET = re.compile(r"^\s*(?:[-*•·]|\d{1,2}[.)、])\s+", re.MULTILINE)
_BOUNDARY = re.compile(r"(?<=[.!?…])\s+|(?<=[。！？])\s*|\s*\n\s*")
_HEAD_END = re.compile(r"[!,.:;?—–-]$|[！，。：；？]$")
_SENTENCE_END = re.compile(r"[.!?…。！？]$")


@dataclass(frozen=True)
class Style:
    """The user's opening and closing text (either may be empty)."""

    head: str = ""
    tail: str = ""
    max_words: int = 0
    """Answers the user wants at most about this long (words; a CJK character counts 0.4); 0 = any length."""
    bullets: bool = False
    """The user wants answers of several sentences as a bullet list."""
    language: str = ""
    """``zh``: the user wants answers in Chinese where the base model answered in another language; "" = as is."""

    def __bool__(self) -> bool:
        return bool(self.head or self.tail or self.max_words or self.bullets or self.language)

    @property
    def reshapes(self) -> bool:
        """The style changes an answer's length or form, so the base model's own answers (the anchors) are not
        how this user's answers should read: only what they say can be compared (personalize.ability)."""
        return bool(self.max_words or self.bullets)

    def to_dict(self) -> dict:
        return {"head": self.head, "tail": self.tail, "max_words": self.max_words, "bullets": self.bullets,
                "language": self.language}

    def dress(self, example: Example) -> Example:
        """A copy of the example whose target carries the style (what it already has is not doubled; an answer
        cut at a length limit gets no closing, which would teach signing off mid-sentence)."""
        example = self._shape(example)
        target = example.target.strip()
        head = self.head if self.head and not target.startswith(self.head) else ""
        tail = self.tail if self.tail and example.complete and not target.endswith(self.tail) else ""
        if not head and not tail:
            return example
        sep = "" if _cjk(self.head + self.tail + target[:1]) else " "
        lead = head + sep if head else ""
        text = lead + target + (sep + tail if tail else "")
        spans = [[a + len(lead), b + len(lead)] for a, b in example.style_spans]
        return replace(example, target=text, style_head=lead, style_tail=sep + tail if tail else "",
                       style_spans=spans)

    def _shape(self, example: Example) -> Example:
        """Length and form: the first sentences that fit ``max_words``, at least half of it (the end of the
        shortened answer is then the style's: trained, not evaluated), as list items when ``bullets``."""
        target = example.target.strip()
        parts = split_sentences(target)
        if self.max_words and len(parts) > 1:
            n = 1
            # an opening too short to say anything ("Sure!") does not count as the answer
            while n < len(parts) and (word_count(target[: parts[n][1]]) <= self.max_words or
                                      word_count(target[: parts[n - 1][1]]) < self.max_words / 2):
                n += 1
            if n < len(parts) and _SENTENCE_END.search(target[: parts[n - 1][1]]):
                target, parts = target[: parts[n - 1][1]], parts[:n]
                example = replace(example, target=target, complete=True, style_stop=True)
        if self.bullets and len(parts) > 1 and "\n" not in target and not is_list(target):
            text, spans = "", []
            for i, (a, b) in enumerate(parts):
                mark = ("\n" if i else "") + "- "
                spans.append([len(text), len(text) + len(mark)])
                text += mark + target[a:b]
            example = replace(example, target=text, style_spans=spans)
        return example


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of ``text``: a sentence ends at . ! ? … followed by a space or the end (so
    "1.5 litres" and "e.g." inside a sentence stay whole), at 。！？, or at a line break."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if text[start: m.start()].strip():
            out.append((start, m.start()))
        start = m.end()
    if text[start:].strip():
        out.append((start, len(text.rstrip())))
    return out


def _cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _join(parts: list[str]) -> str:
    return "".join(parts) if _cjk("".join(parts)) else " ".join(parts)


def is_chinese(text: str) -> bool:
    """Mostly Chinese: at least as many CJK characters as Latin letters (and some)."""
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    return cjk > 0 and cjk >= sum(ch.isascii() and ch.isalpha() for ch in text)


def word_count(text: str) -> float:
    """Words, a CJK character counting as 0.4 of one (about 2.5 characters per word)."""
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    return len(re.sub(r"[\u4e00-\u9fff]", " ", text).split()) + cjk / 2.5


def is_list(text: str) -> bool:
    """At least two lines that are list items ("- ...", "* ...", "1. ...")."""
    return len(_BULLET.findall(text or "")) >= 2


def _words(text: str) -> list[str]:
    return text.split()


def _heads(text: str) -> set[str]:
    words = _words(text)
    return {" ".join(words[:n]) for n in range(1, min(MAX_WORDS, len(words) - 1) + 1)
            if _HEAD_END.search(words[n - 1]) and not _BULLET.match(" ".join(words[:n]) + " ")}


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


def _max_words(pairs: list[tuple[str, str]], need: float) -> int:
    """The longest correction (words, rounded up) when enough corrections shortened long answers, else 0."""
    short = [word_count(c) for o, c in pairs if word_count(o) >= MIN_SHORTENED_WORDS
             and word_count(c) <= SHORTER * word_count(o)]
    return int(max(short) + 0.999) if len(short) >= need else 0


def _bullets(pairs: list[tuple[str, str]], need: float) -> bool:
    """Enough corrections are bullet lists, and clearly more of them than of the answers they replaced (the
    base model writes numbered lists of its own; a user who wants lists asks for them everywhere)."""
    lists = sum(is_list(c) for _, c in pairs)
    return lists >= need and lists - sum(is_list(o) for o, _ in pairs) >= MIN_SHARE * len(pairs) / 2


def _to_chinese(pairs: list[tuple[str, str]]) -> list[bool]:
    """Per pair: the correction is Chinese and the answer it replaced was not."""
    return [bool(o) and is_chinese(c) and not is_chinese(o) for o, c in pairs]


def detect(pairs: list[tuple[str, str]]) -> Style:
    """The style shared by the corrections of (original answer, correction) pairs; empty when there is none."""
    pairs = [((o or "").strip(), c.strip()) for o, c in pairs if c and c.strip()]
    corrections = [c for _, c in pairs]
    originals = [o for o, _ in pairs if o]
    if len(corrections) < MIN_CORRECTIONS:
        return Style()
    need = max(MIN_CORRECTIONS, MIN_SHARE * len(corrections))
    bullets = _bullets(pairs, need)
    switched = _to_chinese(pairs)
    # list items are terse by nature: a user who wants lists did not ask for short answers; and an answer put
    # into another language says nothing about its length (English words against Chinese characters)
    prose = [(o, c) for (o, c), sw in zip(pairs, switched, strict=True) if not sw and not (bullets and is_list(c))]
    return Style(_common(corrections, originals, _heads), _common(corrections, originals, _tails),
                 _max_words(prose, need), bullets, "zh" if sum(switched) >= need else "")


def of_user(examples: list[Example]) -> Style:
    """The style of a user's corrections (their preference pairs, training and held-out)."""
    return detect([(e.rejected or "", e.target) for e in examples if e.kind == "pair"])


def carry(style: Style, examples: list[Example]) -> list[Example]:
    """The examples with answers to learn or score (SFT targets, held-out answers, anchors) dressed in the
    style; others (preference pairs, undesirable answers) as they are."""
    return [style.dress(e) if style and e.kind in ("sft", "anchor") else e for e in examples]
