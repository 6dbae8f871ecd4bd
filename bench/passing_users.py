"""Synthetic users who mention personal facts once, in passing, for ``bench/memory_passing.py``.

Each user talks to the assistant over a few conversations the way real people do: the facts (job, city, family
names, pets, hobbies, diet, travel, age...) are never announced but slipped into requests and questions ("Winter
road salt up here in Duluth eats everything. How do I fix a squeaky bike chain?"), and the assistant replies
answer the request instead of acknowledging the fact. Every user also has one fact that changes later (the probe
of kind "updated" has the new value as keywords and the old one under "old"), one wrong answer the user disliked
and corrected (the correction rides on that assistant message; a "correction" probe re-asks the question in other
words, and ``unrelated_howto`` is a different question of the same domain that must not be served the
correction), a probe per fact phrased with few of the statement's words, and questions about things they never
said (``never_told``). ``GENERAL_DEV``/``GENERAL_TEST`` are general-knowledge questions with nothing personal in
them (a few say "I"/"my" without being about the user).

DEV users are the only ones memory defaults may be tuned on; TEST users are only reported. TEST is written in a
different voice (longer messages, facts mid-sentence with "because", "now that", dashes and parentheses) with
different names, topics and question wordings, and shares no four-word sequence with DEV (checked below).

Written by hand by a helper session for this benchmark, without reading the extraction rules; no rule, pattern
or template in ``assistant/`` or ``personalize/`` may copy their wording. Keywords match as in
``bench.quality._hits``: whole words in any case, Chinese keywords anywhere.
"""

from __future__ import annotations

USER = dict  # see the module docstring; keys: name, lang, conversations, probes, never_told, unrelated_howto


def _u(text: str) -> dict:
    return {"role": "user", "content": text}


def _a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _wrong(text: str, correction: str) -> dict:
    """An answer the user disliked, with the user's correction."""
    return {"role": "assistant", "content": text, "feedback": "dislike", "correction": correction}


def _fact(question: str, *keywords: str) -> dict:
    return {"question": question, "keywords": list(keywords), "kind": "fact"}


def _updated(question: str, new: list[str], old: list[str]) -> dict:
    return {"question": question, "keywords": new, "kind": "updated", "old": old}


def _correction(question: str, *keywords: str) -> dict:
    return {"question": question, "keywords": list(keywords), "kind": "correction"}


# ---------------------------------------------------------------------------------------------------- DEV

_MARCUS = {
    "name": "Marcus", "lang": "en",
    "conversations": [
        [
            _u("I'm a paramedic on twelve-hour shifts and my lower back is wrecked by the end of them. "
               "Any stretches I can do in the rig between calls?"),
            _a("Try a standing hamstring stretch with your heel on the bumper, a seated figure-four for the hips, "
               "and a few slow cat-cows if there's room to kneel. Even a minute of each between calls keeps things "
               "from locking up."),
            _u("The seat in my Ford Ranger doesn't help on the drive home either. Is a lumbar cushion worth buying?"),
            _a("Yes, a firm memory-foam lumbar roll is cheap and often makes a real difference. Set it at about belt "
               "height so it supports the inward curve of your lower back, and recline the seat slightly rather "
               "than sitting bolt upright."),
        ],
        [
            _u("Winter road salt up here in Duluth eats everything. How do I fix a squeaky bike chain?"),
            _wrong("Just spray some WD-40 along the chain and spin the pedals backwards a few times; that's all the "
                   "lubrication it needs.",
                   "WD-40 is mostly a solvent, so it strips what little oil is left and the squeak is back in a day. "
                   "Degrease and dry the chain, put one drop of proper chain lube on each link, let it soak in, "
                   "then wipe off the excess."),
            _u("My daughter Wren wants to ride with me this spring, she's seven. What size bike should I look for?"),
            _a("Most seven-year-olds fit a 20-inch wheel, though a small one may still be on 16 or 18 inches. She "
               "should be able to straddle the top tube with a little clearance and reach the ground with the balls "
               "of her feet."),
        ],
        [
            _u("Pilot, our retired racing greyhound, shivers at night even with the heating on. Do greyhounds need "
               "a coat indoors?"),
            _a("Quite often, yes: greyhounds carry very little body fat and have thin coats, so a light fleece "
               "jumper at night is common. A raised, padded bed away from drafts and a blanket he can burrow under "
               "also help."),
            _u("The vet might put him on amoxicillin for a skin thing and I'm allergic to penicillin myself. Is it "
               "safe for me to give him the pills?"),
            _a("Amoxicillin belongs to the penicillin family, so wear disposable gloves or use a pill pocket and "
               "wash your hands afterwards. If your reactions have ever been severe, ask the vet whether another "
               "antibiotic would do."),
        ],
        [
            _u("Heading out to the Brule for some fly fishing on Saturday. Which flies work best in early May?"),
            _a("Early May on the Brule usually means Hendricksons and blue-winged olives, so carry those as dries "
               "and nymphs, plus a few black stoneflies and a woolly bugger for higher water."),
            _u("I traded in my old pickup last month for a Subaru Outback. Can it handle a rutted forest road down "
               "to the river?"),
            _a("Generally yes: the Outback has around 8.7 inches of ground clearance and full-time all-wheel drive, "
               "which is plenty for most forest roads. Take deep ruts slowly and at an angle so you don't scrape "
               "the underbody."),
            _u("Need to be home by noon Sunday because the Packers are on. When should I start to catch the "
               "morning hatch?"),
            _a("Early-May hatches often get going late morning once the water warms, so on Saturday aim to be on "
               "the river by nine or ten; on Sunday a session from first light until about ten still gets you home "
               "in time."),
        ],
    ],
    "probes": [
        _fact("What do I do for work?", "paramedic", "paramedics", "EMT"),
        _fact("Which city is home for me?", "Duluth"),
        _fact("What's my kid called?", "Wren"),
        _fact("What's the name of my pet?", "Pilot"),
        _fact("Is there a drug I react badly to?", "penicillin"),
        _fact("What do I like to do outdoors on weekends?", "fly fishing", "fly-fishing", "fishing"),
        _fact("Which NFL team do I follow?", "Packers", "Green Bay"),
        _updated("What car do I have these days?", ["Outback", "Subaru"], ["Ranger"]),
        _correction("What's the right way to stop my bicycle chain from creaking?",
                    "chain lube", "each link", "degrease"),
    ],
    "unrelated_howto": "How do I patch a punctured inner tube?",
    "never_told": ["What's my wife's name?", "Where did I go to college?", "What instrument do I play?"],
}

