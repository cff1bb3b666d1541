"""The problems: prompts.json, MGSM and the generated bank (zcausal/bank.py), templates and their
token alignment, the reference answer's tokens, parsing of the model's answer and language, and
the seeded swap partners (a derangement). Imports only runs.py and bank.py.
"""
import json
import math
import re
from pathlib import Path

import numpy as np

from zcausal.runs import REPO, UsageError

DEFAULT_PROMPTS = REPO / "prompts.json"


_PAIR_FIELDS = {"id": str, "category": str, "en": str, "zh": str, "answer": (int, float)}


def load_prompts(path=DEFAULT_PROMPTS):
    """Read and validate a prompts file: {"templates": {name: {"en", "zh"}}, "pairs": [...]}.

    Each pair has id, category, en, zh (str) and answer (number); ids are unique. Any problem is a
    UsageError naming the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--prompts {path} is a folder; pass a prompts.json-style file in it")
    if not path.is_file():
        raise UsageError(f"prompts file {path} does not exist; pass --prompts FILE")
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise UsageError(f"prompts file {path} is empty; pass a prompts.json-style file "
                             f"(see prompts.json)")
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"prompts file {path} is not valid JSON ({err}); fix the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
        raise UsageError(f"prompts file {path} needs a top-level object with a \"pairs\" list")
    templates = data.get("templates")
    if not (isinstance(templates, dict) and templates and all(
            isinstance(t, dict) and all(isinstance(t.get(lang), str) and "{question}" in t[lang]
                                        for lang in ("en", "zh")) for t in templates.values())):
        raise UsageError(f"prompts file {path} needs \"templates\": named templates (e.g. "
                         f"\"direct\", \"cot\"), each with \"en\" and \"zh\" strings that "
                         f"contain {{question}}")
    pairs = data["pairs"]
    if not pairs:
        raise UsageError(f"prompts file {path} has no pairs; add at least one zh/en pair")
    seen = set()
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise UsageError(f"prompts file {path}: pair {i} is not an object")
        for field, kind in _PAIR_FIELDS.items():
            if field not in pair:
                raise UsageError(f"prompts file {path}: pair {i} has no \"{field}\"; add it")
            value = pair[field]
            if isinstance(value, kind) and not isinstance(value, bool):
                continue
            if field == "answer":  # the common mistake: the answer quoted or with its unit
                raise UsageError(f"prompts file {path}: pair {pair.get('id', i)!r} has answer "
                                 f"{value!r} of the wrong type ({type(value).__name__}, not a "
                                 f"number); write it as a JSON number (42 or 2.5, no quotes or "
                                 f"units)")
            raise UsageError(f"prompts file {path}: pair {i} field \"{field}\" has the wrong "
                             f"type ({type(value).__name__})")
        empty = [lang for lang in ("en", "zh") if not pair[lang].strip()]
        if empty:
            raise UsageError(f"prompts file {path}: pair {pair['id']!r} has an empty "
                             f"\"{empty[0]}\" question; fill it in or remove the pair")
        if pair["id"] in seen:
            raise UsageError(f"prompts file {path}: duplicate id {pair['id']!r}; ids must be unique")
        seen.add(pair["id"])
    return {"templates": templates, "pairs": pairs}


def get_template(templates, name):
    """The {"en", "zh"} pair of template `name` (--template), or a UsageError listing the names."""
    if name not in templates:
        raise UsageError(f"--template {name}: no such template; choose one of "
                         f"{', '.join(sorted(templates))}")
    return templates[name]


def format_prompt(template, question):
    """Fill the template; returns (text, (start, end)) with the question's character span."""
    start = template.index("{question}")
    text = template.replace("{question}", question, 1)
    return text, (start, start + len(question))


def decode_response(tokenizer, tokens, stop_ids=()):
    """Text of one generated row up to (not including) its first stop token."""
    tokens = [int(x) for x in tokens]
    for i, tok in enumerate(tokens):
        if tok in stop_ids:
            tokens = tokens[:i]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True)


