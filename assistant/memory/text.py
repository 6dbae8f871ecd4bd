"""What a memory says: statements picked out of a user's message, their second-person form, and the
block of facts put into the prompt. Pure text functions (no model, no storage), shared by serving
(``assistant.memory.service``) and training (``personalize``, which renders examples as serving would).

Measured on the embedded SmolLM2-135M (BENCHMARKS.md, memory section): a fact shown as a short
clean statement is used far more often than a ``User: … Assistant: …`` dump of the turn it came
from, and unrelated facts beside it hurt; so memory keeps short statements and retrieval is strict.
"""

from __future__ import annotations

import re

STATEMENT_MAX_CHARS = 300
"""A statement longer than this is cut into chunks at word boundaries."""
STATEMENT_MIN_WORDS = 2
"""Words a statement needs at least ("I'm vegan."); Chinese counts characters (``ZH_MIN_CHARS``)."""
ZH_MIN_CHARS = 4
ZH_CONTEXT_MIN_CHARS = 6
"""Characters a Chinese clause without 我 needs (people drop the subject: 明天要去北京出差)."""
CONTEXT_MIN_WORDS = 7
"""Words an English clause without "I" and without a name or a number needs to count as about the user."""
LIKED_MIN_WORDS = 4
"""A liked answer shorter than this (an acknowledgment) is not remembered."""

BLOCK_HEADER = "Facts the user told you earlier (use them only when they answer the question):"
"""The first line of the memory block in the system prompt (chosen by measurement, BENCHMARKS.md)."""

_SENTENCE = re.compile(r"[^.!?。！？\n]+(?:[.!?。！？]+|(?=\n)|$)", re.UNICODE)
_LEAD = re.compile(
    r"^(?:(?:and|also|oh|well|so|ok(?:ay)?|btw|by the way|fyi|for the record|just so you know|anyway|plus|"
    r"but|because|'?cause|since|though|although|as|actually|honestly|yeah|yes|no|hey|hi|hello|sorry|"
    r"one more thing|"
    r"(?:please )?(?:remember|note|keep in mind)(?: that)?|don't forget(?: that)?)[,:;]?\s+)+",
    re.IGNORECASE,
)
_QUESTION_START = re.compile(
    r"^(?:what|who|whom|whose|where|when|why|how|which|do|does|did|can|could|would|will|should|shall|may|"
    r"might|is|are|am|was|were|have|has|had|isn't|aren't|don't|doesn't|didn't|won't|wouldn't|can't|couldn't|"
    r"any|anything|ideas?|thoughts?|tips?|suggestions?)\b",
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
_SECOND_PERSON = re.compile(r"\b(?:you|your|you're|yours|yourself|u)\b", re.IGNORECASE)
_EXCLAIM = re.compile(r"^(?:that|what|how|so|such|wow|oh|aw+|congrat\w*|good|great|nice|cool|awesome|"
                      r"amazing|sounds?|looks?|glad|hope|happy|thanks?|bye|see)(?:'s)?\b", re.IGNORECASE)
_HYPOTHETICAL = re.compile(r"^(?:if|unless|whether|suppose|imagine|in case)\b", re.IGNORECASE)
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|i've|i'd|i'll|me|my|mine|myself|we|we're|our|ours|us)\b", re.IGNORECASE)
_SUBJECT = re.compile(
    r"^(?:(?:when|while|after|before|once|since|because|as|now that|ever since)\s+)?"
    r"(?:i|i'm|i've|i'd|i'll|im|ive|my|we|we're|we've|we'll|our|me and)\b", re.IGNORECASE)
"""A clause that opens with the user as its subject ("I'm a welder there", "my son is Elio")."""
_SUBJECT_SOON = re.compile(r"^(?:[\w'-]+,?\s+){1,2}(?:i|i'm|i've|i'd|i'll|my|we|we're|we've|our)\b(?!\s*\?)",
                           re.IGNORECASE)