_PRIYA = {
    "name": "Priya", "lang": "en",
    "conversations": [
        [
            _u("Our flat in Leeds gets almost no direct sun. Which herbs will survive on a north-facing "
               "windowsill?"),
            _a("Mint, parsley, chives and chervil cope best with low light; basil and rosemary will sulk without a "
               "grow light. Water sparingly, since pots dry out slowly without sun."),
            _u("My cat Tamarind keeps chewing the pots. Are any of those bad for cats?"),
            _a("Chives are the real worry, since all alliums can damage a cat's red blood cells; mint and parsley "
               "are mildly upsetting at most. Keep the chives out of reach and offer a pot of cat grass as a "
               "decoy."),
        ],
        [
            _u("I teach chemistry to Year 10 and want a fun demo for the last day of term that doesn't need a fume "
               "cupboard. Any ideas?"),
            _a("Elephant toothpaste with a yeast catalyst, a sugar-solution density rainbow, or red-cabbage "
               "indicator changing colour with household acids and bases all work on an open bench with goggles."),
            _u("The kids always bring cake and being coeliac I end up just watching. What could I bake that "
               "everyone would eat?"),
            _a("A flourless chocolate cake or almond-flour brownies are naturally wheat-free and nobody will miss "
               "anything. Just check that your baking powder and chocolate are certified safe for you."),
        ],
        [
            _u("Since the move to Bristol we finally have a garden, and it came with two big blue hydrangeas. When "
               "should I prune them?"),
            _wrong("Cut them back hard in early spring, down to about 30 cm, before the new growth starts.",
                   "Not for these. Blue mopheads are bigleaf hydrangeas, which flower on old wood (last year's "
                   "stems), so a hard spring cut throws away this summer's flowers. Leave the dead heads on over "
                   "winter for frost protection, then in spring snip each one back to the first pair of fat buds."),
            _u("My husband Arjun wants a veg patch as well. What's easy for complete beginners?"),
            _a("Courgettes, radishes, runner beans and cut-and-come-again salad leaves are very forgiving and quick "
               "to reward you. Start with one small raised bed so the weeding stays manageable."),
        ],
        [
            _u("I just turned 41 and want to start running. Is couch-to-5k realistic at my age?"),
            _a("Absolutely; the plan is built for beginners of any age and its run-walk intervals are gentle on the "
               "joints. Get shoes fitted at a running shop and repeat a week whenever it feels too hard."),
            _u("I play oboe in a community orchestra, will running affect my breathing for that?"),
            _a("If anything it should help, since aerobic fitness improves breath support and stamina. Just avoid a "
               "hard session right before rehearsal, when tired breathing muscles make long phrases feel harder."),
            _u("We're going to Hokkaido in February. Will normal trainers be okay on icy pavements there?"),
            _a("Not really: Sapporo's pavements turn to packed ice in February. Pick up slip-on ice cleats, sold "
               "cheaply in convenience stores there, or shoes with winter rubber soles."),
        ],
    ],
    "probes": [
        _fact("What's my job?", "chemistry"),
        _fact("What's the name of our cat?", "Tamarind"),
        _fact("Is there anything I can't eat?", "coeliac", "celiac", "gluten"),
        _fact("Who am I married to?", "Arjun"),
        _fact("How old am I?", "41", "forty-one"),
        _fact("Do I make any music?", "oboe"),
        _fact("Where am I travelling this winter?", "Hokkaido", "Sapporo", "Japan"),
        _updated("What city do I live in?", ["Bristol"], ["Leeds"]),
        _correction("What time of year is right for cutting back my hydrangeas?",
                    "old wood", "last year's", "frost protection"),
    ],
    "unrelated_howto": "How do I prune a rose bush?",
    "never_told": ["What's my brother called?", "What car do I drive?", "Which football team do I support?"],
}

_TOMAS = {
    "name": "Tomas", "lang": "en",
    "conversations": [
        [
            _u("I run a food truck selling arepas and want to add a dessert that holds up in the heat. Any "
               "suggestions?"),
            _a("Alfajores, guava-and-cheese pastelitos or churro bites all keep without refrigeration and are "
               "quick to hand out the window."),
            _u("Tucson hits 110 in July, so would a dulce de leche filling survive?"),
            _a("Dulce de leche is fairly stable because it's so concentrated, but at that heat it softens and gets "
               "sticky. Fill the cookies in the morning, keep them in a cooler, and sell plain ones in the "
               "afternoon."),
        ],
        [
            _u("My son Ignacio is doing a science fair project on which greens his bearded dragon likes best. Is it "
               "okay to feed the lizard romaine every day?"),
            _a("Romaine is safe but not very nutritious, so rotate in collard, mustard and turnip greens plus some "
               "squash, and dust with calcium a few times a week. Skip iceberg and spinach as staples."),
            _u("How do I make a dark roux for gumbo?"),
            _wrong("Melt butter, whisk in the same amount of flour and cook for about two minutes until it smells "
                   "nutty but is still pale, then add your stock.",
                   "That's a blond roux. A gumbo roux is flour cooked in oil over medium-low heat, stirred "
                   "constantly for 30 to 45 minutes until it turns the colour of milk chocolate."),
        ],
        [
            _u("I play trumpet in a mariachi on weekends and my chops give out after an hour. How do I build "
               "endurance?"),
            _a("Short daily sessions beat one long one: play long tones and lip slurs softly, rest as much as you "
               "play, and take the horn off your face between songs. Using less mouthpiece pressure is the single "
               "biggest endurance gain."),
            _u("We're driving down to Mazatlán for Christmas. Which route from Nogales do most people take?"),
            _a("Most drivers take the 15D toll highway through Hermosillo, Guaymas, Los Mochis and Culiacán. Drive "
               "in daylight, carry Mexican auto insurance, and sort out the temporary vehicle import permit before "
               "you leave."),
        ],
        [
            _u("I sold the truck and I'm now kitchen manager at a downtown hotel. How do I schedule twelve cooks "
               "without burning them out?"),
            _a("Give everyone two consecutive days off, cap doubles at one a week, and post the schedule two weeks "
               "ahead. Rotate the worst shifts fairly and keep one floater on call for banquets."),
            _u("For Friday's staff meal, I'm allergic to cashews, so what's a Thai-style dish with no nuts at all?"),
            _a("Try a basil chicken stir-fry (pad kra pao) or a red curry with pumpkin and green beans, both "
               "naturally nut-free. Just check the curry paste label for tree-nut traces."),
            _u("It has to be quick because the Suns tip off at 7 and I'm not missing it. Can I prep any of it "
               "ahead?"),
            _a("Yes: slice the chicken, chop the aromatics and mix the sauce the night before, and the stir-fry "
               "takes about ten minutes on the line."),
        ],
    ],
    "probes": [
        _updated("Where am I working now?", ["hotel", "kitchen manager"], ["food truck", "arepas", "arepa"]),
        _fact("What town do I live in?", "Tucson"),
        _fact("What's my son's name?", "Ignacio"),
        _fact("What kind of animal does our family keep?", "bearded dragon", "lizard"),
        _fact("What do I do with music on weekends?", "trumpet", "mariachi"),
        _fact("Do I have any food allergy?", "cashew", "cashews"),
        _fact("Which NBA team do I root for?", "Suns", "Phoenix"),
        _fact("Where are we spending the holidays?", "Mazatlán", "Mazatlan"),
        _correction("What's the method for the roux in a gumbo?", "chocolate", "45 minutes", "30 to 45"),
    ],
    "unrelated_howto": "How do I make jambalaya?",
    "never_told": ["What's my wife's name?", "What did I study at university?", "Which language am I learning?"],
}