def stop_token_ids(tokenizer):
    """Tokens that end a response: EOS (and the chat end token, when the tokenizer has it) and a
    lone blank line, which the template uses between examples."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids.update(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
               if t in tokenizer.get_vocab())
    blank = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    if len(blank) == 1:
        ids.add(blank[0])
    return sorted(i for i in ids if i is not None)


def answer_continuation(tokenizer, answer, lang, template="cot"):
    """Token ids of the reference answer as the model would write it right after the template.

    direct: the answer's digits alone, in both languages: the prompts end with the lone space token
    of "The answer is " and "答案是 " (Qwen writes " 60" as " ", "6", "0"), so the prompt's last
    position, the same token in both languages, predicts the first digit (aligned_ends). cot: " N" after "Answer:" in
    English, "N" after "答案：" (where the model starts a calculation: not an answer position).
    """
    text = ("" if template == "direct" or lang != "en" else " ") + format_number(answer)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def format_number(value):
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


# ----------------------------------------------------------------------------------------------
# Answer and language parsing

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?"
_FINAL = [
    r"\\boxed\{\s*(" + _NUMBER + r")\s*\}",
    r"(?:answer|result|total)\s*(?:is|=|:)\s*\$?\s*(" + _NUMBER + r")",
    r"答案\s*(?:是|为|：|:)\s*(" + _NUMBER + r")",
]
_STOP_MARKERS = ("\n\n", "\nQuestion:", "\n问题：", "Question:", "问题：")


def truncate_response(text):
    """The model's answer to this prompt: text up to where it starts writing a new example."""
    cut = len(text)
    for marker in _STOP_MARKERS:
        at = text.find(marker, 1)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def _to_number(token):
    token = token.replace(",", "").replace(" ", "")
    if "/" in token:
        num, den = token.split("/")
        return float(num) / float(den) if float(den) != 0 else None
    return float(token)


def extract_answer(text):
    """The model's final stated answer as a float, or None.

    Looks, in order, for the last \\boxed{...}, the last "answer is N" / "答案是N", and otherwise
    the last number in the response (after truncate_response). Handles negatives, decimals,
    fractions and thousands separators.
    """
    response = truncate_response(text)
    for pattern in _FINAL:
        found = re.findall(pattern, response, flags=re.IGNORECASE)
        if found:
            return _to_number(found[-1])
    numbers = re.findall(_NUMBER, response)
    return _to_number(numbers[-1]) if numbers else None


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")

# The language of a generated answer (classify_language). A CJK ideograph counts as one word, as
# does a run of Latin letters: one ideograph carries about what one English word does, so a share
# of letters would call "行驶 154 kilometers" English (2 ideographs against 10 letters, 0.17).
ZH_SHARE = 0.8  # CJK share of words at or above this: zh; at or below 1 - ZH_SHARE: en; else mixed
MIN_DEGENERATE = 6  # whitespace-free characters a repetition needs: "111" is an answer, not a loop
LANGUAGES = ("en", "zh", "mixed")  # the labels that name a language (not none, not degenerate)


def is_degenerate(text, min_repeats=3, coverage=0.8):
    """True for repetition such as "0000..." or "苹果苹果苹果": one unit of at most 8 characters
    repeated back to back over `coverage` of the (whitespace-free) text."""
    s = re.sub(r"\s+", "", text)
    if len(s) < min_repeats:
        return False
    pattern = re.compile(r"(.{1,8}?)\1{%d,}" % (min_repeats - 1), re.DOTALL)
    covered = sum(len(m.group(0)) for m in pattern.finditer(s))
    return covered >= coverage * len(s)


