"""What the user said about themselves, made learnable: question/answer examples from their statements,
and which of their answers are filler that must not become targets.

- :func:`fact_questions` turns one first-person statement ("My dog is called Biscuit.") into several
  questions the user might ask later ("What is my dog's name?", "What did I name my dog?", ...) from
  the statement's structure (English and Chinese rules, plus generic fallbacks). The answer is the
  statement in second person (:func:`assistant.memory.text.second_person`): "Your dog is called Biscuit."
- :func:`untold_questions` asks about things the user never mentioned (a sister, a car, a birthday), answered
  "You haven't told me about your sister.": trained beside the facts, they teach the adapter to say so rather
  than make an answer up.
- :func:`is_filler` says whether an assistant answer is an acknowledgment of a statement ("Noted!",
  "Got it, you live in Lyon.") rather than an answer to a question: short, and replying to a message
  that asks nothing, or starting like an acknowledgment. Trained on, such answers teach the adapter to
  acknowledge instead of answering (issue 11).
- :func:`target_key` normalizes a target so near-identical answers (case, punctuation, digits,
  spacing) count as one when repeats are capped.

Pure text functions: no model, no storage.
"""

from __future__ import annotations

import hashlib
import random
import re

from assistant.memory.text import _QUESTION_START, _ZH_QUESTION, is_statement, second_person, statements

__all__ = ["fact_questions", "is_filler", "is_question", "statements", "target_key", "fact_key", "untold_questions"]

ACK_START = re.compile(
    r"^(?:noted|got it|gotcha|ok(?:ay)?|sure|thanks?(?: you)?|understood|i see|i will remember|i'll remember|"
    r"i've noted|i have noted|nice|great|cool|lovely|good to know|good luck|sounds (?:good|great|lovely)|"
    r"wonderful|awesome|perfect|alright|all right|will do|cute|how (?:nice|lovely|cool)|what a)\b",
    re.IGNORECASE)
ZH_ACK_START = re.compile(r"^(?:好的|好|明白|知道了|收到|记住了|了解|谢谢|太好了|不错)")
_IMPERATIVE = re.compile(
    r"^(?:please\s+)?(?:tell|give|write|explain|show|help|list|translate|summari[sz]e|make|create|generate|"
    r"describe|find|suggest|recommend|compare|answer|say|draft|plan|calculate|compute|fix|check|rewrite|remind|"
    r"name|let's|let us)\b", re.IGNORECASE)
PEOPLE = {"friend", "best friend", "sister", "brother", "partner", "wife", "husband", "son", "daughter", "mother",
          "mum", "mom", "father", "dad", "boss", "manager", "colleague", "neighbour", "neighbor", "girlfriend",
          "boyfriend", "grandmother", "grandfather", "grandma", "grandpa", "aunt", "uncle", "cousin", "doctor",
          "teacher", "roommate", "flatmate", "fiancé", "fiancee", "fiance", "spouse", "child", "kid", "baby"}
_BASE_VERBS = {"plays": "play", "drives": "drive", "speaks": "speak", "has": "have"}
_STOP = {"a", "an", "the", "my", "of", "to", "in", "on", "at", "and", "or", "is", "are", "am", "very", "really",
         "always", "usually", "also", "too", "so", "just", "i", "it", "for", "with", "from", "here", "there", "lot"}


def is_question(text: str) -> bool:
    """Whether a user message asks or requests something (a question mark, a question word, an order)."""
    t = " ".join((text or "").split())
    if not t:
        return False
    if "?" in t or "？" in t:
        return True
    parts = [p.strip() for p in re.split(r"[.!。！\n]+", t) if p.strip()]
    return any(_QUESTION_START.match(p) or _IMPERATIVE.match(p) or _ZH_QUESTION.search(p) for p in parts)