_HANNAH = {
    "name": "Hannah", "lang": "en",
    "conversations": [
        [
            _u("I'm a court stenographer and my wrists ache after long trials. Any exercises that help?"),
            _a("Tendon glides, gentle wrist flexor and extensor stretches, and squeezing a soft ball a few times a "
               "day all help. In breaks, shake out your hands and check the machine sits at elbow height with your "
               "wrists floating."),
            _u("I also just started learning the ukulele in the evenings. Could that make the ache worse?"),
            _a("It might if you play long sessions with a tight grip. Keep practice to 20 or 30 minutes, press the "
               "strings only as hard as needed, and stop if you feel tingling."),
        ],
        [
            _u("Rainy Saturday in Halifax again. Any indoor ideas for six-year-old twins, Otto and Greta?"),
            _a("Build a blanket fort with a torch-lit story time, set up a treasure hunt with picture clues, or bake "
               "with cookie cutters. The Discovery Centre downtown is also great on wet days."),
            _u("Can Biscotti, our rabbit, join in, or are rabbits stressed by kids?"),
            _a("Rabbits can enjoy it if the kids sit on the floor and let him come to them; they hate being picked "
               "up and chased. Give him a hidey box and keep the sessions short and calm."),
        ],
        [
            _u("I keep my linguistics thesis in git for my part-time master's. How do I undo my last commit but "
               "keep the changes?"),
            _wrong("Run git reset --hard HEAD~1; that removes the last commit and you're good to go.",
                   "--hard throws my changes away too! It's git reset --soft HEAD~1, which removes the commit but "
                   "keeps all the changes staged."),
            _u("Luckily I had a copy. Lactose intolerant here, so what can I snack on during late-night writing "
               "sessions that won't upset my stomach?"),
            _a("Hummus with carrot sticks, roasted chickpeas, a handful of almonds, or oatcakes with peanut butter "
               "all keep you going and are easy on the stomach."),
        ],
        [
            _u("I bruised my tailbone at roller derby practice last night. How long does that usually take to "
               "heal?"),
            _a("A bruised tailbone usually takes two to four weeks to settle, sometimes longer. Sit on a wedge "
               "cushion, ice it for the first couple of days, and see a doctor if the pain is severe or you feel "
               "numbness."),
            _u("Meanwhile I've given up on the little four-string I started with and bought a mandolin. How do I "
               "tune it?"),
            _a("A mandolin is tuned like a violin, G-D-A-E from low to high, with each pair of strings tuned to the "
               "same note. A clip-on tuner makes it quick."),
        ],
    ],
    "probes": [
        _fact("What's my profession?", "stenographer", "court reporter", "stenography"),
        _fact("Where's home for me?", "Halifax"),
        _fact("What are my kids called?", "Otto", "Greta"),
        _fact("Which sport do I practise?", "roller derby", "derby"),
        _fact("What's our pet called?", "Biscotti"),
        _fact("Is there something in my diet I have to avoid?", "lactose", "dairy"),
        _fact("What am I studying?", "linguistics"),
        _updated("What instrument am I learning?", ["mandolin"], ["ukulele", "uke"]),
        _correction("How can I take back a git commit but not lose my work?", "--soft", "reset --soft"),
    ],
    "unrelated_howto": "How do I create a new branch in git?",
    "never_told": ["What's my husband's name?", "What car do I drive?", "Where did I grow up?"],
}