"""... or after a word or two ("last year we moved to Bern", "yesterday my dog ate a sock")."""
_SUBJECT_AFTER = re.compile(r"\b(?:that|because|so|said|says|thinks|told me) (?:i|i'm|i've|my|we|we're|our)\b",
                            re.IGNORECASE)
_FILLER = re.compile(
    r"^(?:i (?:think|guess|mean|know|see|agree|hope|bet|suppose|understand|believe)(?: so| that| it)?|"
    r"i(?:'m| am) (?:fine|good|ok(?:ay)?|great|sorry|glad|happy for you|so happy for you|not sure)|"
    r"i'?d love (?:that|to)|i can imagine|me too|my pleasure|i appreciate (?:it|that|you)|thank you|"
    r"(?:quick (?:one|question|thing) )?before i forget)[.!]*$",
    re.IGNORECASE)
"""Clauses of talk, not facts ("I think so", "I'm fine")."""
_CLAUSE_BREAK = re.compile(
    r"\s*[,;:]\s+|\s+[-–—]+\s+|\s+\((?=[^)]*\))|\)\s*"
    r"|\s+(?=(?:and|but|so|plus|because|'cause|cause|though|although|as|since|while|whereas)\s+"
    r"(?:i|i'm|i've|i'd|i'll|my|we|we're|we've|our|what|how|where|which|who|why|when|any|do|does|can|could|"
    r"should|would|is|are)\b)(?!and\s+i\s+(?:are|were|both)\b)",  # "my partner and I are ...": one subject
    re.IGNORECASE)
_ZH_CLAUSE_BREAK = re.compile(r"[，,；;：:]")
_ZH_QUESTION = re.compile(r"(?:吗|呢|什么|哪|谁|几|多少|怎么|为什么)[。.!！]*$|^(?:请|帮我|给我|告诉我)")
_ZH_ASKS = re.compile(r"吗|呢|什么|哪|谁|多少|怎么|为什么|如何|是否|能不能|可不可以|要不要|有没有|是不是|好不好|"
                      r"推荐|建议")
_ZH_REQUEST = re.compile(r"^(?:请|帮我|给我|告诉我|你能|你可以|你会|你觉得|你知道|麻烦)")

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


def _subject_first(clause: str) -> bool:
    """The user is the clause's subject within its first words ("I'm a welder", "last year we moved ...")."""
    return bool(_SUBJECT.match(clause) or _SUBJECT_SOON.match(clause) or _SUBJECT_AFTER.search(clause))


def is_statement(sentence: str) -> bool:
    """A declarative clause about the user, not a question, a request, an order, a hypothesis or a bit of
    talk ("I think so"): in the first person, or a clause of the user's own circumstances that people say
    without one ("Off to Lisbon on Friday.", "Vegetarian here.", "明天要去北京出差")."""
    s = sentence.strip()
    if not s or s.endswith(("?", "？")):
        return False
    if _is_zh(s):
        body = s.rstrip("。！.!")
        if _ZH_ASKS.search(s) or _ZH_REQUEST.match(s) or s.startswith("你"):
            return False
        return len(body) >= (ZH_MIN_CHARS if "我" in s else ZH_CONTEXT_MIN_CHARS)
    s = s.rstrip(".!")
    if len(s.split()) < STATEMENT_MIN_WORDS or _FILLER.match(s) or _HYPOTHETICAL.match(s) or _REQUEST.search(s):
        return False
    if re.match(r"^call me\b", s, re.IGNORECASE):
        return True
    if _SUBJECT.match(s) is None and (_QUESTION_START.match(s) or _IMPERATIVE_START.match(s)):
        return False
    return bool(_FIRST_PERSON.search(s)) or _circumstance(s)


def _circumstance(s: str) -> bool:
    """A clause without "I" that still says something of the user's life: no "you" in it, not an exclamation
    about something ("That's amazing"), and with substance: a name, a number, "here", or many words."""
    if _SECOND_PERSON.search(s) or _EXCLAIM.match(s):
        return False
    words = s.split()
    named = any(w[:1].isupper() for w in words[1:]) or any(ch.isdigit() for ch in s)
    return bool(re.search(r"\bhere\b", s, re.IGNORECASE)) or (len(words) >= 4 and named) or \
        len(words) >= CONTEXT_MIN_WORDS


