"""Experiment A: activation patching of Z at a layer, English run <- Chinese source.

    python exp_a_patching.py --layer 32 --k 50                         # Qwen2.5-3B, every control
    python exp_a_patching.py --depth 0.889 --k 20 50 --source mean last  # the same depth on any model
    python exp_a_patching.py --model tiny-random --smoke               # smoke run, seconds, offline
    python exp_a_patching.py --summarize results/exp_a                 # SUMMARY.md, figures: no model

For every problem, the English prompt runs greedily under each condition, with the residual stream
at layer --layer patched at the prompt positions as h <- h + P_S (s - h) (common.SubspacePatch):
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
problem's Chinese prompt (pair "same") and with another problem's, whose answer differs ("swap").

Templates (--template): direct (default) ends the prompt right before the answer's first digit, so
the output is the answer and logp_ref is log p(its digits) right after the prompt; cot lets the
model calculate first and scores the answer after teacher-forcing the unpatched run's own text up
to its "The answer is" (logp_readout). ld = log p(own answer) - log p(swap partner's answer).
Statistics and the verdict: zcausal/summaries/exp_a.py (from the CSVs this script writes).
"""
import json
import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import common
from zcausal import decoding, problems, runs, stats, transport
from zcausal.summaries import exp_a as summary

CONDITIONS = ["none", "noop", "z", "zperp", "full", "en"]
RANDOM_CONDITIONS = ["rand_z", "rand_zperp"]
SWAPPED = {"z", "zperp", "full", "rand_z", "rand_zperp"}  # conditions also run with a swap source
COMPLEMENT = {"zperp", "full", "rand_zperp", "noop"}  # P_S = I - V^T V (noop, full: V = 0)
MAX_NEW_TOKENS = {"direct": 10, "cot": 100}  # direct: the digits of a 7-digit answer and one more
SMOKE = {"limit": 4, "n_random": 2, "n_random_logprob": 4, "k": [8], "depth": [0.5]}
DEFAULT_LAYER = 32


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
    """The scored random null: rand_z / rand_zperp under draws 0..M-1 (M = the larger of
    --n-random and --n-random-logprob; the first --n-random are the decoded draws), both pairs."""
    draws = max(args.n_random, args.n_random_logprob)
    return [job_key(i, layer, c, k, positions, source, j, d) for i, k, positions, source, c, d in
            product(range(n_problems), args.k, args.positions, args.source, RANDOM_CONDITIONS,
                    range(draws)) for j in (i, swap_of[i])]


def last_positions(source):
    """m for a last / last:m source, else None."""
    return (int(source.split(":")[1]) if ":" in source else 1) if source.startswith("last") else None


# ----------------------------------------------------------------------------------------------
# One layer's states, sources and bases