_CHEN = {
    "name": "陈磊", "lang": "zh",
    "conversations": [
        [
            _u("我在医院当麻醉师，经常值夜班，白天总睡不踏实，有什么办法吗？"),
            _a("可以用遮光窗帘和耳塞把卧室弄得又黑又安静，下班路上戴墨镜少见强光；"
               "回家后尽量固定时间睡，睡前别喝咖啡、别刷手机。"),
            _u("另外我最近在学书法，想静静心，零基础先练楷书还是行书好？"),
            _a("零基础一般建议从楷书入手，比如颜体或欧体，先把笔画和结构练扎实，再过渡到行书会顺很多。"),
        ],
        [
            _u("红烧肉怎么做？"),
            _wrong("五花肉切块，直接加生抽、老抽和水炖一个小时就可以了，不需要别的步骤。",
                   "不对，关键是先炒糖色：锅里放少许油和冰糖，小火炒到枣红色、冒小泡，"
                   "再下焯过水的五花肉翻炒上色，然后加料酒、酱油和热水慢炖。"),
            _u("我儿子豆豆特别爱吃甜的，给他做的话要少放糖吗？"),
            _a("小朋友吃可以稍微减点糖和酱油，颜色会浅一点但味道照样好；肥肉多的部分可以少给他夹一些。"),
        ],
        [
            _u("青岛这几天海风特别大，我家柯基馒头还要天天遛，要注意什么吗？"),
            _a("柯基腿短、肚子离地近，风大降温时注意肚皮保暖，可以穿件薄外套；"
               "回家后擦干爪子，海边的盐分和沙子容易刺激脚垫。"),
            _u("周末想约朋友打羽毛球，但每次打完膝盖都疼，有什么建议吗？"),
            _a("打之前先热身十分钟，多做弓步和侧向移动；选一双缓冲好的专业球鞋，平时练练大腿和臀部力量。"
               "如果疼痛持续或者肿胀，最好去骨科看看。"),
        ],
        [
            _u("国庆打算去新疆自驾，要准备些什么？我对芒果过敏，那边水果多，有什么要注意的吗？"),
            _a("那边昼夜温差大，带好抓绒和冲锋衣，防晒霜和墨镜必不可少；长途路段加油站少，见到就加满。"
               "当地的葡萄、哈密瓜和杏子都可以放心吃，买果汁、冰淇淋时留意一下配料就行。"),
            _u("之前练字没坚持下来，最近改学围棋了，有什么入门的App推荐吗？"),
            _a("推荐弈城、野狐这类对弈平台，配合入门教学的小程序，先学吃子和死活这些基础，"
               "再慢慢和AI下让子棋。"),
        ],
    ],
    "probes": [
        _fact("我是干什么工作的？", "麻醉"),
        _fact("我住哪儿？", "青岛", "Qingdao"),
        _fact("我孩子叫什么名字？", "豆豆"),
        _fact("我养的狗叫啥？", "馒头"),
        _fact("我平时喜欢什么运动？", "羽毛球", "badminton"),
        _fact("有什么东西我不能吃？", "芒果", "mango"),
        _fact("十一假期我打算去哪里？", "新疆", "Xinjiang"),
        _updated("我最近在培养什么爱好？", ["围棋"], ["书法"]),
        _correction("红烧肉的正确做法是什么？", "糖色", "冰糖"),
    ],
    "unrelated_howto": "西红柿炒鸡蛋怎么做？",
    "never_told": ["我老婆叫什么名字？", "我会弹什么乐器？", "我是哪个大学毕业的？"],
}

DEV: list[USER] = [_MARCUS, _PRIYA, _TOMAS, _HANNAH, _CHEN]

# --------------------------------------------------------------------------------------------------- TEST

_ROSALIND = {
    "name": "Rosalind", "lang": "en",
    "conversations": [
        [
            _u("Because I work rotating shifts as an air traffic controller — three earlies, two lates, then a "
               "block of nights — I can never keep a proper meal routine going, and as a vegetarian it's protein "
               "that always falls off the list first. Could you sketch a simple weekly prep plan that survives "
               "that kind of rotation?"),
            _a("Batch-cook two freezer bases on your first day off — a red lentil dal and a chickpea-and-spinach "
               "stew — and portion them singly. Keep eggs, Greek yoghurt, edamame and smoked tofu around for "
               "grab-and-go protein, and on night blocks eat your main meal before leaving rather than at 3am."),
        ],
        [
            _u("Ever since we adopted Bartholomew (an African grey with strong opinions about sunrise), our little "
               "house in Wellington wakes up at 5:30 whether we like it or not. Is there a realistic way to teach a "
               "parrot to stay quiet until a civilised hour, or is that wishful thinking?"),
            _a("Partly realistic: greys respond well to a consistent light schedule, so a breathable cover and a "
               "blackout blind kept on until seven often shift the dawn chorus. Reward quiet mornings and never "
               "answer the screaming, or he learns that noise brings you running."),
            _u("Different subject — next weekend I'm taking my camera up to Tongariro, and I've never managed that "
               "silky look on a waterfall. What shutter speed do I need?"),
            _wrong("Go fast, around 1/1000 of a second, so the water comes out smooth and sharp.",
                   "That freezes every droplet — the opposite of silky. You want a slow exposure, roughly half a "
                   "second to two seconds, with the camera on a tripod and an ND filter if there's too much "
                   "light."),
        ],
        [
            _u("Callum and I — he's my husband, the one who keeps nicking my phone charger — are flying to Lisbon "
               "in September for our tenth anniversary. Which neighbourhood would you stay in if we want good "
               "food and to walk almost everywhere?"),
            _a("Príncipe Real or the edge of Chiado would suit you: both are leafy, full of good restaurants, and "
               "within walking distance of Bairro Alto, Baixa and the river. Bring shoes with grip, because the "
               "hills and polished cobbles get slippery."),
            _u("And since I've started eating fish again (pescatarian now, after eight years without meat or fish), "
               "which dishes there are worth planning a dinner around?"),
            _a("Grilled sardines if you catch the tail end of their season, bacalhau à Brás, arroz de marisco and "
               "polvo à lagareiro are the classics. A seafood hall like Cervejaria Ramiro is worth booking "
               "ahead."),
        ],
        [
            _u("Most mornings I do an open-water swim at Oriental Bay before my shift, and the water's dropped to "
               "about 13 degrees — is that a sensible temperature to keep going without a wetsuit, and for how many "
               "minutes is it wise to stay in?"),
            _a("Thirteen degrees is manageable once acclimatised, but keep it short: a common rule of thumb is no "
               "more than a minute per degree, and far less when you're new to it. Wear a bright cap, stay "
               "parallel to shore, and rewarm gradually with layers and a hot drink rather than a hot shower."),
            _u("Unrelated, but my double bass teacher says my intonation drifts once I get into thumb position. "
               "What kind of practice routine actually fixes that?"),
            _a("Slow scales against a drone are the classic fix, because every off note rubs against the steady "
               "pitch. Check each shift with harmonics at the octave and fifth, and record yourself so you hear "
               "the drift rather than guess at it."),
        ],
    ],
    "probes": [
        _fact("Could you tell me what I work as?", "air traffic", "controller", "ATC"),
        _fact("Which city am I based in?", "Wellington"),
        _fact("My spouse's name — do you remember it?", "Callum"),
        _fact("What kind of pet shares our home?", "Bartholomew", "African grey", "parrot"),
        _fact("What's my usual morning workout?", "swim", "swimming", "open-water"),
        _fact("Which instrument have I been taking lessons on?", "double bass", "upright bass", "contrabass"),
        _fact("What city is our upcoming couples' holiday in?", "Lisbon", "Portugal"),
        _updated("How would you describe the way I eat these days?", ["pescatarian"], ["vegetarian", "veggie"]),
        _correction("For that blurred, smooth-water effect in photos, what gear and settings do I need?",
                    "ND filter", "tripod", "neutral density"),
    ],
    "unrelated_howto": "What camera settings freeze a bird in flight?",
    "never_told": ["How many siblings have I got?", "Which football club do I cheer for?", "What was my degree in?"],
}