def cjk_share(text):
    """(CJK share of words, number of words) of `text`: ideographs / (ideographs + Latin words),
    each ideograph one word; (nan, 0) without either."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN_WORD.findall(text))
    return (cjk / (cjk + latin) if cjk + latin else math.nan), cjk + latin


def classify_language(text):
    """The language of a whole generated answer, read up to where the model starts a new example
    (truncate_response): 'degenerate' for repetition ("0000000000", "米米米米米米", a word repeated;
    at least MIN_DEGENERATE characters), 'none' for an answer without letters ("42."), else by the
    CJK share of its words (cjk_share): >= ZH_SHARE 'zh', <= 1 - ZH_SHARE 'en', else 'mixed'.
    "书包的总费用是 156" is zh, "行驶 154 kilometers" and "米莉 gets 81 buttons" mixed, "386 m" (a
    direct answer cut after its unit's first letter) en."""
    response = truncate_response(text)
    if len(re.sub(r"\s+", "", response)) >= MIN_DEGENERATE and is_degenerate(response):
        return "degenerate"
    share, words = cjk_share(response)
    if not words:
        return "none"
    if share >= ZH_SHARE:
        return "zh"
    return "en" if 1 - share >= ZH_SHARE else "mixed"  # not share <= 1 - ZH_SHARE: 0.19999...


def changed_language(baseline, patched):
    """Whether a patched output is in another language than the unpatched one: both name a
    language (LANGUAGES) and differ. An output without letters or a degenerate one is no language,
    so it is never a language change (counted apart: none, degenerate)."""
    return baseline in LANGUAGES and patched in LANGUAGES and baseline != patched


def first_number(text):
    """The first number in `text` as a float, or None (the direct template's answer)."""
    found = re.search(_NUMBER, text)
    return _to_number(found.group(0)) if found else None


_READOUT = re.compile(r"answer\s+is|答案\s*(?:是|为)", re.IGNORECASE)


def has_final_answer(text):
    """Whether the response states its final answer ("The answer is N", "答案是N", \\boxed{N})."""
    response = truncate_response(text)
    return any(re.search(p, response, flags=re.IGNORECASE) for p in _FINAL)


# ----------------------------------------------------------------------------------------------
# Where a direct answer ends: its number, then the first character after it that is not a space
# (the unit word's first letter or character, punctuation, a newline), so that a decoded output
# shows its language ("386 minutes" / "386 分钟") a few tokens past the number. decoding's
# stop_when_number_ends runs the same rule on the device (fast_decode.advance) from the tables of
# answer_end_tables; read_output cuts a row with answer_end.

TRAITS = ("digit", "blank", "only_continuation", "leading_continuation", "deficit")


def token_traits(raw, text):
    """What the answer-end rule needs to know of one token, as a tuple in TRAITS order.

    raw: its bytes; text: its decoded text. digit: the text holds a digit; blank: the token is
    nothing but spaces; only_continuation / leading_continuation: it is made only of / starts with
    that many UTF-8 continuation bytes (the rest of a character an earlier token began); deficit:
    the continuation bytes its own last character still lacks (Qwen writes " 颗" as " " plus the
    character's lead byte, then one token per remaining byte)."""
    lead = 0
    while lead < len(raw) and 0x80 <= raw[lead] < 0xC0:
        lead += 1
    deficit = 0
    for i in range(len(raw) - 1, lead - 1, -1):  # the last lead byte and what follows it
        if raw[i] < 0x80:
            break
        if raw[i] >= 0xC0:
            need = 1 if raw[i] < 0xE0 else 2 if raw[i] < 0xF0 else 3
            deficit = max(0, need - (len(raw) - 1 - i))
            break
    return (any(ch.isdigit() for ch in text), bool(raw) and all(b == 0x20 for b in raw),
            bool(raw) and lead == len(raw), lead, deficit)


def end_of_answer(traits):
    """(end, number_ended) for a row's tokens given as token_traits tuples: end is the index just
    past the token where the answer ends (None: not within them), number_ended whether a token
    without a digit followed the first digit. The answer ends at the first token, after the number
    has ended, that is not blank and leaves no character unfinished. fast_decode.advance is the
    same rule in tensors."""
    seen = after = False
    owed = 0
    for i, (digit, blank, only, lead, deficit) in enumerate(traits):
        after = after or (seen and not digit)
        seen = seen or digit
        owed = max(owed - lead, 0) if only else deficit
        if after and not blank and owed == 0:
            return i + 1, True
    return None, after


def answer_end(tokenizer, tokens):
    """end_of_answer of a direct-template row (generated ids)."""
    return end_of_answer(token_traits(raw, tokenizer.decode([token]))
                         for raw, token in zip(token_bytes(tokenizer, tokens), tokens))


_END_TABLES = {}


def answer_end_tables(tokenizer, size=None):
    """The traits of every token id as numpy arrays (dict keyed by TRAITS; bool, or int for the two
    byte counts), `size` long (the model's vocabulary; ids past the tokenizer's get no trait):
    what decoding's stop rule reads on the device. Cached per tokenizer."""
    key = (id(tokenizer), size)
    if key not in _END_TABLES:
        n = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        traits = np.array([token_traits(raw, text) for raw, text in
                           zip(token_bytes(tokenizer), texts)], dtype=np.int64).reshape(n, 5)
        width = max(size or n, n)
        tables = {}
        for column, name in enumerate(TRAITS):
            table = np.zeros(width, dtype=np.int64)
            table[:n] = traits[:, column]
            tables[name] = table[:size or n].astype(bool if column < 3 else np.int64)
        _END_TABLES[key] = (tokenizer, tables)  # the tokenizer kept: its id stays unique
    return _END_TABLES[key][1]


def read_output(tokenizer, tokens, stop_ids, template, max_new_tokens):
    """Text, answer, language and truncation of one generated row (tokens: the ids generated,
    possibly padded after a stop token).

    direct: the row ends at its first stop token or where its answer ends (answer_end: the number
    and the first character after it, e.g. "386 minutes", "386 分"); the answer is the first
    number. cot: the row ends at its first stop token; the answer is extract_answer's. The
    language is classify_language's of the whole output (every word, before and after the
    number). truncated: the row reached max_new_tokens before it ended and without a final-answer
    phrase (direct: before its number ended); a truncated row gets no answer.
    Returns dict(output, tokens (the ids kept), answer, language, truncated).
    """
    tokens = [int(t) for t in tokens]
    stop = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    kept = tokens if stop is None else tokens[:stop]
    if template == "direct":
        end, number_ended = answer_end(tokenizer, kept)
        kept = kept if end is None else kept[:end]
        text = tokenizer.decode(kept, skip_special_tokens=True)
        truncated = stop is None and not number_ended and len(tokens) >= max_new_tokens
        answer = None if truncated else first_number(text)
    else:
        text = tokenizer.decode(kept, skip_special_tokens=True)
        ended = stop is not None or truncate_response(text) != text
        truncated = not ended and len(tokens) >= max_new_tokens and not has_final_answer(text)
        answer = None if truncated else extract_answer(text)
    return {"output": text, "tokens": kept, "answer": answer, "language": classify_language(text),
            "truncated": truncated}


def readout_prefix(tokenizer, tokens):
    """Where a cot response states its answer: (the generated ids up to and including its first
    "The answer is" / "答案是", the text that goes before the number: " " after the English phrase,
    "" after the Chinese), or None when the response has no such phrase before its next example."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if not _READOUT.search(truncate_response(text)):
        return None
    for i in range(1, len(tokens) + 1):
        found = _READOUT.search(tokenizer.decode(tokens[:i], skip_special_tokens=True))
        if found:
            return tokens[:i], "" if "答" in found.group(0) else " "
    return None


def answers_equal(a, b, tol=1e-6):
    return a is not None and b is not None and math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# ----------------------------------------------------------------------------------------------
# Problem sets and command-line plumbing shared by the scripts

def read_mgsm(path_en, path_zh):
    """MGSM's layout: two TSV files (question, answer; no header), row i of each the same problem.

    Returns pairs like prompts.json's: id, category ("mgsm"), en, zh, answer (thousands separators
    stripped). Files of different lengths or with disagreeing answers are a UsageError.
    """
    import csv
    rows = {}
    for lang, path in (("en", path_en), ("zh", path_zh)):
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"--prompts-{lang} {path} is a folder; pass the mgsm_{lang}.tsv file "
                             f"in it")
        if not path.is_file():
            raise UsageError(f"MGSM file {path} does not exist; pass --prompts-{lang} FILE")
        with path.open(encoding="utf-8", newline="") as f:
            rows[lang] = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
        bad = [i for i, r in enumerate(rows[lang]) if len(r) != 2]
        if bad:
            raise UsageError(f"MGSM file {path}: row {bad[0]} does not have two tab-separated "
                             f"columns (question, answer)")
        if not rows[lang]:
            raise UsageError(f"MGSM file {path} is empty; pass --prompts-{lang} the {lang} "
                             f"file of an MGSM release (question TAB answer per line)")
    # The script of the questions tells the languages apart: the share of CJK characters among
    # CJK characters and Latin letters (MGSM: 0.0 in English, 0.99 in Chinese).
    share = {lang: len(_CJK.findall(text)) / max(1, len(_CJK.findall(text))
                                                  + len(_LATIN.findall(text)))
             for lang, text in ((lang, " ".join(r[0] for r in rows[lang])) for lang in rows)}
    if share["en"] >= 0.5 > share["zh"]:
        raise UsageError(f"--prompts-en {path_en} holds Chinese questions and --prompts-zh "
                         f"{path_zh} English ones (CJK share {share['en']:.2f} vs "
                         f"{share['zh']:.2f}): the files are swapped; pass them the other way round")
    for lang, wrong in (("en", share["en"] >= 0.5), ("zh", share["zh"] < 0.5)):
        if wrong:
            raise UsageError(f"--prompts-{lang} {(path_en, path_zh)[lang == 'zh']}: the questions "
                             f"are not {'English' if lang == 'en' else 'Chinese'} (CJK share "
                             f"{share[lang]:.2f}); pass the {lang} file of an MGSM release")
    if len(rows["en"]) != len(rows["zh"]):
        raise UsageError(f"MGSM files have different lengths ({len(rows['en'])} en, "
                         f"{len(rows['zh'])} zh); pass the two files of one release")
    pairs = []
    for i, ((q_en, a_en), (q_zh, a_zh)) in enumerate(zip(rows["en"], rows["zh"])):
        try:
            answer_en, answer_zh = _to_number(a_en.strip()), _to_number(a_zh.strip())
        except ValueError:
            raise UsageError(f"MGSM row {i} (mgsm-{i:03d}): answer {a_en!r} / {a_zh!r} is not a "
                             f"number; write the second column as a number (42 or 2.5, no "
                             f"units)") from None
        if answer_en != answer_zh:
            raise UsageError(f"MGSM row {i}: the en and zh answers differ ({a_en} vs {a_zh}); "
                             f"the files are not aligned")
        if not q_en.strip() or not q_zh.strip():
            raise UsageError(f"MGSM row {i} (mgsm-{i:03d}) has an empty question; fix the file")
        answer = int(answer_en) if float(answer_en).is_integer() else answer_en
        pairs.append({"id": f"mgsm-{i:03d}", "category": "mgsm", "en": q_en, "zh": q_zh,
                      "answer": answer})
    return pairs


BANK = "bank"  # --prompts bank: the generated problem bank (zcausal/bank.py)


def prompts_arg(value):
    """--prompts: the word `bank` or a prompts.json-style file."""
    return BANK if value == BANK else Path(value)


def add_pairs_args(parser, default=DEFAULT_PROMPTS):
    """--prompts (a file or `bank`), --bank-steps, --bank-offset, --prompts-en/--prompts-zh
    (MGSM), --limit.
    default: the script's default problems (DEFAULT_PROMPTS or BANK)."""
    shown = BANK if default == BANK else "prompts.json"
    parser.add_argument("--prompts", type=prompts_arg, default=default,
                        help=f"`bank` (the generated parallel problems: one- or two-step, 2-3 digit "
                             f"answers, see zcausal/bank.py) or a prompts.json-style FILE "
                             f"(default: {shown})")
    parser.add_argument("--bank-steps", type=int, choices=[1, 2], default=1,
                        help="with --prompts bank: one-step or two-step problems")
    parser.add_argument("--bank-offset", type=int, default=0,
                        help="with --prompts bank: skip the bank's first N pairs (--limit counts "
                             "from there); the confirmatory slice starts at the offset "
                             "docs/preregistration.json declares")
    parser.add_argument("--prompts-en", type=Path, default=None,
                        help="MGSM-style English TSV (with --prompts-zh; replaces --prompts)")
    parser.add_argument("--prompts-zh", type=Path, default=None,
                        help="MGSM-style Chinese TSV, row i the same problem as --prompts-en's")
    parser.add_argument("--limit", type=int, default=None,
                        help="use the first N pairs (default: all of a file; of the bank, the "
                             "number the script states in its description)")
    return parser


