"""Experiment A: activation patching of Z at a layer, English run <- Chinese source.

    python exp_a_patching.py --layer 32 --k 50
    python exp_a_patching.py --layer 32 33 --k 20 50 --positions prompt all --source mean ot   # gold grid
    python exp_a_patching.py --summarize results/exp_a        # rebuild metrics, SUMMARY.md, figures

For every problem, the English prompt is decoded greedily under each condition, with the layer's
output patched as h <- h + P_S (s - h) (see common.SubspacePatch):
  none    no patch                          z       replace the Z part of h by the source's
  zperp   replace the Z-perp part           full    replace everything (h <- s)
  rand_z / rand_zperp   the same with a random k-dimensional subspace (--n-random draws): the
          control every Z effect is read against (NOTES section 2).
The source s is the Chinese prompt's state at the layer: its mean over the question's tokens
(--source mean, the plan's A.3) or, per English position, the barycentric image of an exact
optimal-transport plan between the two token clouds (--source ot, the plan's A.6). Each condition
runs with the Chinese version of the same problem ("same") and of a different problem with a
different answer ("swap"), so an answer that moves can be told apart from one that breaks.
--positions prompt patches the prompt only (generated tokens see it through the KV cache); all
also patches every generated step (with the mean source), the plan's literal reading.
"""
import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import common
import decoding
import problems
import runs
import stats

CONDITIONS = ["none", "z", "zperp", "full"]
RANDOM_CONDITIONS = ["rand_z", "rand_zperp"]


# ----------------------------------------------------------------------------------------------
# Sources: the Chinese states a patch writes in

def derangement(answers, seed):
    """A seeded permutation j(i) != i that avoids j with the same answer as i where it can.

    answers: list of N numbers. Returns a list of N indices. Needs N >= 2.
    """
    rng = np.random.default_rng(seed)
    n = len(answers)
    best, best_clashes = None, None
    for _ in range(2000):
        perm = rng.permutation(n)
        if np.any(perm == np.arange(n)):
            continue
        clashes = sum(problems.answers_equal(answers[i], answers[j]) for i, j in enumerate(perm))
        if best is None or clashes < best_clashes:
            best, best_clashes = perm, clashes
        if clashes == 0:
            break
    if best is None:  # only reachable for tiny n by bad luck: a cyclic shift is a derangement
        best = np.roll(np.arange(n), 1)
    return [int(j) for j in best]


def ot_source(en_states, zh_states, scale=None):
    """Per-English-token source from an exact OT plan (uniform marginals, squared Euclidean cost).

    en_states: (T_en, d), zh_states: (T_zh, d). Coordinates are divided by `scale` (d,) for the
    cost only, so a few huge coordinates do not decide the alignment (NOTES section 6).
    Returns (source (T_en, d) float32, plan (T_en, T_zh) float64): source[t] is the barycentric
    image sum_s plan[t, s] zh[s] / sum_s plan[t, s].
    """
    import ot
    en, zh = en_states.float().cpu(), zh_states.float().cpu()
    if scale is not None:
        scale = scale.float().cpu()
        cost = ot.dist((en / scale).double().numpy(), (zh / scale).double().numpy(), "sqeuclidean")
    else:
        cost = ot.dist(en.double().numpy(), zh.double().numpy(), "sqeuclidean")
    a = np.full(len(en), 1.0 / len(en))
    b = np.full(len(zh), 1.0 / len(zh))
    plan = ot.emd(a, b, cost)
    weights = torch.from_numpy(plan / plan.sum(1, keepdims=True)).float()
    return weights @ zh, plan


@torch.no_grad()
def capture_prompt_states(model, tokenizer, texts, spans, layer, batch_size):
    """Unpatched states at `layer` for each prompt: (list of (T_i, d) float32 CPU tensors over real
    tokens, (N, d) float32 means over the question span)."""
    device = next(model.parameters()).device
    tokens, means = [None] * len(texts), [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        ids, mask, span_mask = common.tokenize_left_padded(
            tokenizer, [texts[i] for i in rows], [spans[i] for i in rows], device=device)
        hidden = common.capture_layer_outputs(model, ids, mask, [layer])[layer]
        pooled = common.mean_pool(hidden, span_mask)
        for b, i in enumerate(rows):
            tokens[i] = hidden[b][mask[b].bool()].float().cpu()
            means[i] = pooled[b].cpu()
    return tokens, torch.stack(means)


def robust_scale(states):
    """Per-coordinate IQR over all tokens of `states` (list of (T, d)), floored to avoid zeros."""
    pooled = torch.cat(states).float()
    subsample = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(0))[:20000]
    q = torch.quantile(pooled[subsample], torch.tensor([0.25, 0.75]), 0)  # quantile caps its input
    iqr = q[1] - q[0]
    return iqr.clamp(min=1e-3 * float(iqr.median()) + 1e-8)


# ----------------------------------------------------------------------------------------------
# Jobs: one greedy decode each, shared by every configuration that needs it

def job_key(problem, layer, condition, k, positions, source, source_problem, draw):
    """Canonical identity of a decode: fields a condition does not depend on are blanked, so the
    none row is decoded once per problem and the full row once per (layer, positions, source)."""
    if condition == "none":
        return (problem, -1, "none", 0, "-", "-", problem, -1)
    if condition == "full":
        k = 0
    return (problem, layer, condition, k, positions, source, source_problem, draw)