def is_filler(answer: str, user_message: str, max_words: int) -> bool:
    """An acknowledgment, not an answer: at most ``max_words`` words (about 2.5 CJK characters per word),
    replying to a message that asks nothing, or opening like an acknowledgment ("Noted", "Got it", "好的")."""
    a = " ".join((answer or "").split())
    if not a:
        return False
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in a)
    words = len(a.split()) + cjk / 2.5
    if words > max_words:
        return False
    if not is_question(user_message):
        return True
    return bool(ACK_START.match(a) or ZH_ACK_START.match(a))


def target_key(text: str) -> str:
    """Case, punctuation, digits and spacing folded away: near-identical targets share a key."""
    t = re.sub(r"\d+", "0", (text or "").lower())
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(t.split())


def fact_key(statement: str) -> str:
    return hashlib.sha256(target_key(statement).encode()).hexdigest()[:16]


# English ---------------------------------------------------------------------------------------
def _clause(statement: str) -> str:
    """The main clause: up to the first comma, semicolon or dash, without the final punctuation."""
    s = re.split(r"\s*(?:[,;:]|\s[-–—]\s)\s*", statement.strip(), maxsplit=1)[0]
    return s.rstrip(" .!。！")


def _np_questions(np: str) -> list[str]:
    """Questions about "my <np>" whose answer is the value the statement gives it."""
    np = np.strip()
    head = np.split()[-1]
    out = []
    if np in PEOPLE or head in PEOPLE:
        out += [f"Who is my {np}?", f"What is my {np}'s name?", f"Remind me, who is my {np}?"]
    else:
        out += [f"What is my {np}?", f"What's my {np}?", f"Remind me: what is my {np}?", f"Do you remember my {np}?"]
    fav = re.match(r"^(?:favou?rite|preferred) (.+)$", np)
    if fav:
        thing = fav.group(1)
        out += [f"Which {thing} do I like best?", f"What {thing} do I love the most?",
                f"What kind of {thing} do I prefer?"]
    return out + [f"What do you know about my {np}?", f"What did I tell you about my {np}?"]


def _named_questions(np: str) -> list[str]:
    return [f"What is my {np}'s name?", f"What is my {np} called?", f"What did I name my {np}?",
            f"Remind me, what is my {np} called?", f"What do you know about my {np}?"]


_VERB_QUESTIONS = {
    "play": ["What do I play?", "Which instrument do I play?", "What do I play in my free time?"],
    "drive": ["What car do I drive?", "Which car do I have?", "What do I drive?"],
    "speak": ["Which languages do I speak?", "What language do I speak?"],
    "have": ["What do I have?", "Tell me what I have."],
    "own": ["What do I own?"],
    "like": ["What do I like?", "What am I fond of?"],
    "love": ["What do I love?", "What do I like the most?"],
    "enjoy": ["What do I enjoy?", "What do I like doing?"],
    "prefer": ["What do I prefer?"],
    "hate": ["What do I hate?", "What do I dislike the most?", "What can't I stand?"],
    "dislike": ["What do I dislike?", "What don't I like?"],
    "can't stand": ["What can't I stand?", "What do I hate?", "What do I dislike the most?"],
    "study": ["What do I study?", "What am I studying?"],
    "eat": ["What do I eat?"],
    "drink": ["What do I drink?"],
    "collect": ["What do I collect?"],
    "support": ["Which team do I support?"],
}


