"""Experiment A: activation patching of Z at a layer, English run <- Chinese source.

    python exp_a_patching.py --k 20 50                             # layer 32 of 36 at this depth
    python exp_a_patching.py --depth 0.889 --k 20 50 --source mean last  # the same depth, named
    python exp_a_patching.py --model tiny-random --smoke           # smoke run, seconds, offline
    python exp_a_patching.py --replot --out results/exp_a          # SUMMARY.md, figures: no model

Problems: the generated bank's first 200 pairs by default (--prompts bank, --limit; or a
prompts.json-style file, or MGSM), templates from prompts.json. The unpatched model first answers
every pair in both languages with the run's template, and only the pairs --solved keeps (default
both: correct in both) are measured (solved.csv; tried / kept per language in config.json and the
summary); fewer than --min-pairs kept stops the run with one line before the long part. Swap
partners are drawn among the kept pairs with a different first digit.

For every problem, the English prompt runs greedily under each condition, with the residual stream
entering layer --layer (--site input, the default: the state whose keys and queries Z is built
from; --site output: the stream after it) patched at the prompt positions as h <- h + P_S (s - h)
(common.SubspacePatch). Every row also records how far its patch moves the attention of the layer
that reads the patched stream (the basis layer itself at --site input): attn_tv_last /
attn_tv_all, the total variation between patched and clean attention rows, averaged over heads,
at the last prompt position and over all positions (zcausal/attention.py). Conditions:
  none    no patch                        noop    s = the row's own states (the noise floor: the
  z       replace the Z part of h                 same code path and batches as every patch)
  zperp   replace the Z-perp part         full    replace everything (h <- s)
  en      the Z part, with the English prompt's own question mean as s (mean source only): a mean
          written in without any Chinese content
  rand_z / rand_zperp   the same with random k-dim subspaces (--n-random decoded draws,
          --n-random-logprob scored draws; --random-kind uniform or variance-matched)
Sources s (--source): mean = the Chinese prompt's mean over its question tokens; ot = per English
position, the barycentric image of an exact OT plan between the two token clouds; last / last:m =
the Chinese prompt's final m states written into the English prompt's final m positions (with the
direct template the last one predicts the answer's first digit). Each condition runs with the same
problem's Chinese prompt (pair "same") and with another problem's, whose first digit differs
("swap").

Templates (--template): direct (default) ends the prompt right before the answer's first digit and
states the unit in its examples, so a row is decoded to the unit word ("386 minutes" / "386 分")
and its language shows; logp_ref is log p(the answer's digits) right after the prompt. cot lets
the model calculate first and scores the answer after teacher-forcing the unpatched run's own text
up to its "The answer is" (logp_readout). Every row also records ld = log p(own answer) - log
p(swap partner's answer); first_ref / first_swap, log p of the two first digits, whose share
p_share = p_src / (p_src + p_own) and whose argmax (top1_own / top1_src) say where the first digit
goes; and lang_ref, the language margin log P(Latin word) - log P(Chinese word) right after the
reference answer (common.language_margin). Statistics, the declared primary test and the verdict:
zcausal/summaries/exp_a.py (from the CSVs this script writes).
"""
import json
import math
from itertools import product
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from tqdm.auto import tqdm

import common
from zcausal import answered, decoding, layer_choice, prereg, problems, runs, stats
from zcausal.conditions import SHARED_FORMULA
from zcausal.patching import (RANDOM_CONDITIONS, attention_read_layer, last_positions,
                              make_patch, patch_readouts, patch_sizes, prepare_layer,
                              prompt_texts, variance_rows)
from zcausal.summaries import exp_a as summary
from zcausal.summaries import exp_a_tables as tables

CONDITIONS = ["none", "noop", "z", "zperp", "full", "en"]
SWAPPED = {"z", "zperp", "full", "rand_z", "rand_zperp"}  # conditions also run with a swap source
# direct: 5 digits, a space, a character split over 3 bytes, and one more
MAX_NEW_TOKENS = {"direct": 10, "cot": 100}
SMOKE = {"limit": 4, "solved": "off", "min_pairs": 2, "n_random": 2, "n_random_logprob": 4,
         "k": [8], "depth": [0.5]}