def build_rows(pairs, layer, ks, positions_list, sources, n_random, swap_of):
    """Every (problem, configuration, condition, draw, pair) row of the table for one layer."""
    rows = []
    for i in range(len(pairs)):
        for k in ks:
            for positions in positions_list:
                for source in sources:
                    for pair_kind, j in (("same", i), ("swap", swap_of[i])):
                        conds = [(c, -1) for c in CONDITIONS]
                        conds += [(c, d) for c in RANDOM_CONDITIONS for d in range(n_random)]
                        for condition, draw in conds:
                            if condition == "none" and pair_kind == "swap":
                                continue
                            rows.append(dict(
                                problem=i, layer=layer, k=k, positions=positions, source=source,
                                condition=condition, draw=draw, pair=pair_kind, source_problem=j,
                                job=job_key(i, layer, condition, k, positions, source, j, draw)))
    return rows


def basis_id(condition, k, draw):
    """Key of the basis a condition uses: ("z", k, -1) for z/zperp, ("rand", k, draw) otherwise."""
    return ("z", k, -1) if condition in ("z", "zperp") else ("rand", k, draw)


def make_bases(model, layer, ks, n_random, seed, fold_norm=False):
    """Z and the random control bases for one layer: dict basis_id -> float32 (k, d)."""
    d = common.hidden_size(model)
    bases = {}
    for k in ks:
        bases[("z", k, -1)] = common.z_basis(model, layer, k, fold_norm=fold_norm)
        for draw in range(n_random):  # the same draws at every layer: seeded by (seed, k, draw)
            bases[("rand", k, draw)] = common.random_basis(d, k, seed * 1_000_003 + k * 1_009 + draw)
    return bases


def make_patch(jobs, layer, bases, zh_means, ot_sources, prompt_width, d):
    """A SubspacePatch for a batch of jobs (see job_key), prompts left-padded to prompt_width."""
    B = len(jobs)
    k_max = max([1] + [j[3] for j in jobs if j[2] not in ("none", "full")])
    basis = torch.zeros(B, k_max, d)
    complement = torch.zeros(B, dtype=torch.bool)
    patch_generated = torch.zeros(B, dtype=torch.bool)
    source_mean = torch.zeros(B, d)
    source_tokens = torch.zeros(B, prompt_width, d) if any(j[5] == "ot" for j in jobs) else None
    for b, (problem, _, condition, k, positions, source, src, draw) in enumerate(jobs):
        if condition not in ("none", "full"):
            v = bases[basis_id(condition, k, draw)]
            basis[b, :len(v)] = v
        complement[b] = condition in ("full", "zperp", "rand_zperp")
        patch_generated[b] = positions == "all"
        source_mean[b] = zh_means[src]
        if source_tokens is not None:
            if source == "ot" and condition != "none":
                tokens = ot_sources[(problem, src)]
                source_tokens[b, prompt_width - len(tokens):] = tokens
            else:
                source_tokens[b] = zh_means[src]
    return common.SubspacePatch(layer=max(layer, 0), basis=basis, complement=complement,
                                source_mean=source_mean, patch_generated=patch_generated,
                                source_tokens=source_tokens)


# ----------------------------------------------------------------------------------------------
# Decoding

def decode_batch(model, tokenizer, batch, layer, bases, zh_means, ot_sources, pairs, prefill,
                 swap_of, max_new_tokens, stop_ids):
    """Decode one batch of jobs under their patches; one result dict per job."""
    rows = decoding.select_prefill(prefill, [j[0] for j in batch])
    patch = make_patch(batch, layer, bases, zh_means, ot_sources, rows["input_ids"].shape[1],
                       common.hidden_size(model)).to(rows["input_ids"].device)
    reference = [problems.answer_continuation(tokenizer, pairs[j[0]]["answer"], "en") for j in batch]
    partner = [problems.answer_continuation(tokenizer, pairs[swap_of[j[0]]]["answer"], "en")
               for j in batch]
    out = decoding.generate_and_score(model, rows["input_ids"], rows["attention_mask"],
                                    max_new_tokens, patch, stop_ids, score=[reference, partner],
                                    prefill=rows)
    results = []
    for b, job in enumerate(batch):
        text = problems.decode_response(tokenizer, out["tokens"][b], stop_ids)
        results.append({"job": job, "output": text, "answer": problems.extract_answer(text),
                        "language": problems.classify_language(text),
                        "logp_ref": float(out["scores"][0][b]),
                        "logp_swap": float(out["scores"][1][b])})
    return results


def decode_jobs(model, tokenizer, jobs, layer, bases, zh_means, ot_sources, pairs, prefill,
                swap_of, args, on_results):
    """Decode every job in batches sorted by prompt length (OT jobs apart, since only they need a
    per-token source); halve the batch when the GPU runs out of memory. prefill: the English
    prompts' decoding.shared_prefill at `layer`."""
    stop_ids = problems.stop_token_ids(tokenizer)
    length = prefill["attention_mask"].sum(1).tolist()
    jobs = sorted(jobs, key=lambda j: (j[5] == "ot", length[j[0]], j))
    batch_size, start = args.batch_size, 0
    with tqdm(total=len(jobs), desc=f"layer {layer}", unit="decode") as bar:
        while start < len(jobs):
            batch = jobs[start:start + batch_size]
            batch = [j for j in batch if (j[5] == "ot") == (batch[0][5] == "ot")]
            try:
                results = decode_batch(model, tokenizer, batch, layer, bases, zh_means, ot_sources,
                                       pairs, prefill, swap_of, args.max_new_tokens, stop_ids)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                torch.cuda.empty_cache()
                tqdm.write(f"out of memory: batch size now {batch_size}")
                continue
            on_results(results)
            start += len(batch)
            bar.update(len(batch))