_KWAME = {
    "name": "Kwame", "lang": "en",
    "conversations": [
        [
            _u("Now that I'm fifty my GP keeps bringing up cholesterol, and since I spend ten hours a day at a desk "
               "translating contracts from French into English, I barely move. What small changes actually make a "
               "measurable difference — not a lifestyle overhaul, just things I'd realistically stick to?"),
            _a("Switch to oats for breakfast, add a handful of nuts and a portion of beans or lentils most days, and "
               "cook with olive oil instead of butter; together those can shave a noticeable amount off LDL. For "
               "movement, a ten-minute walk after lunch and standing for every phone call add up more than you'd "
               "think."),
            _u("I do still play five-a-side on Thursday nights — is one match a week worth much?"),
            _a("It's worth more than nothing, since short bursts of hard running are good for the heart, but one "
               "session a week won't move cholesterol by itself. Pair it with two or three brisk walks and you're "
               "close to the recommended 150 minutes."),
        ],
        [
            _u("My car wouldn't start in the supermarket car park this morning and a kind stranger had cables — "
               "what's the correct order for connecting jump leads, so I actually know next time?"),
            _wrong("Red to the flat battery's positive, red to the good battery's positive, black to the good "
                   "battery's negative, and finally black to the flat battery's negative terminal.",
                   "The last black clamp shouldn't go on the flat battery at all — clip it to bare, unpainted metal "
                   "on the dead car's engine block, away from the battery, so any spark happens well away from the "
                   "battery gases."),
            _u("Mum (Abena — she's over from Kumasi for a month) wants to see more of Ghent than the old centre; "
               "where would you take someone in her seventies who can't walk very far?"),
            _a("A canal boat tour covers a lot of the city sitting down, and a short taxi ride gets you to the MSK "
               "fine arts museum in Citadelpark, which has benches everywhere and a good café. Patershol is compact "
               "and flat, with lunch spots a few hundred metres apart."),
        ],
        [
            _u("I've been building a walnut bookcase in the garage — my first real woodwork project — and the "
               "shelves already sag a little in the middle. Would a back panel, a face frame or thicker boards fix "
               "it best?"),
            _a("A hardwood strip glued along the front edge of each shelf is the most effective fix for the span, "
               "and a back panel screwed into the rear edges stiffens them further. Thicker boards work too, but "
               "they're the priciest option."),
            _u("One complication: because of my latex allergy I wear nitrile gloves, so can I handle ordinary "
               "wood glues without trouble?"),
            _a("Standard PVA wood glues like Titebond contain no natural rubber latex, so they're generally fine. Be "
               "wary of some contact cements and rubber-based adhesives, and read the safety data sheet when in "
               "doubt."),
        ],
        [
            _u("After the knee thing I've packed in Thursday football and taken up padel with two neighbours — it's "
               "gentler on the joints, isn't it, or am I kidding myself?"),
            _a("Mostly gentler: the court is smaller, there's less sprinting and no tackles, so the knees take less "
               "impact. The twisting and sudden stops still load them, so wear proper court shoes and warm up with "
               "some side-to-side movement."),
            _u("Arsenal are away on Saturday, and I've said people can come round to watch at mine — what's a "
               "big-batch dish I could cook a day ahead and simply reheat?"),
            _a("A chilli, a chicken curry or a pot of jollof rice all taste better the next day and reheat well. "
               "Cool it quickly, refrigerate it, then reheat until piping hot right before kick-off."),
        ],
    ],
    "probes": [
        _fact("How do I earn a living?", "translator", "translation", "translating"),
        _fact("Where is my home these days?", "Ghent", "Gent"),
        _fact("What is my mother called?", "Abena"),
        _fact("What sort of thing do I like making with my hands?", "woodwork", "woodworking", "bookcase"),
        _fact("Which club are my loyalties with?", "Arsenal", "Gunners"),
        _fact("Is there a material my skin reacts to?", "latex"),
        _fact("What's my age?", "fifty", "50"),
        _updated("What's the sport I'm playing at the moment?", ["padel"], ["five-a-side"]),
        _correction("When I boost a dead battery from another car, where should the final negative cable be "
                    "attached?", "unpainted", "engine block", "bare metal"),
    ],
    "unrelated_howto": "What's the procedure for changing a flat tyre?",
    "never_told": ["What breed is my dog?", "Which university did I attend?", "What does my wife do for a job?"],
}