BANK_PAIRS = 200  # --prompts bank without --limit: the bank's first 200 pairs are tried
# The language criteria need 20 English baselines (below 20 a rate's 95% interval is wider than
# 0.4), so a run needs at least 20 kept pairs; 20 is also where an exact one-sided McNemar test can
# pass with a quarter of the problems changed.
MIN_PAIRS = 20


# ----------------------------------------------------------------------------------------------
# Jobs: one decode (or one teacher-forced score) each, shared by every table row that needs it

class Job(NamedTuple):
    problem: int
    layer: int
    condition: str
    k: int
    positions: str
    source: str
    source_problem: int
    draw: int


def job_key(problem, layer, condition, k, positions, source, source_problem, draw):
    """Canonical Job: fields a condition does not depend on are blanked, so none is decoded once
    per problem, noop once per (problem, layer) and full once per (layer, positions, source)."""
    if condition == "none":
        return Job(problem, -1, "none", 0, "-", "-", problem, -1)
    if condition == "noop":
        return Job(problem, layer, "noop", 0, "-", "-", problem, -1)
    if condition == "full":
        k = 0
    return Job(problem, layer, condition, k, positions, source, source_problem, draw)


def conditions_for(source, n_draws):
    """(condition, draw, pairs) of one configuration: en only for the mean source (for ot and last
    the English prompt's own source is the noop), swap rows only where a source carries content."""
    out = [(c, -1) for c in CONDITIONS if c != "en" or source == "mean"]
    out += [(c, d) for c in RANDOM_CONDITIONS for d in range(n_draws)]
    return [(c, d, ("same", "swap") if c in SWAPPED else ("same",)) for c, d in out]


def build_rows(n_problems, layer, args, swap_of):
    """Every (problem, configuration, condition, draw, pair) row of the table for one layer."""
    rows = []
    for i, k, positions, source in product(range(n_problems), args.k, args.positions, args.source):
        for condition, draw, pairs in conditions_for(source, args.n_random):
            for pair in pairs:
                j = i if pair == "same" else swap_of[i]
                rows.append(dict(problem=i, layer=layer, k=k, positions=positions, source=source,
                                 condition=condition, draw=draw, pair=pair, source_problem=j,
                                 job=job_key(i, layer, condition, k, positions, source, j, draw)))
    return rows


def null_jobs(n_problems, layer, args, swap_of):
    """The scored random null, both pairs: rand_z under draws 0..M-1 (M = the larger of --n-random
    and --n-random-logprob; the first --n-random are the decoded draws), rand_zperp under its
    --n-random decoded draws only. Z is the hypothesis and its rank tests need the many draws; Z-perp
    is the plan's control, and scoring it M times would double the run for secondary tests."""
    draws = {"rand_z": max(args.n_random, args.n_random_logprob), "rand_zperp": args.n_random}
    return [job_key(i, layer, c, k, positions, source, j, d)
            for i, k, positions, source, c in product(range(n_problems), args.k, args.positions,
                                                      args.source, RANDOM_CONDITIONS)
            for d in range(draws[c]) for j in (i, swap_of[i])]


# ----------------------------------------------------------------------------------------------
# Decoding and scoring

def _decode_options(args, decode):
    """Engine and stop rule of a batch: a direct row is done once its answer ends, the number and
    the first character of the word after it (problems.answer_end; read_output cuts at the same
    place either way, so the rows are the same with or without the stop)."""
    return {"engine": args.decode, "stop_when_number_ends": decode and args.template == "direct"}


def score_sets(batch, answer_ids, swap_of, readouts):
    """Teacher-forced continuations for a batch: direct (readouts None): [own answer, partner's
    answer] right after the prompt; cot: [readout + own, readout + partner's, readout alone], so
    log p(answer | prompt + readout) is a difference. Rows without a readout get a dummy and are
    marked (returned list of bools)."""
    if readouts is None:
        return [[answer_ids[j.problem][""] for j in batch],
                [answer_ids[swap_of[j.problem]][""] for j in batch]], [True] * len(batch)
    sets, valid = [[], [], []], []
    for j in batch:
        readout = readouts.get(j.problem)
        valid.append(readout is not None)
        prefix, sep = readout if readout is not None else ([0], "")
        sets[0].append(prefix + answer_ids[j.problem][sep])
        sets[1].append(prefix + answer_ids[swap_of[j.problem]][sep])
        sets[2].append(prefix)
    return sets, valid


