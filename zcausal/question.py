"""Experiment E's second position set: aligned interchange at the question's positions.

    question.run_sweep(model, tokenizer, pairs, template, args, out)

Every kept bank problem gets a counterfactual partner (bank.counterfactual: the same template,
names, objects and units, other numbers with the same digit counts, an answer with another first
digit). In one language the two direct prompts then differ only in the digits' tokens, so every
position aligns. At layer l, each position of the problem's question (the tokens that overlap its
characters: not the few-shot examples before it, not the template's ending after it) takes the
partner's state at the same position, within a subspace; English prompts take their English
partner's states, Chinese prompts their Chinese partner's. The last prompt position is read as in
the last-position sweep: top1_src is the partner's first digit.

The suffix-only engine (interchange.py) runs it: the suffix is each prompt's last M tokens, M the
longest question + ending among the language's prompts (a shorter question's suffix begins with
the few-shot examples' last tokens, which stay clean), and the patch is masked to the question's
tokens (interchange.masked_patch): every other suffix position, the ending's included, is
recomputed from layer l + 1 on, not patched. The partners run clean through the same engine once;
their states at every layer are the sources.

Outputs in --out: question_clean.csv (per language and problem: the clean scores of the problem
and of its partner), question_per_problem.csv and question_random_rows.csv.gz (every row: k,
layer, depth, language, condition, draw, problem_id, source_id, the scores and
exp_e_tables.row_measures' measures), question_timing.csv; the tables question_per_layer.csv
(the resume marker), question_draws.csv and question_tests.csv (exp_e_tables.question_tables).
"""
import time
from types import SimpleNamespace

import pandas as pd
import torch
from tqdm.auto import tqdm

import common
from zcausal import bank, interchange, problems, runs
from zcausal.conditions import draws_layer
from zcausal.interchange import make_conditions
from zcausal.summaries import exp_e_tables as tables

POSITIONS = ["last", "question"]
LANGUAGES = ["en", "zh"]
KEYS = ["language", "k", "layer"]  # one finished step of the sweep (question_per_layer.csv)


def is_bank_problem(pair):
    return "kind" in pair and "values" in pair


def resolve_positions(positions, pairs):
    """--position-sets as a list: the sets given, or by default both where every pair is a bank
    problem (a counterfactual re-draws its numbers) and `last` alone otherwise (said on stdout).
    A UsageError for `question` with problems outside the bank."""
    bank_only = all(is_bank_problem(p) for p in pairs)
    if positions is None:
        if not bank_only:
            print("--position-sets: the question set needs the bank's problems (--prompts bank); "
                  "running the last position only")
        return POSITIONS if bank_only else ["last"]
    if "question" in positions and not bank_only:
        raise runs.UsageError("--position-sets question needs the bank's problems, whose numbers a "
                              "counterfactual partner re-draws: pass --prompts bank, or "
                              "--position-sets last")
    return [p for p in POSITIONS if p in positions]


def partners(pairs, seed):
    """(the pairs that have a counterfactual partner, their partners, ids of those without)."""
    kept, found, missing = [], [], []
    for pair in pairs:
        try:
            found.append(bank.counterfactual(pair, seed))
            kept.append(pair)
        except ValueError:
            missing.append(pair["id"])
    return kept, found, missing