_DELPHINE = {
    "name": "Delphine", "lang": "en",
    "conversations": [
        [
            _u("Solveig (my wife) is hosting her book club here on Friday, and because we keep kosher I can't just "
               "order the usual charcuterie board — what could I put out that feels generous without mixing meat "
               "and dairy?"),
            _a("Go fully dairy: a cheese board with fruit, crackers and honey, a smoked-trout platter (fish is "
               "pareve), a big Greek salad and a lemon olive-oil cake. Keeping the whole spread dairy means nobody "
               "has to think about what goes with what."),
            _u("Also — totally different — what's the quickest way to find which process is hogging port 8080 on "
               "my Linux laptop? I suspect a data-logging script I left running."),
            _wrong("Run netstat -r and look for 8080 in the output; the process name will be listed next to it.",
                   "netstat -r only prints the routing table. Use sudo lsof -i :8080, or ss -ltnp | grep 8080, to "
                   "see which PID is holding the port."),
        ],
        [
            _u("I'm a marine biologist, and most weeks I'm out on a boat off Monterey counting sea otters — so my "
               "skin's getting hammered by sun and salt spray. What sunscreen actually stays on in those "
               "conditions without harming the kelp forest?"),
            _a("Look for a mineral sunscreen based on non-nano zinc oxide, labelled water resistant for 80 minutes, "
               "and skip oxybenzone and octinoxate. A long-sleeve UPF shirt and a neck gaiter cut down how often "
               "you need to reapply."),
            _u("Anselm, my eight-year-old, keeps begging to come along, and his class at Bayview Elementary has a "
               "careers week in May — is a research boat a terrible idea for a kid that age?"),
            _a("Not terrible if the skipper and your institution allow it: a calm-day trip close to shore, a "
               "properly fitted child life jacket and seasickness prep make it manageable. Many labs prefer a "
               "dockside visit at that age, which is still thrilling with otters in view."),
        ],
        [
            _u("Ever since I started pottery classes on Tuesday evenings I've been eyeing a wheel for home. Is a "
               "tabletop wheel good enough for a beginner making mugs and bowls, or would I outgrow it in a "
               "month?"),
            _a("A tabletop wheel is fine for mugs and small bowls, but most have limited torque and stall once you "
               "center more than two or three pounds of clay. If the budget stretches, a compact full-size wheel "
               "with a half-horsepower motor will last you years."),
            _u("Before I spend anything, though: in March I'm off to the Galápagos for three weeks to volunteer on "
               "a tortoise survey, so could you help me with a packing list for a field station where laundry is "
               "limited?"),
            _a("Quick-dry shirts and trousers (three of each), a sun hoodie, a wide-brimmed hat, sturdy boots, "
               "sandals, a rain shell, a headlamp, reef-safe sunscreen, insect repellent, a dry bag and a small "
               "bottle of travel wash so you can hand-wash in the evenings."),
        ],
        [
            _u("We've moved our son to the Montessori school on Lighthouse Avenue — he's thriving there. How can I "
               "support that kind of self-directed learning at home without turning the living room into a "
               "classroom?"),
            _a("Keep a few low, open shelves with a small rotating choice of materials, let him do real tasks like "
               "cooking and watering plants, and follow his questions with library books rather than worksheets. "
               "Order and independence matter more than extra stuff."),
        ],
    ],
    "probes": [
        _fact("In what field do I work?", "marine biologist", "marine biology", "marine"),
        _fact("Whereabouts is my fieldwork?", "Monterey"),
        _fact("Who's my spouse?", "Solveig"),
        _fact("What's my boy's first name?", "Anselm"),
        _fact("What creative thing am I learning on weeknights?", "pottery", "ceramics"),
        _fact("Do we follow any religious food rules at home?", "kosher"),
        _fact("What's my next trip abroad?", "Galápagos", "Galapagos"),
        _updated("Which school is my son enrolled at?", ["Montessori"], ["Bayview"]),
        _correction("On Linux, how can I tell what program is bound to a particular network port?",
                    "lsof", "ss -ltnp", "ss -tlnp"),
    ],
    "unrelated_howto": "How can I check which folders take up the most disk space on Linux?",
    "never_told": ["What does my brother do for work?", "What car am I driving at the moment?",
                   "Which instrument did I learn as a child?"],
}

_GIDEON = {
    "name": "Gideon", "lang": "en",
    "conversations": [
        [
            _u("Being type 1 diabetic turns long hikes into a planning exercise — last month my sugar crashed "
               "halfway up Mount LeConte. For a six-hour day hike, roughly how many carbs should I carry, and what "
               "kind travels best?"),
            _a("Many people plan on roughly 15 to 30 grams of carbohydrate per hour of steady hiking, adjusted to "
               "CGM readings and whatever insulin reduction your care team has agreed with you. Glucose tabs and "
               "gels for quick fixes, plus dried fruit, granola bars and a sandwich for slower fuel, all travel "
               "well."),
            _u("I've always got binoculars on me anyway (birding is half the reason I hike), so which warblers "
               "should I look out for in the Smokies in May?"),
            _a("May is peak time: black-throated blue, black-throated green, Blackburnian, chestnut-sided and "
               "Canada warblers at higher elevations, with hooded and worm-eating warblers lower down. Early "
               "mornings on the Alum Cave trail are reliable."),
        ],
        [
            _u("Can I use baking soda instead of baking powder? It's my brother Thaddeus's birthday tomorrow and "
               "I've run out of powder halfway through his cake."),
            _wrong("Yes, just swap them one-for-one; they do exactly the same job.",
                   "They don't. Baking soda is three to four times stronger and needs an acid to react — use about a "
                   "quarter of the amount and add something acidic like buttermilk, yoghurt or lemon juice."),
            _u("Cake rescued. Now that we've moved out to a little place outside Knoxville with two goats, I'm "
               "wondering whether goats can eat the leftover cake?"),
            _a("Better not: sugary baked goods can upset the rumen and cause bloat. A few pieces of apple or carrot "
               "or a handful of leafy greens make much safer treats."),
        ],
        [
            _u("I'm 27, and as a dental hygienist I spend most of the day hunched over people's mouths — lately my "
               "upper back is constantly stiff. What actually helps, given I can't change the job?"),
            _a("Magnifying loupes with a steep declination angle let you keep your head up, and a saddle stool "
               "keeps your spine closer to neutral. Between patients do chin tucks and doorway chest stretches, and "
               "try thoracic extensions over a foam roller in the evenings."),
            _u("Separately, I've signed up for a Spanish evening class at the community college, two nights a week "
               "— what's a realistic goal for six months?"),
            _a("With two classes a week plus some practice at home, a solid A2 in six months is realistic: you'd "
               "handle everyday conversations about work, family and plans in the present and past tense."),
        ],
        [
            _u("Small update: the evening class just wasn't clicking, so I dropped it and I'm doing Japanese "
               "instead — a friend and I want to visit Osaka next year. Should I learn kana first or go straight "
               "to spoken phrases?"),
            _a("Learn hiragana and katakana first; it takes two or three weeks and makes every textbook and app far "
               "easier. Run basic spoken phrases alongside so you can start speaking from day one."),
        ],
    ],
    "probes": [
        _fact("What's my occupation?", "hygienist", "dental"),
        _fact("Which place do I call home?", "Knoxville", "Tennessee"),
        _fact("Tell me my brother's name.", "Thaddeus"),
        _fact("What livestock do we keep?", "goat", "goats"),
        _fact("What do I enjoy doing outdoors besides walking?", "birding", "birdwatching", "birds"),
        _fact("Is there a medical condition you should keep in mind about me?", "diabetes", "diabetic", "type 1"),
        _fact("Do you know my age?", "27", "twenty-seven"),
        _updated("Which foreign language am I studying right now?", ["Japanese"], ["Spanish"]),
        _correction("If a recipe wants baking powder but all I've got is soda, how should I substitute it?",
                    "quarter", "buttermilk", "acidic"),
    ],
    "unrelated_howto": "How do I stop a cake from sinking in the middle?",
    "never_told": ["What's my girlfriend called?", "Which high school did I attend?", "Which name did I give my cat?"],
}