def run_batch(model, tokenizer, ctx, batch, args, decode, scoring):
    """Decode (decode=True) and/or score (scoring: (answer_ids, swap_of, readouts) or None) one
    batch of Jobs under their patches. One result dict per job: the decode's fields, patch_size,
    attn_tv_last / attn_tv_all (how far the patch moves the attention of the layer reading the
    patched stream: the basis layer at --site input; patching.patch_readouts), and the scores:
    logp_ref / logp_swap (own / swap partner's answer), lang_ref (the language
    margin after the own answer) and, direct template only, first_ref / first_swap (log p of the
    two first digits right after the prompt) and top1 (the argmax there)."""
    rows = decoding.select_prefill(ctx.prefill, [j.problem for j in batch])
    patch = make_patch(batch, ctx, rows, args).to(rows["input_ids"].device)
    readouts = patch_readouts(model, patch, rows["hidden"], rows["attention_mask"],
                              attention_read_layer(model, ctx.stream))
    sets, valid = score_sets(batch, *scoring) if scoring is not None else ([], [])
    stop_ids = problems.stop_token_ids(tokenizer)
    out = decoding.generate_and_score(
        model, rows["input_ids"], rows["attention_mask"], args.max_new_tokens if decode else 0,
        patch, stop_ids, score=sets, prefill=rows, digits=tokenizer,
        languages=ctx.languages, margin_sets=[0], **_decode_options(args, decode))
    direct = args.template == "direct"
    results = []
    for b, job in enumerate(batch):
        result = {"job": job, **{name: float(value[b]) for name, value in readouts.items()}}
        if decode:
            read = problems.read_output(tokenizer, out["tokens"][b].tolist(), stop_ids,
                                        args.template, args.max_new_tokens)
            read["tokens"] = json.dumps(read["tokens"])
            result.update(read)
        if sets:
            s = [float(x[b]) for x in out["scores"]]
            ref, swap = (s[0], s[1]) if len(s) == 2 else (s[0] - s[2], s[1] - s[2])
            first = [float(x[b]) for x in out["first_scores"]] if direct else [math.nan] * 2
            result.update({name: value if valid[b] else math.nan for name, value in dict(
                logp_ref=ref, logp_swap=swap, lang_ref=float(out["margins"][0][b]),
                first_ref=first[0], first_swap=first[1],
                top1=int(out["top1"][b]) if direct else math.nan).items()})
        results.append(result)
    return results


def run_jobs(model, tokenizer, ctx, jobs, args, done, on_results, decode, scoring, desc):
    """Run `jobs` in batches sorted by prompt length; batches whose jobs are all in `done` (a
    resumed run) are skipped, so the remaining batches are the ones an uninterrupted run makes.
    A batch that runs out of GPU memory is split in two."""
    length = ctx.prefill["attention_mask"].sum(1).tolist()
    jobs = sorted(set(jobs), key=lambda j: (length[j.problem], j))
    pending = [jobs[s:s + args.batch_size] for s in range(0, len(jobs), args.batch_size)]
    pending = [b for b in pending if not all(j in done for j in b)]
    # nothing left (a resumed run): no bar at all rather than an empty one
    with tqdm(total=sum(map(len, pending)), desc=desc, unit="row", leave=False,
              disable=not pending) as bar:
        while pending:
            batch = pending.pop(0)
            try:
                results = run_batch(model, tokenizer, ctx, batch, args, decode, scoring)
            except torch.cuda.OutOfMemoryError:
                if len(batch) == 1:
                    raise
                torch.cuda.empty_cache()
                half = len(batch) // 2
                pending[:0] = [batch[:half], batch[half:]]
                tqdm.write(f"out of memory: batch of {len(batch)} split in two")
                continue
            on_results(results)
            bar.update(len(batch))


