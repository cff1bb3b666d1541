"""Experiment E: where does the answer live? A layer sweep of position-aligned interchange, and a
learned subspace (DAS) beside Z.

    python exp_e_layer_sweep.py --model Qwen/Qwen2.5-3B                    # the bank, every layer
    python exp_e_layer_sweep.py --model tiny-random --smoke               # smoke run, seconds
    python exp_e_layer_sweep.py --replot --out results/exp_e      # every table and figure again

Problems: the bank's first 300 pairs by default (--prompts, --limit), kept where the unpatched
model answers them (--solved); swap partners differ in their first digit. The `direct` template
ends on the same space token in both languages (refused otherwise unless --allow-unaligned), so
each prompt's last position predicts the answer's first digit. At every layer l of --layers and
every k of --k (teacher-forced only), the English prompt's last --last-m positions take the
Chinese prompt's last m positions (aligned from the end), from the same problem (pairing `same`)
or from the swap partner (`swap`), within a subspace:
  none      nothing (the no-op, computed in the same batches: the noise floor)
  full      everything (h <- s)
  z_basis   Z of --layer (or --depth F; default: layer 32 of 36 at the same depth), k dims;
            the primary test reads it at the basis layer's input (--site input: sweep layer b - 1,
            always swept) or its output (--site output: sweep layer b)
  z_layer   Z of the patched layer l itself
  random    --n-random random k-dim subspaces (--random-draws: independent per layer, or shared)
Every row also records how far its patch moves the basis layer's attention at the patched
position (attn_tv_last / attn_tv_all; layers below the basis layer only): Z's own positive control.
Every row is written (per_problem.csv, random_rows.csv.gz); the tables, the declared primary test
and the Holm-corrected secondary ones are built from those rows alone
(zcausal/summaries/exp_e_tables.py: measures top1_src / top1_own / neither, the p_share shift,
disruption, pooled shifts, the language margin after the answer). Decoded spot checks at
--decode-layers. A second position set runs first (--position-sets; by default with bank problems):
every token of the question takes, at layer l, the state at the same position of a
counterfactual partner's prompt in the same language (the same problem with other numbers of
the same digit counts, so the prompts align position by position), with the same conditions
(zcausal/question.py). Then DAS, the positive control: at each --das-layer and --das-k a learned
subspace, trained on the train split, reported on the held-out test split beside full, Z and
random subspaces of the same k at the same layer, with its principal angles to Z.

Outputs in --out: per-row clean.csv, per_problem.csv, random_rows.csv.gz, timing.csv, solved.csv,
decode.csv, das_per_problem.csv, das_random_rows.csv.gz, das_training.csv, das_angles.csv,
das_decode.csv, das_basis_L<layer>_k<k>.npy, question_clean.csv, question_per_problem.csv,
question_random_rows.csv.gz, question_timing.csv; tables per_layer.csv, draws.csv, das.csv,
tests.csv, decode_summary.csv, das_decode_summary.csv, question_per_layer.csv,
question_draws.csv, question_tests.csv; config.json (with the primary test, the counterfactual
partners and the DAS layers with why each); figures layer_sweep.png (layer_sweep_k<k>.png for
the other k), question_sweep.png and das_curve.png under --figures (runs.figure_path), drawn by
zcausal/summaries/exp_e_figures.py from the tables.
"""
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import common
from zcausal import (answered, das, decoding, interchange, layer_choice, prereg, problems,
                     question, runs, stats)
from zcausal.conditions import RANDOM_DRAWS, draws_layer, resolve_draws, seed_formula
from zcausal.interchange import make_conditions
from zcausal.runs import done_values, keep_rows
from zcausal.summaries import exp_e as summary
from zcausal.summaries import exp_e_tables as tables
from zcausal.summaries.exp_e_tables import write_rows

FIXED = ["none", "full", "z_basis", "z_layer"]
DAS_K = [1, 2, 5, 10, 20, 50]  # the default --das-k: the curve of DAS against k
BANK_PAIRS = 300  # with --prompts bank and no --limit: the first 300 pairs are tried
# --n-random: more than the other scripts' stats.N_RANDOM, whose smallest p (0.05) no
# Holm-adjusted secondary test could pass; a draw costs one teacher-forced row per pair and layer.
N_RANDOM = 50


# ----------------------------------------------------------------------------------------------
# Problems: splits, swap partners, answer tokens

