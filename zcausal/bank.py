"""A seeded bank of parallel English / Chinese arithmetic word problems that small models answer.

    pairs = generate_bank(steps=1, size=1200, seed=0)     # list of dicts, like prompts.json's pairs
    pairs = bank_slice(steps=1, offset=900, limit=300)    # a slice of it, ids kept (bank1-0900...)

Why: a patch can only move an answer the model computes. Multi-step problems (prompts.json, MGSM)
are solved too rarely by small models to carry a causal test; one- and two-step problems with 2-3
digit answers are (with the direct template the 0.5B check model answered 3 of prompts.json's 44
multi-step problems and 2 of 80 of MGSM's). Every problem states its unit ("eggs" / "个鸡蛋"), so the
answer is written with a unit word and the words after the number show the output's language.

Each pair: id ("bank1-0042"), category, steps (1 or 2), en, zh, answer (int, 10..999), expr (the
arithmetic, which tests evaluate), unit_en, unit_zh, kind (the name of the function that drew it)
and values (what filled its format strings: names, objects, units and numbers). The same (steps,
size, seed) always gives the same list: ids are stable across runs and machines. The list is
shuffled, so the first N pairs (--limit N) mix every category. No project imports.

    partner = counterfactual(pair, seed=0)    # the same problem with other numbers

A counterfactual partner keeps the template, names, objects and units and re-draws the numbers
with the same digit counts, so that with a tokenizer that writes each digit as its own token (Qwen2)
the two prompts in one language differ only in the digits' tokens and every position aligns; its
answer's first digit differs from the problem's.
"""
import random

# (English plural, Chinese measure word, Chinese noun): countable things.
THINGS = [
    ("apples", "个", "苹果"), ("eggs", "个", "鸡蛋"), ("pencils", "支", "铅笔"),
    ("books", "本", "书"), ("marbles", "颗", "弹珠"), ("stickers", "张", "贴纸"),
    ("cookies", "块", "饼干"), ("flowers", "朵", "花"), ("balloons", "个", "气球"),
    ("cards", "张", "卡片"), ("stamps", "枚", "邮票"), ("shells", "个", "贝壳"),
    ("candies", "颗", "糖果"), ("oranges", "个", "橙子"), ("notebooks", "本", "笔记本"),
    ("buttons", "颗", "纽扣"),
]
# (English name, pronoun subject, pronoun object, Chinese name, Chinese pronoun)
PEOPLE = [
    ("Tom", "he", "him", "汤姆", "他"), ("Anna", "she", "her", "安娜", "她"),
    ("Li Ming", "he", "him", "李明", "他"), ("Mia", "she", "her", "米娅", "她"),
    ("Sam", "he", "him", "小山", "他"), ("Lucy", "she", "her", "露西", "她"),
    ("Wang Fang", "she", "her", "王芳", "她"), ("Jack", "he", "him", "杰克", "他"),
]
CONTAINERS = [("box", "boxes", "个", "盒子"), ("bag", "bags", "个", "袋子"),
              ("basket", "baskets", "个", "篮子"), ("jar", "jars", "个", "罐子")]


# (English, Chinese measure word, Chinese noun): things with a price.
ITEMS = [("book", "本", "书"), ("schoolbag", "个", "书包"), ("lamp", "盏", "台灯"),
         ("game", "个", "游戏"), ("jacket", "件", "夹克"), ("chair", "把", "椅子"),
         ("kettle", "个", "水壶"), ("clock", "个", "钟")]


def _items(rng, n):
    out = {}
    for (en, cl, zh), name in zip(rng.sample(ITEMS, n), ("x", "y")):
        out.update({name: en, f"{name}_cl": cl, f"{name}_zh": zh})
    return out


def _thing(rng):
    en, cl, zh = rng.choice(THINGS)
    return dict(obj=en, cl=cl, obj_zh=zh)