# ----------------------------------------------------------------------------------------------
# On-disk stores: every finished batch is appended, so an interrupted run resumes where it stopped

JOB_FIELDS = list(Job._fields)


class Store:
    """Results keyed by Job in a CSV (generations.csv: decodes; scores.csv: teacher-forced scores
    that no decode gave), appended batch by batch and read back by --resume; path None: in memory."""

    def __init__(self, path, pairs):
        self.path, self.pairs, self.results = Path(path) if path else None, pairs, {}
        if self.path is not None and self.path.is_file():
            for record in tables.load_table(self.path).to_dict("records"):
                job = Job(*[int(record[f]) if f in ("problem", "layer", "k", "source_problem",
                                                     "draw") else str(record[f]) for f in JOB_FIELDS])
                result = {k: v for k, v in record.items() if k not in JOB_FIELDS + ["problem_id"]}
                if "answer" in result and pd.isna(result["answer"]):
                    result["answer"] = None
                self.results[job] = result

    def __contains__(self, job):
        return job in self.results

    def __getitem__(self, job):
        return self.results[job]

    def frame(self, results):
        return pd.DataFrame([dict(zip(JOB_FIELDS, job), problem_id=self.pairs[job.problem]["id"],
                                  **{k: v for k, v in r.items() if k != "job"}) for job, r in results])

    def add(self, results):
        """Keep a finished batch and append it to the file in one write (an interrupt lands
        between batches, never inside a line)."""
        import csv
        for r in results:
            self.results[r["job"]] = {k: v for k, v in r.items() if k != "job"}
        if self.path is None:
            return
        text = self.frame([(r["job"], r) for r in results]).to_csv(
            index=False, header=not self.path.exists(), quoting=csv.QUOTE_NONNUMERIC)
        with self.path.open("a", encoding="utf-8", newline="") as f:
            f.write(text)

    def rewrite_sorted(self):
        """The final file in job order: the same bytes whether or not the run was interrupted."""
        if self.results and self.path is not None:
            runs.write_csv(self.frame(sorted(self.results.items())), self.path)


def answer_token_ids(tokenizer, pairs):
    """Per problem, the answer's ids keyed by what precedes them: "" (the direct prompt, or a cot
    readout ending in "答案是") and " " (a cot readout ending in "The answer is")."""
    return [{"": problems.answer_continuation(tokenizer, p["answer"], "en", "direct"),
             " ": tokenizer(" " + problems.format_number(p["answer"]),
                            add_special_tokens=False)["input_ids"]} for p in pairs]


def readout_prefixes(tokenizer, pairs, decodes):
    """cot: per problem, (the unpatched run's ids up to its "The answer is", sep), or None."""
    out = {}
    for i in range(len(pairs)):
        g = decodes[job_key(i, -1, "none", 0, "-", "-", i, -1)]
        ids = json.loads(g["tokens"])
        out[i] = problems.readout_prefix(tokenizer, ids)
    return out


def run_layer(model, tokenizer, pairs, template, layer, args, swap_of, decodes, scores,
              earlier=frozenset(), languages=None):
    """Decode and score every job of one layer not in the stores yet (decodes, scores: Store or
    dict-like with .add); `earlier`: jobs that belong to layers already run (the none rows).
    Returns (the layer's table rows, its scored null jobs, its variance rows)."""
    ctx = prepare_layer(model, tokenizer, pairs, template, layer, args, swap_of, languages)
    rows = build_rows(len(pairs), layer, args, swap_of)
    decoded = sorted({r["job"] for r in rows} - set(earlier))
    null = sorted(set(null_jobs(len(pairs), layer, args, swap_of)))
    answer_ids = answer_token_ids(tokenizer, pairs)
    direct = args.template == "direct"
    run_jobs(model, tokenizer, ctx, decoded, args, decodes, decodes.add, True,
             (answer_ids, swap_of, None) if direct else None, f"layer {layer} decode")
    readouts = None if direct else readout_prefixes(tokenizer, pairs, decodes)
    to_score = [j for j in null if j not in decodes] if direct else sorted(set(null) | set(decoded))
    run_jobs(model, tokenizer, ctx, to_score, args, scores, scores.add, False,
             (answer_ids, swap_of, readouts), f"layer {layer} score")
    return rows, null, variance_rows(ctx, args), set(decoded)