def _english(clause: str) -> list[str]:
    c = clause.strip()
    low = c.lower()
    m = re.match(r"^my (.+?) (?:is|are|was) (?:called|named) .+$", low) or re.match(r"^my (.+?)'s name is .+$", low)
    if m:
        return _named_questions(m.group(1))
    m = re.match(r"^my name is .+$", low) or re.match(r"^call me .+$", low)
    if m:
        return ["What is my name?", "What should you call me?", "How should you address me?", "Who am I?"]
    m = re.match(r"^my (.+?) (is|are) .+$", low)
    if m:
        return _np_questions(m.group(1))
    m = re.match(r"^i (?:live|stay) (in|on|at|near) (.+)$", low)
    if m:
        qs = ["Where do I live?", "Where is my home?", "Where am I based?", "Which place do I call home?"]
        if re.search(r"\b(?:lane|street|road|avenue|st|rd|ave|way|drive|close|court)\b", m.group(2)):
            qs += ["What street do I live on?", "What is my address?"]
        elif m.group(1) == "in":
            qs += ["Which city do I live in?", "In which city is my home?"]
        return qs + ["What did I tell you about where I live?"]
    m = re.match(r"^i (?:work|am working) (as|at|for|in) (.+)$", low)
    if m:
        if m.group(1) == "as":
            return ["What do I do for a living?", "What is my job?", "What do I work as?", "What is my profession?",
                    "What did I tell you about my work?"]
        return ["Where do I work?", "Which company do I work for?", "Who is my employer?",
                "What did I tell you about my work?"]
    m = re.match(r"^i(?:'m| am) allergic to .+$", low)
    if m:
        return ["What am I allergic to?", "What are my allergies?", "Which food must I avoid?",
                "Do I have any allergies?", "What did I tell you about my allergies?"]
    m = re.match(r"^i was born (in|on) (.+)$", low)
    if m:
        when = m.group(1) == "on" or re.search(r"\d", m.group(2))
        return ["When was I born?", "What is my date of birth?"] if when else \
            ["Where was I born?", "Where am I from?", "Which place was I born in?"]
    m = re.match(r"^i(?:'m| am) (\w+ing) .+$", low)
    if m:
        verb = m.group(1)
        return [f"What am I {verb}?", f"What am I {verb} at the moment?", f"What did I say I am {verb}?"]
    m = re.match(r"^i(?:'m| am) (?:a|an) .+$", low) or re.match(r"^i(?:'m| am) .+$", low)
    if m:
        return ["What do you know about me?", "What did I tell you about myself?", "Tell me something about me."]
    m = re.match(r"^i (can't stand|cannot stand|don't like|(?:\w+)) .+$", low)
    if m:
        verb = {"cannot stand": "can't stand", "don't like": "dislike"}.get(m.group(1), m.group(1))
        verb = _BASE_VERBS.get(verb, verb)
        qs = list(_VERB_QUESTIONS.get(verb, []))
        if not qs and re.fullmatch(r"[a-z]+", verb) and not verb.endswith(("ed", "ing")):
            qs = [f"What do I {verb}?"]
        key = _key_noun(c)
        return qs + ([f"What did I tell you about {key}?"] if key else [])
    return []


def _key_noun(clause: str) -> str:
    """The last content word of a clause (the likeliest topic), '' if none."""
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z'-]*", clause) if w.lower() not in _STOP]
    return words[-1] if len(words) > 1 else ""


# Chinese ---------------------------------------------------------------------------------------
def _chinese(statement: str) -> list[str]:
    s = re.split(r"[，,；;]", statement.strip(), maxsplit=1)[0].rstrip("。！!. ")
    m = re.match(r"^我的(.+?)(?:叫做|叫|名叫)(.+)$", s)
    if m:
        np = m.group(1)
        return [f"我的{np}叫什么？", f"我的{np}叫什么名字？", f"你还记得我的{np}叫什么吗？"]
    m = re.match(r"^我(?:叫|的名字是)(.+)$", s)
    if m:
        return ["我叫什么名字？", "你应该怎么称呼我？"]
    m = re.match(r"^我的(.+?)是(.+)$", s)
    if m:
        np = m.group(1)
        return [f"我的{np}是什么？", f"你还记得我的{np}吗？", f"关于我的{np}，我跟你说过什么？"]
    m = re.match(r"^我(?:住在|住|家在)(.+)$", s)
    if m:
        return ["我住在哪里？", "我住在哪个城市？", "我家在哪儿？"]
    m = re.match(r"^我在(.+?)(?:工作|上班)$", s)
    if m:
        return ["我在哪里工作？", "我在哪家公司上班？"]
    m = re.match(r"^我(?:是|当)(?:一名|一个|一位)?(.+)$", s)
    if m:
        return ["我是做什么的？", "我的职业是什么？", "关于我，你知道什么？"]
    m = re.match(r"^我对(.+?)过敏$", s)
    if m:
        return ["我对什么过敏？", "我不能吃什么？"]
    m = re.match(r"^我(?:最)?(喜欢|爱|讨厌|不喜欢|会|学|在学|养了?|有)(.+)$", s)
    if m:
        verb = m.group(1)
        return [f"我{verb}什么？", f"你还记得我{verb}什么吗？"]
    return ["关于我，你知道什么？"] if "我" in s else []