def prompt_texts(pairs, templates, lang):
    """Templated prompts and the character span of each question inside them."""
    filled = [problems.format_prompt(templates[lang], p[lang]) for p in pairs]
    return [t for t, _ in filled], [s for _, s in filled]


def english_prefill(model, tokenizer, pairs, templates, layer):
    """The English prompts run once through layers 0..layer (decoding.shared_prefill), and their
    unpatched token states at `layer` (list of (T_i, d) float32 on the CPU, for OT)."""
    en_texts, _ = prompt_texts(pairs, templates, "en")
    ids, mask, _ = common.tokenize_left_padded(tokenizer, en_texts)
    prefill = decoding.shared_prefill(model, ids, mask, layer)
    real = prefill["attention_mask"].bool()
    tokens = [prefill["hidden"][i][real[i]].float().cpu() for i in range(len(pairs))]
    return prefill, tokens


def run_layer(model, tokenizer, pairs, templates, layer, args, swap_of, generations, save=None):
    """Decode every job of one layer not decoded yet (generations: job -> result, updated; each
    finished batch also goes to save(results) when given), and return the layer's table rows."""
    prefill, en_tokens = english_prefill(model, tokenizer, pairs, templates, layer)
    zh_texts, zh_spans = prompt_texts(pairs, templates, "zh")
    zh_tokens, zh_means = capture_prompt_states(model, tokenizer, zh_texts, zh_spans, layer,
                                                args.batch_size)
    bases = make_bases(model, layer, args.k, args.n_random, args.seed, args.fold_norm)
    rows = build_rows(pairs, layer, args.k, args.positions, args.source, args.n_random, swap_of)
    jobs = sorted({r["job"] for r in rows} - set(generations))
    ot_sources = {}
    if "ot" in args.source:
        scale = robust_scale(en_tokens + zh_tokens)
        for i, j in sorted({(job[0], job[6]) for job in jobs if job[5] == "ot"}):
            ot_sources[(i, j)] = ot_source(en_tokens[i], zh_tokens[j], scale)[0]

    def keep(results):
        for result in results:
            generations[result["job"]] = result
        if save is not None:
            save(results)

    decode_jobs(model, tokenizer, jobs, layer, bases, zh_means, ot_sources, pairs, prefill,
                swap_of, args, keep)
    null = None
    if getattr(args, "n_random_logprob", 0):
        null = score_random_null(model, tokenizer, pairs, layer, args, prefill, zh_means,
                                 ot_sources, swap_of)
    return rows, null


def score_random_null(model, tokenizer, pairs, layer, args, prefill, zh_means, ot_sources, swap_of):
    """Teacher-forced log p(reference) under --n-random-logprob random subspaces (same-problem
    source, no decoding): a null for Z's log-prob shift with enough draws for a p-value (NOTES 2).
    Returns a frame: problem_id, layer, k, positions, source, condition, draw, logp_ref."""
    from types import SimpleNamespace
    bases = make_bases(model, layer, args.k, args.n_random_logprob, args.seed, args.fold_norm)
    jobs = [(i, layer, condition, k, positions, source, i, draw)
            for i in range(len(pairs)) for k in args.k for positions in args.positions
            for source in args.source for condition in RANDOM_CONDITIONS
            for draw in range(args.n_random_logprob)]
    scored = []
    score_only = SimpleNamespace(**{**vars(args), "max_new_tokens": 0})
    decode_jobs(model, tokenizer, jobs, layer, bases, zh_means, ot_sources, pairs, prefill,
                swap_of, score_only, scored.extend)
    return pd.DataFrame([dict(problem_id=pairs[r["job"][0]]["id"], layer=layer, k=r["job"][3],
                              positions=r["job"][4], source=r["job"][5], condition=r["job"][2],
                              draw=r["job"][7], logp_ref=r["logp_ref"]) for r in scored])


JOB_FIELDS = ["problem", "job_layer", "condition", "job_k", "job_positions", "job_source",
              "source_problem", "draw"]


def save_generations(path, results, pairs):
    """Append decoded jobs to generations.csv as they finish, so a crash loses at most a batch."""
    frame = pd.DataFrame([dict(zip(JOB_FIELDS, r["job"]), problem_id=pairs[r["job"][0]]["id"],
                               **{k: v for k, v in r.items() if k != "job"}) for r in results])
    runs.write_csv(frame, path, append=True)