# ----------------------------------------------------------------------------------------------
# Tables

SCORED = ("logp_ref", "logp_swap", "first_ref", "first_swap", "top1", "lang_ref")
READOUTS = ("attn_tv_last", "attn_tv_all")  # the patch's effect on the reading layer's attention


def score_of(job, decodes, scores):
    """The SCORED fields of a job, floats: from the scoring pass, else from its decode (direct)."""
    r = scores[job] if job in scores else decodes[job]
    return {name: float(r[name]) for name in SCORED}


def readouts_of(job, decodes, scores):
    """The READOUTS of a job, floats (NaN for a run from before they were measured)."""
    r = scores[job] if job in scores else decodes[job]
    return {name: float(r.get(name, math.nan)) for name in READOUTS}


def first_digit_fields(s, own, partner, first_ids):
    """top1_own / top1_src (the argmax at the last prompt position is the own / the swap
    partner's first digit; None without a top1, the cot template) and p_share = p_partner /
    (p_partner + p_own) over the two first digits."""
    if math.isnan(s["top1"]):
        return dict(top1_own=None, top1_src=None, p_share=math.nan)
    top1 = int(s["top1"])
    return dict(top1_own=top1 == first_ids[own], top1_src=top1 == first_ids[partner],
                p_share=1 / (1 + math.exp(s["first_ref"] - s["first_swap"])))


def table_rows(rows, decodes, scores, pairs, swap_of, first_ids):
    """The rows.csv frame: each row with its decode, scores and comparisons to the none row (the
    d* columns: patched minus unpatched). first_ids: each problem's first answer token."""
    records = []
    for r in rows:
        g = decodes[r["job"]]
        none_job = job_key(r["problem"], -1, "none", 0, "-", "-", r["problem"], -1)
        none = decodes[none_job]
        s, s0 = score_of(r["job"], decodes, scores), score_of(none_job, decodes, scores)
        own, src = pairs[r["problem"]], pairs[r["source_problem"]]
        digits = first_digit_fields(s, r["problem"], swap_of[r["problem"]], first_ids)
        digits0 = first_digit_fields(s0, r["problem"], swap_of[r["problem"]], first_ids)
        unchanged = (g["answer"] is None and none["answer"] is None) or problems.answers_equal(
            g["answer"], none["answer"])
        if bool(g["truncated"]):
            outcome = "truncated"
        elif r["pair"] == "swap" and problems.answers_equal(g["answer"], float(src["answer"])):
            outcome = "transferred"
        else:
            outcome = "kept" if unchanged else "broken"
        ref, swap, ld0 = s["logp_ref"], s["logp_swap"], s0["logp_ref"] - s0["logp_swap"]
        records.append(dict(
            problem_id=own["id"], category=own["category"], layer=r["layer"], k=r["k"],
            positions=r["positions"], source=r["source"], condition=r["condition"],
            draw=r["draw"], pair=r["pair"], source_id=src["id"], output=g["output"],
            answer=g["answer"], reference=float(own["answer"]), source_answer=float(src["answer"]),
            correct=problems.answers_equal(g["answer"], float(own["answer"])),
            truncated=bool(g["truncated"]), answer_changed=not unchanged,
            baseline_language=none["language"], language=g["language"],
            language_changed=problems.changed_language(none["language"], g["language"]),
            to_zh=none["language"] == "en" and g["language"] == "zh", outcome=outcome,
            logp_ref=ref, logp_swap=swap, ld=ref - swap, dlogp_ref=ref - s0["logp_ref"],
            dlogp_swap=swap - s0["logp_swap"], dld=(ref - swap) - ld0,
            first_ref=s["first_ref"], first_swap=s["first_swap"], top1=s["top1"], **digits,
            dp_share=digits["p_share"] - digits0["p_share"], lang_ref=s["lang_ref"],
            dlang_ref=s["lang_ref"] - s0["lang_ref"], patch_size=float(g["patch_size"]),
            **readouts_of(r["job"], decodes, scores)))
    return pd.DataFrame(records)


