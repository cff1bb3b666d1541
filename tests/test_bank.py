"""The problem bank (zcausal/bank.py), token alignment of the direct template, the first-digit swap
partners, the language classes of the vocabulary and the solved-pair selection (answered.py)."""
import ast
import operator
import re
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pytest
import torch

import common
from zcausal import answered, bank, problems, runs

MGSM = Path(__file__).resolve().parents[2] / "shared" / "data" / "mgsm"
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def evaluate(expr):
    """The value of an arithmetic string (+ - * / parentheses, integers), without eval."""
    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"not plain arithmetic: {expr!r}")
    return walk(ast.parse(expr, mode="eval").body)


@pytest.fixture(scope="module")
def banks():
    return {steps: bank.generate_bank(steps) for steps in (1, 2)}


@pytest.fixture(scope="module")
def tok():
    return common.tiny_tokenizer()


@pytest.mark.parametrize("steps", [1, 2])
def test_every_answer_is_its_expression_and_has_two_or_three_digits(banks, steps):
    for p in banks[steps]:
        assert evaluate(p["expr"]) == p["answer"], p["id"]
        assert isinstance(p["answer"], int) and 10 <= p["answer"] <= 999, p["id"]
        operations = sum(p["expr"].count(op) for op in "+-*/")
        if steps == 1 and re.fullmatch(r"\d\*60\+\d+", p["expr"]):
            operations -= 1  # hours and minutes to minutes: one step in words
        assert p["steps"] == steps and operations == steps, p["id"]


@pytest.mark.parametrize("steps", [1, 2])
def test_problems_are_distinct_parallel_and_state_their_numbers_and_unit(banks, steps):
    pairs = banks[steps]
    assert len(pairs) >= 1000
    assert len({p["en"] for p in pairs}) == len({p["zh"] for p in pairs}) == len(pairs)
    assert len({p["id"] for p in pairs}) == len(pairs)
    for p in pairs:
        numbers = re.findall(r"\d+", p["expr"])
        numbers = [n for n in numbers if n != "60" or "60" in p["en"]]  # hours -> minutes
        for n in numbers:
            assert re.search(rf"(?<!\d){n}(?!\d)", p["en"]) and re.search(rf"(?<!\d){n}(?!\d)",
                                                                           p["zh"]), p["id"]
        assert p["unit_en"].split()[-1] in p["en"], p["id"]
        assert p["unit_zh"][-1] in p["zh"], p["id"]
        assert not re.search(r"[\u4e00-\u9fff]", p["en"]) and not re.search(r"[A-Za-z]", p["zh"])


def test_the_bank_covers_the_categories_and_is_seeded(banks):
    assert {"sums", "differences", "products", "quotients", "money", "time", "measures"} <= \
        {p["category"] for p in banks[1]}
    assert bank.generate_bank(1, size=50) == bank.generate_bank(1, size=50)
    assert bank.generate_bank(1, size=50, seed=1) != bank.generate_bank(1, size=50)
    first_digits = {problems.first_digit(p["answer"]) for p in banks[1][:100]}
    assert len(first_digits) >= 7  # the first 100 mix first digits: swap partners can differ


def _args(**kw):
    base = dict(prompts=problems.BANK, bank_steps=1, prompts_en=None, prompts_zh=None, limit=None)
    return Namespace(**dict(base, **kw))


def test_load_pairs_selects_the_bank_by_flag():
    assert len(problems.load_pairs(_args())) == bank.BANK_SIZE
    assert len(problems.load_pairs(_args(), bank_limit=300)) == 300
    two = problems.load_pairs(_args(bank_steps=2, limit=7), bank_limit=300)
    assert len(two) == 7 and all(p["steps"] == 2 for p in two)
    assert problems.load_templates(_args())["direct"] == \
        problems.load_prompts()["templates"]["direct"]
    with pytest.raises(runs.UsageError, match="--limit"):
        problems.load_pairs(_args(limit=5000))


def test_bank_offset_takes_the_slice_from_there_with_the_banks_own_ids():
    pairs = problems.load_pairs(_args(bank_offset=900, limit=5))
    assert [p["id"] for p in pairs] == [f"bank1-{i:04d}" for i in range(900, 905)]
    assert pairs == bank.generate_bank(1)[900:905] == bank.bank_slice(1, 900, 5)
    assert len(problems.load_pairs(_args(bank_offset=900), bank_limit=80)) == 80
    assert len(problems.load_pairs(_args(bank_offset=1100))) == 100  # to the bank's end
    with pytest.raises(runs.UsageError, match="--bank-offset 1200 is out of range"):
        problems.load_pairs(_args(bank_offset=1200))
    with pytest.raises(runs.UsageError, match="--bank-offset 900 applies to --prompts bank"):
        problems.load_pairs(_args(bank_offset=900, prompts=problems.DEFAULT_PROMPTS))
    with pytest.raises(runs.UsageError, match="--limit"):  # --limit counts from the offset
        problems.load_pairs(_args(bank_offset=900, limit=301))