def table_rows(rows, generations, pairs):
    """The rows.csv frame: each row with its decode and its comparisons to the none row."""
    records = []
    for r in rows:
        g = generations[r["job"]]
        none = generations[job_key(r["problem"], -1, "none", 0, "-", "-", r["problem"], -1)]
        own, src = pairs[r["problem"]], pairs[r["source_problem"]]
        unchanged = (g["answer"] is None and none["answer"] is None) or problems.answers_equal(
            g["answer"], none["answer"])
        if r["pair"] == "swap" and problems.answers_equal(g["answer"], float(src["answer"])):
            outcome = "transferred"
        else:
            outcome = "kept" if unchanged else "broken"
        records.append(dict(
            problem_id=own["id"], category=own["category"], layer=r["layer"], k=r["k"],
            positions=r["positions"], source=r["source"], condition=r["condition"],
            draw=r["draw"], pair=r["pair"], source_id=src["id"], output=g["output"],
            answer=g["answer"], reference=float(own["answer"]), source_answer=float(src["answer"]),
            correct=problems.answers_equal(g["answer"], float(own["answer"])),
            answer_changed=not unchanged, language=g["language"],
            language_changed=g["language"] != none["language"], outcome=outcome,
            logp_ref=g["logp_ref"], logp_swap=g["logp_swap"],
            dlogp_ref=g["logp_ref"] - none["logp_ref"],
            dlogp_swap=g["logp_swap"] - none["logp_swap"]))
    return pd.DataFrame(records)


# ----------------------------------------------------------------------------------------------
# Statistics

CONFIG = ["layer", "k", "positions", "source"]


def _by_problem(frame, condition, column, draw=-1, pair="same"):
    part = frame[(frame.condition == condition) & (frame.draw == draw) & (frame.pair == pair)]
    return part.set_index("problem_id")[column]


def select_config(frame, config):
    """The rows of `frame` whose (layer, k, positions, source) equal `config`."""
    mask = np.ones(len(frame), dtype=bool)
    for column, value in zip(CONFIG, config):
        mask &= (frame[column] == value).to_numpy()
    return frame[mask]


def config_metrics(frame):
    """The plan's five metrics and the baselines for one configuration: list of metric dicts."""
    none = _by_problem(frame, "none", "language")
    problems = none.index
    n = len(problems)

    def rate(name, values, condition=""):
        count = int(np.sum(values))
        lo, hi = stats.wilson_interval(count, n)
        return dict(metric=name, count=count, n=n, rate=count / n if n else math.nan,
                    ci_low=lo, ci_high=hi)

    lang = {c: _by_problem(frame, c, "language").reindex(problems) for c in ("z", "zperp", "full")}
    change = {c: _by_problem(frame, c, "answer_changed").reindex(problems).astype(bool)
              for c in ("z", "zperp", "full")}
    lang_changed = {c: _by_problem(frame, c, "language_changed").reindex(problems).astype(bool)
                    for c in ("z", "zperp", "full")}
    full_vs_z = (change["full"] == change["z"]) & (lang_changed["full"] == lang_changed["z"])
    full_vs_zp = (change["full"] == change["zperp"]) & (lang_changed["full"] == lang_changed["zperp"])
    return [
        rate("baseline_accuracy", _by_problem(frame, "none", "correct").reindex(problems)),
        rate("baseline_english", none == "en"),
        rate("z_answer_change", change["z"]),
        rate("zperp_answer_change", change["zperp"]),
        rate("z_language_preserved", lang["z"] == "en"),
        rate("zperp_language_disrupted", lang["zperp"] != "en"),
        rate("full_answer_change", change["full"]),
        rate("full_language_disrupted", lang["full"] != "en"),
        rate("full_agrees_with_z", full_vs_z),
        rate("full_agrees_with_zperp", full_vs_zp),
    ]


def config_controls(frame):
    """Per random draw: answer change, language change, transfer and mean log-prob shift, next to
    Z's own values (draw -1). One dict per (condition, draw)."""
    out = []
    for condition in ("z", "zperp", "full", "rand_z", "rand_zperp"):
        for draw in sorted(frame[frame.condition == condition].draw.unique()):
            same = frame[(frame.condition == condition) & (frame.draw == draw) & (frame.pair == "same")]
            swap = frame[(frame.condition == condition) & (frame.draw == draw) & (frame.pair == "swap")]
            out.append(dict(condition=condition, draw=int(draw), n=len(same),
                            answer_change=same.answer_changed.mean(),
                            language_not_en=(same.language != "en").mean(),
                            language_changed=same.language_changed.mean(),
                            transferred=(swap.outcome == "transferred").mean(),
                            kept_swap=(swap.outcome == "kept").mean(),
                            broken_swap=(swap.outcome == "broken").mean(),
                            dlogp_ref=same.dlogp_ref.mean(), dlogp_swap=swap.dlogp_swap.mean()))
    return out


def random_band(controls, condition, column, value):
    """Where `value` (Z's) falls among the random draws: mean, sd, min, max, the number of draws
    at or above it, and the one-sided empirical p-value (1 + #{draw >= value}) / (M + 1)."""
    draws = controls[controls.condition == condition][column].to_numpy(float)
    if len(draws) == 0:
        return {}
    at_or_above = int((draws >= value - 1e-12).sum())
    return dict(mean=draws.mean(), sd=draws.std(ddof=1) if len(draws) > 1 else 0.0,
                min=draws.min(), max=draws.max(), draws=len(draws), at_or_above=at_or_above,
                at_or_below=int((draws <= value + 1e-12).sum()),
                p_above=(1 + at_or_above) / (len(draws) + 1))


