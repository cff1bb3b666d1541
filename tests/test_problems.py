"""problems.py: the direct template's answer position, number ends, truncation, cot readouts."""
import pytest

import common
from zcausal import problems


@pytest.fixture(scope="module")
def tok():
    return common.tiny_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_direct_prompt_ends_right_before_the_answers_first_digit(tok, lang):
    """For every pair: the prompt's ids are a prefix of the ids of prompt + answer, the next id is
    the answer's first digit, and the rest are answer_continuation's ids (Qwen's pre-tokenizer,
    which the tiny tokenizer shares: one token per digit, the space before a number its own)."""
    data = problems.load_prompts()
    template = problems.get_template(data["templates"], "direct")
    for pair in data["pairs"]:
        prompt, _ = problems.format_prompt(template[lang], pair[lang])
        number = problems.format_number(pair["answer"])
        head, full = _ids(tok, prompt), _ids(tok, prompt + number)
        assert full[:len(head)] == head, pair["id"]
        assert tok.decode([full[len(head)]]) == number[0], pair["id"]
        assert full[len(head):] == problems.answer_continuation(tok, pair["answer"], lang, "direct")
    if lang == "en":  # the English prompt ends with the lone space of "The answer is "
        assert tok.decode([head[-1]]) == " "


@pytest.mark.parametrize("text, end", [("60.", 3), (" 60\n", 4), ("x 7 y", 5), ("1656", None),
                                       ("no digits", None), ("60 eggs", 4), ("386 分钟", 5),
                                       ("81 颗纽扣", 4), ("7 \n", 3)])
def test_answer_end(tok, text, end):
    """The number, then the first character after it that is not a space (a split character
    completed first); None where the text stops before."""
    ids = _ids(tok, text)
    got, number_ended = problems.answer_end(tok, ids)
    if end is None:
        assert got is None and not number_ended
    else:
        assert tok.decode(ids[:got]) == text[:end] and number_ended


def test_token_traits_of_split_characters():
    """Qwen writes " 颗" as " " + the lead byte (two bytes still owed), then one byte per token."""
    lead, cont = " 颗".encode()[:2], " 颗".encode()[2:3]
    assert problems.token_traits(lead, " \ufffd") == (False, False, False, 0, 2)
    assert problems.token_traits(cont, "\ufffd") == (False, False, True, 1, 0)
    assert problems.token_traits(b"  ", "  ")[1] and not problems.token_traits(b" \n", " \n")[1]
    assert problems.token_traits(b"7", "7")[0]


def test_read_output_direct_cuts_at_the_number_and_marks_truncation(tok):
    stop = problems.stop_token_ids(tok)
    ids = _ids(tok, "60.\n\nQuestion: more text")
    read = problems.read_output(tok, ids, stop, "direct", 10)
    assert read["output"] == "60." and read["answer"] == 60 and not read["truncated"]
    # The digits still coming when the token limit is reached: truncated, no answer.
    read = problems.read_output(tok, _ids(tok, "1455"), stop, "direct", 4)
    assert read["truncated"] and read["answer"] is None and read["output"] == "1455"
    # A stop token before any digit: not truncated, and no answer either.
    read = problems.read_output(tok, [tok.eos_token_id] * 4, stop, "direct", 4)
    assert not read["truncated"] and read["answer"] is None


def test_read_output_cot_truncation(tok):
    stop = problems.stop_token_ids(tok)
    cut = _ids(tok, " 1455 + 201 = 165")  # the example: the limit hit mid-calculation
    read = problems.read_output(tok, cut, stop, "cot", len(cut))
    assert read["truncated"] and read["answer"] is None
    stated = _ids(tok, " 3 + 4 = 7. The answer is 7")
    read = problems.read_output(tok, stated, stop, "cot", len(stated))
    assert not read["truncated"] and read["answer"] == 7
    finished = _ids(tok, " 3 + 4 = 7\n\nQuestion: next")  # a new example started: it ended
    read = problems.read_output(tok, finished, stop, "cot", len(finished))
    assert not read["truncated"] and read["answer"] == 7
    stopped = _ids(tok, " 3 + 4 = 7") + [tok.eos_token_id]
    assert not problems.read_output(tok, stopped, stop, "cot", len(stopped))["truncated"]


def test_readout_prefix(tok):
    ids = _ids(tok, " 3 + 4 = 7. The answer is 7.\n\nQuestion: The answer is 9")
    prefix, sep = problems.readout_prefix(tok, ids)
    assert tok.decode(prefix) == " 3 + 4 = 7. The answer is" and sep == " "
    prefix, sep = problems.readout_prefix(tok, _ids(tok, "3加4等于7。答案是7。"))
    assert tok.decode(prefix).endswith("答案是") and sep == ""
    # A phrase only in the next example does not count.
    assert problems.readout_prefix(tok, _ids(tok, " 7\n\nQuestion: The answer is 9")) is None


def test_first_number_and_final_phrase():
    assert problems.first_number("60. Then 70") == 60
    assert problems.first_number("none") is None
    assert problems.has_final_answer("so the answer is 12.")
    assert not problems.has_final_answer("so 3 + 4 = 7")