_ZHOU = {
    "name": "周晓雯", "lang": "zh",
    "conversations": [
        [
            _u("因为我在幼儿园带小班，每天从早说到晚，最近嗓子一直是哑的——除了喝水以外，还有什么护嗓的办法？"
               "有没有适合泡水喝的东西（我对花生过敏，含花生的就别推荐了）？"),
            _a("说话时放慢语速、用腹式呼吸，少扯着嗓子喊，上课可以戴个小蜜蜂扩音器。泡水可以试试胖大海、"
               "罗汉果、菊花或者蜂蜜柚子茶；如果沙哑超过两周，最好去耳鼻喉科看看。"),
            _u("顺便问一下，厦门这几天回南天，屋里到处湿漉漉的，衣服老是晾不干，有什么好办法？"),
            _a("回南天白天别开窗，关好门窗开空调的除湿模式或者用除湿机；衣服可以用烘干机，"
               "室内晾的时候对着风扇吹，地面拖完再用干拖把过一遍。"),
        ],
        [
            _u("自从我和老公阿哲都换了新手机，就一直想把旧手机里的微信聊天记录弄过来。这个要怎么转移到新手机上？"),
            _wrong("打开iCloud备份，新手机登录同一个Apple ID恢复一下就行，微信记录会跟着一起过去。",
                   "不对，iCloud不会完整备份微信聊天记录。要在旧手机微信的设置里找到“聊天记录迁移与备份”，"
                   "选“迁移”，两部手机登录同一个微信号、连同一个Wi-Fi，就能直接传过去。"),
            _u("还有个事，我家猫年糕最近每天半夜跑酷，把我们俩都吵醒，怎么才能让它晚上安静一点？"),
            _a("睡前陪它用逗猫棒玩十五到二十分钟，让它跑累，再喂当天最后一顿，猫吃饱后一般会睡一阵。"
               "白天多给它些玩具和爬架，半夜闹的时候别起来理它。"),
        ],
        [
            _u("我今年刚满三十，想给自己找个能长期坚持的爱好——小时候学过几年古筝，前几天又把琴从柜子里翻出来了"
               "（快十年没碰过）。成年人重新捡起来，每天练多久比较合适？"),
            _a("刚开始每天半小时到四十五分钟就够了，先花一周找回指法和手感，从以前弹过的曲子练起。"
               "记得先请人调好音、换掉老化的琴弦，义甲胶布也重新买一副。"),
            _u("春节要去婆家过年——在哈尔滨——我一个南方人从没经历过零下二十多度，衣服该怎么准备？"),
            _a("按三层来穿：贴身是羊毛或者速干保暖内衣，中间一层抓绒或羽绒内胆，外面一件过膝的厚羽绒服。"
               "帽子、围巾、手套和加绒防滑的雪地靴都要有，暖宝宝也多带几片。"),
        ],
        [
            _u("上个月我把之前的工作辞了，现在在家里开了个小小的烘焙工作室，主要接生日蛋糕的单子。"
               "想问一下，在家做蛋糕卖需要办什么证吗？"),
            _a("各地规定不太一样，一般要先办个体工商户营业执照，再申请食品经营许可或者小作坊登记，"
               "具体最好去当地市场监督管理局问清楚。在网上接单的话，平台通常也会要求上传这些证件。"),
        ],
    ],
    "probes": [
        _updated("我目前靠什么谋生？", ["烘焙", "蛋糕"], ["幼儿园"]),
        _fact("我在哪座城市生活？", "厦门", "Xiamen"),
        _fact("我丈夫的名字是？", "阿哲"),
        _fact("家里的宠物名字是啥来着？", "年糕"),
        _fact("我会弹哪种乐器？", "古筝", "guzheng"),
        _fact("有哪种食物我碰不得？", "花生", "peanut"),
        _fact("我今年几岁？", "三十", "30岁"),
        _fact("过年我们要去哪里？", "哈尔滨", "Harbin"),
        _correction("换了新手机以后，怎么把旧手机上的微信聊天内容搬过去？", "迁移与备份", "同一个Wi", "同一Wi"),
    ],
    "unrelated_howto": "微信怎么把某个群设成消息免打扰？",
    "never_told": ["我儿子在上几年级？", "我开的是什么车？", "我爸爸是做什么的？"],
}

TEST: list[USER] = [_ROSALIND, _KWAME, _DELPHINE, _GIDEON, _ZHOU]

# ------------------------------------------------------------------------------------------------ GENERAL

GENERAL_DEV: list[str] = [
    "How long should I boil an egg for a runny yolk?",
    "What is the capital of Canada?",
    "How do I reset my router?",
    "Why is the sky blue?",
    "How many ounces are in a pound?",
    "What's the difference between a virus and a bacterium?",
    "How do I get a red wine stain out of a carpet?",
    "Who wrote Pride and Prejudice?",
    "What's a good way to memorise a speech?",
    "How does compound interest work?",
    "Why does water boil at a lower temperature at high altitude?",
    "How can I make my phone battery last longer?",
    "What causes the seasons on Earth?",
    "How do I convert Celsius to Fahrenheit?",
    "What is photosynthesis?",
    "How should I store fresh basil?",
    "What's the tallest mountain in Africa?",
    "How do I unclog a bathroom sink without chemicals?",
    "When did the Berlin Wall fall?",
    "What does a VPN do?",
    "How many players are on a rugby union team?",
    "How do I write a polite email declining a meeting?",
    "What's the difference between affect and effect?",
    "How do vaccines train the immune system?",
    "What's the fastest land animal?",
    "How do I sharpen a kitchen knife with a whetstone?",
    "Why do onions make you cry?",
    "What is the Pythagorean theorem?",
    "How do I get rid of fruit flies in my kitchen?",
    "What year did humans first land on the Moon?",
    "怎样用电饭锅煮米饭？",
    "长城有多长？",
    "怎么清理电脑的C盘空间？",
    "为什么月亮会有阴晴圆缺？",
    "饺子皮怎么擀才圆？",
    "中国有多少个省级行政区？",
    "感冒了应该多喝水还是多睡觉？",
    "我的手机连不上WiFi怎么办？",
    "《红楼梦》的作者是谁？",
    "一公斤等于多少斤？",
]

