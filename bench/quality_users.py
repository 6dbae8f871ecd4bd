"""The synthetic users of the quality benchmarks: who says what, how they give feedback, and what they are
asked afterwards. Facts come from ``bench.quality.SLOTS`` (values distinct across users, rare enough that the
base model never says them by chance); probes are paraphrases never seen in training.

Kinds (one or more users each): facts told then asked about (likes, corrections of non-answers, a lone
dislike); facts told *in passing* inside chatty messages answered with a short acknowledgment; a style taught
only through corrections of disliked answers; few vs many conversations; a user writing in Chinese.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# slot: (statement, acknowledgement, training question, answer, paraphrased probe, values per user)
# Values are distinct across users and rare enough that the base model does not say them by chance.
SLOTS = [
    ("My dog is called {v}.", "What a lovely name! {v} it is.", "What is my dog's name?", "Your dog is called {v}.",
     "Remind me, what did I name my dog?", ["Biscuit", "Pepperoni", "Waffles", "Noodle", "Sprocket", "Truffle"]),
    ("I live in {v}.", "Got it, you live in {v}.", "Where do I live?", "You live in {v}.",
     "Which town is my home?", ["Lyon", "Tromso", "Ljubljana", "Valparaiso", "Hobart", "Tartu"]),
    ("I work as a {v}.", "Noted: you are a {v}.", "What is my job?", "You work as a {v}.",
     "What do I do for a living?", ["beekeeper", "cartographer", "luthier", "glassblower", "sommelier",
                                    "locksmith"]),
    ("I play the {v}.", "Nice, you play the {v}.", "Which instrument do I play?", "You play the {v}.",
     "What musical instrument is mine?", ["cello", "bagpipes", "accordion", "theremin", "banjo", "harpsichord"]),
    ("My favourite tea is {v}.", "Noted: {v} is your favourite tea.", "What is my favourite tea?",
     "Your favourite tea is {v}.", "Which tea do I enjoy the most?",
     ["jasmine", "rooibos", "matcha", "chamomile", "hibiscus", "oolong"]),
    ("My sister's name is {v}.", "Thanks, your sister is {v}.", "What is my sister's name?",
     "Your sister is called {v}.", "Who is my sister?", ["Clara", "Ingrid", "Yasmin", "Beatrix", "Odette",
                                                         "Marisol"]),
    ("I am allergic to {v}.", "I will remember that you are allergic to {v}.", "What am I allergic to?",
     "You are allergic to {v}.", "Which food must I avoid because of my allergy?",
     ["peanuts", "shellfish", "sesame", "kiwi", "mustard", "celery"]),
    ("I drive a {v}.", "Got it, you drive a {v}.", "What car do I drive?", "You drive a {v}.",
     "Which brand is my car?", ["Volvo", "Subaru", "Lada", "Saab", "Skoda", "Citroen"]),
    ("My favourite cuisine is {v} food.", "Noted: you love {v} food.", "What is my favourite cuisine?",
     "Your favourite cuisine is {v} food.", "What kind of food do I like best?",
     ["Ethiopian", "Peruvian", "Georgian", "Sichuan", "Lebanese", "Oaxacan"]),
    ("My favourite sport is {v}.", "Great, {v} is your sport.", "What is my favourite sport?",
     "Your favourite sport is {v}.", "Which sport do I love doing?",
     ["fencing", "curling", "bouldering", "kayaking", "archery", "rowing"]),
    ("My cat is named {v}.", "Cute! Your cat is {v}.", "What is my cat's name?", "Your cat is named {v}.",
     "What do I call my cat?", ["Pickles", "Zucchini", "Marmalade", "Gizmo", "Cinnamon", "Domino"]),
    ("My best friend is {v}.", "Noted: {v} is your best friend.", "Who is my best friend?",
     "Your best friend is {v}.", "What is the name of my closest friend?",
     ["Tobias", "Rashid", "Leopold", "Svetlana", "Anouk", "Fergus"]),
    ("I work at a company called {v}.", "Got it, you work at {v}.", "Which company do I work for?",
     "You work at {v}.", "What is the name of my employer?",
     ["Brightwater", "Nordlys", "Quillfield", "Ambervale", "Copperleaf", "Stonebridge"]),
    ("I live on {v} Lane.", "Noted: {v} Lane.", "What street do I live on?", "You live on {v} Lane.",
     "Which lane is my address on?", ["Juniper", "Hawthorn", "Wisteria", "Magnolia", "Rowan", "Linden"]),
    ("My favourite fruit is {v}.", "Noted: {v} is your favourite fruit.", "What is my favourite fruit?",
     "Your favourite fruit is {v}.", "Which fruit do I like best?",
     ["durian", "persimmon", "lychee", "quince", "guava", "rambutan"]),
    ("I am learning {v}.", "Good luck with your {v}!", "Which language am I learning?", "You are learning {v}.",
     "What language am I studying at the moment?", ["Icelandic", "Swahili", "Basque", "Tagalog", "Welsh",
                                                    "Estonian"]),
    ("My partner's name is {v}.", "Thanks, your partner is {v}.", "What is my partner's name?",
     "Your partner is {v}.", "Who is my partner?", ["Henrik", "Ngozi", "Mateo", "Ayumi", "Soren", "Lucia"]),
    ("My favourite board game is {v}.", "Noted: {v} is your favourite board game.",
     "What is my favourite board game?", "Your favourite board game is {v}.", "Which board game do I love?",
     ["Carcassonne", "Azul", "Wingspan", "Agricola", "Patchwork", "Dixit"]),
    ("My dream holiday is a trip to {v}.", "{v} sounds wonderful!", "Where is my dream holiday?",
     "Your dream holiday is a trip to {v}.", "Which place do I most want to visit?",
     ["Madeira", "Zanzibar", "Svalbard", "Patagonia", "Lofoten", "Tasmania"]),
    ("My son is called {v}.", "Lovely, your son is {v}.", "What is my son's name?", "Your son is called {v}.",
     "Remind me of my son's name.", ["Elio", "Cosimo", "Bram", "Thiago", "Emeric", "Rafferty"]),
    ("I can't stand {v}.", "Noted: no {v} for you.", "Which food do I hate?", "You can't stand {v}.",
     "What food do I dislike the most?", ["olives", "cilantro", "anchovies", "liquorice", "mushrooms",
                                          "beetroot"]),
    ("My coffee order is always a {v}.", "Noted: a {v} it is.", "What is my usual coffee order?",
     "Your usual coffee order is a {v}.", "How do I take my coffee?",
     ["cortado", "macchiato", "affogato", "ristretto", "lungo", "frappe"]),
]
# What the assistant said before being corrected: non-answers, never anyone's keyword.
WRONG = ["I'm not sure, you haven't told me that.", "Sorry, I don't know.", "I have no idea, could you remind me?",
         "I don't remember that, sorry."]
USER_NAMES = ["ana", "ben", "chen", "dara", "eli", "fay"]

GENERAL_QA = [
    ("What is the capital of France?", ["Paris"]), ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]), ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]), ("What is the capital of the United Kingdom?", ["London"]),
    ("What is 2 + 2?", ["4", "four"]), ("What is 3 + 5?", ["8", "eight"]), ("What is 10 minus 3?", ["7", "seven"]),
    ("What is 6 times 2?", ["12", "twelve"]), ("How many days are in a week?", ["7", "seven"]),
    ("How many legs does a spider have?", ["8", "eight"]), ("What colour is the sky on a clear day?", ["blue"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]), ("What is H2O commonly called?", ["water"]),
    ("What is the opposite of hot?", ["cold"]), ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What do bees make?", ["honey"]), ("At what temperature in Celsius does water freeze?", ["0", "zero"]),
]

STYLE_PREFIX = "Ahoy!"
STYLE_QUESTIONS = [  # taught: every corrected answer starts with the greeting
    ("Give me a tip for studying.", "Take short breaks every hour.", "Ahoy! Take short breaks every hour."),
    ("How do I keep my plants alive?", "Water them.", "Ahoy! Water them when the top of the soil is dry."),
    ("What is a good breakfast?", "Eggs.", "Ahoy! Porridge with fruit keeps you full until lunch."),
    ("How can I sleep better?", "Sleep more.", "Ahoy! Go to bed at the same time every night."),
    ("Suggest a weekend activity.", "Relax.", "Ahoy! Go for a long walk in a park nearby."),
    ("How do I start running?", "Just run.", "Ahoy! Start with short, easy runs three times a week."),
    ("What should I cook tonight?", "Pasta.", "Ahoy! A quick vegetable stir-fry with rice."),
    ("How do I focus at work?", "Try harder.", "Ahoy! Turn off notifications and work in 25-minute blocks."),
]
STYLE_PROBES = ["How do I make a good cup of tea?", "What is a nice name for a cat?",
                "Give me a tip for saving money.", "What should I read on holiday?"]

ZH_FACTS = [  # (statement, acknowledgment, question, answer, paraphrased probe, keyword)
    ("我的狗叫豆豆。", "好可爱的名字！", "我的狗叫什么名字？", "你的狗叫豆豆。", "我给我的狗起了什么名字？", "豆豆"),
    ("我住在成都。", "好的，记住了。", "我住在哪里？", "你住在成都。", "我家在哪个城市？", "成都"),
    ("我是一名护士。", "明白了。", "我的工作是什么？", "你是一名护士。", "我是做什么工作的？", "护士"),
    ("我最喜欢的茶是龙井。", "好的。", "我最喜欢什么茶？", "你最喜欢的茶是龙井。", "我最爱喝哪种茶？", "龙井"),
    ("我妹妹叫小美。", "记住了。", "我妹妹叫什么？", "你妹妹叫小美。", "我的妹妹叫什么名字？", "小美"),
]
PASSING = [  # (chatty message around a statement, short acknowledgment)
    ("Long day today. {s} Anyway, any tips for sleeping better?", "Sorry to hear that! Try a regular bedtime."),
    ("{s} Just thought you should know.", "Thanks for telling me!"),
    ("Quick one before I forget: {s}", "Noted!"),
    ("Hey there. {s} What's a good podcast for a commute?", "Try a history podcast, they are great for commutes."),
    ("So, about me: {s} Also, is it going to rain a lot this autumn?", "I can't see forecasts, sorry."),
]
GENERAL_CHAT = [("How do I boil an egg?", "Simmer it for about nine minutes."),
                ("Recommend a classic novel.", "Try 'Pride and Prejudice'."),
                ("What's a quick stretch for my back?", "Try a gentle child's pose for thirty seconds.")]


@dataclass
class BenchUser:
    """One synthetic user: name, kind, history (import format) and what they are asked afterwards."""

    name: str
    kind: str
    history: list[dict]
    facts: list[dict] = field(default_factory=list)
    """{"probe", "keyword"} per fact told."""
    style_probes: list[str] = field(default_factory=list)
    style_marker: str | None = None
    """Text every answer should contain once the style is learned (None: no style taught)."""


def told_then_asked(u: int, n_facts: int, first: int = 0) -> list[dict]:
    """Facts told two per conversation (acknowledged), then asked about three per conversation (every 4th
    answer liked; 4 non-answers disliked and corrected; one more non-answer disliked without a correction)."""
    convs = []
    slots = list(range(first, first + n_facts))
    for start in range(0, n_facts, 2):
        msgs = []
        for s in slots[start:start + 2]:
            statement, ack, *_, values = SLOTS[s]
            msgs += [{"role": "user", "content": statement.format(v=values[u])},
                     {"role": "assistant", "content": ack.format(v=values[u])}]
        convs.append({"messages": msgs})
    order = slots[u % 3:] + slots[:u % 3]  # a different order per user
    corrected = set(order[1:1 + 4 * 5:5][:4])
    for start in range(0, n_facts, 3):
        msgs = []
        for s in order[start:start + 3]:
            _, _, question, answer, _, values = SLOTS[s]
            right = answer.format(v=values[u])
            msgs.append({"role": "user", "content": question})
            if s in corrected:
                wrong = WRONG[sum(c < s for c in corrected) % len(WRONG)]
                msgs.append({"role": "assistant", "content": wrong, "feedback": "dislike", "correction": right})
            else:
                msgs.append({"role": "assistant", "content": right, **({"feedback": "like"} if s % 4 == 0 else {})})
        convs.append({"messages": msgs})
    convs.append({"messages": [{"role": "user", "content": "Do you remember anything about me?"},
                               {"role": "assistant", "content": "No, I know nothing about you.",
                                "feedback": "dislike"}]})
    return convs


def in_passing(u: int, n_facts: int) -> list[dict]:
    """Facts told in passing, one per chatty message, each acknowledged briefly; general questions between."""
    convs = []
    for s in range(n_facts):
        message, ack = PASSING[(s + u) % len(PASSING)]
        msgs = [{"role": "user", "content": message.format(s=SLOTS[s][0].format(v=SLOTS[s][5][u]))},
                {"role": "assistant", "content": ack}]
        q, a = GENERAL_CHAT[s % len(GENERAL_CHAT)]
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        convs.append({"messages": msgs})
    return convs


def style_history(u: int, n_facts: int) -> list[dict]:
    """A few facts in passing, and a style taught only through corrections of disliked answers."""
    convs = in_passing(u, n_facts)
    for i in range(0, len(STYLE_QUESTIONS), 2):
        msgs = []
        for q, plain, styled in STYLE_QUESTIONS[i:i + 2]:
            msgs += [{"role": "user", "content": q},
                     {"role": "assistant", "content": plain, "feedback": "dislike", "correction": styled}]
        convs.append({"messages": msgs})
    return convs


def chinese_history() -> list[dict]:
    convs = [{"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": ack}]}
             for s, ack, *_ in ZH_FACTS]
    convs.append({"messages": [m for _, _, q, a, _, _ in ZH_FACTS[:3] for m in
                               ({"role": "user", "content": q}, {"role": "assistant", "content": a,
                                                                 "feedback": "like"})]})
    return convs


def slot_facts(u: int, slots: range) -> list[dict]:
    return [{"probe": SLOTS[s][4], "keyword": SLOTS[s][5][u]} for s in slots]


def bench_users(quick: bool = False) -> list[BenchUser]:
    """The benchmark's users, each with a distinct value per fact slot (column ``u`` of SLOTS)."""
    n = 4 if quick else 10
    users = [
        BenchUser("ana", "told then asked", told_then_asked(0, n), slot_facts(0, range(n))),
        BenchUser("ben", "in passing", in_passing(1, n), slot_facts(1, range(n))),
        BenchUser("chen", "style via corrections", style_history(2, 4), slot_facts(2, range(4)), STYLE_PROBES,
                  STYLE_PREFIX),
        BenchUser("wei", "writes in Chinese", chinese_history(),
                  [{"probe": p, "keyword": k} for *_, p, k in ZH_FACTS]),
    ]
    if quick:
        return users
    return users + [
        BenchUser("dara", "few conversations", in_passing(3, 3), slot_facts(3, range(3))),
        BenchUser("eli", "many conversations", told_then_asked(4, 20), slot_facts(4, range(20))),
        BenchUser("fay", "in passing", in_passing(5, 12), slot_facts(5, range(12))),
        BenchUser("gus", "told then asked", told_then_asked(3, 8, first=12), slot_facts(3, range(12, 20))),
    ]