def _people(rng):
    a, b = rng.sample(PEOPLE, 2)
    return dict(A=a[0], he=a[1], He=a[1].capitalize(), him=a[2], A_zh=a[3], ta=a[4], B=b[0],
                B_zh=b[3])


def _container(rng):
    one, many, cl, zh = rng.choice(CONTAINERS)
    return dict(box=one, boxes=many, box_cl=cl, box_zh=zh)


def _thing_unit(v):
    return v["obj"], v["cl"] + v["obj_zh"]


# ----------------------------------------------------------------------------------------------
# Problem kinds. Each draws its numbers with `rng` and returns a Problem; the answer is computed
# here in Python, the expression is kept as text (tests evaluate it against the answer).

class Problem(tuple):
    """(category, en, zh, expr, answer, values, (unit_en, unit_zh)): en, zh and expr are format
    strings filled from `values`."""
    def __new__(cls, category, en, zh, expr, answer, values, units):
        return super().__new__(cls, (category, en, zh, expr, answer, values, units))


def sum_things(rng):
    v = dict(_thing(rng), **_people(rng), a=rng.randint(12, 480), b=rng.randint(11, 480))
    return Problem("sums", "{A} has {a} {obj}. {B} gives {him} {b} more {obj}. How many {obj} does "
                   "{A} have now?", "{A_zh}有{a}{cl}{obj_zh}，{B_zh}又给了{ta}{b}{cl}{obj_zh}。"
                   "{A_zh}现在有多少{cl}{obj_zh}？", "{a}+{b}", v["a"] + v["b"], v, _thing_unit(v))


def difference_things(rng):
    v = dict(_thing(rng), **_people(rng), a=rng.randint(30, 900))
    v["b"] = rng.randint(5, v["a"] - 10)
    return Problem("differences", "{A} had {a} {obj} and gave {b} of them to {B}. How many {obj} "
                   "does {A} have left?", "{A_zh}有{a}{cl}{obj_zh}，送给{B_zh}{b}{cl}。{A_zh}还剩"
                   "多少{cl}{obj_zh}？", "{a}-{b}", v["a"] - v["b"], v, _thing_unit(v))


def product_things(rng):
    v = dict(_thing(rng), **_container(rng), a=rng.randint(3, 9), b=rng.randint(4, 60))
    return Problem("products", "There are {a} {boxes} with {b} {obj} in each {box}. How many {obj} "
                   "are there in total?", "有{a}{box_cl}{box_zh}，每{box_cl}{box_zh}里有{b}{cl}"
                   "{obj_zh}。一共有多少{cl}{obj_zh}？", "{a}*{b}", v["a"] * v["b"], v,
                   _thing_unit(v))


def quotient_things(rng):
    v = dict(_thing(rng), **_people(rng), b=rng.randint(2, 9), q=rng.randint(10, 99))
    v["a"] = v["b"] * v["q"]
    return Problem("quotients", "{A} shares {a} {obj} equally among {b} friends. How many {obj} "
                   "does each friend get?", "{A_zh}把{a}{cl}{obj_zh}平均分给{b}个朋友。每个朋友分到"
                   "多少{cl}{obj_zh}？", "{a}/{b}", v["q"], v, _thing_unit(v))


def money_total(rng):
    v = dict(_items(rng, 2), a=rng.randint(12, 450), b=rng.randint(11, 450))
    return Problem("money", "A {x} costs {a} dollars and a {y} costs {b} dollars. How many dollars "
                   "do the two cost together?", "一{x_cl}{x_zh}{a}元，一{y_cl}{y_zh}{b}元。两样一共"
                   "多少元？", "{a}+{b}", v["a"] + v["b"], v, ("dollars", "元"))


def money_change(rng):
    v = dict(_items(rng, 1), **_people(rng), a=rng.choice([100, 200, 500, 1000]))
    v["b"] = rng.randint(11, v["a"] - 10)
    return Problem("money", "{A} pays {a} dollars for a {x} that costs {b} dollars. How many "
                   "dollars of change does {he} get?", "{A_zh}买一{x_cl}{x_zh}要{b}元，付了{a}元。"
                   "应该找回多少元？", "{a}-{b}", v["a"] - v["b"], v, ("dollars", "元"))