def question_tokens(tokenizer, text, span):
    """(token ids of `text`, [start, end) of the tokens that overlap the character span `span`):
    a token holding both template and question characters counts as the question's."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"])
              if a < span[1] and b > span[0]]
    return encoded["input_ids"], (inside[0], inside[-1] + 1)


def aligned_prompts(tokenizer, template, pair, partner):
    """(ids, partner's ids, question's token range) of one problem's prompt in one language
    (`template` that language's), or a str saying why the two do not align position by
    position (lengths or question ranges differ, or tokens differ outside the question)."""
    (ids, where), (other, other_where) = (
        question_tokens(tokenizer, *problems.format_prompt(template, p)) for p in (pair, partner))
    if len(ids) != len(other) or where != other_where:
        return (f"{len(ids)} and {len(other)} tokens, questions at tokens {where} and "
                f"{other_where}")
    outside = [i for i, (a, b) in enumerate(zip(ids, other))
               if a != b and not where[0] <= i < where[1]]
    if outside:
        return f"the prompts differ outside the question (token {outside[0]})"
    return ids, other, where


def check_alignment(tokenizer, template, pairs, seed):
    """encode() in both languages for every pair with a partner, so that a pair whose prompts
    do not align stops the run (a UsageError) before anything is computed."""
    kept, partner_pairs, _ = partners(pairs, seed)
    for language in LANGUAGES:
        encode(tokenizer, template, kept, partner_pairs, language)


# ----------------------------------------------------------------------------------------------
# The clean pass of one language: problems and partners through the engine, states kept

def encode(tokenizer, template, pairs, partner_pairs, language):
    """Token ids of the problems' and the partners' prompts in `language`, and the (N, M) bool
    mask of the question's tokens among each prompt's last M tokens. A UsageError naming the
    first problem whose prompts do not align."""
    ids, other, ranges = [], [], []
    for pair, partner in zip(pairs, partner_pairs):
        got = aligned_prompts(tokenizer, template[language], pair[language], partner[language])
        if isinstance(got, str):
            raise runs.UsageError(
                f"{pair['id']} and its counterfactual {partner['id']} are not position-aligned "
                f"in {language} ({got}): the question set needs a tokenizer that writes each "
                f"digit as its own token; pass --position-sets last")
        ids.append(got[0])
        other.append(got[1])
        ranges.append(got[2])
    m = max(len(x) - start for x, (start, _) in zip(ids, ranges))
    positions = torch.zeros(len(ids), m, dtype=torch.bool)
    for u, (x, (start, end)) in enumerate(zip(ids, ranges)):
        first = len(x) - m  # the prompt position of suffix column 0
        positions[u, start - first:end - first] = True
    return ids, other, positions


@torch.no_grad()
def prepare(model, tokenizer, pairs, partner_pairs, template, language, batch_size):
    """One language's clean pass (SimpleNamespace): prefixes and block (interchange.Prefixes and
    QueryBlock of the problems' prompts, suffix M = the longest question + ending, segments [own
    answer, partner's answer]); hidden (L + 1, N, Q, d), the block's clean states; source
    (L + 1, N, M, d), the partners' clean states at the same suffix positions; positions (N, M)
    bool, the question's tokens (readout_rows: they and the ending after them, the positions
    whose attention a patch of the question can move); clean, per problem the clean scores of
    both (clean_frame)."""
    ids, other, positions = encode(tokenizer, template, pairs, partner_pairs, language)
    m = positions.shape[1]
    device = common.input_device(model)
    languages = common.LanguageClasses(tokenizer).to(device)
    own = [problems.answer_continuation(tokenizer, p["answer"], language, "direct") for p in pairs]
    src = [problems.answer_continuation(tokenizer, p["answer"], language, "direct")
           for p in partner_pairs]
    probe = lambda c: interchange.with_probe(c, languages)  # noqa: E731
    rows = list(range(len(pairs)))
    batch_size = min(batch_size, 64)  # whole suffixes with every layer's states: small batches
    prefixes = interchange.encode_prefixes(model, ids, m, batch_size)
    block = interchange.build_block(prefixes, rows,
                                    [[probe(a), probe(b)] for a, b in zip(own, src)])
    hidden, scores = interchange.block_states(model, prefixes, block, batch_size, languages)
    source_prefixes = interchange.encode_prefixes(model, other, m, batch_size)
    source_block = interchange.build_block(source_prefixes, rows,
                                           [[probe(b), probe(a)] for a, b in zip(own, src)])
    source, source_scores = interchange.block_states(model, source_prefixes, source_block,
                                                     batch_size, languages, width=m)
    return SimpleNamespace(
        language=language, pairs=pairs, partner_pairs=partner_pairs, prefixes=prefixes,
        block=block, hidden=hidden, source=source, positions=positions.to(device), m=m,
        readout_rows=(positions.cumsum(1) > 0).to(device),  # the question's tokens and after
        languages=languages, first=[a[0] for a in own], source_first=[b[0] for b in src],
        clean=clean_frame(pairs, partner_pairs, language, scores, source_scores, own, src))


def clean_frame(pairs, partner_pairs, language, scores, source_scores, own, src):
    """Per problem, what exp_e_tables.row_measures reads from the clean runs (the columns of
    clean.csv: logp_* and first_* of the problem's own answer and of the partner's after the
    problem's prompt; ld_target and ld_first_target from the partner's prompt), and the partner's
    own clean reading (source_top1_own: its argmax is its own first digit, the most the question
    set can transfer)."""
    logp, first = scores["logp"].double().numpy(), scores["logp_first"].double().numpy()
    s_logp, s_first = source_scores["logp"].double().numpy(), \
        source_scores["logp_first"].double().numpy()
    rows = []
    for u, (p, c) in enumerate(zip(pairs, partner_pairs)):
        top1, source_top1 = int(scores["top1"][u]), int(source_scores["top1"][u])
        rows.append(dict(
            language=language, problem_id=p["id"], answer=p["answer"], source_id=c["id"],
            source_answer=c["answer"], source_question=c[language], logp_own=logp[u, 0],
            logp_src=logp[u, 1], ld_clean=logp[u, 0] - logp[u, 1],
            ld_target=s_logp[u, 1] - s_logp[u, 0], first_own=first[u, 0], first_src=first[u, 1],
            ld_first_clean=first[u, 0] - first[u, 1], ld_first_target=s_first[u, 1] - s_first[u, 0],
            greedy_correct=bool(scores["greedy"][u, 0]), top1=top1, top1_own=top1 == own[u][0],
            top1_src=top1 == src[u][0], lang_own=float(scores["lang"][u, 0]),
            lang_src=float(scores["lang"][u, 1]), source_logp_own=s_logp[u, 0],
            source_top1=source_top1, source_top1_own=source_top1 == src[u][0]))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Patched rows

@torch.no_grad()
def run_rows(model, state, layer, conditions, batch_size, basis_layer=None):
    """Scores of every (problem, condition) row with the question's tokens patched at `layer`
    (-1: the embeddings) from the partner's states at the same positions: a frame with problem,
    condition (index), logp_own / logp_src and first_own / first_src (the problem's / the
    partner's answer, all tokens / the first), lang_own, lang_src, top1 with top1_own /
    top1_src (the argmax at the last prompt position is the problem's / the partner's first
    digit), patch_share = |P_S (s - h)| / |s - h| over the question's tokens, and attn_tv_last /
    attn_tv_all: how far the patch moves the attention of `basis_layer` at the last prompt
    position / averaged over the question's and the ending's positions (total variation averaged
    over heads; NaN for layers at or above it: interchange.scores_and_readout)."""
    device = state.hidden.device
    bases, complement = conditions.bases.to(device), conditions.complement.to(device)
    rows = [(u, c) for u in range(len(state.pairs)) for c in range(len(conditions.names))]
    frames = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        index = torch.tensor([u for u, _ in chunk], device=device)
        condition = torch.tensor([c for _, c in chunk], device=device)
        hidden = state.hidden[layer + 1][index]
        suffix, where = hidden[:, :state.m], state.positions[index]
        patch = interchange.masked_patch(interchange.subspace_patch(
            bases[condition], complement[condition], state.source[layer + 1][index]), where)
        moved = (patch(suffix).float() - suffix.float()).flatten(1).norm(dim=1)
        span = ((state.source[layer + 1][index].float() - suffix.float()) * where[..., None])
        share = moved / span.flatten(1).norm(dim=1).clamp(min=1e-12)
        def clean():  # the clean stream entering the basis layer, gathered where it is read
            return state.hidden[basis_layer][index]
        out, tv_last, tv_all = interchange.scores_and_readout(
            model, state.prefixes, state.block.take(index), layer, hidden, patch, basis_layer,
            clean, state.languages, query_rows=state.readout_rows[index])
        top1 = out["top1"].cpu()
        frames.append(pd.DataFrame({
            "problem": index.cpu().numpy(), "condition": condition.cpu().numpy(),
            "logp_own": out["logp"][:, 0].double().cpu().numpy(),
            "logp_src": out["logp"][:, 1].double().cpu().numpy(),
            "first_own": out["logp_first"][:, 0].double().cpu().numpy(),
            "first_src": out["logp_first"][:, 1].double().cpu().numpy(),
            "lang_own": out["lang"][:, 0].double().cpu().numpy(),
            "lang_src": out["lang"][:, 1].double().cpu().numpy(), "top1": top1.numpy(),
            "top1_own": (top1 == torch.tensor([state.first[u] for u, _ in chunk])).numpy(),
            "top1_src": (top1 == torch.tensor([state.source_first[u] for u, _ in chunk])).numpy(),
            "patch_share": share.double().cpu().numpy(),
            "attn_tv_last": tv_last.double().numpy(), "attn_tv_all": tv_all.double().numpy()}))
    return pd.concat(frames, ignore_index=True)


def labelled_rows(measured, state, conditions, extra):
    """run_rows' frame with ids, condition names, draws and `extra` columns in front, and the
    measures of exp_e_tables.row_measures against the clean run."""
    frame = measured.copy()
    frame.insert(0, "condition_name", [conditions.names[c] for c in frame.condition])
    frame.insert(1, "draw", [conditions.draws[c] for c in frame.condition])
    frame.insert(2, "problem_id", [state.pairs[u]["id"] for u in frame.problem])
    frame.insert(3, "source_id", [state.partner_pairs[u]["id"] for u in frame.problem])
    frame = frame.drop(columns=["condition", "problem"]).rename(
        columns={"condition_name": "condition"})
    for key, value in reversed(list(extra.items())):
        frame.insert(0, key, value)
    return tables.question_measures(frame, state.clean)


# ----------------------------------------------------------------------------------------------
# The sweep

def run_sweep(model, tokenizer, pairs, template, args, out):
    """Every (language, k, layer) of LANGUAGES x args.k x args.layers not in
    question_per_layer.csv yet: the rows appended to the per-row files, the step's time to
    question_timing.csv, then the question tables rebuilt (question_per_layer.csv last: a crash
    loses at most the step under way). The random draws are the last-position sweep's
    (interchange.make_conditions under --random-draws)."""
    kept, partner_pairs, missing = partners(pairs, args.seed)
    record_partners(out, kept, partner_pairs, missing, args.seed)
    if not kept:
        return
    done = runs.done_values(out / "question_per_layer.csv", KEYS)
    for name in ("question_per_problem.csv", "question_random_rows.csv.gz",
                 "question_timing.csv"):
        runs.keep_rows(out / name, KEYS, done)
    d, n_layers = common.hidden_size(model), common.num_layers(model)
    z_basis = {k: common.z_basis(model, args.layer, k, fold_norm=args.fold_norm)
               for k in args.k}
    for language in LANGUAGES:
        todo = [(k, layer) for k in args.k for layer in args.layers
                if (language, k, layer) not in done]
        if not todo:
            continue
        state = prepare(model, tokenizer, kept, partner_pairs, template, language, args.batch_size)
        write_clean(out, state.clean)
        for k, layer in tqdm(todo, desc=f"question positions, {language}", unit="layer"):
            started = time.perf_counter()
            conditions = make_conditions(
                d, k, [("z_basis", z_basis[k]),
                       ("z_layer", common.z_basis(model, layer, k, fold_norm=args.fold_norm))],
                args.n_random, args.seed, draws_layer(args, layer))
            rows = labelled_rows(run_rows(model, state, layer, conditions, args.batch_size,
                                          args.layer),
                                 state, conditions, {"k": k, "layer": layer,
                                                     "depth": layer / n_layers,
                                                     "language": language})
            tables.write_rows(rows, out, prefix="question_")
            runs.write_csv(pd.DataFrame([dict(language=language, k=k, layer=layer,
                                              seconds=time.perf_counter() - started)]),
                           out / "question_timing.csv", append=True)
            tables.write_question_tables(out)
        del state


def write_clean(out, clean):
    """question_clean.csv with this language's rows (re)written, the other language's kept."""
    path = out / "question_clean.csv"
    if path.is_file():
        old = runs.load_csv(path)
        clean = pd.concat([old[old.language != clean.language.iloc[0]], clean],
                          ignore_index=True)
    runs.write_csv(clean, path)


def record_partners(out, kept, partner_pairs, missing, seed):
    """config.json's `question` entry: the counterfactual seed, each problem's partner (id,
    answer) and the problems without one (said on stdout too)."""
    path = out / "config.json"
    config = tables.read_config(out)
    config["question"] = dict(
        counterfactual_seed=seed, partners={p["id"]: dict(id=c["id"], answer=c["answer"])
                                            for p, c in zip(kept, partner_pairs)},
        without_partner=missing)
    runs.write_json(path, config)
    if missing:
        print(f"question positions: {len(missing)} of {len(kept) + len(missing)} problems have "
              f"no counterfactual partner with the same digit counts and another first digit "
              f"(first: {missing[0]}); left out")