def null_table(jobs, decodes, scores, pairs, swap_of, first_ids):
    """random_scores.csv: per problem and scored random draw, the scored measures (no decoding)."""
    records = []
    columns = ["problem_id", "layer", "k", "positions", "source", "condition", "draw", "pair",
               *SCORED, "ld", "top1_own", "top1_src", "p_share", *READOUTS]
    for job in jobs:
        s = score_of(job, decodes, scores)
        records.append(dict(problem_id=pairs[job.problem]["id"], layer=job.layer, k=job.k,
                            positions=job.positions, source=job.source, condition=job.condition,
                            draw=job.draw,
                            pair="same" if job.source_problem == job.problem else "swap",
                            **s, ld=s["logp_ref"] - s["logp_swap"],
                            **first_digit_fields(s, job.problem, swap_of[job.problem], first_ids),
                            **readouts_of(job, decodes, scores)))
    return pd.DataFrame(records, columns=columns)


# ----------------------------------------------------------------------------------------------

def validate(args):
    """Every check that needs no weights, before anything is loaded or written. Resolves --layer
    (from --depth), --max-new-tokens (per template) and --batch-size in args. Returns (the pairs
    to try, the template)."""
    device = common.check_runtime(args.device, args.dtype, args.device_map)
    if args.n_random_logprob < args.n_random:
        raise runs.UsageError(f"--n-random-logprob {args.n_random_logprob} is fewer than "
                              f"--n-random {args.n_random}: the decoded draws are among the scored "
                              f"ones; pass --n-random-logprob {args.n_random} or more")
    if not 0 < args.keep_threshold < 1:
        raise runs.UsageError(f"--keep-threshold {args.keep_threshold}: pass a rate in (0, 1)")
    if "all" in args.positions and any(s != "mean" and s != "ot" for s in args.source):
        raise runs.UsageError("--positions all patches generated tokens with a mean: use it with "
                              "--source mean or ot, not last")
    config = common.load_model_config(args.model)
    args.layer = layer_choice.resolve_layers(config, args.layer, args.depth)
    for k in args.k:
        common.check_k(config, k, allow_full=False)
    pairs = problems.load_pairs(args, bank_limit=BANK_PAIRS)
    if len(pairs) < 2:
        raise runs.UsageError("need at least 2 pairs (the swap source is another problem); pass a "
                              "larger --limit")
    template = problems.get_template(problems.load_templates(args), args.template)
    if args.max_new_tokens is None:
        args.max_new_tokens = MAX_NEW_TOKENS[args.template]
    if args.batch_size is None:  # decoding is memory-bound: big batches on a GPU, small on a CPU
        args.batch_size = 256 if device.type == "cuda" else 64
    return pairs, template


def select_pairs(model, tokenizer, pairs, template, args, out):
    """The pairs the run measures: those the unpatched model answers as --solved asks (answered.py;
    a resumed run reads its solved.csv), at least --min-pairs of them, else a UsageError before
    anything is written. Returns (kept pairs, the selection record for config.json)."""
    path = out / "solved.csv"
    if args.resume and path.is_file():
        table = runs.load_csv(path)
    else:
        table = answered.answer_table(model, tokenizer, pairs, template, args.template,
                                      args.batch_size, args.decode)
        table = table.assign(kept=answered.kept_mask(table, args.solved))
    record = answered.solved_record(table, args.solved)
    answered.require_kept(record, args.min_pairs,
                          f"the run (--min-pairs; the language criteria need {MIN_PAIRS} "
                          f"English baselines)")
    runs.write_csv(table, path)
    kept = [p for p, keep in zip(pairs, table.kept.astype(bool)) if keep]
    print(f"{record['kept']} of {record['tried']} pairs kept (--solved {args.solved}: correct in "
          f"English {record['correct_en']}, in Chinese {record['correct_zh']}, both "
          f"{record['correct_both']})")
    return kept, record


def check_last_source(tokenizer, pairs, template, args):
    """--source last:M needs M <= the shortest prompt, in either language."""
    shortest = min(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                   for lang in ("en", "zh") for t in prompt_texts(pairs, template, lang)[0])
    if max([0] + [last_positions(s) or 0 for s in args.source]) > shortest:
        raise runs.UsageError(f"--source last:M: M is longer than the shortest prompt "
                              f"({shortest} tokens); pass a smaller M")


