"""Which problems the unpatched model answers, in each language (`--solved`, Experiments A and E).

A patch can only move an answer the model computes: a "transfer" of an answer the model never
gives, or a "change" of a wrong answer, measures nothing. So before A and E measure anything, the
unpatched model answers every pair greedily in English and in Chinese with the run's template, and
only the pairs it answers as the flag says are kept:

    table = answer_table(model, tokenizer, pairs, template, "direct", batch_size)
    kept = [p for p, keep in zip(pairs, kept_mask(table, "both")) if keep]
    record = solved_record(table, "both")        # tried / correct per language / kept: config.json

--solved both (default): correct in both languages; en: in English (the language patched);
any: in either; off: every pair (say so: then an answer change may be a change of a wrong answer).
"""
import pandas as pd

import common
from zcausal import decoding, problems
from zcausal.runs import UsageError

SOLVED_MODES = ("both", "en", "any", "off")
NEW_TOKENS = {"direct": 6, "cot": 100}  # direct: up to 4 digits and what follows; cot: the plan's


def add_solved_arg(parser):
    parser.add_argument("--solved", choices=SOLVED_MODES, default="both",
                        help="keep the pairs the unpatched model answers correctly in both "
                             "languages (both), in English (en), in either (any), or every pair "
                             "(off)")
    return parser


def answer_table(model, tokenizer, pairs, template, template_name, batch_size, engine="auto"):
    """The unpatched model's greedy answer to every pair in both languages: a frame with
    problem_id, answer, and per language (en, zh) output_*, answer_*, correct_*.

    template: {"en", "zh"} strings; template_name: "direct" (the output's first number is the
    answer) or "cot" (problems.extract_answer's)."""
    device = common.input_device(model)
    stop_ids = problems.stop_token_ids(tokenizer)
    new_tokens = NEW_TOKENS[template_name]
    table = pd.DataFrame({"problem_id": [p["id"] for p in pairs],
                          "answer": [p["answer"] for p in pairs]})
    for lang in ("en", "zh"):
        texts = [problems.format_prompt(template[lang], p[lang])[0] for p in pairs]
        ids, mask, _ = common.tokenize_left_padded(tokenizer, texts, device=device)
        result = decoding.generate_and_score(
            model, ids, mask, new_tokens, stop_ids=stop_ids, engine=engine,
            stop_when_number_ends=template_name == "direct", digits=tokenizer,
            batch_size=batch_size)
        read = [problems.read_output(tokenizer, row, stop_ids, template_name, new_tokens)
                for row in result["tokens"].tolist()]
        table[f"output_{lang}"] = [r["output"] for r in read]
        table[f"answer_{lang}"] = [r["answer"] for r in read]
        table[f"correct_{lang}"] = [problems.answers_equal(r["answer"], float(p["answer"]))
                                    for r, p in zip(read, pairs)]
    return table


def kept_mask(table, mode):
    """(N,) bool list: the pairs `mode` keeps (see the module docstring)."""
    en, zh = table.correct_en.astype(bool), table.correct_zh.astype(bool)
    keep = {"both": en & zh, "en": en, "any": en | zh, "off": en | True}[mode]
    return keep.tolist()


def solved_record(table, mode):
    """What config.json, the summary and the report say about the selection."""
    en, zh = table.correct_en.astype(bool), table.correct_zh.astype(bool)
    return dict(mode=mode, tried=len(table), correct_en=int(en.sum()), correct_zh=int(zh.sum()),
                correct_both=int((en & zh).sum()), kept=int(sum(kept_mask(table, mode))))


def require_kept(record, needed, why):
    """A UsageError (one line, exit 2) when fewer than `needed` pairs were kept; `why` says what
    needs them (e.g. "E's DAS split needs 20 test pairs")."""
    if record["kept"] >= needed:
        return
    hint = ("pass a larger --limit (or leave it out), --prompts bank --bank-steps 1 (the problems "
            "small models answer), or --solved en / any / off")
    raise UsageError(f"only {record['kept']} of {record['tried']} pairs kept by --solved "
                     f"{record['mode']} (correct: {record['correct_en']} in English, "
                     f"{record['correct_zh']} in Chinese, {record['correct_both']} in both); "
                     f"{why} needs at least {needed}: {hint}")