def split_sizes(n, fractions, test_min=0):
    """(train, validation, test) sizes from the --split fractions, each at least 2 (a
    derangement needs 2). The test split then takes problems from train until it holds
    `test_min` (--das-test-min), as long as train keeps at least as many as test: DAS's
    held-out rates need about 50 pairs to be read, and train keeps the rest."""
    val, test = (max(2, int(round(f * n))) for f in fractions[1:])
    test = max(test, min(test_min, (n - val) // 2))
    if n - val - test < 2:
        raise runs.UsageError(f"{n} pairs cannot be split into train / validation / test with at "
                              f"least 2 problems each (--split {' '.join(map(str, fractions))}); "
                              f"use at least 6 pairs or change --split")
    return n - val - test, val, test


def make_splits(n, fractions, seed, test_min=0):
    """A seeded assignment of problems to 'train' / 'validation' / 'test': list of N names."""
    sizes = split_sizes(n, fractions, test_min)
    order = np.random.default_rng(seed).permutation(n)
    names = np.empty(n, dtype=object)
    names[order[:sizes[0]]] = "train"
    names[order[sizes[0]:sizes[0] + sizes[1]]] = "validation"
    names[order[sizes[0] + sizes[1]:]] = "test"
    return list(names)


def swap_partners(pairs, split, seed):
    """Swap partner of every problem: a seeded derangement within its split (so no test problem's
    states ever reach training) that avoids a partner with the same first digit where it can (so
    the source's first digit differs from the run's own). List of N indices."""
    partner = [None] * len(pairs)
    for offset, name in enumerate(("train", "validation", "test")):
        members = [i for i, s in enumerate(split) if s == name]
        perm = problems.derangement([pairs[i]["answer"] for i in members], seed + offset,
                                    key=problems.first_digit)
        for i, j in zip(members, perm):
            partner[i] = members[j]
    return partner


def answer_ids(tokenizer, answer):
    """The answer's tokens right after a `direct` prompt: its digits (Qwen writes each digit as
    its own token; the English prompt already ends with the space)."""
    return tokenizer(problems.format_number(answer), add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# The clean pass: prefixes, canonical query blocks, their states at every layer, the sources

@torch.no_grad()
def prepare(model, tokenizer, pairs, template, partner, m, batch_size):
    """Everything the patched rows reuse, computed once (SimpleNamespace):
    prefixes (interchange.Prefixes of the English prompts), canonical (QueryBlock of every
    prompt with segments [own answer, partner's answer, answer of the problem whose partner it
    is]), hidden (L + 1, N, Q, d): the canonical block's clean states, index 0 the embeddings
    and l + 1 the output of layer l; zh_last (L + 1, N, m, d): the Chinese prompts' last m states;
    clean: per-problem clean scores; languages (common.LanguageClasses).
    """
    n = len(pairs)
    batch_size = min(batch_size, 64)  # whole prompts with every layer's states: keep batches small
    inverse = [0] * n
    for i, j in enumerate(partner):
        inverse[j] = i
    en = [problems.format_prompt(template["en"], p["en"])[0] for p in pairs]
    zh = [problems.format_prompt(template["zh"], p["zh"])[0] for p in pairs]
    answers = [answer_ids(tokenizer, p["answer"]) for p in pairs]
    languages = common.LanguageClasses(tokenizer).to(common.input_device(model))
    conts = [[interchange.with_probe(answers[x], languages) for x in (i, partner[i], inverse[i])]
             for i in range(n)]
    prefixes = interchange.encode_prefixes(model, interchange.prompt_ids(tokenizer, en), m,
                                           batch_size)
    canonical = interchange.build_block(prefixes, list(range(n)), conts)
    hidden, scores = clean_states(model, prefixes, canonical, batch_size, languages)
    state = SimpleNamespace(pairs=pairs, partner=partner, inverse=inverse, answers=answers,
                            conts=conts, prefixes=prefixes, canonical=canonical, hidden=hidden,
                            zh_last=last_states(model, tokenizer, zh, m, batch_size),
                            languages=languages, m=m)
    state.clean = clean_frame(pairs, partner, inverse, scores, answers)
    return state


def clean_states(model, prefixes, canonical, batch_size, languages):
    """The canonical block's states at every layer (L + 1, N, Q, d) and its clean scores."""
    return interchange.block_states(model, prefixes, canonical, batch_size, languages)


def last_states(model, tokenizer, texts, m, batch_size):
    """Each prompt's last m states at every layer: (L + 1, N, m, d), index 0 the embeddings."""
    layers = list(range(-1, common.num_layers(model)))
    device = common.input_device(model)
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask, _ = common.tokenize_left_padded(tokenizer, texts[start:start + batch_size],
                                                   device=device)
        captured = common.capture_layer_outputs(model, ids, mask, layers)
        out.append(torch.stack([captured[l][:, -m:] for l in layers]))  # left padding: real tail
    return torch.cat(out, 1)


def clean_frame(pairs, partner, inverse, scores, answers):
    """Per problem: clean scores. logp_src is log p(partner's answer | own prompt); ld_target =
    log p(own answer | partner's prompt) - log p(partner's answer | partner's prompt); the
    first_* and ld_first_* columns are the same for the answers' first tokens alone; top1 is the
    argmax at the last prompt position, top1_own / top1_src whether it is the own / the partner's
    first digit."""
    logp, lang, greedy = scores["logp"].double().numpy(), scores["lang"].double().numpy(), \
        scores["greedy"].numpy()
    first, top1 = scores["logp_first"].double().numpy(), scores["top1"].numpy()
    first_ids = [a[0] for a in answers]
    rows = []
    for i, p in enumerate(pairs):
        j = partner[i]
        rows.append(dict(problem_id=p["id"], answer=p["answer"], source_id=pairs[j]["id"],
                         source_answer=pairs[j]["answer"], logp_own=logp[i, 0],
                         logp_src=logp[i, 1], ld_clean=logp[i, 0] - logp[i, 1],
                         ld_target=logp[j, 2] - logp[j, 0], first_own=first[i, 0],
                         first_src=first[i, 1], ld_first_clean=first[i, 0] - first[i, 1],
                         ld_first_target=first[j, 2] - first[j, 0],
                         greedy_correct=bool(greedy[i, 0]), top1=int(top1[i]),
                         top1_own=int(top1[i]) == first_ids[i],
                         top1_src=int(top1[i]) == first_ids[j],
                         lang_own=lang[i, 0], lang_src=lang[i, 1]))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Conditions and the patched rows

def make_batches(state, problem_index, n_conditions, batch_size, dtype):
    """Row batches (problem x condition, per pairing), built once and reused at every layer.

    Rows are ordered by answer lengths so that a batch's segments are nearly unpadded; `same`
    rows score only the own answer (the source's answer is the same), `swap` rows score both.
    """
    batches = []
    for pairing, segments in (("same", [0]), ("swap", [0, 1])):
        order = sorted(problem_index, key=lambda u: (len(state.conts[u][0]),
                                                     len(state.conts[u][1]), u))
        rows = [(u, c) for u in order for c in range(n_conditions)]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            problems_ = [u for u, _ in chunk]
            block = interchange.build_block(
                state.prefixes, problems_, [[state.conts[u][s] for s in segments] for u in problems_])
            device = block.ids.device
            sources = [u if pairing == "same" else state.partner[u] for u in problems_]
            batches.append(SimpleNamespace(
                pairing=pairing, block=block, problems=problems_,
                columns=interchange.column_map(block, state.canonical, segments),
                mask=interchange.attention_mask(state.prefixes, block, dtype),
                condition=torch.tensor([c for _, c in chunk], device=device),
                source=torch.tensor(sources, device=device)))
    return batches


def run_with_readout(model, state, batch, layer, hidden, patch, basis_layer):
    """patched_scores for one batch, and how far the patch moves the attention of `basis_layer`
    at the patched (suffix) positions: the query block runs from layer + 1 up to the basis layer,
    its attention is read from the stream entering it (interchange.scores_and_readout, against the
    clean stream there), then the rest of the layers run; the scores are the ones a single pass
    gives. Returns (scores, attn_tv_last (B,), attn_tv_all (B,)): total variation averaged over
    heads at the last patched position / over the patched positions; NaN where the patched stream
    is not below the basis layer (a patch at or above it cannot reach its attention)."""
    def clean():  # the clean stream entering the basis layer, gathered only where it is read
        return state.hidden[basis_layer][batch.block.rows[:, None], batch.columns]
    return interchange.scores_and_readout(model, state.prefixes, batch.block, layer, hidden, patch,
                                          basis_layer, clean, state.languages, batch.mask)


@torch.no_grad()
def run_rows(model, state, layer, conditions, batches, basis_layer=None):
    """Scores of every row with the `last` source patched at `layer`: a frame with problem,
    pairing, condition index, logp_own, logp_src, first_own, first_src, lang_own, lang_src, top1
    (the argmax at the patched last position) with top1_own / top1_src (it is the own / the
    source's first digit; for `same` rows the source is the own problem),
    patch_share = |P_S (s - h)| / |s - h| at the patched positions (how much of the difference
    between source and run the subspace carries: 1 for full, 0 for none), and attn_tv_last /
    attn_tv_all, how far the patch moves the attention of `basis_layer` at the patched
    positions (run_with_readout; NaN for layers at or above it, or without a basis layer)."""
    device = state.hidden.device
    bases, complement = conditions.bases.to(device), conditions.complement.to(device)
    frames = []
    for batch in batches:
        rows = batch.block.rows
        hidden = state.hidden[layer + 1][rows[:, None], batch.columns]
        source = state.zh_last[layer + 1][batch.source]
        patch = interchange.subspace_patch(bases[batch.condition], complement[batch.condition],
                                           source)
        suffix = hidden[:, :batch.block.m].float()
        share = ((patch(suffix).float() - suffix).norm(dim=-1)
                 / (source.float() - suffix).norm(dim=-1).clamp(min=1e-12)).mean(1)
        out, tv_last, tv_all = run_with_readout(model, state, batch, layer, hidden, patch,
                                                basis_layer)
        src = 0 if batch.pairing == "same" else 1
        top1 = out["top1"].cpu().numpy()
        own_first = np.array([state.answers[u][0] for u in batch.problems])
        src_first = np.array([state.answers[int(j)][0] for j in batch.source.cpu()])
        frames.append(pd.DataFrame({
            "problem": batch.problems, "pairing": batch.pairing,
            "condition": batch.condition.cpu().numpy(),
            "logp_own": out["logp"][:, 0].double().cpu().numpy(),
            "logp_src": out["logp"][:, src].double().cpu().numpy(),
            "first_own": out["logp_first"][:, 0].double().cpu().numpy(),
            "first_src": out["logp_first"][:, src].double().cpu().numpy(),
            "lang_own": out["lang"][:, 0].double().cpu().numpy(),
            "lang_src": out["lang"][:, src].double().cpu().numpy(),
            "top1": top1, "top1_own": top1 == own_first, "top1_src": top1 == src_first,
            "patch_share": share.double().cpu().numpy(),
            "attn_tv_last": tv_last.double().numpy(), "attn_tv_all": tv_all.double().numpy()}))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# The sweep

def per_problem_rows(measured, state, conditions, split, extra):
    """Every row of one layer (named conditions and random draws), with ids, split and draw: the
    raw scores and measures that every table and figure of the run is rebuilt from."""
    frame = measured.copy()
    pairs = state.pairs
    frame.insert(0, "condition_name", [conditions.names[c] for c in frame.condition])
    frame.insert(1, "draw", [conditions.draws[c] for c in frame.condition])
    frame["problem_id"] = [pairs[u]["id"] for u in frame.problem]
    frame["source_id"] = [pairs[u if p == "same" else state.partner[u]]["id"]
                          for u, p in zip(frame.problem, frame.pairing)]
    frame["split"] = [split[u] for u in frame.problem]
    frame = frame.drop(columns=["condition", "problem"]).rename(columns={"condition_name": "condition"})
    for key, value in reversed(list(extra.items())):
        frame.insert(0, key, value)
    return frame


def query_flops(config, rows, width, prefix, n_layers_run, scored):
    """Multiply-adds x 2 of running `rows` query blocks of `width` tokens through n_layers_run
    decoder layers against `prefix` cached positions, then the LM head at `scored` positions per
    row (the cost model of the suffix-only engine; norms, RoPE and the patch are left out)."""
    d, ffn = config.hidden_size, config.intermediate_size
    d_head = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * d_head, config.num_key_value_heads * d_head
    per_token = 2 * (d * q + 2 * d * kv + q * d + 3 * d * ffn) + 4 * (prefix + width) * q
    return rows * (width * n_layers_run * per_token + scored * 2 * d * config.vocab_size)


def layer_flops(config, batches, layer):
    """Estimated FLOPs of one layer's patched rows (query_flops summed over the batches)."""
    n_layers = config.num_hidden_layers
    return sum(query_flops(config, len(b.problems), b.block.width, b.block.prefix_width,
                           n_layers - 1 - layer, b.block.width - b.block.m + 1) for b in batches)


def run_sweep(model, state, args, out, split):
    """Every (k, layer) of args.k x args.layers not in per_layer.csv yet: the patched rows with
    their measures appended to the per-row files, the layer's time to timing.csv, then every
    table rebuilt from the rows (exp_e_tables.write_tables; per_layer.csv, written last, marks
    the layer done, so a crash loses at most the layer under way)."""
    d, L = common.hidden_size(model), common.num_layers(model)
    dtype = next(model.parameters()).dtype
    swept = range(len(state.pairs[:args.sweep_limit]))  # --sweep-limit: the first N kept pairs
    batches = make_batches(state, swept, len(FIXED) + args.n_random, args.batch_size, dtype)
    done = done_values(out / "per_layer.csv", ["k", "layer"])
    for name in ("per_problem.csv", "random_rows.csv.gz", "timing.csv"):
        keep_rows(out / name, ["k", "layer"], done)
    todo = [(k, layer) for k in args.k for layer in args.layers if (k, layer) not in done]
    z_fixed = {}
    for k, layer in tqdm(todo, desc="layers", unit="layer", disable=not todo):  # none: no bar
        started = time.perf_counter()
        if k not in z_fixed:
            z_fixed[k] = common.z_basis(model, args.layer, k, fold_norm=args.fold_norm)
        z_here = common.z_basis(model, layer, k, fold_norm=args.fold_norm)
        conditions = make_conditions(d, k, [("z_basis", z_fixed[k]), ("z_layer", z_here)],
                                     args.n_random, args.seed, draws_layer(args, layer))
        rows = per_problem_rows(run_rows(model, state, layer, conditions, batches,
                                         args.layer), state, conditions, split,
                                {"k": k, "layer": layer, "depth": layer / L})
        write_rows(tables.row_measures(rows, state.clean, args.min_span), out)
        runs.write_csv(pd.DataFrame([dict(  # this layer's rows, Z's SVD included
            k=k, layer=layer, seconds=time.perf_counter() - started,
            tflop=layer_flops(model.config, batches, layer) / 1e12)]), out / "timing.csv",
            append=True)
        tables.write_tables(out)


# ----------------------------------------------------------------------------------------------
# Decoded spot checks

def decode_rows(model, tokenizer, state, template, layer, conditions, problem_index, args):
    """Greedy decodes of the English prompts with the `last` source patched at `layer` through
    decoding.generate_and_score (the full forward with a SubspacePatch whose source_tokens and
    prompt_mask select the last m positions), every condition x pairing x problem. The output is
    decoded past the answer (no stop token), so its language shows in what follows the number."""
    pairs, m = state.pairs, state.m
    d = common.hidden_size(model)
    rows = [(u, pairing, c) for pairing in ("same", "swap") for u in problem_index
            for c in range(len(conditions.names))]
    records = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        texts = [problems.format_prompt(template["en"], pairs[u]["en"])[0] for u, _, _ in chunk]
        ids, mask, _ = common.tokenize_left_padded(tokenizer, texts)
        src = [u if p == "same" else state.partner[u] for u, p, _ in chunk]
        cond = torch.tensor([c for _, _, c in chunk])
        B, T = ids.shape
        source_tokens = torch.zeros(B, T, d)
        source_tokens[:, -m:] = state.zh_last[layer + 1][torch.tensor(src)].float().cpu()
        prompt_mask = torch.zeros(B, T, dtype=torch.bool)
        prompt_mask[:, -m:] = True
        patch = common.SubspacePatch(
            layer=layer, basis=conditions.bases[cond], complement=conditions.complement[cond],
            source_mean=torch.zeros(B, d), patch_generated=torch.zeros(B, dtype=torch.bool),
            source_tokens=source_tokens, prompt_mask=prompt_mask)
        patch.to(common.input_device(model))
        result = decoding.generate_and_score(
            model, ids, mask, args.max_new_tokens, patch, stop_ids=(),
            score=[[state.answers[u] for u, _, _ in chunk], [state.answers[j] for j in src]],
            engine=args.decode)
        for b, (u, pairing, c) in enumerate(chunk):
            text = problems.decode_response(tokenizer, result["tokens"][b])
            records.append(decode_record(pairs, u, src[b], pairing, conditions, c, text,
                                         float(result["scores"][0][b]), layer))
    return pd.DataFrame(records)


def decode_record(pairs, u, j, pairing, conditions, c, text, logp_own, layer):
    answer = problems.extract_answer(text)
    own, source = pairs[u]["answer"], pairs[j]["answer"]
    if problems.answers_equal(answer, own):
        outcome = "kept"
    elif pairing == "swap" and problems.answers_equal(answer, source):
        outcome = "transferred"
    else:
        outcome = "broken"
    return dict(layer=layer, pairing=pairing, condition=conditions.names[c],
                draw=conditions.draws[c], problem_id=pairs[u]["id"], source_id=pairs[j]["id"],
                answer=own, source_answer=source, output=text, parsed=answer, outcome=outcome,
                language=problems.classify_language(text),
                logp_own_decode=logp_own)


def run_decode_checks(model, tokenizer, state, template, args, out, layers):
    """Decoded spot checks at `layers` (first --decode-limit problems) at the primary k, each
    layer written as it finishes; the teacher-forced log p of the fast engine is joined for the
    named conditions."""
    d, k = common.hidden_size(model), stats.primary_k(args.k)
    z_fixed = common.z_basis(model, args.layer, k, fold_norm=args.fold_norm)
    problem_index = list(range(min(args.decode_limit, len(state.pairs))))
    if not problem_index or not layers:
        return
    done = {layer for layer, in done_values(out / "decode.csv", ["layer"])}
    for layer in [l for l in layers if l not in done]:
        z_here = common.z_basis(model, layer, k, fold_norm=args.fold_norm)
        conditions = make_conditions(d, k, [("z_basis", z_fixed), ("z_layer", z_here)],
                                     args.decode_random, args.seed, draws_layer(args, layer))
        frame = decode_rows(model, tokenizer, state, template, layer, conditions, problem_index,
                            args).assign(k=k)
        fast = runs.load_csv(out / "per_problem.csv")
        fast = fast[(fast.layer == layer) & (fast.k == k)][["pairing", "condition", "problem_id",
                                                            "logp_own"]]
        frame = frame.merge(fast.rename(columns={"logp_own": "logp_own_fast"}), how="left",
                            on=["pairing", "condition", "problem_id"])
        runs.write_csv(frame, out / "decode.csv", append=True)
    frame = runs.load_csv(out / "decode.csv")
    runs.write_csv(summary.decode_summary(frame, ["layer", "pairing", "condition"]),
                   out / "decode_summary.csv")  # replot rebuilds it too


# ----------------------------------------------------------------------------------------------
# DAS: learn the subspace on train, choose steps on validation, report on test

def run_das(model, tokenizer, state, template, args, out, split, layers):
    """For every (layer, k) of `layers` x --das-k not done yet: train (progress as plain
    lines; the training data built once per layer), then on the test split the rows of DAS, Z
    (basis layer and this layer), full and the random draws; principal angles; decoded outputs
    of the first --decode-limit test problems; das.csv rebuilt from the rows
    (exp_e_tables.write_tables) last, as the marker of a finished (layer, k)."""
    d = common.hidden_size(model)
    test = [i for i, s in enumerate(split) if s == "test"]
    dtype = next(model.parameters()).dtype
    done = done_values(out / "das.csv", ["layer", "k"])
    for name in ("das_training.csv", "das_angles.csv", "das_decode.csv", "das_per_problem.csv",
                 "das_random_rows.csv.gz"):
        keep_rows(out / name, ["layer", "k"], done)
    z_fixed = {}
    for layer in layers:
        todo = [k for k in args.das_k if (layer, k) not in done]
        data = das.training_data(model, state, layer, split, args) if todo else None
        for k in todo:
            basis, history = das.train_das(
                model, state, data, k, args,
                log=lambda entry: tqdm.write(das.progress_line(k, entry, layer)))
            np.save(out / f"das_basis_L{layer}_k{k}.npy", basis.numpy())
            if k not in z_fixed:
                z_fixed[k] = common.z_basis(model, args.layer, k, fold_norm=args.fold_norm)
            z_here = common.z_basis(model, layer, k, fold_norm=args.fold_norm)
            conditions = make_conditions(d, k, [("das", basis), ("z_basis", z_fixed[k]),
                                                ("z_layer", z_here)], args.n_random, args.seed,
                                         draws_layer(args, layer))
            batches = make_batches(state, test, len(conditions.names), args.batch_size, dtype)
            rows = per_problem_rows(run_rows(model, state, layer, conditions, batches,
                                             args.layer), state, conditions, split,
                                    {"k": k, "layer": layer})
            random_bases = [b for b, name in zip(conditions.bases, conditions.names)
                            if name == "random"]
            angles = das.das_angles(basis, [("z_basis", -1, z_fixed[k]), ("z_layer", -1, z_here)],
                                    random_bases, k)
            decoded = decode_rows(model, tokenizer, state, template, layer,
                                  make_conditions(d, k, [("das", basis), ("z_basis", z_fixed[k])],
                                                  0, args.seed), test[:args.decode_limit], args)
            runs.write_csv(history.assign(k=k, layer=layer), out / "das_training.csv",
                           append=True)
            runs.write_csv(angles.assign(layer=layer), out / "das_angles.csv", append=True)
            if len(decoded):
                runs.write_csv(decoded.assign(k=k), out / "das_decode.csv", append=True)
            # the rows last: das.csv is built from them, so any later write_tables marks this
            # (layer, k) done, and everything else of it must be on disk by then
            write_rows(tables.row_measures(rows, state.clean, args.min_span), out, prefix="das_")
            tables.write_tables(out)  # das.csv: marks (layer, k) done
    # das_decode_summary.csv: main()'s closing replot builds it from das_decode.csv


# ----------------------------------------------------------------------------------------------

def validate(args):
    """Every check that needs no weights, before anything is loaded or written. Resolves --layer
    (or --depth) to the basis layer's index, and the default --layers (all)."""
    common.check_runtime(args.device, args.dtype, args.device_map)
    config = common.load_model_config(args.model)
    args.layer = layer_choice.resolve_layer(config, args.layer, args.depth)
    args.random_draws = resolve_draws(args)
    n_layers = common.num_layers(config)
    args.layers = sorted(set(args.layers)) if args.layers else list(range(n_layers))
    if args.site == "input" and args.layer == 0:
        raise runs.UsageError("--site input at basis layer 0 would patch the embeddings, which "
                              "the sweep does not; pass --site output or a basis layer above 0")
    primary = primary_layer_of(args)
    if primary not in args.layers:  # the primary test's layer is always swept
        args.layers = sorted(args.layers + [primary])
    for flag, layers in (("--layers", args.layers), ("--decode-layers", args.decode_layers or []),
                         ("--das-layer", args.das_layer or [])):
        for layer in layers:
            common.check_layer(config, layer, flag=flag, alternative=None)
    args.k = list(dict.fromkeys(args.k))  # one sweep per k, in the order given
    if args.das_k is None:  # the default curve, each k below d (k = d is `full`)
        args.das_k = [k for k in DAS_K if k < common.hidden_size(config)]
    args.das_k = list(dict.fromkeys(args.das_k))
    for flag, ks in (("--k", args.k), ("--das-k", args.das_k)):
        for k in ks:
            common.check_k(config, k, allow_full=False, flag=flag,
                           why="a k = d subspace is the whole state: that is `full`")
    if args.last_m > 8:
        raise runs.UsageError(f"--last-m {args.last_m}: pass 1..8 (the template's tail; 1 is the "
                              f"position that predicts the first digit)")
    if args.das_lr <= 0:
        raise runs.UsageError(f"--das-lr {args.das_lr} must be positive")
    if len(args.split) != 3 or min(args.split) <= 0 or abs(sum(args.split) - 1) > 1e-6:
        raise runs.UsageError(f"--split {' '.join(map(str, args.split))}: pass three positive "
                              f"fractions (train validation test) that sum to 1")
    pairs = problems.load_pairs(args, bank_limit=BANK_PAIRS)
    split_sizes(len(pairs), args.split, args.das_test_min)
    args.position_sets = question.resolve_positions(args.position_sets, pairs)
    template = problems.get_template(problems.load_templates(args), "direct")
    return pairs, template


def primary_layer_of(args):
    """The sweep layer of the primary test: a row's layer l patches the output of l, which is
    the input of l + 1, so Z of basis layer b is tested where its own heads read it at l = b - 1
    (--site input), or at l = b (--site output, the stream only the layers above b read)."""
    return args.layer - 1 if args.site == "input" else args.layer


def select_pairs(model, tokenizer, pairs, template, args):
    """The pairs the sweep measures: those the unpatched model answers as --solved asks
    (answered.py), their prompts aligned (both languages end on the token before the first digit,
    unless --allow-unaligned), at least --min-pairs of them. Returns (kept pairs, the answer
    table, the selection record for config.json); a UsageError when too few are kept."""
    table = answered.answer_table(model, tokenizer, pairs, template, "direct", args.batch_size,
                                  args.decode)
    keep = answered.kept_mask(table, args.solved)
    record = answered.solved_record(table, args.solved)
    answered.require_kept(record, max(args.min_pairs, 6), "the sweep (--min-pairs, and 2 pairs "
                                                          "per split)")
    kept = [p for p, k in zip(pairs, keep) if k]
    unaligned = problems.aligned_ends(tokenizer, template, kept)
    record["unaligned"] = len(unaligned)
    if unaligned and not args.allow_unaligned:
        pid, why = unaligned[0]
        raise runs.UsageError(
            f"{len(unaligned)} of {len(kept)} pairs are not position-aligned with the direct "
            f"template (first: {pid}: {why}); a last-position interchange would swap the token "
            f"itself: make both templates in prompts.json end with the space before the answer, "
            f"or pass --allow-unaligned")
    if "question" in args.position_sets:  # its partners' prompts must align too
        question.check_alignment(tokenizer, template, kept, args.seed)
    return kept, table.assign(kept=keep), record


def work(args, n_pairs, config):
    """E's unit of time in zcausal/cost.py: the sweep's rows (pairs x layers x k x conditions x
    both pairings) plus DAS's examples (layers, 2 by default, x k x steps x batch)."""
    das = ((2 if args.das_layer is None else len(args.das_layer))
           * len(DAS_K if args.das_k is None else args.das_k) * args.das_steps * args.das_batch)
    swept = min(n_pairs, getattr(args, "sweep_limit", None) or n_pairs)  # --sweep-limit
    return das + (swept * len(args.layers or range(common.num_layers(config))) * len(args.k)
                  * (len(FIXED) + args.n_random) * 2)


def main(args):
    runs.validate_common(args)
    if args.replot:
        return summary.replot(args)
    pairs, template = validate(args)
    if args.batch_size is None:  # rows are a few tokens each: large batches pay on a GPU
        on_gpu = common.check_runtime(args.device, args.dtype, args.device_map).type == "cuda"
        args.batch_size = 512 if on_gpu else 64
    fresh = not Path(args.out).exists()
    out = runs.prepare_out_dir(args.out, args.overwrite, args.resume, args, args.figures)
    runs.set_seed(args.seed)
    model, tokenizer = common.load_model(args.model, args.dtype, args.device, seed=args.seed,
                                         device_map=args.device_map)
    model.requires_grad_(False)
    tried = len(pairs)
    try:
        pairs, answers, solved = select_pairs(model, tokenizer, pairs, template, args)
    except runs.UsageError:
        if fresh and not any(out.iterdir()):
            out.rmdir()  # a refused run leaves nothing behind
        raise
    print(f"{solved['kept']} of {tried} pairs kept (--solved {args.solved}: correct in English "
          f"{solved['correct_en']}, in Chinese {solved['correct_zh']}, both "
          f"{solved['correct_both']})")
    runs.write_csv(answers, out / "solved.csv")
    split = make_splits(len(pairs), args.split, args.seed, args.das_test_min)
    partner = swap_partners(pairs, split, args.seed)
    if not args.resume:
        runs.write_json(out / "config.json", runs.run_config(
            args, model, template=template, n_pairs=len(pairs), basis_layer=args.layer,
            site=args.site, primary_layer=primary_layer_of(args),
            primary_test=tables.primary_description(args.k, args.layer, args.site),
            preregistration=prereg.record("E"),
            secondary_tests=tables.SECONDARY_DESCRIPTION,
            splits={s: [p["id"] for p, name in zip(pairs, split) if name == s]
                    for s in ("train", "validation", "test")},
            swap_source={p["id"]: pairs[j]["id"] for p, j in zip(pairs, partner)},
            random_basis_seeds=seed_formula(args.random_draws), solved=solved,
            language_margin="log P(Latin word) - log P(Chinese word) after the answer, a lone "
                            "space marginalised (common.language_margin)"))
    if "question" in args.position_sets:  # the question's tokens from counterfactual partners
        question.run_sweep(model, tokenizer, pairs[:args.sweep_limit], template, args, out)
    if "last" not in args.position_sets:
        return summary.replot(args)
    state = prepare(model, tokenizer, pairs, template, partner, args.last_m, args.batch_size)
    runs.write_csv(state.clean.assign(split=split), out / "clean.csv")
    run_sweep(model, state, args, out, split)
    peak = tables.peak_layer(out)
    decode_layers = args.decode_layers if args.decode_layers is not None else sorted(
        {primary_layer_of(args), peak} & set(args.layers))
    run_decode_checks(model, tokenizer, state, template, args, out, decode_layers)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    chosen = tables.das_layers(out, args.layer, args.das_layer) if args.das_k else {}
    for layer, why in chosen.items():
        print(f"DAS at layer {layer}: {why}")
    if chosen:
        runs.write_json(out / "config.json", dict(
            config, das_layers=list(chosen), das_layer_reasons={str(l): why for l, why in
                                                                chosen.items()},
            decode_layers=decode_layers))
        run_das(model, tokenizer, state, template, args, out, split, list(chosen))
    summary.replot(args)  # every table and figure once more, what it wrote and the summary


# --smoke: flags left at their default take these values (seconds on --model tiny-random)
SMOKE = dict(limit=6, solved="off", min_pairs=6, depth=[0.5], k=[8], n_random=3, decode_limit=2,
             decode_random=1, das_k=[4],
             das_steps=4, das_eval_every=2, max_new_tokens=4)


def parse_args(argv=None):
    parser = build_parser()
    return runs.apply_smoke(parser, parser.parse_args(argv), SMOKE,
                            unless={"depth": "layer"})


def build_parser():
    parser = runs.make_parser(__doc__)
    common.add_common_args(parser, "exp_e")
    problems.add_pairs_args(parser, default=problems.BANK)
    answered.add_solved_arg(parser)
    parser.add_argument("--min-pairs", type=int, default=20,
                        help="stop before the sweep when fewer pairs are kept (below 20 a rate's "
                             "95%% interval is wider than 0.4)")
    parser.add_argument("--allow-unaligned", action="store_true",
                        help="run even when the English and Chinese prompts end on different "
                             "tokens (a last-position interchange then swaps the token itself)")
    decoding.add_decode_args(parser)
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="layers to patch (default: every layer 0..L-1)")
    layer_choice.add_layer_args(parser, ", the fixed basis z_basis patched at every layer of --layers")
    parser.add_argument("--site", choices=["input", "output"], default="input",
                        help="where the primary test patches Z of the basis layer b: input "
                             "(default; sweep layer b - 1, whose output is the stream b's W_Q and "
                             "W_K read) or output (sweep layer b); both are in the sweep")
    parser.add_argument("--k", type=int, nargs="+", default=[50],
                        help="dimensions of Z and the random subspaces: one sweep per k (a k "
                             "column in every table; the primary test at k = 50, else the "
                             "largest)")
    parser.add_argument("--n-random", type=int, default=N_RANDOM,
                        help=f"random k-dim subspaces per layer, drawn as --random-draws says (the "
                             f"band and the rank tests); default {N_RANDOM}, not {stats.N_RANDOM}, "
                             f"because the secondary tests are Holm-adjusted together and "
                             f"{stats.N_RANDOM} draws give no p below 0.05; a draw adds one "
                             f"teacher-forced row per pair and layer, no decoding")
    parser.add_argument("--random-draws", choices=RANDOM_DRAWS, default=None,
                        help="per-layer: independent draws at every layer (default of new runs; "
                             "what z_layer's family-wise test needs, conservative for z_basis's); "
                             "shared: the same subspaces at every layer (runs before the flag)")
    parser.add_argument("--sweep-limit", type=int, default=None, metavar="N",
                        help="run both position sets' sweeps on the first N kept pairs only; "
                             "DAS still trains and tests on all of them (default: all)")
    parser.add_argument("--last-m", type=int, default=1,
                        help="positions interchanged: the English prompt's last m take the "
                             "Chinese prompt's last m, aligned from the end")
    parser.add_argument("--position-sets", nargs="+", choices=question.POSITIONS, default=None,
                        help="position sets: last (the last --last-m positions from the Chinese "
                             "prompt, then the decoded checks and DAS) and question (every token "
                             "of the question from a counterfactual partner with other numbers, "
                             "in the same language; bank problems only). Default: both with "
                             "--prompts bank, else last")
    parser.add_argument("--min-span", type=float, default=1.0,
                        help="a swap pair enters the old mean-of-ratios `transfer` column (kept "
                             "for comparison, not in the summary) only when |ld_target - "
                             "ld_clean| is at least this many nats")
    parser.add_argument("--fold-norm", action="store_true",
                        help="fold the layer's input RMSNorm gain into W_Q, W_K before Z's SVD")
    parser.add_argument("--split", type=float, nargs=3, default=[0.7, 0.1, 0.2],
                        metavar=("TRAIN", "VAL", "TEST"),
                        help="fractions of problems for DAS training, step choice and report "
                             "(seeded; swap partners stay within a split; 300 kept pairs give "
                             "210 / 30 / 60)")
    parser.add_argument("--das-test-min", type=int, default=50,
                        help="the test split takes problems from train until it holds this "
                             "many, as long as train keeps at least as many as test (0: the "
                             "--split fractions as they are)")
    parser.add_argument("--decode-layers", type=int, nargs="*", default=None,
                        help="layers of the decoded spot checks (default: the primary test's "
                             "layer and the lowest layer where full interchange's top1_src is "
                             "largest on train + validation problems)")
    parser.add_argument("--decode-limit", type=int, default=16,
                        help="problems decoded at each decode layer (the first N)")
    parser.add_argument("--decode-random", type=int, default=3,
                        help="random draws decoded beside the named conditions")
    parser.add_argument("--max-new-tokens", type=int, default=10,
                        help="greedy tokens decoded: the answer and what follows it")
    parser.add_argument("--das-k", type=int, nargs="*", default=None,
                        help="dimensions of the learned subspaces, one trained per k and layer "
                             f"(default: {' '.join(map(str, DAS_K))}, those below the hidden "
                             f"size; none: skip DAS)")
    parser.add_argument("--das-layer", type=int, nargs="*", default=None,
                        help="layers whose output DAS patches (default: the input of the basis "
                             "layer, i.e. layer b - 1, and the first layer where full "
                             "interchange's top1_src reaches 0.8 on train + validation "
                             "problems, or where it is largest; none: skip DAS)")
    parser.add_argument("--das-steps", type=int, default=200, help="Adam steps of DAS training")
    parser.add_argument("--das-lr", type=float, default=1e-2, help="Adam learning rate of DAS")
    parser.add_argument("--das-batch", type=int, default=32, help="interchange pairs per DAS step")
    parser.add_argument("--das-eval-every", type=int, default=10,
                        help="steps between validation losses (the best is kept)")
    parser.add_argument("--das-partners", type=int, default=4,
                        help="source problems per training problem (its swap partner and more "
                             "from the train split)")
    runs.add_smoke_arg(parser, SMOKE)
    parser.set_defaults(batch_size=None)  # resolved in main(): 512 on a GPU, 64 on a CPU
    return parser


if __name__ == "__main__":
    runs.run_cli(main, parse_args())
