"""What a memory says: statements picked out of a user's message, their second-person form, and the
block of facts put into the prompt. Pure text functions (no model, no storage), shared by serving
(``assistant.memory``) and training (``personalize``, which renders examples as serving would).

Measured on the embedded SmolLM2-135M (BENCHMARKS.md, memory section): a fact shown as a short
clean statement is used far more often than a ``User: … Assistant: …`` dump of the turn it came
from, and unrelated facts beside it hurt; so memory keeps short statements and retrieval is strict.
"""

from __future__ import annotations

import re

STATEMENT_MAX_CHARS = 300
"""A statement longer than this is cut into chunks at word boundaries."""
STATEMENT_MIN_WORDS = 3
LIKED_MIN_WORDS = 4
"""A liked answer shorter than this (an acknowledgment) is not remembered."""

BLOCK_HEADER = "Facts the user told you earlier (use them only when they answer the question):"
"""The first line of the memory block in the system prompt (chosen by measurement, BENCHMARKS.md)."""

_SENTENCE = re.compile(r"[^.!?。！？\n]+[.!?。！？]*", re.UNICODE)
_LEAD = re.compile(
    r"^(?:(?:and|also|oh|well|so|ok(?:ay)?|btw|by the way|fyi|for the record|just so you know|"
    r"(?:please )?(?:remember|note|keep in mind)(?: that)?|don't forget(?: that)?)[,:;]?\s+)+",
    re.IGNORECASE,
)
_QUESTION_START = re.compile(
    r"^(?:what|who|whom|whose|where|when|why|how|which|do|does|did|can|could|would|will|should|shall|may|"
    r"might|is|are|am|was|were|have|has|had|isn't|aren't|don't|doesn't|didn't|won't|wouldn't|can't|couldn't)\b",
    re.IGNORECASE,
)
_IMPERATIVE_START = re.compile(
    r"^(?:please\s+)?(?:tell|give|write|explain|show|help|list|translate|summari[sz]e|make|create|generate|"
    r"describe|find|suggest|recommend|compare|answer|say|draft|plan|calculate|compute|fix|check|rewrite|"
    r"remind|teach|send|book|add|set|buy|read|guess|imagine|convert|define|name|try|look|search|sort|edit|"
    r"correct|continue|repeat|recap|summarize|let's|let us)\b",
    re.IGNORECASE,
)
_REQUEST = re.compile(
    r"\b(?:i (?:want|need|would like|'d like|wish) (?:you|to know|to learn about|a |an |some )|"
    r"i(?:'m| am) (?:looking for|wondering|curious)|can you|could you|would you|please)\b",
    re.IGNORECASE,
)
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|i've|i'd|i'll|me|my|mine|myself|we|we're|our|ours|us)\b", re.IGNORECASE)
_ZH_QUESTION = re.compile(r"(?:吗|呢|什么|哪|谁|几|多少|怎么|为什么)[。.!！]*$|^(?:请|帮我|给我|告诉我)")

# First person -> second person, for the prompt block and for training answers.
_SWAPS = {
    "i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself",
    "i'm": "you're", "i've": "you've", "i'd": "you'd", "i'll": "you'll",
    "we": "you", "us": "you", "our": "your", "ours": "yours", "ourselves": "yourselves",
    "we're": "you're", "we've": "you've", "we'd": "you'd", "we'll": "you'll",
}
_AFTER_I = {"am": "are", "was": "were", "'m": "'re"}
_WORD = re.compile(r"[A-Za-z']+|[^A-Za-z']+")


def _chunks(text: str, limit: int = STATEMENT_MAX_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ``limit`` characters at word boundaries."""
    out, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > limit:
            out.append(current)
            current = ""
        current = f"{current} {word}".strip()[:limit]
    if current:
        out.append(current)
    return out


def _is_zh(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def is_statement(sentence: str) -> bool:
    """A declarative sentence about the user (first person), not a question, a request or an order."""
    s = sentence.strip()
    if not s or s.endswith(("?", "？")):
        return False
    if _is_zh(s):
        return "我" in s and not _ZH_QUESTION.search(s) and len(s) >= 4
    if len(s.split()) < STATEMENT_MIN_WORDS or _QUESTION_START.match(s) or _IMPERATIVE_START.match(s):
        return False
    if re.match(r"^call me\b", s, re.IGNORECASE):
        return True
    return bool(_FIRST_PERSON.search(s)) and not _REQUEST.search(s)


def informative(answer: str) -> bool:
    """An answer worth remembering as a fact: more than a short acknowledgment ("Nice name!", "Noted.")."""
    return len(answer.split()) >= LIKED_MIN_WORDS or (_is_zh(answer) and len(answer.strip()) >= 8)


def statements(text: str) -> list[str]:
    """The short, self-contained statements about the user in one of their messages, in order.

    "Hi! My dog is called Biscuit. What breed suits flats?" -> ["My dog is called Biscuit."]
    """
    out: list[str] = []
    for match in _SENTENCE.finditer(text or ""):
        sentence = _LEAD.sub("", " ".join(match.group(0).split())).strip(" ,;:-")
        head, colon, tail = sentence.partition(": ")
        if colon and is_statement(tail):  # "Quick one before I forget: my dog is Rex." -> the part after
            sentence = tail
        if not is_statement(sentence):
            continue
        sentence = sentence[0].upper() + sentence[1:]
        if not sentence.endswith((".", "!", "。", "！")):
            sentence += "。" if _is_zh(sentence) else "."
        for piece in _chunks(sentence) if len(sentence) > STATEMENT_MAX_CHARS else [sentence]:
            if piece not in out:
                out.append(piece)
    return out


def second_person(text: str) -> str:
    """The user's statement as said to them: "I live in Lyon, my dog..." -> "You live in Lyon, your dog..."."""
    if _is_zh(text):
        return text.replace("我们", "你们").replace("我", "你")
    named = re.match(r"^call me (.+?)([.!]*)$", text.strip(), re.IGNORECASE)
    if named:
        return f"You want to be called {named.group(1)}{named.group(2) or '.'}"
    parts = _WORD.findall(text)
    out: list[str] = []
    prev = ""
    for part in parts:
        low = part.lower()
        if low in _SWAPS and (low != "us" or part == "us"):  # "the US" stays
            new = _SWAPS[low]
        elif prev in ("i", "we") and low in _AFTER_I:
            new = _AFTER_I[low]
        else:
            new = part
        if new is not part and part[:1].isupper() and (not out or out[-1].rstrip().endswith((".", "!", "?")) or
                                                       not "".join(out).strip()):
            new = new[:1].upper() + new[1:]
        out.append(new)
        if part.strip():
            prev = low
    result = "".join(out)
    return result[:1].upper() + result[1:] if result else result


def facts_block(lines: list[str]) -> str:
    """The memory block for the system prompt: a header and one fact per line; "" for none."""
    if not lines:
        return ""
    return "\n".join([BLOCK_HEADER, *(f"- {line}" for line in lines)])


def with_facts(messages: list[dict], block: str) -> list[dict]:
    """The conversation with the memory block put before the text of its last user message (where the small
    model uses it best: BENCHMARKS.md, memory quality); unchanged when ``block`` is empty."""
    if not block or not messages or messages[-1].get("role") != "user":
        return messages
    last = messages[-1]
    return [*messages[:-1], {**last, "content": f"{block}\n\n{last['content']}"}]