def informative(answer: str) -> bool:
    """An answer worth remembering as a fact: more than a short acknowledgment ("Nice name!", "Noted.")."""
    return len(answer.split()) >= LIKED_MIN_WORDS or (_is_zh(answer) and len(answer.strip()) >= 8)


def _opens_clause(part: str, asks: bool) -> bool:
    """A piece of a sentence that starts a clause of its own (rather than continuing the one before it)."""
    if asks and _QUESTION_START.match(part):  # "my sister, who lives in Rome, is a chef": no new clause
        return True
    return bool(_subject_first(part) or _IMPERATIVE_START.match(part)
                or _HYPOTHETICAL.match(part) or _REQUEST.match(part)
                or re.match(r"^(?:you|call me|thanks|thank you)\b", part, re.I))


_RELATION_VERBS = frozenset(
    "is are was were am be been has have had do does did will would can could should may might must loves love likes "
    "like hates hate wants want needs need got gets get goes go went says say said thinks think lives live works "
    "work".split())
_NOT_NAMES = frozenset(
    "can could would should will is are do does did hi hey hello thanks so and but also ok okay well yes no please "
    "btw oh the what where when why how which who any since because if i my our".split())
"""Capitalized words that are no name ("So, my sister, ..." names nobody)."""


def _relation(piece: str) -> bool:
    """The piece only says whom someone is to the user: "my beagle", "our eldest daughter" (no verb, no name)."""
    words = piece.split()
    return (2 <= len(words) <= 5 and words[0].lower() in ("my", "our")
            and all(re.fullmatch(r"[a-z][a-z'-]*", w) and w not in _RELATION_VERBS for w in words[1:]))


def _leading_name(words: list[str]) -> list[str]:
    """The capitalized words ``words`` start with (not a question word or a greeting), at most two."""
    name: list[str] = []
    for word in words[:2]:
        if not re.fullmatch(r"[A-Z][\w'-]+", word) or word.lower() in _NOT_NAMES:
            break
        name.append(word)
    return name


def _name_at_end(text: str) -> str | None:
    """The name (one or two capitalized words) that ``text`` ends with."""
    return " ".join(reversed(_leading_name(text.split()[::-1]))) or None


def _name_at_start(text: str) -> str | None:
    return " ".join(_leading_name(text.split())) or None


def _appositive(part: str, before: str) -> bool:
    """``part`` names whom the name that ends ``before`` is to the user ("Max, **my beagle**, hates baths")."""
    return _relation(part) and _name_at_end(before) is not None


def named(sentence: str) -> list[str]:
    """Statements of whom a name is to the user, said as an aside inside any sentence, a question included:
    "Can Biscotti, our rabbit, join in?" -> ["Biscotti is our rabbit."]; "Our rabbit, Biscotti, hates it." ->
    ["Our rabbit is Biscotti."]. English only (Chinese says it with 叫, which a statement keeps)."""
    pieces = [p.strip() for p in re.split(r",\s+", sentence.strip().rstrip(" .!?"))]
    out = []
    for i, piece in enumerate(pieces):
        if not _relation(piece):
            continue
        relation = piece[0].lower() + piece[1:]
        name = _name_at_end(pieces[i - 1]) if i > 0 else None
        after = pieces[i + 1] if i + 1 < len(pieces) else ""
        if name:
            out.append(f"{name} is {relation}.")
        elif _name_at_start(after) and (i + 2 == len(pieces) or len(after.split()) <= 2):
            out.append(f"{relation[0].upper()}{relation[1:]} is {_name_at_start(after)}.")
    return out


def _zh_opens_clause(part: str, asks: bool) -> bool:
    return "我" in part or bool(_ZH_ASKS.search(part) or _ZH_REQUEST.match(part) or part.startswith("你"))