def _alignment_sets(banks):
    sets = {"prompts.json": problems.load_prompts()["pairs"], "bank1": banks[1],
            "bank2": banks[2]}
    if (MGSM / "mgsm_en.tsv").is_file():
        sets["mgsm"] = problems.read_mgsm(MGSM / "mgsm_en.tsv", MGSM / "mgsm_zh.tsv")[:50]
    return sets


def test_both_languages_end_on_the_same_token_before_the_first_digit(tok, banks):
    """Qwen2's pre-tokenizer (which the tiny tokenizer uses): for every pair of prompts.json, the
    bank and MGSM's first 50 (where the data is present), the English and Chinese direct prompts
    end with the same token id, and the answer's first digit is the next token."""
    template = problems.load_prompts()["templates"]["direct"]
    for name, pairs in _alignment_sets(banks).items():
        assert problems.aligned_ends(tok, template, pairs) == [], name
        pair = pairs[0]
        ends = {lang: tok(problems.format_prompt(template[lang], pair[lang])[0],
                          add_special_tokens=False)["input_ids"][-1] for lang in ("en", "zh")}
        assert ends["en"] == ends["zh"] and tok.decode([ends["en"]]) == " "


def test_a_template_ending_on_different_tokens_is_found(tok):
    template = dict(problems.load_prompts()["templates"]["direct"])
    template["zh"] = template["zh"].rstrip(" ")  # "答案是" then the digits: the old template
    pairs = problems.load_prompts()["pairs"][:3]
    found = problems.aligned_ends(tok, template, pairs)
    assert [pid for pid, _ in found] == [p["id"] for p in pairs]
    assert "different tokens" in found[0][1]


def test_swap_partners_differ_in_first_digit():
    answers = [12, 15, 23, 27, 31, 38, 45, 49, 56, 61]
    perm = problems.derangement(answers, seed=0, key=problems.first_digit)
    assert sorted(perm) == list(range(10)) and all(i != j for i, j in enumerate(perm))
    assert all(str(answers[i])[0] != str(answers[j])[0] for i, j in enumerate(perm))
    assert problems.first_digit(75) == problems.first_digit(7.5) == "7"


def test_language_classes_and_margin(tok):
    classes = common.LanguageClasses(tok)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert all(classes.latin[i] and not classes.cjk[i] for i in ids("apples"))
    assert all(classes.cjk[i] and not classes.latin[i] for i in ids("苹果"))
    assert ids(" ") == [classes.space_id] and not classes.latin[classes.space_id] \
        and not classes.cjk[classes.space_id]
    V = len(tok)
    logits = torch.full((2, V), -30.0)
    logits[0, ids("apples")[0]] = 5.0            # row 0: an English word next
    logits[1, classes.space_id] = 5.0            # row 1: a space, then (below) a Chinese word
    after_space = torch.full((2, V), -30.0)
    after_space[:, ids("苹果")[0]] = 5.0
    margin = common.language_margin(torch.log_softmax(logits, -1),
                                    torch.log_softmax(after_space, -1), classes)
    assert margin[0] > 10 and margin[1] < -10
    # without the space probe, row 1's Chinese word is invisible: the margin is near 0
    blind = common.language_margin(torch.log_softmax(logits, -1), None, classes)
    assert abs(float(blind[1])) < abs(float(margin[1]))


def test_kept_mask_modes_and_the_stop_message():
    table = pd.DataFrame({"problem_id": list("abcd"), "answer": [1, 2, 3, 4],
                          "correct_en": [True, True, False, False],
                          "correct_zh": [True, False, True, False]})
    assert answered.kept_mask(table, "both") == [True, False, False, False]
    assert answered.kept_mask(table, "en") == [True, True, False, False]
    assert answered.kept_mask(table, "any") == [True, True, True, False]
    assert answered.kept_mask(table, "off") == [True] * 4
    record = answered.solved_record(table, "both")
    assert record == dict(mode="both", tried=4, correct_en=2, correct_zh=2, correct_both=1, kept=1)
    answered.require_kept(record, 1, "x")
    with pytest.raises(runs.UsageError, match=r"only 1 of 4 pairs kept by --solved both.*--limit"):
        answered.require_kept(record, 2, "the sweep")