@torch.no_grad()
def capture_prompt_states(model, tokenizer, texts, spans, stream, batch_size):
    """Unpatched states at residual stream `stream` (-1: embeddings) for each prompt: (list of
    (T_i, d) float32 CPU tensors over real tokens, (N, d) float32 means over the question span)."""
    device = next(model.parameters()).device
    tokens, means = [None] * len(texts), [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        ids, mask, span_mask = common.tokenize_left_padded(
            tokenizer, [texts[i] for i in rows], [spans[i] for i in rows], device=device)
        hidden = common.capture_layer_outputs(model, ids, mask, [stream])[stream]
        pooled = common.mean_pool(hidden, span_mask)
        for b, i in enumerate(rows):
            tokens[i] = hidden[b][mask[b].bool()].float().cpu()
            means[i] = pooled[b].cpu()
    return tokens, torch.stack(means)


def prompt_texts(pairs, template, lang):
    """Templated prompts and the character span of each question inside them."""
    filled = [problems.format_prompt(template[lang], p[lang]) for p in pairs]
    return [t for t, _ in filled], [s for _, s in filled]


def basis_seed(seed, k, draw):
    """Seed of random draw `draw` of size k: the same draws at every layer and in every run."""
    return seed * 1_000_003 + k * 1_009 + draw


def make_bases(model, layer, ks, n_draws, seed, fold_norm=False, kind="uniform", cov_sqrt=None):
    """Z of `layer` and the random bases: dict ("z", k, -1) / ("rand", k, draw) -> float32 (k, d).
    kind "matched" draws with the activations' covariance (needs cov_sqrt, see stats)."""
    d = common.hidden_size(model)
    bases = {}
    for k in ks:
        bases[("z", k, -1)] = common.z_basis(model, layer, k, fold_norm=fold_norm)
        for draw in range(n_draws):
            if kind == "matched":
                v = stats.matched_random_basis(cov_sqrt, k, basis_seed(seed, k, draw))
                bases[("rand", k, draw)] = torch.from_numpy(v).float()
            else:
                bases[("rand", k, draw)] = common.random_basis(d, k, basis_seed(seed, k, draw))
    return bases


@dataclass
class LayerContext:
    """What every batch of one layer needs: the layer, the residual stream patched (the layer's
    output, or its input with --site input), the English prefill at that stream, the question
    means of both languages (N, d), the token states (lists of (T_i, d)), bases and OT sources."""
    layer: int
    stream: int
    prefill: dict
    en_means: torch.Tensor
    en_tokens: list
    zh_means: torch.Tensor
    zh_tokens: list
    bases: dict
    ot_sources: dict
    cov: np.ndarray
    device: dict = None  # the same sources and bases on the model's device (device_tables)


def device_tables(ctx, device):
    """What make_patch gathers from, on the model's device, so that a batch's patch is built
    there in a few indexed copies instead of on the host and copied over each batch: means (2N, d)
    (Chinese, then English question means), per k a (bases, k, d) stack of Z and the random draws
    with the row of each basis key, the Chinese prompts' token states and the OT sources."""
    stacks = {}
    for k in sorted({k for _, k, _ in ctx.bases}):
        keys = sorted(key for key in ctx.bases if key[1] == k)
        stacks[k] = (torch.stack([ctx.bases[key] for key in keys]).to(device),
                     {key: row for row, key in enumerate(keys)})
    return dict(means=torch.cat([ctx.zh_means, ctx.en_means]).float().to(device), stacks=stacks,
                zh_tokens=[t.to(device) for t in ctx.zh_tokens],
                ot=({key: v.float().to(device) for key, v in ctx.ot_sources.items()}))


def prepare_layer(model, tokenizer, pairs, template, layer, args, swap_of):
    """States, sources and bases of one layer (see LayerContext); the English prompts run through
    layers 0..stream once (decoding.shared_prefill)."""
    stream = layer if args.site == "output" else layer - 1
    tqdm.write(f"layer {layer}: English prompts through layers 0..{stream} (shared prefill), "
               f"Chinese prompt states")
    en_texts, en_spans = prompt_texts(pairs, template, "en")
    ids, mask, span_mask = common.tokenize_left_padded(tokenizer, en_texts, en_spans)
    prefill = decoding.shared_prefill(model, ids, mask, stream)
    real = prefill["attention_mask"].bool()
    en_tokens = [prefill["hidden"][i][real[i]].float().cpu() for i in range(len(pairs))]
    en_means = common.mean_pool(prefill["hidden"], span_mask).cpu()
    zh_texts, zh_spans = prompt_texts(pairs, template, "zh")
    zh_tokens, zh_means = capture_prompt_states(model, tokenizer, zh_texts, zh_spans, stream,
                                                args.batch_size)
    # Position 0 (the sink) is left out of the covariance, whose norm would dominate it; at most
    # 32768 tokens (seeded) keep it cheap for MGSM-sized runs.
    states = torch.cat([t[1:] for t in en_tokens + zh_tokens])
    keep = torch.randperm(len(states), generator=torch.Generator().manual_seed(0))[:32768]
    cov = stats.covariance(states[keep.sort().values].numpy())
    draws = max(args.n_random, args.n_random_logprob)
    tqdm.write(f"layer {layer}: Z and {draws} {args.random_kind} random bases per k")
    bases = make_bases(model, layer, args.k, draws, args.seed, args.fold_norm, args.random_kind,
                       stats.covariance_sqrt(cov) if args.random_kind == "matched" else None)
    ot_sources = {}
    if "ot" in args.source:
        scale = transport.robust_scale(en_tokens + zh_tokens)
        for i in range(len(pairs)):
            for j in (i, swap_of[i]):
                ot_sources[(i, j)] = transport.ot_source(en_tokens[i], zh_tokens[j], scale)[0]
    ctx = LayerContext(layer, stream, prefill, en_means, en_tokens, zh_means, zh_tokens, bases,
                       ot_sources, cov)
    ctx.device = device_tables(ctx, prefill["hidden"].device)
    return ctx


def variance_rows(ctx, args):
    """Share of the layer's activation variance in Z and in both kinds of random subspace (the
    uniform draws of the run's seeds, and variance-matched draws), one dict per basis."""
    d = ctx.cov.shape[0]
    cov_sqrt = stats.covariance_sqrt(ctx.cov)
    out = []
    for k in args.k:
        share = lambda v: stats.variance_share(np.asarray(v, np.float64), ctx.cov)  # noqa: E731
        out.append(dict(layer=ctx.layer, k=k, basis="z", draw=-1,
                        share=share(ctx.bases[("z", k, -1)])))
        for draw in range(max(args.n_random, 1)):
            seed = basis_seed(args.seed, k, draw)
            out.append(dict(layer=ctx.layer, k=k, basis="uniform", draw=draw,
                            share=share(common.random_basis(d, k, seed))))
            out.append(dict(layer=ctx.layer, k=k, basis="matched", draw=draw,
                            share=share(stats.matched_random_basis(cov_sqrt, k, seed))))
    return out


# ----------------------------------------------------------------------------------------------
# Patches

def make_patch(batch, ctx, rows, args):
    """A SubspacePatch for a batch of Jobs, built on the device of rows["hidden"] from
    ctx.device. rows: decoding.select_prefill of the batch's problems (prompts left-padded to a
    common width T; rows["hidden"] (B, T, d) are their own states)."""
    tables, hidden = ctx.device, rows["hidden"]
    device = hidden.device
    mask = rows["attention_mask"].bool().to(device)
    B, T = mask.shape
    n, d = ctx.zh_means.shape
    subspace = [b for b, j in enumerate(batch) if j.condition not in ("none", "noop", "full")]
    basis = torch.zeros(B, max([1] + [batch[b].k for b in subspace]), d, device=device)
    for k in sorted({batch[b].k for b in subspace}):
        at = [b for b in subspace if batch[b].k == k]
        stack, row = tables["stacks"][k]
        basis[at, :k] = stack[[row[("rand", k, batch[b].draw) if batch[b].condition in
                                    RANDOM_CONDITIONS else ("z", k, -1)] for b in at]]
    flags = lambda values: torch.tensor(values, device=device)  # noqa: E731
    complement = flags([j.condition in COMPLEMENT for j in batch])
    patch_generated = flags([j.positions == "all" and j.condition not in ("none", "noop")
                             for j in batch])
    source_mean = tables["means"][[n + j.problem if j.condition == "en" else j.source_problem
                                   for j in batch]]
    # last:m rows patch only their last m positions; --skip-first leaves each row's first real
    # token (the attention sink) alone
    first = flags([T - last_positions(j.source) if last_positions(j.source) and j.condition not in
                   ("none", "noop") else 0 for j in batch])
    prompt_mask = mask & (torch.arange(T, device=device)[None] >= first[:, None])
    if args.skip_first:
        prompt_mask[torch.arange(B, device=device), mask.float().argmax(1)] = False
    return common.SubspacePatch(layer=ctx.layer, basis=basis, complement=complement,
                                source_mean=source_mean, patch_generated=patch_generated,
                                source_tokens=source_tokens(batch, tables, hidden, source_mean),
                                prompt_mask=prompt_mask, site=args.site)


def source_tokens(batch, tables, hidden, source_mean):
    """(B, T, d) per-position sources on hidden's device, or None when every row's source is its
    mean: a row's own states (noop), its OT source or its last m Chinese states right-aligned,
    else its mean at every position."""
    per_token = [b for b, j in enumerate(batch) if j.condition == "noop" or (
        j.condition not in ("none", "en") and j.source != "mean")]
    if not per_token:
        return None
    B, T, d = hidden.shape
    tokens = source_mean[:, None, :].expand(B, T, d).clone()
    for b in per_token:
        job = batch[b]
        if job.condition == "noop":
            tokens[b] = hidden[b].float()
        elif job.source == "ot":
            ot = tables["ot"][(job.problem, job.source_problem)]
            tokens[b, T - len(ot):] = ot
        else:
            m = last_positions(job.source)
            tokens[b, T - m:] = tables["zh_tokens"][job.source_problem][-m:]
    return tokens


def patch_sizes(patch, hidden, attention_mask):
    """Mean over the patched real prompt positions of |P_S (s - h)|: (B,) float32 on the CPU."""
    patch.phase = "prompt"
    moved = patch(hidden)
    moved = (moved.float() - hidden.float()).norm(dim=-1) if moved is not None else \
        torch.zeros(hidden.shape[:2], device=hidden.device)
    where = attention_mask.bool() & patch.prompt_mask.to(hidden.device)
    return ((moved * where).sum(1) / where.sum(1).clamp(min=1)).cpu()


# ----------------------------------------------------------------------------------------------
# Decoding and scoring

def _decode_options(args, decode):
    """Engine and stop rule of a batch: a direct row is done once its number ends (read_output
    cuts at the same place either way, so the rows are the same with or without the stop)."""
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
    batch of Jobs under their patches. One result dict per job."""
    rows = decoding.select_prefill(ctx.prefill, [j.problem for j in batch])
    patch = make_patch(batch, ctx, rows, args).to(rows["input_ids"].device)
    sizes = patch_sizes(patch, rows["hidden"], rows["attention_mask"])
    sets, valid = score_sets(batch, *scoring) if scoring is not None else ([], [])
    stop_ids = problems.stop_token_ids(tokenizer)
    out = decoding.generate_and_score(
        model, rows["input_ids"], rows["attention_mask"], args.max_new_tokens if decode else 0,
        patch, stop_ids, score=sets, prefill=rows, **_decode_options(args, decode))
    results = []
    for b, job in enumerate(batch):
        result = {"job": job, "patch_size": float(sizes[b])}
        if decode:
            read = problems.read_output(tokenizer, out["tokens"][b].tolist(), stop_ids,
                                        args.template, args.max_new_tokens)
            read["tokens"] = json.dumps(read["tokens"])
            result.update(read)
        if sets:
            s = [float(x[b]) for x in out["scores"]]
            ref, swap = (s[0], s[1]) if len(s) == 2 else (s[0] - s[2], s[1] - s[2])
            result.update(logp_ref=ref if valid[b] else math.nan,
                          logp_swap=swap if valid[b] else math.nan)
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
    with tqdm(total=sum(map(len, pending)), desc=desc, unit="row", leave=False) as bar:
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
            for record in summary.load_table(self.path).to_dict("records"):
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
              earlier=frozenset()):
    """Decode and score every job of one layer not in the stores yet (decodes, scores: Store or
    dict-like with .add); `earlier`: jobs that belong to layers already run (the none rows).
    Returns (the layer's table rows, its scored null jobs, its variance rows)."""
    ctx = prepare_layer(model, tokenizer, pairs, template, layer, args, swap_of)
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

def score_of(job, decodes, scores):
    """(logp_ref, logp_swap) of a job: from the scoring pass, else from its decode (direct)."""
    r = scores[job] if job in scores else decodes[job]
    return float(r["logp_ref"]), float(r["logp_swap"])


def table_rows(rows, decodes, scores, pairs):
    """The rows.csv frame: each row with its decode, scores and comparisons to the none row."""
    records = []
    for r in rows:
        g = decodes[r["job"]]
        none_job = job_key(r["problem"], -1, "none", 0, "-", "-", r["problem"], -1)
        none = decodes[none_job]
        ref, swap = score_of(r["job"], decodes, scores)
        none_ref, none_swap = score_of(none_job, decodes, scores)
        own, src = pairs[r["problem"]], pairs[r["source_problem"]]
        unchanged = (g["answer"] is None and none["answer"] is None) or problems.answers_equal(
            g["answer"], none["answer"])
        if bool(g["truncated"]):
            outcome = "truncated"
        elif r["pair"] == "swap" and problems.answers_equal(g["answer"], float(src["answer"])):
            outcome = "transferred"
        else:
            outcome = "kept" if unchanged else "broken"
        records.append(dict(
            problem_id=own["id"], category=own["category"], layer=r["layer"], k=r["k"],
            positions=r["positions"], source=r["source"], condition=r["condition"],
            draw=r["draw"], pair=r["pair"], source_id=src["id"], output=g["output"],
            answer=g["answer"], reference=float(own["answer"]), source_answer=float(src["answer"]),
            correct=problems.answers_equal(g["answer"], float(own["answer"])),
            truncated=bool(g["truncated"]), answer_changed=not unchanged,
            baseline_language=none["language"], language=g["language"],
            language_changed=g["language"] != none["language"], outcome=outcome,
            logp_ref=ref, logp_swap=swap, ld=ref - swap, dlogp_ref=ref - none_ref,
            dlogp_swap=swap - none_swap, dld=(ref - swap) - (none_ref - none_swap),
            patch_size=float(g["patch_size"])))
    return pd.DataFrame(records)


def null_table(jobs, decodes, scores, pairs):
    """random_scores.csv: per problem and random draw, the scored measures (no decoding)."""
    records = []
    for job in jobs:
        ref, swap = score_of(job, decodes, scores)
        records.append(dict(problem_id=pairs[job.problem]["id"], layer=job.layer, k=job.k,
                            positions=job.positions, source=job.source, condition=job.condition,
                            draw=job.draw, pair="same" if job.source_problem == job.problem else "swap",
                            logp_ref=ref, logp_swap=swap, ld=ref - swap))
    return pd.DataFrame(records)


# ----------------------------------------------------------------------------------------------

def resolve_layers(config, args):
    """--layer or --depth (not both) to decoder layers; the default is layer 32."""
    if args.layer is not None and args.depth is not None:
        raise runs.UsageError("pass --layer or --depth, not both")
    if args.depth is not None:
        return [common.depth_to_layer(config, f) for f in args.depth]
    layers = args.layer if args.layer is not None else [DEFAULT_LAYER]
    return [common.check_layer(config, layer) for layer in layers]


def validate(args):
    """Every check that needs no weights, before anything is loaded or written. Resolves --layer
    (from --depth), --max-new-tokens (per template) and --batch-size in args."""
    device = common.check_runtime(args.device, args.dtype)
    if min(args.n_random, args.n_random_logprob) < 0 or (args.batch_size or 1) < 1 \
            or (args.max_new_tokens or 1) < 1:
        raise runs.UsageError("--n-random and --n-random-logprob must be >= 0, --batch-size and "
                              "--max-new-tokens >= 1")
    if not 0 < args.keep_threshold < 1:
        raise runs.UsageError(f"--keep-threshold {args.keep_threshold}: pass a rate in (0, 1)")
    if "all" in args.positions and any(s != "mean" and s != "ot" for s in args.source):
        raise runs.UsageError("--positions all patches generated tokens with a mean: use it with "
                              "--source mean or ot, not last")
    config = common.load_model_config(args.model)
    args.layer = resolve_layers(config, args)
    for k in args.k:
        common.check_k(config, k, allow_full=False)
    pairs = problems.load_pairs(args)
    if len(pairs) < 2:
        raise runs.UsageError("need at least 2 pairs (the swap source is another problem)")
    template = problems.get_template(problems.load_prompts(args.prompts)["templates"], args.template)
    if args.max_new_tokens is None:
        args.max_new_tokens = MAX_NEW_TOKENS[args.template]
    if args.batch_size is None:  # decoding is memory-bound: big batches on a GPU, small on a CPU
        args.batch_size = 256 if device.type == "cuda" else 64
    return pairs, template


def write_outputs(out, rows, null, variance, decodes, scores, pairs, template_name):
    """rows.csv, random_scores.csv and variance.csv (named for the template's measure), and the
    job stores rewritten in job order."""
    names = summary.measure_names(template_name)
    runs.write_csv(table_rows(rows, decodes, scores, pairs).rename(columns=names), out / "rows.csv")
    runs.write_csv(null_table(null, decodes, scores, pairs).rename(columns=names),
                   out / "random_scores.csv")
    runs.write_csv(pd.DataFrame(variance), out / "variance.csv")
    decodes.rewrite_sorted()
    scores.rewrite_sorted()


def main(args):
    if args.summarize is not None:
        return summary.summarize(args.summarize, args.figures)
    pairs, template = validate(args)
    out = runs.prepare_out_dir(args.out, args.overwrite, args.resume, args, args.figures)
    args.out = out
    runs.set_seed(args.seed)
    model, tokenizer = common.load_model(args.model, args.dtype, args.device, seed=args.seed)
    shortest = min(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                   for lang in ("en", "zh") for t in prompt_texts(pairs, template, lang)[0])
    if max([0] + [last_positions(s) or 0 for s in args.source]) > shortest:
        if not args.resume and not any(out.iterdir()):
            out.rmdir()  # nothing is left behind by a refused command
        raise runs.UsageError(f"--source last:M: M is longer than the shortest prompt "
                              f"({shortest} tokens); pass a smaller M")
    swap_of = problems.derangement([p["answer"] for p in pairs], args.seed)
    if not args.resume:  # a resumed run keeps the config.json it was started with
        runs.write_json(out / "config.json", runs.run_config(
            args, model, template=template, n_pairs=len(pairs), layers_resolved=dict(
                depth=args.depth, layer=args.layer, num_layers=common.num_layers(model)),
            swap_source={p["id"]: pairs[j]["id"] for p, j in zip(pairs, swap_of)},
            random_basis_seeds="seed * 1000003 + k * 1009 + draw"))
    decodes, scores = Store(out / "generations.csv", pairs), Store(out / "scores.csv", pairs)
    rows, null, variance, earlier = [], [], [], set()
    for layer in args.layer:
        r, n, v, decoded = run_layer(model, tokenizer, pairs, template, layer, args, swap_of,
                                     decodes, scores, earlier)
        rows, null, variance, earlier = rows + r, null + n, variance + v, earlier | decoded
    write_outputs(out, rows, null, variance, decodes, scores, pairs, args.template)
    result = summary.summarize(out, args.figures)
    print(f"wrote {out}/SUMMARY.md")
    return result


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
    problems.add_pairs_args(parser)
    decoding.add_decode_args(parser)
    parser.add_argument("--layer", type=int, nargs="+", default=None,
                        help=f"decoder layer(s) to patch; default {DEFAULT_LAYER} (Qwen2.5-3B's)")
    parser.add_argument("--depth", type=float, nargs="+", default=None, metavar="F",
                        help="instead of --layer: layer round(F x number of layers), the same "
                             "depth on any model (0.889: 32 of 36, 21 of 24, 25 of 28)")
    parser.add_argument("--k", type=int, nargs="+", default=[50], help="dimension(s) of Z")
    parser.add_argument("--template", choices=["direct", "cot"], default="direct",
                        help="direct: the prompt ends right before the answer's first digit; cot: "
                             "the model calculates first (scored at its 'The answer is')")
    parser.add_argument("--positions", nargs="+", choices=["prompt", "all"], default=["prompt"],
                        help="prompt: patch the prompt only; all: also every generated token "
                             "(with the mean source)")
    parser.add_argument("--source", nargs="+", type=source_arg, default=["mean"],
                        help="mean, ot, last, last:M (see the description above)")
    parser.add_argument("--site", choices=["output", "input"], default="output",
                        help="patch decoder layer l's output (the residual stream after l) or its "
                             "input (the stream l's W_Q and W_K read, = layer l-1's output)")
    parser.add_argument("--skip-first", action="store_true",
                        help="leave position 0 (the attention sink) unpatched")
    parser.add_argument("--n-random", type=int, default=19,
                        help="random k-dim subspaces decoded per (layer, k): 19 is the fewest for "
                             "a rank-test p of 0.05")
    parser.add_argument("--n-random-logprob", type=int, default=200, metavar="M",
                        help="random subspaces scored by teacher forcing (no decoding) for the "
                             "rank tests of the log-prob measures; the first --n-random are the "
                             "decoded draws")
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
                             "(default: raw weights, as Phase 2 built Z)")
    runs.add_smoke_arg(parser, SMOKE)
    parser.add_argument("--summarize", type=Path, default=None, metavar="DIR",
                        help="only rebuild the summary and figures of a finished run from its CSVs")
    parser.set_defaults(batch_size=None)  # resolved in validate(): 256 on a GPU, 64 on a CPU
    return parser


def parse_args(argv=None):
    """The flags, with --smoke's values filled in where the command leaves them at the default."""
    parser = build_parser()
    return runs.apply_smoke(parser, parser.parse_args(argv), SMOKE, unless={"depth": "layer"})


if __name__ == "__main__":
    runs.run_cli(main, parse_args())