def fact_questions(statement: str) -> list[tuple[str, str]]:
    """(question, answer) pairs for one statement about the user: specific questions first, then fallbacks.

    "My dog is called Biscuit." -> [("What is my dog's name?", "Your dog is called Biscuit."), ...];
    "我住在上海。" -> [("我住在哪里？", "你住在上海。"), ...]. A statement no rule knows gets the generic
    fallbacks only ("What did I tell you about <key noun>?"), or nothing when it has no key noun.
    """
    statement = " ".join((statement or "").split())
    if not statement or not is_statement(statement):
        return []
    answer = second_person(statement)
    if not answer.endswith((".", "!", "。", "！")):
        answer += "。" if any("\u4e00" <= ch <= "\u9fff" for ch in answer) else "."
    if any("\u4e00" <= ch <= "\u9fff" for ch in statement):
        questions = _chinese(statement)
    else:
        clause = _clause(statement)
        questions = _english(clause)
        if not questions:
            np = re.search(r"\bmy ((?:[a-z'-]+ ){0,2}[a-z'-]+)\b", clause.lower())
            key = _key_noun(clause)
            if np:
                questions.append(f"What do you know about my {np.group(1)}?")
            if key:
                questions.append(f"What did I tell you about {key}?")
    seen: list[str] = []
    for q in questions:
        if q not in seen:
            seen.append(q)
    return [(q, answer) for q in seen]


# Never told ------------------------------------------------------------------------------------
UNTOLD = ["wife", "husband", "partner", "girlfriend", "boyfriend", "sister", "brother", "son", "daughter", "mother",
          "father", "grandmother", "best friend", "boss", "neighbour", "dog", "cat", "car", "birthday", "hometown",
          "school", "university", "employer", "favourite colour", "favourite food", "favourite band", "favourite book",
          "favourite film", "hobby", "job", "street", "phone number", "middle name", "blood type", "shoe size"]
"""Common things about a person that have one answer (English)."""
UNTOLD_ZH = ["妻子", "丈夫", "姐姐", "哥哥", "妹妹", "弟弟", "儿子", "女儿", "妈妈", "爸爸", "老板", "狗", "猫", "车",
             "生日", "老家", "大学", "工作", "最好的朋友", "爱好"]
"""The same, in Chinese."""
_NAMED = PEOPLE | {"dog", "cat", "neighbour"}


def untold_questions(messages: list[str], n: int, seed: str) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs about things none of the user's ``messages`` mentions, nor any question their
    statements answer ("I drive a Volvo" answers "What car do I drive?": the car was told), in the language most
    of them are written in: ("What is my sister's name?", "You haven't told me about your sister.")."""
    asked = [q for m in messages for st in statements(m) for q, _ in fact_questions(st)]
    text = " ".join(messages + asked).lower()
    zh = sum(any("\u4e00" <= ch <= "\u9fff" for ch in m) for m in messages) * 2 > len(messages)
    pool = UNTOLD_ZH if zh else UNTOLD
    fresh = [np for np in pool if (np not in text if zh else
                                   not re.search(rf"\b{re.escape(np.split()[-1])}s?\b", text))]
    rng = random.Random(seed)
    out = []
    for np in rng.sample(fresh, min(n, len(fresh))):
        if zh:
            questions = [f"我的{np}叫什么名字？", f"你还记得我的{np}吗？", f"关于我的{np}，你知道什么？"]
            answer = f"你还没有告诉过我你的{np}。"
        else:
            questions = _named_questions(np) if np in _NAMED else _np_questions(np)
            answer = f"You haven't told me about your {np}."
        out.append((rng.choice(questions), answer))
    return out