def config_tests(frame):
    """Exact McNemar tests between conditions on answer change and on language change (same-
    problem rows); random = the majority outcome over the draws for each problem."""
    problems = _by_problem(frame, "none", "language").index
    tests = []
    for column in ("answer_changed", "language_changed"):
        series = {c: _by_problem(frame, c, column).reindex(problems).astype(bool)
                  for c in ("none", "z", "zperp", "full")}
        for rand in ("rand_z", "rand_zperp"):
            part = frame[(frame.condition == rand) & (frame.pair == "same")]
            if len(part):
                series[rand] = (part.groupby("problem_id")[column].mean() > 0.5).reindex(problems)
        for a, b in (("z", "zperp"), ("z", "rand_z"), ("z", "none"), ("zperp", "rand_zperp"),
                     ("zperp", "none"), ("full", "none")):
            if a in series and b in series:
                only_a, only_b, p = stats.mcnemar_exact(series[a], series[b])
                tests.append(dict(measure=column, first=a, second=b, first_only=only_a,
                                  second_only=only_b, p_value=p))
    return tests


def logprob_null_tests(rows, null):
    """Z's (and Z-perp's) mean shift in log p(reference) against the same shift under each random
    subspace of the null (logprob_null.csv), per configuration: empirical one- and two-sided p."""
    none = rows[rows.condition == "none"].drop_duplicates("problem_id").set_index("problem_id")
    null = null.assign(dlogp_ref=null.logp_ref - null.problem_id.map(none.logp_ref))
    null_means = null.groupby(CONFIG + ["condition", "draw"]).dlogp_ref.mean()
    out = []
    for config, frame in rows.groupby(CONFIG, sort=True):
        for condition, rand in (("z", "rand_z"), ("zperp", "rand_zperp")):
            own = frame[(frame.condition == condition) & (frame.pair == "same")].dlogp_ref.mean()
            try:
                draws = null_means.loc[tuple(config) + (rand,)].to_numpy(float)
            except KeyError:
                continue
            above = (1 + int((draws >= own).sum())) / (len(draws) + 1)
            below = (1 + int((draws <= own).sum())) / (len(draws) + 1)
            out.append(dict(zip(CONFIG, config), condition=condition, dlogp_ref=own,
                            null_draws=len(draws), null_mean=draws.mean(), null_min=draws.min(),
                            null_max=draws.max(), p_above=above, p_below=below,
                            p_two_sided=min(1.0, 2 * min(above, below))))
    return pd.DataFrame(out)


def verdicts(metrics, controls, tests, alpha=0.05):
    """The plan's verdict, with and without the random-subspace control (NOTES section 2)."""
    m = {r["metric"]: r for r in metrics}
    p = {(t["measure"], t["first"], t["second"]): t["p_value"] for t in tests}
    z_change, zp_change = m["z_answer_change"]["rate"], m["zperp_answer_change"]["rate"]
    z_lang_changed_p = p.get(("language_changed", "z", "none"), 1.0)
    band_z = random_band(controls, "rand_z", "answer_change", z_change)
    band_zp_lang = random_band(controls, "rand_zperp", "language_not_en",
                               m["zperp_language_disrupted"]["rate"])
    z_changes = p.get(("answer_changed", "z", "none"), 1.0) < alpha
    z_keeps_lang = m["z_language_preserved"]["ci_low"] >= 0.5 and z_lang_changed_p >= alpha
    zp_disrupts = p.get(("language_changed", "zperp", "none"), 1.0) < alpha
    zp_keeps_answers = p.get(("answer_changed", "zperp", "none"), 1.0) >= alpha
    z_beats_zp = z_change > zp_change and p.get(("answer_changed", "z", "zperp"), 1.0) < alpha
    z_outside = bool(band_z) and z_change > band_z["max"]
    zp_outside = bool(band_zp_lang) and m["zperp_language_disrupted"]["rate"] > band_zp_lang["max"]

    def verdict(controlled):
        if controlled and not band_z:
            return "not tested (no random draws)"
        if z_changes and z_keeps_lang and zp_disrupts and zp_keeps_answers and (
                not controlled or (z_outside and zp_outside)):
            return "double dissociation"
        if z_beats_zp and (not controlled or z_outside):
            return "partial"
        return "null"

    return {"verdict": verdict(True), "verdict_without_controls": verdict(False),
            "z_outside_random_band": z_outside, "zperp_outside_random_band": zp_outside}


def compute_summary_tables(rows):
    """metrics, controls and tests frames for every configuration of a rows.csv frame."""
    metrics, controls, tests = [], [], []
    for config, frame in rows.groupby(CONFIG, sort=True):
        keys = dict(zip(CONFIG, config))
        m, c, t = config_metrics(frame), config_controls(frame), config_tests(frame)
        v = verdicts(m, pd.DataFrame(c), t)
        metrics += [dict(keys, **r, **v) for r in m]
        controls += [dict(keys, **r) for r in c]
        tests += [dict(keys, **r) for r in t]
    return pd.DataFrame(metrics), pd.DataFrame(controls), pd.DataFrame(tests)


# ----------------------------------------------------------------------------------------------
# Summary (from CSVs only) and figures

def _pct(r):
    return f"{r['count']}/{r['n']} ({100 * r['rate']:.0f}%, 95% CI {100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f}%)"