def write_outputs(out, rows, null, variance, decodes, scores, pairs, swap_of, tokenizer, args):
    """rows.csv, random_scores.csv and variance.csv (named for the template's measure), and the
    job stores rewritten in job order."""
    names = tables.measure_names(args.template)
    first_ids = [problems.answer_continuation(tokenizer, p["answer"], "en", "direct")[0]
                 for p in pairs]
    runs.write_csv(table_rows(rows, decodes, scores, pairs, swap_of, first_ids).rename(
        columns=names), out / "rows.csv")
    runs.write_csv(null_table(null, decodes, scores, pairs, swap_of, first_ids).rename(
        columns=names), out / "random_scores.csv")
    runs.write_csv(pd.DataFrame(variance), out / "variance.csv")
    decodes.rewrite_sorted()
    scores.rewrite_sorted()


def start_run(args, pairs, template):
    """The output folder, the model and the measured pairs; a refused run (too few pairs kept, a
    last:M source too long) leaves nothing behind. Returns (out, model, tokenizer, kept, record)."""
    fresh = not Path(args.out).exists() or not any(Path(args.out).iterdir())
    out = runs.prepare_out_dir(args.out, args.overwrite, args.resume, args, args.figures)
    args.out = out
    runs.set_seed(args.seed)
    try:
        model, tokenizer = common.load_model(args.model, args.dtype, args.device, seed=args.seed,
                                             device_map=args.device_map)
        check_last_source(tokenizer, pairs, template, args)
        kept, record = select_pairs(model, tokenizer, pairs, template, args, out)
    except (runs.UsageError, KeyboardInterrupt):
        if fresh and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing is left behind by a refused command
        raise
    return out, model, tokenizer, kept, record


def work(args, n_pairs, config):
    """The rows a run decodes or scores on n_pairs pairs, the unit of A's time in the cost model
    (zcausal/cost.py): per pair, patched layer and configuration, the conditions and --n-random
    draws of random Z and Z-perp with their swap sources (conditions_for), and the random Z draws
    scored beyond the decoded ones (both sources)."""
    layers = len(args.layer or args.depth or [None])
    configs = len(args.k) * len(args.positions) * len(args.source)
    decoded = sum(len(pairs) for _, _, pairs in conditions_for("mean", args.n_random))
    scored = 2 * max(args.n_random_logprob - args.n_random, 0)
    return n_pairs * layers * configs * (decoded + scored)


def main(args):
    runs.validate_common(args)
    if args.replot:
        return summary.replot(args)
    tried, template = validate(args)
    out, model, tokenizer, pairs, solved = start_run(args, tried, template)
    swap_of = problems.derangement([p["answer"] for p in pairs], args.seed,
                                   key=problems.first_digit)
    if not args.resume:  # a resumed run keeps the config.json it was started with
        layers = dict(depth=args.depth, layer=args.layer, num_layers=common.num_layers(model),
                      plan_layer=common.plan_layer_at_depth(model))
        primary = tables.primary_config(args.layer, args.k, args.positions, args.source,
                                        layers["plan_layer"])
        runs.write_json(out / "config.json", runs.run_config(
            args, model, template=template, n_pairs=len(pairs), solved=solved,
            layers_resolved=layers, primary_test=dict(
                zip(tables.CONFIG, primary), site=args.site,
                description=tables.primary_description(primary, args.site, layers)),
            preregistration=prereg.record("A"),
            swap_source={p["id"]: pairs[j]["id"] for p, j in zip(pairs, swap_of)},
            random_basis_seeds=SHARED_FORMULA,
            language_margin="log P(Latin word) - log P(Chinese word) right after the reference "
                            "answer, a lone space marginalised (common.language_margin)"))
    languages = common.LanguageClasses(tokenizer)
    decodes, scores = Store(out / "generations.csv", pairs), Store(out / "scores.csv", pairs)
    rows, null, variance, earlier = [], [], [], set()
    for layer in args.layer:
        r, n, v, decoded = run_layer(model, tokenizer, pairs, template, layer, args, swap_of,
                                     decodes, scores, earlier, languages)
        rows, null, variance, earlier = rows + r, null + n, variance + v, earlier | decoded
    write_outputs(out, rows, null, variance, decodes, scores, pairs, swap_of, tokenizer, args)
    return summary.replot(args)  # the tables, SUMMARY.md and figures; prints verdicts and paths