def money_each(rng):
    v = dict(_items(rng, 1), a=rng.randint(2, 9), b=rng.randint(6, 99))
    return Problem("money", "One {x} costs {b} dollars. How many dollars do {a} of them cost?",
                   "一{x_cl}{x_zh}{b}元。{a}{x_cl}{x_zh}一共多少元？", "{a}*{b}", v["a"] * v["b"], v,
                   ("dollars", "元"))


def time_total(rng):
    v = dict(_people(rng), a=rng.randint(15, 300), b=rng.randint(10, 300))
    return Problem("time", "{A} reads for {a} minutes in the morning and {b} minutes in the "
                   "evening. How many minutes does {he} read in total?", "{A_zh}早上读书{a}分钟，"
                   "晚上读书{b}分钟。{ta}一共读书多少分钟？", "{a}+{b}", v["a"] + v["b"], v,
                   ("minutes", "分钟"))


def time_days(rng):
    v = dict(_people(rng), a=rng.randint(12, 95), b=rng.randint(2, 9))
    return Problem("time", "{A} practises the piano for {a} minutes every day. How many minutes "
                   "does {he} practise in {b} days?", "{A_zh}每天练琴{a}分钟。{b}天一共练琴多少分钟？",
                   "{a}*{b}", v["a"] * v["b"], v, ("minutes", "分钟"))


def time_hours(rng):
    v = dict(h=rng.randint(2, 9), m=rng.randint(5, 55))
    return Problem("time", "A trip takes {h} hours and {m} minutes. How many minutes does the trip "
                   "take?", "一次旅行用了{h}小时{m}分钟。这次旅行一共用了多少分钟？", "{h}*60+{m}",
                   v["h"] * 60 + v["m"], v, ("minutes", "分钟"))


def length_left(rng):
    v = dict(_people(rng), a=rng.randint(40, 950))
    v["b"] = rng.randint(5, v["a"] - 12)
    return Problem("measures", "A rope is {a} meters long. {A} cuts off {b} meters. How many meters "
                   "of rope are left?", "一根绳子长{a}米，{A_zh}剪掉了{b}米。还剩多少米？", "{a}-{b}",
                   v["a"] - v["b"], v, ("meters", "米"))


def distance_speed(rng):
    v = dict(a=rng.randint(12, 120), b=rng.randint(2, 8))
    return Problem("measures", "A car travels {a} kilometers every hour. How many kilometers does "
                   "it travel in {b} hours?", "一辆汽车每小时行驶{a}公里。{b}小时行驶多少公里？",
                   "{a}*{b}", v["a"] * v["b"], v, ("kilometers", "公里"))


def weight_total(rng):
    v = dict(a=rng.randint(12, 400), b=rng.randint(11, 400))
    return Problem("measures", "A truck carries {a} kilograms of rice and {b} kilograms of flour. "
                   "How many kilograms does it carry in total?", "一辆卡车运了{a}千克大米和{b}千克"
                   "面粉。一共运了多少千克？", "{a}+{b}", v["a"] + v["b"], v, ("kilograms", "千克"))


def ages(rng):
    v = dict(_people(rng), a=rng.randint(6, 40), b=rng.randint(20, 45))
    return Problem("ages", "{A} is {a} years old. {B} is {b} years older than {A}. How many years "
                   "old is {B}?", "{A_zh}{a}岁。{B_zh}比{A_zh}大{b}岁。{B_zh}多少岁？", "{a}+{b}",
                   v["a"] + v["b"], v, ("years", "岁"))