def clauses(sentence: str) -> list[str]:
    """One sentence cut into clauses: a new clause starts where the user, a question, an order or a request
    does; other pieces stay with the clause before them ("my sister, who lives in Rome, is a chef"). In a
    sentence ending in a question mark, its question clause is dropped (the last one when none looks like
    a question): "We're off to Crete in July, what should I pack?" -> ["We're off to Crete in July"]."""
    zh = _is_zh(sentence)
    body = sentence.strip().rstrip(" .!?。！？")
    asks = sentence.strip().endswith(("?", "？"))
    breaker, opens = (_ZH_CLAUSE_BREAK, _zh_opens_clause) if zh else (_CLAUSE_BREAK, _opens_clause)
    out: list[list[str]] = []  # [clause text, separator before the next piece]
    last = 0
    pieces = []
    for m in breaker.finditer(body):
        pieces.append((body[last:m.start()], m.group(0)))
        last = m.end()
    pieces.append((body[last:], ""))
    for text, sep in pieces:
        lead = text.strip() if zh else _LEAD.sub("", text.strip()).strip()
        if not lead:
            continue
        if not out or (opens(lead, asks) and (zh or not _appositive(lead, out[-1][0]))):
            out.append([lead, sep])
        else:
            out[-1][0] += out[-1][1] + text.strip()
            out[-1][1] = sep
    found: list[str] = []
    for i, (clause, sep) in enumerate(out):  # "Pilot, our greyhound, shivers" -> one clause, not "Pilot"
        if found and not zh and len(found[-1].split()) == 1 and not _LEAD.match(found[-1] + " "):
            found[-1] = found[-1] + out[i - 1][1] + clause
        else:
            found.append(clause)
    if asks and found:
        questions = [c for c in found if _ZH_ASKS.search(c) or _ZH_REQUEST.match(c)] if zh else \
            [c for c in found if not _SUBJECT.match(c) and (_QUESTION_START.match(c) or _IMPERATIVE_START.match(c))]
        if not questions:
            found = found[:-1]
    return found


def sentences(text: str) -> list[str]:
    """The sentences of a message, each with its end mark (a line break ends one too)."""
    return [m.group(0) for m in _SENTENCE.finditer(text or "")]


ASKED_SENTENCES = 3
"""Sentences at the end of a message searched for the questions it asks (a reply to it answers those)."""


def asked(text: str | None) -> str | None:
    """The questions a message ends by asking ("Nice! Where are you based these days?" -> "Where are you based
    these days?"), on one line; None if it asks none. A reply to the message is found by them too."""
    tail = [" ".join(s.split()) for s in sentences(text or "")[-ASKED_SENTENCES:]]
    found = [s for s in tail if s.endswith(("?", "？"))]
    return " ".join(found) or None


def statements(text: str) -> list[str]:
    """The short, self-contained statements about the user in one of their messages, in order: every
    first-person clause that says something about them, wherever it sits (also inside a question or a
    request), one per statement.

    "Hi! I'm Nina, I live in Porto and I work as a nurse." -> ["I'm Nina.", "I live in Porto.",
    "I work as a nurse."]; "I'm a welder, any tips for neck pain?" -> ["I'm a welder."]
    """
    out: list[str] = []
    for sentence in sentences(text):
        sentence = " ".join(sentence.split())
        for clause in [*clauses(sentence), *([] if _is_zh(sentence) else named(sentence))]:
            clause = clause.strip(" ,;:-–—")
            if not is_statement(clause):
                continue
            clause = clause[0].upper() + clause[1:]
            if not clause.endswith((".", "!", "。", "！")):
                clause += "。" if _is_zh(clause) else "."
            for piece in _chunks(clause) if len(clause) > STATEMENT_MAX_CHARS else [clause]:
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


def _units(text: str) -> set[str]:
    """Lower-cased words, and each Chinese character as a word of its own."""
    return {w for w in re.findall(r"[\u4e00-\u9fff]|[^\W_]+", text.lower()) if w}


def overlap(a: str, b: str) -> float:
    """Share of words two texts have in common (Jaccard; a Chinese character counts as a word)."""
    x, y = _units(a), _units(b)
    return len(x & y) / len(x | y) if x and y else float(a.strip() == b.strip())