def source_arg(value):
    """--source values: mean, ot, last, last:M (M >= 1)."""
    if value in ("mean", "ot", "last"):
        return value
    if value.startswith("last:") and value[5:].isdigit() and int(value[5:]) >= 1:
        return value
    import argparse
    raise argparse.ArgumentTypeError(f"{value!r}: choose mean, ot, last or last:M with M >= 1")


def build_parser():
    parser = runs.make_parser(__doc__)
    common.add_common_args(parser, "exp_a")
    problems.add_pairs_args(parser, default=problems.BANK)
    answered.add_solved_arg(parser)
    parser.add_argument("--min-pairs", type=int, default=MIN_PAIRS,
                        help="stop before the long part when fewer pairs are kept: the language "
                             f"criteria need {MIN_PAIRS} English baselines (below 20 a rate's 95%% "
                             "interval is wider than 0.4)")
    decoding.add_decode_args(parser)
    layer_choice.add_layer_args(parser, " and patched (--site: at its output or its input)",
                          several=True)
    parser.add_argument("--k", type=int, nargs="+", default=[50],
                        help="dimension(s) of Z, each 1..d-1 (the primary test is at k 50)")
    parser.add_argument("--template", choices=["direct", "cot"], default="direct",
                        help="direct: the prompt ends right before the answer's first digit; cot: "
                             "the model calculates first (scored at its 'The answer is')")
    parser.add_argument("--positions", nargs="+", choices=["prompt", "all"], default=["prompt"],
                        help="prompt: patch the prompt only; all: also every generated token "
                             "(with the mean source)")
    parser.add_argument("--source", nargs="+", type=source_arg, default=["mean"],
                        help="mean, ot, last, last:M (see the description above)")
    parser.add_argument("--site", choices=["input", "output"], default="input",
                        help="input (default): patch the residual stream entering layer l, the "
                             "state its W_Q and W_K read, where Z acts (= layer l-1's output); "
                             "output: the stream after layer l, which only the layers above read")
    parser.add_argument("--skip-first", action="store_true",
                        help="leave position 0 (the attention sink) unpatched")
    parser.add_argument("--n-random", type=int, default=stats.N_RANDOM,
                        help=f"random k-dim subspaces decoded per (layer, k); {stats.N_RANDOM_WHY}")
    parser.add_argument("--n-random-logprob", type=int, default=200, metavar="M",
                        help="random Z subspaces scored by teacher forcing (no decoding) for "
                             "the rank tests of Z's scored measures; the first --n-random are the "
                             "decoded draws (random Z-perp is scored on its decoded draws only)")
    parser.add_argument("--random-kind", choices=["uniform", "matched"], default="uniform",
                        help="uniform (Haar) random subspaces, or drawn with the activations' "
                             "covariance at the layer (as much variance as the data give them)")
    parser.add_argument("--keep-threshold", type=float, default=0.2,
                        help="'keeps answers/language' needs the change rate's Wilson upper "
                             "bound at most this")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="greedy tokens per row; None: 10 (direct), 100 (cot)")
    parser.add_argument("--fold-norm", action="store_true",
                        help="fold the layer's input RMSNorm gain into W_Q, W_K before the SVD "
                             "(default: the raw weights, as Z is defined)")
    runs.add_smoke_arg(parser, SMOKE)
    parser.set_defaults(batch_size=None)  # resolved in validate(): 256 on a GPU, 64 on a CPU
    return parser


def parse_args(argv=None):
    """The flags, with --smoke's values filled in where the command leaves them at the default."""
    parser = build_parser()
    return runs.apply_smoke(parser, parser.parse_args(argv), SMOKE, unless={"depth": "layer"})


if __name__ == "__main__":
    runs.run_cli(main, parse_args())