def test_answer_table_reads_the_models_greedy_answers(tiny):
    model, tok = tiny
    pairs = bank.generate_bank(1, size=4)
    template = problems.load_prompts()["templates"]["direct"]
    table = answered.answer_table(model, tok, pairs, template, "direct", batch_size=3)
    assert list(table.problem_id) == [p["id"] for p in pairs]
    for lang in ("en", "zh"):
        for row in table.itertuples():
            output, answer = getattr(row, f"output_{lang}"), getattr(row, f"answer_{lang}")
            assert answer == problems.first_number(output) or (answer is None and
                                                                problems.first_number(output)
                                                                is None)
            assert getattr(row, f"correct_{lang}") == problems.answers_equal(answer, row.answer)


# ----------------------------------------------------------------------------------------------
# Counterfactual partners: the same problem with other numbers of the same digit counts

def _partners(pairs, seed=0):
    """[(pair, partner)] of the pairs that have one, and the pairs that have none."""
    found, missing = [], []
    for p in pairs:
        try:
            found.append((p, bank.counterfactual(p, seed)))
        except ValueError:
            missing.append(p)
    return found, missing


@pytest.mark.parametrize("steps", [1, 2])
def test_counterfactual_partners_change_the_numbers_and_the_first_digit_only(banks, steps):
    found, missing = _partners(banks[steps][:300])
    assert len(found) >= 290
    # the only kind without a partner for some problems: the change from 500 (1000) dollars
    # after two prices of 3 digits (100..150) always starts with 2 (7)
    assert all(p["kind"] == "change_after_two" and p["values"]["p"] in (500, 1000)
               for p in missing)
    for p, c in found:
        assert evaluate(c["expr"]) == c["answer"] and 10 <= c["answer"] <= 999, c["id"]
        assert problems.first_digit(c["answer"]) != problems.first_digit(p["answer"]), c["id"]
        assert c["id"] == p["id"] + "-cf0"
        for key in ("category", "steps", "kind", "unit_en", "unit_zh"):
            assert c[key] == p[key], (c["id"], key)
        words = {k: v for k, v in p["values"].items() if not isinstance(v, int)}
        assert {k: v for k, v in c["values"].items() if not isinstance(v, int)} == words
        assert [len(str(v)) for v in c["values"].values() if isinstance(v, int)] == \
            [len(str(v)) for v in p["values"].values() if isinstance(v, int)], c["id"]
    p = found[0][0]
    assert bank.counterfactual(p, 0) == found[0][1]  # seeded
    assert any(bank.counterfactual(p, 1)["answer"] != c["answer"] for p, c in found[:10])


def test_a_problem_outside_the_bank_has_no_counterfactual():
    with pytest.raises(ValueError, match="not a bank problem"):
        bank.counterfactual(problems.load_prompts()["pairs"][0])


def _differing_tokens(tokenizer, template, pair, partner, lang):
    """The (token, partner's token) pairs where the two direct prompts differ; an AssertionError
    when their lengths differ."""
    ids = [tokenizer(problems.format_prompt(template[lang], p[lang])[0],
                     add_special_tokens=False)["input_ids"] for p in (pair, partner)]
    assert len(ids[0]) == len(ids[1]), (pair["id"], lang)
    return [(tokenizer.decode([a]), tokenizer.decode([b])) for a, b in zip(*ids) if a != b]


def _assert_only_digits_differ(tokenizer, found):
    template = problems.load_prompts()["templates"]["direct"]
    for p, c in found:
        for lang in ("en", "zh"):
            differ = _differing_tokens(tokenizer, template, p, c, lang)
            assert differ, (p["id"], lang)  # some number changed
            for a, b in differ:
                assert len(a) == len(b) == 1 and a.isdigit() and b.isdigit(), (p["id"], lang, a, b)


@pytest.mark.parametrize("steps", [1, 2])
def test_counterfactual_prompts_differ_only_in_digit_tokens(tok, banks, steps):
    """Qwen2's pre-tokenizer (the tiny tokenizer's): in each language, the direct prompts of a
    problem and its partner have the same length and differ only at positions holding a digit
    on both sides, so every position aligns."""
    _assert_only_digits_differ(tok, _partners(banks[steps][:150])[0])


def test_counterfactual_prompts_align_on_the_real_qwen_tokenizer(banks):
    """The same on the real Qwen2.5 tokenizer (skipped where it is not on disk)."""
    path = Path.home() / ".cache/real-models/qwen2.5-coder-0.5b-instruct"
    if not path.is_dir():
        pytest.skip("real Qwen tokenizer not available")
    from transformers import AutoTokenizer
    real = AutoTokenizer.from_pretrained(path)
    _assert_only_digits_differ(real, _partners(banks[1][:200] + banks[2][:100])[0])