def _bank_offset(args):
    """--bank-offset, checked: within the bank, and only with --prompts bank."""
    from zcausal.bank import BANK_SIZE
    offset = getattr(args, "bank_offset", 0) or 0
    if offset and (args.prompts != BANK or args.prompts_en is not None):
        raise UsageError(f"--bank-offset {offset} applies to --prompts bank only; drop it or "
                         f"pass --prompts bank")
    if not 0 <= offset < BANK_SIZE:
        raise UsageError(f"--bank-offset {offset} is out of range: the bank has {BANK_SIZE} "
                         f"pairs; pass --bank-offset between 0 and {BANK_SIZE - 1}")
    return offset


def load_pairs(args, bank_limit=None):
    """The zh/en pairs the flags name (the bank from --bank-offset, a prompts file or MGSM), cut
    to --limit; with the bank and no --limit, to the script's `bank_limit` (None: all of it)."""
    if (args.prompts_en is None) != (args.prompts_zh is None):
        raise UsageError("pass both --prompts-en and --prompts-zh, or neither")
    offset = _bank_offset(args)
    if args.prompts_en is not None:
        pairs = read_mgsm(args.prompts_en, args.prompts_zh)
    elif args.prompts == BANK:
        from zcausal.bank import bank_slice
        pairs = bank_slice(getattr(args, "bank_steps", 1), offset,
                           bank_limit if args.limit is None else None)
    else:
        pairs = load_prompts(args.prompts)["pairs"]
    if args.limit is not None:
        if not 1 <= args.limit <= len(pairs):
            raise UsageError(f"--limit {args.limit} is out of range: there are {len(pairs)} pairs; "
                             f"pass --limit between 1 and {len(pairs)}")
        pairs = pairs[:args.limit]
    return pairs


