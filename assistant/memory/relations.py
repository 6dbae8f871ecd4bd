"""Family and partner roles a text names ("my wife", "her sons", "我女儿"), and whether a memory names only other
roles than a question asks about.

A question about one relative ("What's my wife's name?") scores high with a memory about another ("My daughter
Wren is seven."): the embedder sees "family member's name" in both. A memory that names relatives, none of them
the one asked about, does not answer the question, so retrieval passes over it (``MemoryService.retrieve``):
the next memory may be the right one, and a question about a relative the user never mentioned gets none.

Roles are a closed class, listed here in English and Chinese by family ("partner": wife, husband, ...). A general
word ("partner", "kids", "parents", "孩子") matches every role of its family. A memory that names no role says
nothing either way (it may well be about the person asked for: "Arjun's birthday is in May."). Pure text.
"""

from __future__ import annotations

import re

_ROLES: dict[str, dict[str | None, tuple[str, ...]]] = {
    "partner": {None: ("partner", "partners", "spouse", "other half", "对象", "爱人", "伴侣"),
                "wife": ("wife", "wives", "wifey", "老婆", "妻子", "太太", "媳妇"),
                "husband": ("husband", "husbands", "hubby", "老公", "丈夫"),
                "boyfriend": ("boyfriend", "bf", "男朋友", "男友"),
                "girlfriend": ("girlfriend", "gf", "女朋友", "女友"),
                "fiance": ("fiance", "fiancé", "fiancee", "fiancée", "未婚夫", "未婚妻")},
    "child": {None: ("kid", "kids", "child", "children", "孩子", "小孩"),
              "son": ("son", "sons", "儿子"),
              "daughter": ("daughter", "daughters", "女儿", "闺女")},
    "parent": {None: ("parent", "parents", "父母", "爸妈"),
               "mother": ("mother", "mom", "mum", "mommy", "mummy", "mama", "mamma", "妈妈", "母亲", "老妈"),
               "father": ("father", "dad", "daddy", "papa", "爸爸", "父亲", "老爸")},
    "sibling": {None: ("sibling", "siblings", "兄弟姐妹"),
                "brother": ("brother", "brothers", "哥哥", "弟弟", "兄弟"),
                "sister": ("sister", "sisters", "姐姐", "妹妹", "姐妹")},
    "grandparent": {None: ("grandparent", "grandparents"),
                    "grandmother": ("grandmother", "grandma", "granny", "gran", "nana", "奶奶", "外婆", "姥姥"),
                    "grandfather": ("grandfather", "grandpa", "granddad", "grandad", "爷爷", "外公", "姥爷")},
    "grandchild": {None: ("grandchild", "grandchildren", "grandkid", "grandkids"),
                   "grandson": ("grandson", "grandsons", "孙子", "外孙"),
                   "granddaughter": ("granddaughter", "granddaughters", "孙女", "外孙女")},
    "aunt_uncle": {"aunt": ("aunt", "auntie", "aunty", "阿姨", "姑姑", "姨妈"),
                   "uncle": ("uncle", "叔叔", "舅舅", "伯伯")},
    "cousin": {None: ("cousin", "cousins", "表哥", "表姐", "表弟", "表妹", "堂哥", "堂姐", "堂弟", "堂妹")},
    "nibling": {"niece": ("niece", "nieces", "侄女", "外甥女"), "nephew": ("nephew", "nephews", "侄子", "外甥")},
}
_LATIN: dict[str, tuple[str, str | None]] = {}
_CJK: list[tuple[str, tuple[str, str | None]]] = []
for _family, _members in _ROLES.items():
    for _role, _words in _members.items():
        for _w in _words:
            if re.search(r"[\u4e00-\u9fff]", _w):
                _CJK.append((_w, (_family, _role)))
            else:
                _LATIN[_w] = (_family, _role)
_CJK.sort(key=lambda p: -len(p[0]))  # longest first: 外孙女 is not also 孙女
_LATIN_WORD = re.compile(r"other half|[a-zà-ÿ]+", re.IGNORECASE)
_OTHERS = frozenset({"his", "her", "their", "your", "its", "whose"})
"""Possessives that make a role someone else's ("their brother", "her husband")."""
_MINE = frozenset({"my", "our"})
_ZH_OTHERS = re.compile(r"(?:他|她|你|它|他们|她们|你们)的?$")


def _someone_elses(before: str) -> bool:
    """Whether the words just before a role (at most three, within the clause) give it to someone else."""
    words = re.findall(r"[\w']+|[,.;:!?]", before.lower())[-3:]
    for word in reversed(words):
        if word in _MINE or not word[0].isalnum():
            return False
        if word in _OTHERS or word.endswith("'s"):
            return True
    return False


def roles(text: str) -> set[tuple[str, str | None]]:
    """The (family, role) pairs of the user's own relatives a text names (role None for a family's general word:
    "kids" is (child, None)); a role given to someone else ("their brother", "Tom's wife", "他哥哥") is not."""
    found = set()
    low = (text or "").lower()
    for m in _LATIN_WORD.finditer(low):
        hit = _LATIN.get(m.group(0))
        if hit and not _someone_elses(low[: m.start()]):
            found.add(hit)
    for word, hit in _CJK:
        start = low.find(word)
        while start >= 0:
            if not _ZH_OTHERS.search(low[:start]):
                found.add(hit)
            low = low[:start] + " " * len(word) + low[start + len(word):]
            start = low.find(word)
    return found


def _compatible(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
    return a[0] == b[0] and (a[1] is None or b[1] is None or a[1] == b[1])


def other_relatives(question: str, memory: str) -> bool:
    """Whether the question asks about relatives and the memory names relatives, none of them those asked about
    ("my wife" asked, "my daughter" told). False when either names none."""
    return names_others(roles(question), memory)


def names_others(asked: set[tuple[str, str | None]], memory: str) -> bool:
    """:func:`other_relatives` with the question's roles read once (``roles(question)``) for many memories."""
    if not asked:
        return False
    told = roles(memory)
    return bool(told) and not any(_compatible(a, t) for a in asked for t in told)