# Which questions are about the user, and statements about nothing in particular ------------------------------
_ABOUT_USER = re.compile(r"\b(?:i|i'm|i've|i'd|my|me|mine|myself|we|our|us)\b|我", re.IGNORECASE)
_HOW_TO = re.compile(
    r"^(?:how (?:do|can|should|would|could|might) (?:i|we)|how to|what(?:'s| is) (?:the )?(?:best|easiest|right|"
    r"quickest|simplest) way|(?:can|could|would) you|any (?:tips|ideas|advice|suggestions)|tips? (?:for|on)|"
    r"should i)\b|怎么|如何|怎样", re.IGNORECASE)


def personal(question: str) -> bool:
    """A question about the user ("what's my line of work?"), not a how-to that happens to say "I" or "my"
    ("how do I reset my router?"): such questions may get a memory on a smaller margin."""
    q = " ".join((question or "").split())
    return bool(_ABOUT_USER.search(q)) and not _HOW_TO.search(q)


NEUTRAL_STATEMENTS = (
    "I went to the shop this morning and it was busy.", "My day was long but fine.", "I watched a film last night.",
    "We had dinner with friends at the weekend.", "I have been pretty tired lately.",
    "My phone battery died again.", "I cleaned the house on Sunday.", "I am reading a book at the moment.",
    "My neighbour was playing music loudly.", "I took the bus to town.", "We went for a walk in the park.",
    "I had a coffee with a colleague.", "I forgot my umbrella and got wet.", "My inbox is full of emails.",
    "I cooked pasta for dinner.", "I stayed up too late yesterday.", "We talked about the holidays.",
    "I need to buy groceries this week.", "My friend called me in the evening.",
    "I finished a big task at work today.", "The weather has been grey all week.",
    "I listened to a podcast on the way home.", "I have a meeting tomorrow morning.",
    "We are thinking about the weekend.", "I spent the afternoon sorting old papers.",
    "My back hurts a little after gardening.", "I tried a new recipe.", "I went to bed early.",
    "I am trying to drink more water.", "We visited family over the holiday.", "我今天去超市买了点东西。",
    "我昨天晚上看了一部电影。", "我们周末和朋友一起吃饭。", "我最近有点累。", "我早上坐公交车去上班。",
    "我下午整理了一下房间。", "我给朋友打了个电话。", "我这周要开好几个会。", "我们打算出去走走。",
    "我最近在看一本书。",
)
"""Everyday statements about nothing a question could be after: a question's best scores against them are its
baseline (``assistant.memory.service``); a memory must beat that baseline, not just a fixed cosine."""


# Facts with one current value: a newer statement of the same topic supersedes the older one ---------------
_ATTRIBUTES = ("birthday", "phone", "phone number", "email", "address", "car", "blood type", "shoe size", "height",
               "weight", "team", "religion", "nationality", "hometown")