def temperature(rng):
    v = dict(a=rng.randint(10, 35), b=rng.randint(3, 15))
    return Problem("temperature", "In the morning it was {a} degrees. By noon it was {b} degrees "
                   "warmer. How many degrees was it at noon?", "早上气温是{a}度，到中午升高了{b}度。"
                   "中午气温是多少度？", "{a}+{b}", v["a"] + v["b"], v, ("degrees", "度"))


def area(rng):
    v = dict(a=rng.randint(3, 30), b=rng.randint(3, 30))
    return Problem("area", "A garden is {a} meters long and {b} meters wide. How many square "
                   "meters is its area?", "一个花园长{a}米，宽{b}米。它的面积是多少平方米？",
                   "{a}*{b}", v["a"] * v["b"], v, ("square meters", "平方米"))


def class_count(rng):
    v = dict(a=rng.randint(3, 9), b=rng.randint(18, 45))
    return Problem("counting", "A school has {a} classes with {b} students in each class. How many "
                   "students are there?", "一所学校有{a}个班，每个班有{b}名学生。一共有多少名学生？",
                   "{a}*{b}", v["a"] * v["b"], v, ("students", "名学生"))


ONE_STEP = [sum_things, difference_things, product_things, quotient_things, money_total,
            money_change, money_each, time_total, time_days, time_hours, length_left,
            distance_speed, weight_total, ages, temperature, area, class_count]


def buy_and_give(rng):
    v = dict(_thing(rng), **_people(rng), a=rng.randint(12, 300), b=rng.randint(10, 300))
    v["c"] = rng.randint(5, v["a"] + v["b"] - 10)
    return Problem("sums", "{A} has {a} {obj}. {He} buys {b} more and then gives {c} to {B}. How "
                   "many {obj} does {A} have now?", "{A_zh}有{a}{cl}{obj_zh}，又买了{b}{cl}，然后送给"
                   "{B_zh}{c}{cl}。{A_zh}现在有多少{cl}{obj_zh}？", "{a}+{b}-{c}",
                   v["a"] + v["b"] - v["c"], v, _thing_unit(v))


def boxes_plus_loose(rng):
    v = dict(_thing(rng), **_container(rng), a=rng.randint(3, 9), b=rng.randint(4, 40),
             c=rng.randint(3, 60))
    return Problem("products", "There are {a} {boxes} with {b} {obj} in each {box}, and {c} more "
                   "{obj} on the table. How many {obj} are there in total?", "有{a}{box_cl}{box_zh}，"
                   "每{box_cl}{box_zh}里有{b}{cl}{obj_zh}，桌上还有{c}{cl}{obj_zh}。一共有多少{cl}"
                   "{obj_zh}？", "{a}*{b}+{c}", v["a"] * v["b"] + v["c"], v, _thing_unit(v))


def shopping_two(rng):
    v = dict(_items(rng, 2), **_people(rng), a=rng.randint(2, 6), b=rng.randint(6, 60),
             c=rng.randint(8, 150))
    return Problem("money", "{A} buys {a} {x}s at {b} dollars each and a {y} for {c} dollars. How "
                   "many dollars does {he} spend?", "{A_zh}买了{a}{x_cl}{x_zh}，每{x_cl}{b}元，又买了"
                   "一{y_cl}{y_zh}，{c}元。{ta}一共花了多少元？", "{a}*{b}+{c}",
                   v["a"] * v["b"] + v["c"], v, ("dollars", "元"))


def change_after_two(rng):
    v = dict(_items(rng, 2), **_people(rng), p=rng.choice([200, 500, 1000]),
             a=rng.randint(11, 150), b=rng.randint(11, 150))
    return Problem("money", "{A} pays {p} dollars for a {x} that costs {a} dollars and a {y} that "
                   "costs {b} dollars. How many dollars of change does {he} get?", "{A_zh}买一{x_cl}"
                   "{x_zh}花了{a}元，买一{y_cl}{y_zh}花了{b}元，付了{p}元。应该找回多少元？",
                   "{p}-{a}-{b}", v["p"] - v["a"] - v["b"], v, ("dollars", "元"))