def load_templates(args):
    """The named templates: from --prompts when it is a file, else from prompts.json (the bank
    and MGSM carry questions only)."""
    source = args.prompts if isinstance(args.prompts, Path) and args.prompts_en is None \
        else DEFAULT_PROMPTS
    return load_prompts(source)["templates"]


def first_digit(answer):
    """The answer's first digit as a string ("7" for 75 and for 7.5): the token the direct
    template's last position predicts, and what a swap partner must not share."""
    return format_number(abs(float(answer)))[0]


def aligned_ends(tokenizer, template, pairs):
    """Problems whose English and Chinese direct prompts do not end on the same token, or whose
    answer's first digit is not the token right after the prompt: [(id, reason)], empty when
    every pair is aligned. Position-aligned interchange at the last position needs both: the same
    token on both sides, and that token predicting the first digit: otherwise, at low layers,
    swapping the last state swaps the token itself ("答案是" ends on 是, "The answer is " on a space)."""
    bad = []
    for pair in pairs:
        last = {}
        for lang in ("en", "zh"):
            text = format_prompt(template[lang], pair[lang])[0]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            full = tokenizer(text + format_number(pair["answer"]),
                             add_special_tokens=False)["input_ids"]
            if full[:len(ids)] != ids or tokenizer.decode(full[len(ids):len(ids) + 1]) != \
                    first_digit(pair["answer"]):
                bad.append((pair["id"], f"in {lang} the answer's first digit is not the token "
                                        f"after the prompt"))
            last[lang] = ids[-1]
        if last["en"] != last["zh"]:
            bad.append((pair["id"], f"the prompts end on different tokens "
                                    f"({tokenizer.decode([last['en']])!r} in en, "
                                    f"{tokenizer.decode([last['zh']])!r} in zh)"))
    return bad