def _cell(text, width=70):
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def render_patching_table(frame):
    """The plan's table for one configuration (same-problem source), as markdown lines."""
    lines = ["| problem | original (en) | Z-patched (en←zh) | Z⊥-patched (en←zh) | full-patched |",
             "|---|---|---|---|---|"]
    cells = {c: frame[(frame.condition == c) & (frame.pair == "same") & (frame.draw == -1)]
             .set_index("problem_id") for c in CONDITIONS}
    for pid in cells["none"].index:
        row = [pid]
        for c in CONDITIONS:
            r = cells[c].loc[pid]
            answer = "-" if pd.isna(r.answer) else problems.format_number(r.answer)
            row.append(f"{_cell(r.output)} **[{answer}, {r.language}]**")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def verdict_paragraph(metrics, controls, tests, logprob=None):
    """A paragraph generated from the numbers only."""
    m = metrics.set_index("metric")
    p = {(t.measure, t.first, t.second): t.p_value for t in tests.itertuples()}
    band = random_band(controls, "rand_z", "answer_change", m.loc["z_answer_change", "rate"])
    band_zp = random_band(controls, "rand_zperp", "language_not_en",
                          m.loc["zperp_language_disrupted", "rate"])
    c = controls.set_index(["condition", "draw"])
    rand_transfer = controls[controls.condition == "rand_z"].transferred
    text = [
        f"Unpatched, the model answered {_pct(m.loc['baseline_accuracy'])} correctly and in "
        f"English on {_pct(m.loc['baseline_english'])}.",
        f"Z-patching changed the answer on {_pct(m.loc['z_answer_change'])} and kept the output "
        f"English on {_pct(m.loc['z_language_preserved'])}; Z⊥-patching changed the answer on "
        f"{_pct(m.loc['zperp_answer_change'])} and took the output out of English on "
        f"{_pct(m.loc['zperp_language_disrupted'])}.",
        f"Exact McNemar, Z against Z⊥ on answer change: p = "
        f"{p.get(('answer_changed', 'z', 'zperp'), float('nan')):.3g}; Z against no patch: p = "
        f"{p.get(('answer_changed', 'z', 'none'), float('nan')):.3g}."]
    if band:
        side = "above" if band["at_or_above"] == 0 else "below" if band["at_or_below"] == 0 else "inside"
        text.append(
            f"{band['draws']} random {int(metrics.k.iloc[0])}-dimensional subspaces patched the same "
            f"way changed {100 * band['mean']:.0f}% of answers on average (range "
            f"{100 * band['min']:.0f}-{100 * band['max']:.0f}%): Z is {side} that band "
            f"({band['at_or_above']} of {band['draws']} draws at or above it, empirical p = "
            f"{band['p_above']:.2f}).")
    if band_zp:
        text.append(f"Random Z⊥ patches took the output out of English on {100 * band_zp['mean']:.0f}% "
                    f"(range {100 * band_zp['min']:.0f}-{100 * band_zp['max']:.0f}%).")
    if ("z", -1) in c.index and not math.isnan(c.loc[("z", -1), "transferred"]):
        text.append(
            f"With another problem's Chinese prompt as the source, the output took that problem's "
            f"answer on {100 * c.loc[('z', -1), 'transferred']:.0f}% of problems under Z, "
            f"{100 * c.loc[('zperp', -1), 'transferred']:.0f}% under Z⊥, "
            f"{100 * c.loc[('full', -1), 'transferred']:.0f}% under full replacement"
            + (f" and {100 * rand_transfer.mean():.0f}% under random Z" if len(rand_transfer) else "")
            + ".")
    agree_z, agree_zp = m.loc["full_agrees_with_z", "rate"], m.loc["full_agrees_with_zperp", "rate"]
    like = ("it behaves more like the Z-patch" if agree_z > agree_zp else
            "it behaves more like the Z⊥-patch" if agree_zp > agree_z else
            "it is no closer to one than to the other")
    text.append(f"Full replacement matched the Z-patch outcome on {100 * agree_z:.0f}% of problems "
                f"and the Z⊥-patch outcome on {100 * agree_zp:.0f}%: {like}.")
    if logprob is not None:
        for r in logprob.itertuples():
            name = "Z" if r.condition == "z" else "Z⊥"
            text.append(f"Scored by teacher forcing against {r.null_draws} random subspaces, "
                        f"{name}'s mean shift in log p(reference) ({r.dlogp_ref:+.2f} nats) has a "
                        f"two-sided empirical p = {r.p_two_sided:.3f} (random: mean "
                        f"{r.null_mean:+.2f}, range {r.null_min:+.2f} to {r.null_max:+.2f}).")
    verdict, literal = metrics.verdict.iloc[0], metrics.verdict_without_controls.iloc[0]
    text.append(f"**Verdict: {verdict}** (the plan's criteria read against the random band; "
                f"without that control the same numbers would read as: {literal}).")
    return " ".join(text)