_TOPICS_EN: list[tuple[str, re.Pattern]] = [(name, re.compile(p, re.IGNORECASE)) for name, p in [
    ("name", r"\bmy name is\b|\bi(?:'m| am) called\b|^call me\b"),
    ("home", r"\b(?:i|we) (?:now |currently |still |also )?(?:live|am living|'m living|are living|'re living|reside)"
             r" (?:in|at|near)\b|\b(?:i|we) (?:just |recently |finally |have |'ve |had )*(?:moved|relocated|am moving"
             r"|'m moving|are moving|'re moving) (?:to|into)\b|\bmy (?:home|address) is\b|\bi(?:'m| am) based in\b"),
    ("job", r"\b(?:i|we) (?:now |currently |still )?(?:work|am working|'m working|am employed|'m employed) as\b|"
            r"\bmy (?:new |current )?(?:job|profession|occupation|role) is\b|\bi(?:'m| am) an? [\w -]+ by "
            r"(?:trade|profession)\b|\bi (?:just )?(?:got|started|have|took|landed) (?:a |my |the )?(?:new )?"
            r"(?:job|position|role) as\b"),
    ("employer", r"\bi (?:now |currently |still )?(?:work|am working|'m working) (?:at|for)\b|"
                 r"\bi (?:just )?(?:joined|started at)\b"),
    ("age", r"\bi(?:'m| am) (?:now )?\d{1,3}(?: years old| years of age|(?=[.!,;]|$))|\bi (?:just )?turned \d{1,3}\b"),
]]
_INTRODUCTION = re.compile(r"^(?:I'm|I am|Im) [A-Z][\w'-]+(?: [A-Z][\w'-]+)?[.!]?$")
"""Introducing oneself by name ("I'm Nina."): case-sensitive, so "I'm tired." is no name."""
_PAST = re.compile(r"\b(?:used to|previously|formerly|back then|as a kid|as a child|when i was|years ago)\b", re.I)
_NAME_OF = re.compile(r"\bmy ((?:[a-z-]+ ){0,2}[a-z-]+?)(?:'s name is| is (?:called|named)| goes by)\b", re.I)
_FAVOURITE = re.compile(r"\bmy (?:all-time |absolute )?favou?rite ((?:[a-z-]+ ){0,2}[a-z-]+?) (?:is|are)\b", re.I)
_ATTRIBUTE = re.compile(r"\bmy (" + "|".join(_ATTRIBUTES) + r") (?:is|are)\b", re.I)
_TOPICS_ZH: list[tuple[str, re.Pattern]] = [(name, re.compile(p)) for name, p in [
    ("name", r"我叫|我的名字(?:是|叫)"),
    ("home", r"我(?:们)?(?:现在|目前|已经)?(?:住在|住|搬到|搬去|搬家到|定居在?)"),
    ("job", r"我(?:现在|目前)?(?:是|当)(?:一名|一位|一个|个|名)|我的(?:工作|职业)是|我(?:现在|目前)?做"),
    ("employer", r"我(?:现在|目前)?在.{1,12}(?:工作|上班)"),
    ("age", r"我(?:今年|现在)?\d{1,3}岁"),
]]
_ZH_NAME_OF = re.compile(r"我的(.{1,6}?)(?:叫|的名字是)")
_ZH_FAVOURITE = re.compile(r"我最喜欢的(.{1,6}?)是")


_CHANGE = re.compile(
    r"\b(?:traded|trade(?:d)? in|switched|swapped|moved|the move|sold|given up|gave up|quit|no longer|not any ?more|"
    r"instead of|replaced|changed (?:to|jobs?)|left my)\b|改|换成|换了|搬到|搬去|搬家|不再|不干了|辞职", re.IGNORECASE)


def says_change(statement: str) -> bool:
    """A statement that says something of the user changed ("I sold the truck", "we moved to Lyon")."""
    return bool(_CHANGE.search(statement or ""))


def topic(statement: str) -> str | None:
    """The one-valued thing a statement says about the user ("home", "job", "name of dog", "favorite
    colour"), or None. Of two statements on the same topic, the newer is current: "I moved to Lyon"
    supersedes "I live in Porto". Past tense ("I used to live in Porto") has no topic: it replaces nothing."""
    s = " ".join((statement or "").split())
    if not s:
        return None
    if _is_zh(s):
        if "以前" in s or "曾经" in s or "小时候" in s:
            return None
        for pattern, prefix in ((_ZH_FAVOURITE, "favorite "), (_ZH_NAME_OF, "name of ")):
            m = pattern.search(s)
            if m:
                return prefix + m.group(1)
        return next((name for name, p in _TOPICS_ZH if p.search(s)), None)
    if _PAST.search(s):
        return None
    if _INTRODUCTION.match(s):
        return "name"
    for pattern, prefix in ((_FAVOURITE, "favorite "), (_NAME_OF, "name of "), (_ATTRIBUTE, "")):
        m = pattern.search(s)
        if m:
            return prefix + m.group(1).lower().replace("favourite", "favorite")
    return next((name for name, p in _TOPICS_EN if p.search(s)), None)