GENERAL_TEST: list[str] = [
    "At what internal temperature is cooked chicken safe to eat?",
    "Which planet has the most moons?",
    "Is it bad to leave my laptop plugged in overnight?",
    "What's the capital of Australia?",
    "Why are there two high tides a day?",
    "Who painted the ceiling of the Sistine Chapel?",
    "How can you tell when an avocado is ripe?",
    "Explain inflation in simple terms.",
    "How many bones does an adult human skeleton have?",
    "What's the best way to clean a cast-iron pan?",
    "Why does bread go stale?",
    "How do I back up the photos on my phone?",
    "What does DNA stand for?",
    "How far away is the Moon?",
    "Weather versus climate: what separates them?",
    "How should a dress shirt be ironed?",
    "Which ocean is the deepest?",
    "Why do leap years exist?",
    "How can I stop my glasses fogging up when I wear a mask?",
    "Who invented the telephone?",
    "How fast does light travel?",
    "How do I descale a kettle?",
    "What are the signs of dehydration?",
    "How does a fridge keep food cold?",
    "What language is spoken in Brazil?",
    "How do I politely ask my landlord to fix something?",
    "When should you use 'fewer' rather than 'less'?",
    "How many minutes are in a week?",
    "Why do cats purr?",
    "Which desert is the largest in the world?",
    "包饺子的馅要怎么调？",
    "珠穆朗玛峰有多高？",
    "笔记本电脑怎么清灰？",
    "二十四节气是怎么来的？",
    "怎样判断西瓜熟没熟？",
    "唐朝的首都是哪里？",
    "我的电脑开机特别慢，可能是什么原因？",
    "发烧到多少度需要去医院？",
    "《西游记》里唐僧有几个徒弟？",
    "一亩地是多少平方米？",
]


if __name__ == "__main__":
    import re

    def _hits(text: str, keywords: list[str]) -> list[str]:  # as bench.quality._hits
        return [k for k in keywords if (k in text if any("\u4e00" <= ch <= "\u9fff" for ch in k) else
                                        re.search(rf"(?<!\w){re.escape(k)}(?!\w)", text, re.IGNORECASE))]

    def _texts(users: list[USER], general: list[str]) -> list[str]:
        out = list(general)
        for user in users:
            out += [m[k] for c in user["conversations"] for m in c for k in ("content", "correction") if k in m]
            out += [p["question"] for p in user["probes"]] + user["never_told"] + [user["unrelated_howto"]]
        return out

    def _grams(text: str) -> set[tuple[str, ...]]:
        tokens = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[\u4e00-\u9fff]", text.lower())
        return {tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)}

    def _check(user: USER) -> None:
        name, convs = user["name"], user["conversations"]
        assert user["lang"] in ("en", "zh") and 3 <= len(convs) <= 5, name
        said = [(i, m["content"]) for i, c in enumerate(convs) for m in c if m["role"] == "user"]
        for c in convs:
            assert [m["role"] for m in c] == ["user", "assistant"] * (len(c) // 2), name
        kinds = [p["kind"] for p in user["probes"]]
        assert kinds.count("updated") == 1 and kinds.count("correction") == 1, name
        assert 6 <= kinds.count("fact") <= 8, name
        wrong = [m for c in convs for m in c if m.get("feedback") == "dislike"]
        assert len(wrong) == 1 and wrong[0]["correction"] and wrong[0]["role"] == "assistant", name
        assert user["unrelated_howto"] and len(user["never_told"]) == 3, name
        for p in user["probes"]:
            q, kws = p["question"], p["keywords"]
            assert 1 <= len(kws) <= 3 and all(kws), (name, q)
            assert not _hits(q, kws + p.get("old", [])), (name, q)  # the question gives nothing away
            where = [i for i, text in said if _hits(text, kws)]
            if p["kind"] == "correction":
                assert _hits(wrong[0]["correction"], kws) and not _hits(wrong[0]["content"], kws), (name, q)
                assert not where, (name, q)
            elif p["kind"] == "fact":
                assert len(where) == 1, (name, q, where)  # stated exactly once
            else:
                before = [i for i, text in said if _hits(text, p["old"])]
                assert len(where) == 1 and len(before) == 1 and before[0] < where[0], (name, q, before, where)
                new_text = next(text for i, text in said if _hits(text, kws))
                assert not _hits(new_text, p["old"]), (name, q)  # the new statement never repeats the old value
        assert not any(_hits(m.get("content", ""), ["noted", "got it"]) for c in convs for m in c), name

    for split in (DEV, TEST):
        assert len(split) == 5 and [u["lang"] for u in split].count("zh") == 1
        for user in split:
            _check(user)
    for general in (GENERAL_DEV, GENERAL_TEST):
        assert len(general) == 40 and sum(bool(re.search(r"[\u4e00-\u9fff]", q)) for q in general) == 10
    names = [u["name"] for u in DEV + TEST]
    assert len(set(names)) == len(names)
    dev_grams = set().union(*map(_grams, _texts(DEV, GENERAL_DEV)))
    shared = {}
    for text in _texts(TEST, GENERAL_TEST):
        for gram in _grams(text) & dev_grams:
            shared.setdefault(" ".join(gram), text[:70])
    assert not shared, "\n".join(f"{g!r}: {t}" for g, t in sorted(shared.items()))

    for label, split in (("DEV", DEV), ("TEST", TEST)):
        probes = [p for u in split for p in u["probes"]]
        by_kind = {k: sum(p["kind"] == k for p in probes) for k in ("fact", "updated", "correction")}
        print(f"{label}: {len(split)} users, {sum(len(u['conversations']) for u in split)} conversations, "
              f"{by_kind['fact']} facts (+{by_kind['updated']} updated), probes {by_kind}, "
              f"{sum(len(u['never_told']) for u in split)} never-told")
    print("ok")