def write_summary(out_dir, rows, metrics, controls, tests, config, logprob=None):
    """SUMMARY.md and patching_table.md, both generated from the CSV frames."""
    model = config.get("model", {})
    head = ["# Experiment A: activation patching of Z",
            "",
            f"Model `{model.get('name_or_path')}` ({model.get('dtype')}, {model.get('device_name')}), "
            f"{rows.problem_id.nunique()} problems, command `{config.get('command')}`, "
            f"git {config.get('git_commit')}. Every number and sentence here is generated from "
            f"`rows.csv`; rebuild with `python exp_a_patching.py --summarize <this folder>`.", "",
            "| layer | k | positions | source | Z answer change | random Z (mean, range) | "
            "Z⊥ answer change | Z language kept | Z⊥ language disrupted | verdict | without controls |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    body, table = [], ["# Experiment A: the plan's patching tables", ""]
    for config_key, frame in rows.groupby(CONFIG, sort=True):
        m, c, t = (select_config(f, config_key) for f in (metrics, controls, tests))
        mi = m.set_index("metric")
        rz = c[c.condition == "rand_z"].answer_change
        band = f"{100 * rz.mean():.0f}% ({100 * rz.min():.0f}-{100 * rz.max():.0f}%)" if len(rz) else "-"
        name = "layer {} · k {} · positions {} · source {}".format(*config_key)
        head.append("| {} | {} | {} | {} | ".format(*config_key) + " | ".join([
            f"{100 * mi.loc['z_answer_change', 'rate']:.0f}%", band,
            f"{100 * mi.loc['zperp_answer_change', 'rate']:.0f}%",
            f"{100 * mi.loc['z_language_preserved', 'rate']:.0f}%",
            f"{100 * mi.loc['zperp_language_disrupted', 'rate']:.0f}%",
            m.verdict.iloc[0], m.verdict_without_controls.iloc[0]]) + " |")
        lp = select_config(logprob, config_key) if logprob is not None and len(logprob) else None
        body += [f"## {name}", "", verdict_paragraph(m, c, t, lp), "", "### Metrics", "",
                 m[["metric", "count", "n", "rate", "ci_low", "ci_high"]].to_markdown(
                     index=False, floatfmt=".3f"), "",
                 "### Controls (per condition; random rows are individual draws)", "",
                 c.drop(columns=CONFIG).to_markdown(index=False, floatfmt=".3f"), "",
                 "### Paired tests (exact McNemar)", "",
                 t.drop(columns=CONFIG).to_markdown(index=False, floatfmt=".3g"), "",
                 "### Patching table (same-problem source; [answer, language])", ""]
        body += render_patching_table(frame) + [""]
        table += [f"## {name}", ""] + render_patching_table(frame) + [""] + [
            m[["metric", "count", "n", "rate", "ci_low", "ci_high"]].to_markdown(
                index=False, floatfmt=".3f"), ""]
    Path(out_dir, "SUMMARY.md").write_text("\n".join(head + [""] + body), encoding="utf-8")
    Path(out_dir, "patching_table.md").write_text("\n".join(table), encoding="utf-8")


def plot_figures(out_dir, controls, metrics, figures_dir):
    """Change rates against the random band, transfer rates, and log-prob shifts (from CSVs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from types import SimpleNamespace
    where = SimpleNamespace(out=Path(out_dir), figures=Path(figures_dir))
    configs = list(metrics.groupby(CONFIG, sort=True).groups)
    labels = ["L{} k{}\n{} {}".format(*c) for c in configs]
    x = np.arange(len(configs))
    width = 0.25

    def panel(ax, column, title, conditions, per_metric=None):
        for offset, (cond, rand, colour) in zip((-width, 0, width), conditions):
            values, lows, highs = [], [], []
            for i, config in enumerate(configs):
                c = select_config(controls, config)
                own = c[(c.condition == cond) & (c.draw == -1)][column]
                values.append(float(own.iloc[0]) if len(own) else np.nan)
                if per_metric:
                    mi = select_config(metrics, config).set_index("metric").loc[per_metric[cond]]
                    lows.append(values[-1] - mi.ci_low)
                    highs.append(mi.ci_high - values[-1])
                draws = c[c.condition == rand][column] if rand else []
                if len(draws):
                    ax.fill_between([i + offset - width / 2, i + offset + width / 2], draws.min(),
                                    draws.max(), color=colour, alpha=0.2, lw=0)
                    ax.plot([i + offset - width / 2, i + offset + width / 2], [draws.mean()] * 2,
                            color=colour, ls=":", lw=1)
            ax.bar(x + offset, values, width * 0.8, color=colour, label=cond,
                   yerr=[lows, highs] if per_metric else None, capsize=2)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)

    conds = [("z", "rand_z", "tab:blue"), ("zperp", "rand_zperp", "tab:orange"),
             ("full", None, "tab:gray")]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.4 * len(configs)), 7))
    panel(axes[0], "answer_change", "answer changed vs no patch (same-problem source)\n"
          "error bars: Wilson 95%; shaded: random draws (range, dotted: mean)", conds,
          {"z": "z_answer_change", "zperp": "zperp_answer_change", "full": "full_answer_change"})
    panel(axes[1], "language_not_en", "output not English (same-problem source)", conds)
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylim(0, 1.05)
    runs.save_figure(fig, runs.figure_path(where, "change_rates"))

    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(configs)), 3.5))
    panel(ax, "transferred", "interchange: output takes the source problem's answer", conds)
    ax.set_ylim(0, 1.05)
    runs.save_figure(fig, runs.figure_path(where, "transfer_rates"))

    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.4 * len(configs)), 7))
    panel(axes[0], "dlogp_ref", "shift in log p(reference answer) vs no patch", conds)
    panel(axes[1], "dlogp_swap", "shift in log p(source problem's answer), interchange rows", conds)
    for ax in axes:
        ax.axhline(0, color="k", lw=0.5)
    runs.save_figure(fig, runs.figure_path(where, "logprob_shift"))


def summarize(out_dir, figures_dir):
    """Rebuild metrics.csv, controls.csv, tests.csv, SUMMARY.md, patching_table.md and the figures
    from rows.csv and config.json alone (no model)."""
    import json
    out_dir = Path(out_dir)
    if not (out_dir / "rows.csv").is_file():
        raise runs.UsageError(f"{out_dir} has no rows.csv; run the experiment first or pass the "
                                f"folder of a finished run")
    rows = runs.load_csv(out_dir / "rows.csv")
    config = json.loads((out_dir / "config.json").read_text()) if (out_dir / "config.json").exists() else {}
    metrics, controls, tests = compute_summary_tables(rows)
    logprob = None
    if (out_dir / "logprob_null.csv").is_file():
        logprob = logprob_null_tests(rows, runs.load_csv(out_dir / "logprob_null.csv"))
        runs.write_csv(logprob, out_dir / "logprob_tests.csv")
    runs.write_csv(metrics, out_dir / "metrics.csv")
    runs.write_csv(controls, out_dir / "controls.csv")
    runs.write_csv(tests, out_dir / "tests.csv")
    write_summary(out_dir, rows, metrics, controls, tests, config, logprob)
    plot_figures(out_dir, controls, metrics, figures_dir)
    return metrics


# ----------------------------------------------------------------------------------------------

def validate(args):
    """Every check that needs no weights, before anything is loaded or written."""
    if args.n_random < 0 or args.n_random_logprob < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise runs.UsageError("--n-random and --n-random-logprob must be >= 0, --batch-size and "
                                "--max-new-tokens >= 1")
    config = common.load_model_config(args.model)
    for layer in args.layer:
        common.check_layer(config, layer)
    for k in args.k:
        common.check_k(config, k)
    pairs = problems.load_pairs(args)
    if len(pairs) < 2:
        raise runs.UsageError("need at least 2 pairs (the interchange source is another problem)")
    templates = problems.load_prompts(args.prompts)["templates"]
    return pairs, problems.get_template(templates, "cot")


def main(args):
    if args.summarize is not None:
        return summarize(args.summarize, args.figures)
    if args.batch_size is None:  # decoding is memory-bound: big batches on a GPU, small on a CPU
        on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.batch_size = 256 if on_gpu else 64
    pairs, templates = validate(args)
    out = runs.prepare_out_dir(args.out, args.overwrite)
    for stale in ("rows.csv", "generations.csv", "logprob_null.csv"):  # --overwrite: no appending
        (out / stale).unlink(missing_ok=True)
    args.out = out
    runs.set_seed(args.seed)
    model, tokenizer = common.load_model(args.model, args.dtype, args.device, seed=args.seed)
    swap_of = derangement([p["answer"] for p in pairs], args.seed)
    runs.write_json(out / "config.json", runs.run_config(
        args, model, templates=templates, n_pairs=len(pairs),
        swap_source={p["id"]: pairs[j]["id"] for p, j in zip(pairs, swap_of)},
        random_basis_seeds="seed * 1000003 + k * 1009 + draw"))
    generations = {}
    for layer in args.layer:
        rows, null = run_layer(
            model, tokenizer, pairs, templates, layer, args, swap_of, generations,
            save=lambda results: save_generations(out / "generations.csv", results, pairs))
        if null is not None:
            runs.write_csv(null, out / "logprob_null.csv", append=True)
        runs.write_csv(table_rows(rows, generations, pairs), out / "rows.csv", append=True)
    metrics = summarize(out, args.figures)
    print(f"wrote {out}/SUMMARY.md")
    print(metrics.drop_duplicates(CONFIG)[CONFIG + ["verdict", "verdict_without_controls"]]
          .to_string(index=False))
    return metrics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, "exp_a")
    problems.add_pairs_args(parser)
    parser.add_argument("--layer", type=int, nargs="+", default=[32])
    parser.add_argument("--k", type=int, nargs="+", default=[50])
    parser.add_argument("--positions", nargs="+", choices=["prompt", "all"], default=["prompt"])
    parser.add_argument("--source", nargs="+", choices=["mean", "ot"], default=["mean"])
    parser.add_argument("--n-random", type=int, default=10,
                        help="random k-dimensional control subspaces per (layer, k)")
    parser.add_argument("--n-random-logprob", type=int, default=0, metavar="M",
                        help="also score log p(reference) under M random subspaces per (layer, k) "
                             "without decoding, for p-values on the continuous measure (NOTES 2 "
                             "suggests M >= 200); writes logprob_null.csv and logprob_tests.csv")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--fold-norm", action="store_true",
                        help="fold the layer's input RMSNorm gain into W_Q, W_K before the SVD "
                             "(NOTES 1; default: raw weights, as Phase 2)")
    parser.add_argument("--summarize", type=Path, default=None, metavar="DIR",
                        help="only rebuild the summary and figures of a finished run from its CSVs")
    parser.set_defaults(batch_size=None)  # resolved in main(): 256 on a GPU, 64 on a CPU
    return parser.parse_args(argv)


if __name__ == "__main__":
    runs.run_cli(main, parse_args())
