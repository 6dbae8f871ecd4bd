"""General-knowledge questions with short, checkable answers: does a personalized small model keep its general ability?

What it is: ``DEV`` and ``TEST``, two lists of ``(question, keywords)`` pairs of very common knowledge that even
SmolLM2-135M-Instruct has a chance on (capitals of big countries, basic science, small-number arithmetic, famous
authors, painters and composers, animals, geography, colours, units, days and months, opposites, plurals, simple
definitions), about 10% of them in Chinese. ``keywords`` lists every acceptable way the answer word may appear
(``["seven", "7"]``); an answer is right when any keyword appears in it as a whole word in any case, a Chinese
keyword anywhere (``hits``, the same rule as ``bench.quality._hits``). A Chinese question also accepts the digit
form of a number and the English answer word, since a tiny model often answers in English. No keyword appears in
its own question, so an answer that only repeats the question scores nothing.

How it was written: by hand by a helper session, without a model. DEV is plain and short ("Name the capital city
of Egypt.", "The chemical symbol for gold is", "what colour is snow"); TEST is written in another voice, casual,
with a sentence of context before the question ("Pub quiz question from last night that nobody got: ..."), and
says nothing personal that a memory system would store. Topics that the anchor prompts
(``personalize/anchor_prompts.txt``, trained on as pseudo-rehearsal) or the other benchmarks' general questions
already ask about (the capitals of Japan, France or Canada, a spider's legs, Romeo and Juliet...) were left out.
``overlaps()`` checks that DEV and TEST share no question, no four-word run (``[a-z0-9']+`` tokens, lower case)
and no eight-character run of a Chinese text, and that neither shares one with the anchor prompts,
``bench.quality_users.GENERAL_QA`` or ``bench.passing_users.GENERAL_DEV``/``GENERAL_TEST``;
``tests/test_bench_general_qa.py`` asserts it finds nothing.

How to use it: tune on DEV only and report TEST::

    from bench.general_qa import hits, questions

    right = sum(bool(hits(generate(q), keywords)) for q, keywords in questions("dev"))

``python -m bench.general_qa`` prints the counts per split and any overlap.
"""

from __future__ import annotations

import re
from pathlib import Path

QA = tuple[str, list[str]]