def time_week(rng):
    v = dict(_people(rng), a=rng.randint(12, 60), b=rng.randint(2, 6), c=rng.randint(10, 90))
    return Problem("time", "{A} runs {a} minutes a day for {b} days, and {c} minutes on the "
                   "weekend. How many minutes does {he} run in total?", "{A_zh}每天跑步{a}分钟，跑了"
                   "{b}天，周末又跑了{c}分钟。{ta}一共跑了多少分钟？", "{a}*{b}+{c}",
                   v["a"] * v["b"] + v["c"], v, ("minutes", "分钟"))


def trip_two_legs(rng):
    v = dict(a=rng.randint(20, 90), b=rng.randint(2, 5), c=rng.randint(10, 150))
    return Problem("measures", "A bus travels {a} kilometers per hour for {b} hours and then {c} "
                   "more kilometers. How many kilometers does it travel in total?", "一辆公共汽车每"
                   "小时行驶{a}公里，行驶了{b}小时，然后又行驶了{c}公里。它一共行驶了多少公里？",
                   "{a}*{b}+{c}", v["a"] * v["b"] + v["c"], v, ("kilometers", "公里"))


def rope_two_cuts(rng):
    v = dict(_people(rng), a=rng.randint(60, 950))
    v["b"] = rng.randint(5, v["a"] // 2)
    v["c"] = rng.randint(5, v["a"] - v["b"] - 12)
    return Problem("measures", "A rope is {a} meters long. {A} cuts off {b} meters and then {c} "
                   "meters. How many meters are left?", "一根绳子长{a}米，{A_zh}先剪掉{b}米，又剪掉"
                   "{c}米。还剩多少米？", "{a}-{b}-{c}", v["a"] - v["b"] - v["c"], v,
                   ("meters", "米"))


def ages_later(rng):
    v = dict(_people(rng), a=rng.randint(5, 40), b=rng.randint(3, 30), c=rng.randint(2, 20))
    return Problem("ages", "{A} is {a} years old and {B} is {b} years older. How many years old "
                   "will {B} be in {c} years?", "{A_zh}{a}岁，{B_zh}比{ta}大{b}岁。{c}年后{B_zh}"
                   "多少岁？", "{a}+{b}+{c}", v["a"] + v["b"] + v["c"], v, ("years", "岁"))


def share_after_buying(rng):
    v = dict(_thing(rng), **_people(rng), b=rng.randint(2, 9), q=rng.randint(10, 60))
    v["c"] = rng.randint(5, v["b"] * v["q"] - 5)
    v["a"] = v["b"] * v["q"] - v["c"]
    return Problem("quotients", "{A} has {a} {obj} and buys {c} more. {He} shares them equally "
                   "among {b} friends. How many {obj} does each friend get?", "{A_zh}有{a}{cl}"
                   "{obj_zh}，又买了{c}{cl}。{ta}把它们平均分给{b}个朋友。每个朋友分到多少{cl}"
                   "{obj_zh}？", "({a}+{c})/{b}", v["q"], v, _thing_unit(v))


def temperature_two(rng):
    v = dict(a=rng.randint(15, 35), b=rng.randint(3, 12), c=rng.randint(2, 10))
    return Problem("temperature", "In the morning it was {a} degrees. It got {b} degrees warmer by "
                   "noon and then {c} degrees colder by evening. How many degrees was it in the "
                   "evening?", "早上气温是{a}度，到中午升高了{b}度，到傍晚又下降了{c}度。傍晚气温是"
                   "多少度？", "{a}+{b}-{c}", v["a"] + v["b"] - v["c"], v, ("degrees", "度"))


TWO_STEP = [buy_and_give, boxes_plus_loose, shopping_two, change_after_two, time_week,
            trip_two_legs, rope_two_cuts, ages_later, share_after_buying, temperature_two]
KINDS = {1: ONE_STEP, 2: TWO_STEP}
BANK_SIZE = 1200  # per number of steps


def draw_problem(kind, rng):
    """One filled problem of `kind` (a dict without id), or None when its answer falls outside
    10..999 (2-3 digits: a first digit that can move, and few enough digits to score)."""
    category, en, zh, expr, answer, v, (unit_en, unit_zh) = kind(rng)
    if not 10 <= answer <= 999:
        return None
    return dict(category=category, en=en.format(**v), zh=zh.format(**v), answer=int(answer),
                expr=expr.format(**v), unit_en=unit_en, unit_zh=unit_zh, kind=kind.__name__,
                values=dict(v))


def generate_bank(steps=1, size=BANK_SIZE, seed=0):
    """`size` distinct parallel problems of `steps` (1 or 2) steps, seeded (see the module
    docstring). The kinds are drawn in turn, so each is about equally frequent."""
    if steps not in KINDS:
        raise ValueError(f"steps must be 1 or 2, not {steps}")
    kinds = KINDS[steps]
    rng = random.Random(f"bank-{steps}-{seed}")
    seen, pairs = set(), []
    for attempt in range(100 * size):
        if len(pairs) == size:
            break
        problem = draw_problem(kinds[attempt % len(kinds)], rng)
        if problem is not None and problem["en"] not in seen:
            seen.add(problem["en"])
            pairs.append(problem)
    if len(pairs) < size:
        raise RuntimeError(f"could not draw {size} distinct {steps}-step problems")
    rng.shuffle(pairs)
    return [dict(id=f"bank{steps}-{i:04d}", steps=steps, **p) for i, p in enumerate(pairs)]


KIND_NAMES = {kind.__name__: kind for kinds in KINDS.values() for kind in kinds}


def _digits(values):
    """Digit count of every number among a problem's values: {name: count}."""
    return {name: len(str(value)) for name, value in values.items() if isinstance(value, int)}


def counterfactual(pair, seed=0, tries=20_000):
    """The counterfactual partner of a bank pair (a dict like the pair's, id "<id>-cf<seed>"): its
    kind draws numbers (so every constraint of the kind holds: a difference stays positive, a
    quotient whole) until each number has the digit count of the pair's and the answer (10..999)
    has another first digit; names, objects and units are the pair's. Seeded by the pair's id and
    `seed`. A ValueError for a pair without kind and values (not from the bank) or when no draw
    of `tries` fits (a few two-step problems have none: 500 dollars less two prices of 3 digits,
    at most 150 each, always starts with 2)."""
    if "kind" not in pair or "values" not in pair:
        raise ValueError(f"{pair.get('id')}: not a bank problem (no kind and values to re-draw)")
    kind, values = KIND_NAMES[pair["kind"]], pair["values"]
    digits = _digits(values)
    rng = random.Random(f"counterfactual-{pair['id']}-{seed}")
    for _ in range(tries):
        _, en, zh, expr, answer, drawn, _ = kind(rng)
        numbers = {name: drawn[name] for name in digits}
        if _digits(numbers) != digits or not 10 <= answer <= 999 \
                or str(answer)[0] == str(pair["answer"])[0]:
            continue
        v = dict(values, **numbers)
        return dict(pair, id=f"{pair['id']}-cf{seed}", en=en.format(**v), zh=zh.format(**v),
                    answer=int(answer), expr=expr.format(**v), values=v)
    raise ValueError(f"{pair['id']}: no counterfactual with the same digit counts in {tries} draws")


def bank_slice(steps=1, offset=0, limit=None, seed=0):
    """generate_bank(steps, seed=seed)[offset:offset + limit] (limit None: to the end), with the
    bank's own ids: the slice a run with --bank-offset / --limit uses. Development runs use the
    bank from its start; the confirmatory slice (docs/preregistration.json) starts far beyond
    them, so its problems were never used in development."""
    pairs = generate_bank(steps, seed=seed)[offset:]
    return pairs if limit is None else pairs[:limit]