def _byte_decoder():
    """GPT-2's byte-level alphabet reversed: the character a byte-level BPE token uses for each
    byte -> the byte (Qwen2's tokenizer, and the tests' tiny one, are byte-level)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer, ids=None):
    """The raw bytes of vocabulary entries: list of bytes, one per id of `ids` (None: every id)."""
    if not _BYTE_DECODER:
        _BYTE_DECODER.update(_byte_decoder())
    table = _BYTE_DECODER
    ids = list(range(len(tokenizer))) if ids is None else [int(i) for i in ids]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return [bytes(table[ch] for ch in tok) if tok and all(ch in table for ch in tok)
            else (tok or "").encode("utf-8") for tok in tokens]


_BYTE_DECODER = {}


# UTF-8 lead bytes of the three-byte characters U+3000..U+9FFF (CJK punctuation, kana and the
# unified ideographs): a byte-level token that holds one is the start of Chinese text even when it
# holds only part of a character (Qwen writes " 颗" as " " + its first byte, then two more).
_CJK_LEAD = range(0xE3, 0xEA)


def language_token_classes(tokenizer):
    """(latin, cjk): bool arrays over the vocabulary. latin: the token holds an ASCII letter and no
    byte of a multi-byte character; cjk: it holds a CJK character or the lead byte of one. The
    language margin of a next-token distribution, log sum p(latin) - log sum p(cjk), is positive
    when the model goes on in English and negative in Chinese, whatever word it would write."""
    raw = token_bytes(tokenizer)
    latin = np.array([any(65 <= c <= 90 or 97 <= c <= 122 for c in b) and max(b, default=0) < 128
                      for b in raw])
    cjk = np.array([any(c in _CJK_LEAD for c in b) for b in raw])
    return latin, cjk


def derangement(answers, seed, key=None):
    """A seeded permutation j(i) != i (list of N indices, N >= 2) that avoids pairing i with a j of
    the same key(answer) where it can: by default the same answer; with key=first_digit, the same
    first digit (then the source's first digit differs from the run's own wherever no digit holds
    more than half the answers). The best of up to 2,000 seeded permutations, then repaired by
    swapping partners: with 79 answers over nine first digits a random permutation pairs about
    eleven within a digit and 2,000 draws still left five, which counted as "the source's digit"."""
    rng = np.random.default_rng(seed)
    n = len(answers)
    keys = [key(a) if key is not None else float(a) for a in answers]
    same = (lambda a, b: a == b) if key is not None else answers_equal
    best, best_clashes = None, None
    for _ in range(2000):
        perm = rng.permutation(n)
        if np.any(perm == np.arange(n)):
            continue
        clashes = sum(same(keys[i], keys[j]) for i, j in enumerate(perm))
        if best is None or clashes < best_clashes:
            best, best_clashes = perm, clashes
        if clashes == 0:
            break
    if best is None:  # only reachable for tiny n by bad luck: a cyclic shift is a derangement
        best = np.roll(np.arange(n), 1)
    return [int(j) for j in _repair_clashes(best.copy(), keys, same, rng)]


def _repair_clashes(perm, keys, same, rng):
    """perm with each i paired to its own key swapped against a position m where both new pairs
    are clash-free and neither is a fixed point (seeded order of m); stops when no swap helps."""
    def bad(i, j):
        return i == j or same(keys[i], keys[j])

    for _ in range(len(perm)):
        fixed = False
        for i in [i for i in range(len(perm)) if bad(i, perm[i])]:
            for m in rng.permutation(len(perm)):
                if bad(i, perm[i]) and not bad(i, perm[m]) and not bad(m, perm[i]):
                    perm[i], perm[m] = perm[m], perm[i]
                    fixed = True
                    break
        if not fixed:
            break
    return perm