DEV: list[QA] = [
    # capitals and places
    ("Name the capital city of Egypt.", ["Cairo"]),
    ("Name the capital city of Russia.", ["Moscow"]),
    ("Name the capital city of Greece.", ["Athens"]),
    ("The capital city of Ireland is", ["Dublin"]),
    ("Which country has Paris as its capital?", ["France"]),
    ("Which is the largest continent?", ["Asia"]),
    ("Which ocean lies between Europe and North America?", ["Atlantic"]),
    ("On which continent is Kenya?", ["Africa"]),
    ("Name the long river that flows through Egypt.", ["Nile"]),
    ("Which country is shaped like a boot?", ["Italy"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("Mount Everest is part of which mountain range?", ["Himalaya", "Himalayas", "Himalayan"]),
    # science
    ("The chemical symbol for gold is", ["Au"]),
    ("What gas do humans need to breathe to stay alive?", ["oxygen", "O2"]),
    ("Which planet do people call the Red Planet?", ["Mars"]),
    ("What do we call the star at the centre of our solar system?", ["Sun"]),
    ("How many planets orbit the Sun?", ["8", "eight"]),
    ("What is the natural satellite of the Earth called?", ["Moon"]),
    ("Which organ pumps blood around the body?", ["heart"]),
    ("What gas do plants take in from the air to make their food?", ["carbon dioxide", "CO2"]),
    ("Water boils at how many degrees Celsius at sea level?", ["100", "hundred"]),
    ("What force pulls objects toward the ground?", ["gravity"]),
    ("What is the hardest natural substance?", ["diamond", "diamonds"]),
    ("Which part of a plant grows under the ground and takes in water?", ["root", "roots"]),
    ("Which metal is liquid at room temperature?", ["mercury"]),
    # arithmetic
    ("What is 5 + 4?", ["9", "nine"]),
    ("What is 9 minus 6?", ["3", "three"]),
    ("What is 20 divided by 4?", ["5", "five"]),
    ("What is half of 10?", ["5", "five"]),
    ("Calculate 7 + 6.", ["13", "thirteen"]),
    ("What is 100 minus 1?", ["99", "ninety-nine", "ninety nine"]),
    ("What is 2 times 3?", ["6", "six"]),
    ("How many sides does a hexagon have?", ["6", "six"]),
    # people
    ("Who wrote the play Hamlet?", ["Shakespeare"]),
    ("Who painted The Starry Night?", ["Gogh"]),
    ("Who wrote the Harry Potter books?", ["Rowling"]),
    ("Which scientist came up with the theory of relativity?", ["Einstein"]),
    ("Who composed the Moonlight Sonata?", ["Beethoven"]),
    # animals
    ("Name the largest animal on Earth.", ["blue whale", "blue whales"]),
    ("An insect has how many legs?", ["6", "six"]),
    ("What animal says moo?", ["cow", "cows"]),
    ("What do caterpillars turn into?", ["butterfly", "butterflies", "moth", "moths"]),
    ("What is the tallest animal in the world?", ["giraffe", "giraffes"]),
    ("What is a baby dog called?", ["puppy", "pup", "puppies"]),
    ("What is a baby cat called?", ["kitten", "kittens"]),
    ("how many wheels does a bicycle have", ["2", "two"]),
    # colours
    ("What colour is a ripe banana?", ["yellow"]),
    ("What color is fresh grass?", ["green"]),
    ("what colour is snow", ["white"]),
    ("Mixing red and white paint gives which colour?", ["pink"]),
    # units, days and months
    ("How many minutes make an hour?", ["60", "sixty"]),
    ("How many centimetres are in a metre?", ["100", "hundred"]),
    ("How many months are in a year?", ["12", "twelve"]),
    ("Which month comes after March?", ["April"]),
    ("what day comes after friday", ["Saturday"]),
    ("Which is the first month of the year?", ["January"]),
    # words
    ("Give the opposite of up.", ["down"]),
    ("the opposite of day is", ["night"]),
    ("Give the plural of child.", ["children"]),
    ("Give the plural of tooth.", ["teeth"]),
    ("What do we call a word that means the same as another word?", ["synonym", "synonyms"]),
    ("What do you call a person who writes books?", ["author", "authors", "writer", "writers", "novelist"]),
    ("A shape with three sides is called a", ["triangle"]),
    # Chinese
    ("中国的首都是哪个城市？", ["北京", "Beijing"]),
    ("一年有几个月？", ["十二", "12"]),
    ("三加四等于几？", ["七", "7"]),
    ("太阳从哪个方向升起？", ["东方", "东边", "东面", "east"]),
    ("一天有多少个小时？", ["二十四", "24"]),
    ("彩虹一般有几种颜色？", ["七", "7"]),
    ("哪种动物被称为“沙漠之舟”？", ["骆驼", "camel", "camels"]),
]

TEST: list[QA] = [
    # capitals and places
    ("Pub quiz question from last night that nobody at our table got: what city is South Korea's capital?",
     ["Seoul"]),
    ("Settling a small argument here, so be precise. Which city serves as India's capital?", ["Delhi"]),
    ("I always mix up the Nordic countries, so humour me: Sweden's capital is which city?", ["Stockholm"]),
    ("Watching an old film set in Lisbon got me curious. Lisbon belongs to which country?", ["Portugal"]),
    ("Random one from a trivia app: the Statue of Liberty stands in which city?", ["New York"]),
    ("Looking at a world map just now. Kangaroos live wild on which continent?", ["Australia", "Oceania"]),
    ("Saw penguins on a nature show. Which frozen continent sits at the South Pole?", ["Antarctica"]),
    ("A documentary on rainforests made me wonder: most of the Amazon rainforest lies in which country?",
     ["Brazil"]),
    ("Someone on TV had a red leaf on their flag. Which country's flag shows a maple leaf?", ["Canada"]),
    ("Geography was never my strong suit. By area, which country is the biggest on the planet?", ["Russia"]),
    ("Map question for you: the ocean east of Africa and south of India is called what?", ["Indian"]),
    # science
    ("Homework-style question, I just want to double-check it: during the day, plants give off which gas?",
     ["oxygen", "O2"]),
    ("Saw a documentary about space yesterday. Which planet is the one with the big bright rings?", ["Saturn"]),
    ("This came up in a trivia app and I second-guessed myself: which planet is the hottest one?", ["Venus"]),
    ("Chemistry class was ages ago, so remind me: iron's symbol on the periodic table is what?", ["Fe"]),
    ("Reading about the human body and got curious. Which organs do we breathe with?", ["lungs", "lung"]),
    ("Was stargazing and thought of this: a group of stars making a pattern, like Orion, is called a what?",
     ["constellation", "constellations"]),
    ("I heard someone claim bats are birds. What kind of animal is a bat really?", ["mammal", "mammals"]),
    ("Odd question, but it popped into my head: a frog lives both in water and on land, so it is what kind of "
     "animal?", ["amphibian", "amphibians"]),
    ("Quick one about magnets, no long answer needed. Which metal do fridge magnets stick to?", ["iron", "steel"]),
    # arithmetic
    ("Splitting a bill in my head and my brain just stalled. What's 8 plus 7?", ["15", "fifteen"]),
    ("doing some quick maths while dinner cooks: what's 12 minus 5?", ["7", "seven"]),
    ("Practising times tables for fun, no calculator allowed. What's 4 times 5?", ["20", "twenty"]),
    ("Bit of mental arithmetic to wake my brain up: 30 divided by 3 equals what?", ["10", "ten"]),
    ("easy one, I just want to be sure I'm not losing it: what's double 9?", ["18", "eighteen"]),
    ("My calculator app froze, so help me out here. What's 25 plus 25?", ["50", "fifty"]),
    ("Counting coins on the table. How many cents make up one dollar?", ["100", "hundred"]),
    ("Doodling shapes on a napkin. A pentagon has how many sides?", ["5", "five"]),
    # people
    ("Caught the end of a film adaptation last night and wondered: who wrote Oliver Twist originally?",
     ["Dickens"]),
    ("Walking past a museum poster gave me this question. Which Spanish artist painted Guernica?", ["Picasso"]),
    ("Trying to remember a physics story: whose laws of motion came, supposedly, after an apple fell on him?",
     ["Newton"]),
    ("A tune from an opera got stuck in my head. Who composed The Magic Flute?", ["Mozart"]),
    ("Found an old paperback of Tom Sawyer at a flea market. Who's the author of that one?", ["Twain"]),
    # animals
    ("Watching ants march across the pavement made me wonder: how many legs has an ant got?", ["6", "six"]),
    ("A child at the zoo asked this and I had no answer: which is the biggest land animal?",
     ["elephant", "elephants"]),
    ("Bit of a silly one, humour me: what sound does a dog make?", ["bark", "barks", "barking", "woof"]),
    ("Saw a nature clip about the Arctic. The fur of a polar bear looks which colour?", ["white"]),
    ("Spring is here and the fields are full of them: what's a baby sheep called?", ["lamb", "lambs"]),
    ("Not a trick question, I promise. Which slow animal carries its shell-house on its back?",
     ["snail", "snails", "tortoise", "tortoises", "turtle", "turtles"]),
    ("Kids' puzzle book question: which horse-like animal has black and white stripes?", ["zebra", "zebras"]),
    # colours
    ("Not repainting anything, just curious: what colour do you get from mixing red and blue?",
     ["purple", "violet"]),
    ("Summer is almost here. What colour are the leaves on most trees this time of year?", ["green"]),
    ("strawberries when they're ripe are what colour?", ["red"]),
    ("Lighting a barbecue later. A lump of coal is which colour?", ["black"]),
    # units, days and months
    ("Setting a kitchen timer and got confused: how many seconds make up one minute?", ["60", "sixty"]),
    ("Converting a recipe from a website. How many grams go into one kilogram?", ["1000", "1,000", "thousand"]),
    ("Flipping through a calendar: which month comes right before December?", ["November"]),
    ("Feeling slow today. In a normal year, how many days does February have?",
     ["28", "twenty-eight", "twenty eight"]),
    ("Lost track of the week already. If today is Wednesday, what day will tomorrow be?", ["Thursday"]),
    ("History podcast question: a century is how many years?", ["100", "hundred"]),
    ("Roughly speaking, a year has about how many weeks?", ["52", "fifty-two", "fifty two"]),
    # words
    ("Writing a little word game for fun. What's the opposite of happy?", ["sad", "unhappy"]),
    ("English grammar moment, since I always doubt it: the plural of 'foot' is what?", ["feet"]),
    ("One more grammar thing while I'm at it: what's the plural of 'woman'?", ["women"]),
    ("plural of goose? i can never remember", ["geese"]),
    ("Packing the dishwasher and pondering words. What's the opposite of full?", ["empty"]),
    ("Curious about job titles: what's the word for a doctor who treats animals?",
     ["vet", "vets", "veterinarian", "veterinarians", "veterinary"]),
    ("Crossword clue I'm stuck on: a word meaning the reverse of another word. What's the term?",
     ["antonym", "antonyms"]),
    ("Helping out with a geometry worksheet: what's a shape with four equal sides and four right angles?",
     ["square"]),
    ("Looking out the window at a plane overhead. The person who flies it is called a what?", ["pilot", "pilots"]),
    ("A building where you can borrow books for free is called a what?", ["library", "libraries"]),
    # Chinese
    ("刚才看新闻突然想到一个问题：美国的首都是哪座城市？", ["华盛顿", "Washington"]),
    ("考考你，很简单的：一个小时等于多少分钟？", ["六十", "60"]),
    ("买东西算账的时候卡住了，五乘以六是多少？", ["三十", "30"]),
    ("晚上看星星时想到的：地球是绕着什么转的？", ["太阳", "Sun"]),
    ("小时候学过但现在记不清了，一年分为几个季节？", ["四", "4"]),
    ("读了几首古诗以后有点好奇，李白是哪个朝代的诗人？", ["唐", "Tang"]),
    ("在动物园看到大熊猫，想问一下：大熊猫是哪个国家的国宝？", ["中国", "China"]),
]


def questions(split: str) -> list[QA]:
    """The questions of ``split``: "dev" (tune on these), "test" (report only) or "all" (both); copies."""
    chosen = {"dev": DEV, "test": TEST, "all": DEV + TEST}.get(split.lower())
    if chosen is None:
        raise ValueError(f"unknown split {split!r}: expected 'dev', 'test' or 'all'")
    return [(q, list(kws)) for q, kws in chosen]


def _chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def hits(text: str, keywords: list[str]) -> list[str]:
    """Keywords found in ``text``: whole words in any case, a Chinese keyword anywhere (the rule of every bench;
    ``bench.quality._hits`` is this)."""
    return [k for k in keywords if (k in text if _chinese(k) else
                                    re.search(rf"(?<!\w){re.escape(k)}(?!\w)", text, re.IGNORECASE))]


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _shared(a: str, b: str) -> str | None:
    """A four-word run (or a whole shorter text), or an eight-character Chinese run, found in both; else None."""
    ta, tb = _tokens(a), _tokens(b)
    runs_a = {" ".join(ta[i:i + 4]) for i in range(len(ta) - 3)}
    runs_b = {" ".join(tb[i:i + 4]) for i in range(len(tb) - 3)}
    if common := sorted(runs_a & runs_b):
        return common[0]
    for short, long in ((ta, tb), (tb, ta)):
        if short and len(short) < 4 and f" {' '.join(short)} " in f" {' '.join(long)} ":
            return " ".join(short)
    if _chinese(a) and _chinese(b):
        ca, cb = re.sub(r"\s+", "", a.lower()), re.sub(r"\s+", "", b.lower())
        common = sorted({ca[i:i + 8] for i in range(len(ca) - 7)} & {cb[i:i + 8] for i in range(len(cb) - 7)})
        if common:
            return common[0]
    return None


def _others() -> list[tuple[str, str]]:
    """(source, text) of every prompt the splits must not overlap: anchor prompts and other benches' questions."""
    from bench.passing_users import GENERAL_DEV, GENERAL_TEST
    from bench.quality_users import GENERAL_QA

    anchors = Path(__file__).resolve().parent.parent / "personalize" / "anchor_prompts.txt"
    lines = [ln.strip() for ln in anchors.read_text(encoding="utf-8").splitlines()]
    return ([("anchor", ln) for ln in lines if ln and not ln.startswith("#")]
            + [("quality_users.GENERAL_QA", q) for q, _ in GENERAL_QA]
            + [("passing_users.GENERAL_DEV", q) for q in GENERAL_DEV]
            + [("passing_users.GENERAL_TEST", q) for q in GENERAL_TEST])


def overlaps() -> list[str]:
    """Every offending pair, one line each (empty when all is well): DEV and TEST sharing a question or a run,
    either sharing one with the anchor prompts or another bench's general questions, and a question whose
    keywords it contains itself (an answer repeating the question would count as right)."""
    found = []
    for q in {q for q, _ in DEV} & {q for q, _ in TEST}:
        found.append(f"DEV and TEST both ask {q!r}")
    for d, _ in DEV:
        for t, _ in TEST:
            if run := _shared(d, t):
                found.append(f"DEV {d!r} ~ TEST {t!r}: {run!r}")
    others = _others()
    for label, split in (("DEV", DEV), ("TEST", TEST)):
        for q, keywords in split:
            for source, other in others:
                if q.strip().lower() == other.strip().lower():
                    found.append(f"{label} {q!r} is in {source}")
                elif run := _shared(q, other):
                    found.append(f"{label} {q!r} ~ {source} {other!r}: {run!r}")
            if given := hits(q, keywords):
                found.append(f"{label} {q!r} contains its own keywords {given}")
    return found


if __name__ == "__main__":
    for name, split in (("DEV", DEV), ("TEST", TEST)):
        zh = sum(_chinese(q) for q, _ in split)
        print(f"{name}: {len(split)} questions ({len({q for q, _ in split})} distinct, {zh} in Chinese)")
    problems = overlaps()
    print("\n".join(problems) or "no overlaps")
