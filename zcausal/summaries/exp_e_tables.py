"""Experiment E's tables and tests from its per-row CSVs alone (no model); the sentences and
--replot are in exp_e.py, the figures in exp_e_figures.py.

build_tables(out) is the one place every table of a run comes from: per_layer.csv, draws.csv,
das.csv and tests.csv are rebuilt from clean.csv, per_problem.csv, random_rows.csv.gz,
das_per_problem.csv, das_random_rows.csv.gz, timing.csv and config.json. The run calls it after
every layer and every DAS k (per_layer.csv and das.csv are its resume markers); --replot calls it
again, so a replot reproduces what the run wrote.

Measures, per (k, layer, pairing, condition, draw). Swap rows are taken over the swap pairs whose
two first digits differ (n_pairs; n_rows counts them all); same-problem rows over every pair:
  top1_src / top1_own / neither  the patched argmax at the last position is the source's first
                                 digit / the own one / neither (rates; Wilson 95% intervals)
  p_share        p_src / (p_src + p_own) over the two first digits; p_share_shift: patched minus
                 clean, the mean over pairs (a pooled shift, not a mean of ratios)
  low_mass       share of pairs where p_own + p_src falls below half its clean value (same rows:
                 p_own); `disrupts` when that is most pairs: such a row is disruption, not transfer
  transfer_pooled, first_pooled  mean shift / mean span of the logit difference own - source
                 (all digits / the first), over the same pairs
  dlogp_own, dlogp_src, dlang_own  mean shifts of log p(own / source answer) and of the language
                 margin after the answer; patch_share |P_S (s - h)| / |s - h|
  transfer       the old mean of per-pair ratios (only pairs with |span| >= --min-span; demoted:
                 kept for comparison with earlier runs, never in a sentence)

Primary test (declared; config.json records it at the start of a run): Z of the basis layer
(z_basis) at the basis layer, swap pairs, k = 50 (the largest k where 50 was not run): top1_src
and p_share_shift each ranked among the random draws (stats.rank_test, one-sided: above), and Z
"transfers" only if both p <= 0.05 (an intersection-union test: no correction needed), unless Z
disrupts there; else "not above random", or "no transfer (0 of n, upper bound u)" where Z and
every draw sit at top1_src 0 (ties say nothing about a direction), the p_share shift's two-sided
rank test then giving the direction if it has one (zcausal/labels.py). Secondary tests,
Holm-adjusted together in tests.csv: the best layer of z_basis and z_layer (family-wise: Z's
largest value over the layers against each draw's largest over the same layers), z_basis at the
basis layer at the other k and the language margin there (two-sided). DAS, the positive
control, against its random draws on the held-out pairs per (DAS layer, k): its own family
`control`, Holm-adjusted within it. Per-layer rank p-values in per_layer.csv are uncorrected and
descriptive.

DAS tables are keyed by (layer, k): das.csv (the held-out rows of DAS, full, Z and the random
band, with n_train, too_small and bootstrap intervals) and das_angles.csv (load_angles: DAS's
principal angles to Z and to the random draws, mean_cos2 against its chance value k / d). Runs
from before several DAS layers (no layer column in das_angles.csv, `overlap` for mean_cos2) are
read with config.json's das_layer.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from zcausal import conditions, problems, runs, stats
from zcausal.summaries.text import plural

ALPHA = 0.05
MIN_TEST_PAIRS = 50  # fewer held-out pairs: a rate's 95% interval is wider than about 0.25
MIN_TRAIN_PROBLEMS = 200  # fewer: a learned subspace can fit the training answers themselves
CARRIED = 0.8  # full interchange's top1_src from which the last position carries the answer
BOOTSTRAP = 2000
NOT_TESTED = "not tested (no random draws)"
KEYS = ["k", "layer", "pairing", "condition", "draw"]
NAMED = ["none", "full", "z_basis", "z_layer", "das"]
RATES = ["top1_src", "top1_own", "neither"]
# attn_tv_last / attn_tv_all: how far the patch moves the basis layer's attention at the patched
# positions (Z's own positive control; NaN at and above the basis layer, and in runs from before it)
ATTENTION = ["attn_tv_last", "attn_tv_all"]
MEASURES = RATES + ["p_share", "p_share_clean", "p_share_shift", "low_mass", "transfer_pooled",
                    "first_pooled", "dlogp_own", "dlogp_src", "dlang_own", "patch_share",
                    "transfer"] + ATTENTION
ABOVE = ["top1_src", "p_share_shift", "transfer_pooled", "first_pooled"] + ATTENTION  # one-sided
TWO_SIDED = ["top1_own", "low_mass", "dlogp_own", "dlogp_src", "dlang_own"]
PRIMARY_MEASURES = ["top1_src", "p_share_shift"]
BOOTSTRAPPED = ["top1_src", "p_share_shift"]
# Columns row_measures() derives; per-row files may carry older versions of them, recomputed.
DERIVED = ["in_set", "dlogp_own", "dlogp_src", "dlang_own", "p_share", "p_share_clean",
           "p_share_shift", "mass_ratio", "low_mass", "neither", "ld_shift", "ld_span",
           "first_shift", "first_span", "transfer", "transfer_first"]


SECONDARY_DESCRIPTION = (
    "Holm-adjusted together (tests.csv): per k, the best layer of z_basis and of z_layer on "
    "top1_src and the p_share shift (family-wise: Z's largest value over the layers against each "
    "random draw's largest), z_basis at the basis layer at the other k, the language margin "
    "shift there (two-sided); DAS, a positive control, is tested in its own family (`control`: "
    "per DAS layer and k, DAS against its random draws on the held-out pairs, Holm-adjusted "
    "among themselves), so that the number of controls run does not weaken the tests of Z")


def site_of(layer, n_layers):
    """Which stream a sweep row patches, in words: the output of `layer`, which is the input of
    the next one (the stream whose keys and queries that layer's kernels read)."""
    if layer + 1 >= n_layers:
        return f"output of layer {layer} (the last)"
    return f"output of layer {layer} = input of layer {layer + 1}"


def primary_layer(config):
    """The sweep layer of the primary test: the output of basis layer - 1, i.e. the basis layer's
    input (--site input, the default), or the basis layer's output (--site output, and every run
    from before the flag)."""
    return int(config.get("primary_layer", config["basis_layer"]))


def primary_site(config):
    """'the input of layer 21' / 'the output of layer 21': where the primary test patches Z."""
    basis = int(config["basis_layer"])
    return f"the {'input' if primary_layer(config) == basis - 1 else 'output'} of layer {basis}"


def primary_description(ks, basis_layer, site="input"):
    """The declared primary hypothesis in one sentence (config.json and the summary)."""
    return (f"Z of layer {basis_layer} (z_basis) patched at the {site} of layer {basis_layer} "
            f"(sweep layer {basis_layer - 1 if site == 'input' else basis_layer}), k = "
            f"{stats.primary_k(ks)}, swap pairs whose first digits differ: its top1_src and its "
            f"p_share shift each ranked among the random draws (one-sided, towards transfer); Z "
            f"transfers only if both p <= {ALPHA} (intersection-union) and Z does not disrupt; "
            f"else 'not above random', or, where Z and every draw sit at top1_src 0, 'no "
            f"transfer (0 of n, upper bound u)' with the p_share shift's two-sided test for a "
            f"direction")


# ----------------------------------------------------------------------------------------------
# Per-row measures

def clean_table(clean):
    """clean.csv indexed by problem id (str), with digits_differ: the partner's first digit is
    not the own one (the pair enters the swap measures)."""
    c = clean.assign(problem_id=clean.problem_id.astype(str)).set_index("problem_id")
    c["digits_differ"] = [problems.first_digit(a) != problems.first_digit(b)
                          for a, b in zip(c.answer, c.source_answer)]
    return c


def row_measures(rows, clean, min_span=1.0):
    """rows (per_problem / random_rows columns: pairing, problem_id, logp_own, logp_src,
    first_own, first_src, lang_own, top1_own, top1_src, ...) with the DERIVED columns against
    the clean run (clean.csv) added; older derived columns are dropped first."""
    out = rows.drop(columns=[c for c in DERIVED if c in rows]).reset_index(drop=True)
    for name in ATTENTION:  # runs from before the attention readout
        if name not in out:
            out[name] = np.nan
    c = clean_table(clean).reindex(out.problem_id.astype(str))
    swap = (out.pairing == "swap").to_numpy()
    col = lambda frame, name: frame[name].to_numpy(float)  # noqa: E731
    own, src = col(out, "first_own"), col(out, "first_src")
    c_own = col(c, "first_own")
    c_src = np.where(swap, col(c, "first_src"), c_own)
    nan = np.full(len(out), np.nan)
    out["in_set"] = ~swap | c.digits_differ.to_numpy(bool)
    out["dlogp_own"] = col(out, "logp_own") - col(c, "logp_own")
    out["dlogp_src"] = col(out, "logp_src") - np.where(swap, col(c, "logp_src"), col(c, "logp_own"))
    out["dlang_own"] = col(out, "lang_own") - col(c, "lang_own")
    out["p_share"] = np.where(swap, 1 / (1 + np.exp(own - src)), nan)
    out["p_share_clean"] = np.where(swap, 1 / (1 + np.exp(c_own - c_src)), nan)
    out["p_share_shift"] = out.p_share - out.p_share_clean
    log_mass = np.where(swap, np.logaddexp(own, src) - np.logaddexp(c_own, c_src), own - c_own)
    out["mass_ratio"] = np.exp(log_mass)
    out["low_mass"] = log_mass < np.log(0.5)
    out["top1_own"], out["top1_src"] = out.top1_own.astype(bool), out.top1_src.astype(bool)
    out["neither"] = ~out.top1_own & ~out.top1_src
    for prefix, ld, clean_col, target_col in (
            ("ld", col(out, "logp_own") - col(out, "logp_src"), "ld_clean", "ld_target"),
            ("first", own - src, "ld_first_clean", "ld_first_target")):
        out[f"{prefix}_shift"] = np.where(swap, ld - col(c, clean_col), nan)
        out[f"{prefix}_span"] = np.where(swap, col(c, target_col) - col(c, clean_col), nan)
    ok = np.abs(out.ld_span.to_numpy()) >= min_span
    with np.errstate(divide="ignore", invalid="ignore"):
        out["transfer"] = np.where(ok, out.ld_shift / out.ld_span, nan)
    return out


def group_table(measured):
    """One row per KEYS group: n_rows (all rows), n_pairs (rows in the pair set), n_transfer,
    the MEASURES (top1_src blank for same-problem rows: there it is top1_own) and disrupts."""
    inside = measured[measured.in_set].copy()
    for name in RATES + ["low_mass"]:
        inside[name] = inside[name].astype(float)
    groups = inside.groupby(KEYS, sort=True)
    means = [m for m in MEASURES if m not in ("transfer_pooled", "first_pooled")]
    table = groups[means + ["ld_shift", "ld_span", "first_shift", "first_span"]].mean()
    table.insert(0, "n_pairs", groups.size())
    table.insert(0, "n_rows", measured.groupby(KEYS, sort=True).size().reindex(table.index))
    table["n_transfer"] = groups.transfer.count()
    with np.errstate(divide="ignore", invalid="ignore"):
        table["transfer_pooled"] = table.pop("ld_shift") / table.pop("ld_span")
        table["first_pooled"] = table.pop("first_shift") / table.pop("first_span")
    table = table.reset_index()
    table.loc[table.pairing == "same", "top1_src"] = np.nan
    table["disrupts"] = table.low_mass > 0.5
    table.insert(table.columns.get_loc("n_pairs") + 1, "pair_set", np.where(
        table.pairing == "swap", "swap pairs whose first digits differ", "every pair"))
    return table


# ----------------------------------------------------------------------------------------------
# Tables: named conditions with intervals and ranks, the random band, the draws

def with_intervals(table):
    """Wilson 95% intervals of the RATES (count = rate x n_pairs) as <rate>_ci_lo / _ci_hi (the
    random rows' <m>_lo / <m>_hi are the draws' band instead)."""
    table = table.copy()
    for name in RATES:
        bounds = [stats.wilson_interval(round(v * n), n) if not np.isnan(v) else (np.nan, np.nan)
                  for v, n in zip(table[name], table.n_pairs)]
        table[f"{name}_ci_lo"], table[f"{name}_ci_hi"] = zip(*bounds) if bounds else ([], [])
    return table


def versus_draws(table, draws, keys=("k", "layer", "pairing")):
    """Each named row ranked among the random draws of its (k, layer, pairing): <m>_rank and
    <m>_p_above for the ABOVE measures, two-sided <m>_p for the TWO_SIDED ones (uncorrected)."""
    groups = {key: g for key, g in draws.groupby(list(keys))} if len(draws) else {}
    records = []
    for _, row in table.iterrows():
        rand = groups.get(tuple(row[k] for k in keys))
        record = {}
        for m in ABOVE + TWO_SIDED:
            test = stats.rank_test(row[m], rand[m]) if rand is not None else {}
            if m in ABOVE:
                record[f"{m}_rank"] = test.get("rank", np.nan)
                record[f"{m}_p_above"] = test.get("p_above", np.nan)
            else:
                record[f"{m}_p"] = test.get("p_two_sided", np.nan)
        records.append(record)
    return pd.concat([table.reset_index(drop=True), pd.DataFrame(records)], axis=1)


def band_rows(draws, keys=("k", "layer", "pairing")):
    """`random` rows: the draws' mean of every measure, its 2.5-97.5% band (<m>_lo, <m>_hi),
    n_draws and draws_disrupting."""
    records = []
    for key, g in (draws.groupby(list(keys)) if len(draws) else []):
        record = dict(zip(keys, key), condition="random", draw=-1, n_rows=int(g.n_rows.iloc[0]),
                      n_pairs=int(g.n_pairs.iloc[0]), pair_set=g.pair_set.iloc[0], n_draws=len(g),
                      draws_disrupting=int(g.disrupts.sum()), disrupts=g.disrupts.mean() > 0.5)
        for m in MEASURES:
            values = g[m].dropna()
            record[m] = values.mean() if len(values) else np.nan
            record[f"{m}_lo"], record[f"{m}_hi"] = (np.percentile(values, [2.5, 97.5])
                                                    if len(values) else (np.nan, np.nan))
        records.append(record)
    return pd.DataFrame(records)


def ordered(table):
    """Rows sorted by k, layer, pairing and condition (NAMED order, random last)."""
    rank = {name: i for i, name in enumerate(NAMED + ["random"])}
    order = [c for c in ("k", "layer") if c in table] + ["pairing"]
    return (table.assign(_c=table.condition.map(rank)).sort_values(order + ["_c", "draw"])
            .drop(columns="_c").reset_index(drop=True))


def condition_tables(measured):
    """(named rows with intervals, ranks and the band rows; the draws' rows) of one measured
    frame (a sweep's or DAS's)."""
    table = group_table(measured)
    named, draws = table[table.condition != "random"], table[table.condition == "random"]
    named = versus_draws(with_intervals(named), draws)
    table = pd.concat([named, band_rows(draws)], ignore_index=True)
    for m in MEASURES:  # the band's columns, blank without draws
        for end in ("lo", "hi"):
            if f"{m}_{end}" not in table:
                table[f"{m}_{end}"] = np.nan
    return ordered(table), ordered(draws)


def sweep_tables(measured, config, timing=None):
    """per_layer.csv and draws.csv from the sweep's measured rows (row_measures): depth,
    noop_max_abs (the no-op rows' largest |Δ log p|: the engine's noise floor) and, where
    timing.csv has them, seconds and tflop of each layer."""
    per_layer, draws = condition_tables(measured)
    n_layers = config["model"]["num_layers"]
    for table in (per_layer, draws):
        table.insert(2, "depth", table.layer / n_layers)
    per_layer.insert(3, "site", [site_of(int(layer), n_layers) for layer in per_layer.layer])
    none = measured[measured.condition == "none"]
    noop = pd.concat([none.dlogp_own.abs(), none.dlogp_src.abs()], axis=1).max(axis=1)
    noop = noop.groupby([none.k, none.layer]).max().rename("noop_max_abs").reset_index()
    per_layer = per_layer.merge(noop, on=["k", "layer"], how="left")
    if timing is not None and len(timing):
        per_layer = per_layer.merge(timing.drop_duplicates(["k", "layer"], keep="last"),
                                    on=["k", "layer"], how="left")
    return per_layer, draws.drop(columns="condition")


def bootstrap_columns(measured, table, seed):
    """Percentile 95% intervals over the held-out problems (BOOTSTRAP resamples of them, seeded
    by k, the same resamples for every condition and every DAS layer of a k) of the
    BOOTSTRAPPED measures of every named swap row (<m>_boot_lo / _boot_hi), and of DAS minus
    full on the same problems (das_minus_full_<m> with _lo / _hi)."""
    table = table.copy()
    swap = measured[(measured.pairing == "swap") & measured.in_set
                    & measured.condition.isin(NAMED)]
    for (layer, k), group in swap.groupby(["layer", "k"]):
        ids = sorted(group.problem_id.astype(str).unique())
        resample = np.random.default_rng([int(seed), int(k)]).integers(0, len(ids),
                                                                       (BOOTSTRAP, len(ids)))
        here = (table.k == k) & (table.layer == layer) & (table.pairing == "swap")
        for m in BOOTSTRAPPED:
            wide = group.assign(v=group[m].astype(float), pid=group.problem_id.astype(str)) \
                .pivot_table(index="pid", columns="condition", values="v").reindex(ids)
            for condition in wide.columns:
                row = here & (table.condition == condition)
                boots = np.nanmean(wide[condition].to_numpy()[resample], axis=1)
                table.loc[row, [f"{m}_boot_lo", f"{m}_boot_hi"]] = np.percentile(boots, [2.5, 97.5])
            if {"das", "full"} <= set(wide.columns):
                diff = (wide["das"] - wide["full"]).to_numpy()
                row = here & (table.condition == "das")
                boots = np.nanmean(diff[resample], axis=1)
                table.loc[row, f"das_minus_full_{m}"] = np.nanmean(diff)
                table.loc[row, [f"das_minus_full_{m}_lo", f"das_minus_full_{m}_hi"]] = \
                    np.percentile(boots, [2.5, 97.5])
    return table


def das_tables(measured, config):
    """das.csv (per DAS layer and k, named conditions and the random band on the held-out
    pairs, with bootstrap intervals; n_train, the training problems; too_small where the test
    split has fewer than MIN_TEST_PAIRS swap pairs or train fewer than MIN_TRAIN_PROBLEMS
    problems, `note` saying which) and the DAS draws' rows (for tests.csv)."""
    table, draws = condition_tables(measured)
    table = bootstrap_columns(measured, table, config.get("args", {}).get("seed", 0))
    table["pair_set"] = "test split: " + table.pair_set.astype(str)
    table.insert(2, "site", [site_of(int(layer), config["model"]["num_layers"])
                             for layer in table.layer])
    n_train = len(config.get("splits", {}).get("train", []))
    table["n_train"] = n_train
    table["too_small"] = (table.n_pairs < MIN_TEST_PAIRS) | (n_train < MIN_TRAIN_PROBLEMS)
    table["note"] = [size_note(n, n_train) for n in table.n_pairs]
    return table, draws.drop(columns="condition")


def das_site(layer, basis):
    """How a summary names a DAS layer: 'the input of layer 21, the basis layer (layer 20's
    output)' where it is, else 'layer 16's output'."""
    if layer == basis - 1:
        return f"the input of layer {basis}, the basis layer (layer {layer}'s output)"
    return f"layer {layer}'s output"


def size_note(n_test, n_train):
    """'' when DAS's splits are large enough to read, else what is too small."""
    parts = [f"test split of {plural(n_test, 'pair')} (fewer than {MIN_TEST_PAIRS})"
             if n_test < MIN_TEST_PAIRS else "",
             f"train split of {plural(n_train, 'problem')} (fewer than {MIN_TRAIN_PROBLEMS})"
             if n_train < MIN_TRAIN_PROBLEMS else ""]
    parts = [p for p in parts if p]
    return " and ".join(parts) + ": too small" if parts else ""


def load_angles(out, config):
    """das_angles.csv with a layer column (config.json's das_layer for runs from before there
    were several DAS layers) and mean_cos2 / chance_mean_cos2 (older runs called them overlap /
    chance_overlap: the same numbers); None without the file."""
    path = Path(out) / "das_angles.csv"
    if not path.is_file():
        return None
    angles = runs.load_csv(path).rename(columns={"overlap": "mean_cos2",
                                                 "chance_overlap": "chance_mean_cos2"})
    if "layer" not in angles:
        angles["layer"] = config.get("das_layer")
    return angles


# ----------------------------------------------------------------------------------------------
# Tests: the declared primary test, the family-wise best-layer test, Holm over the secondary ones

def best_layer_test(z, draws):
    """Family-wise rank test of "Z transfers at some layer": Z's largest value over the layers
    against each random draw's largest over the same layers (one test covers every layer; it
    keeps its level when a draw varies over the layers as Z does: zcausal/conditions.py).

    z: (L,) Z's statistic per layer; draws: (M, L) each draw's. Returns stats.rank_test's dict
    (p_above is the family-wise p) with value (Z's largest) and at (its layer index), or {}
    without draws or values."""
    z, draws = np.asarray(z, float), np.asarray(draws, float).reshape(-1, len(z))
    if not len(draws) or np.all(np.isnan(z)):
        return {}
    at = int(np.nanargmax(z))
    test = stats.rank_test(z[at], np.nanmax(np.where(np.isnan(draws), -np.inf, draws), axis=1))
    return dict(test, value=float(z[at]), at=at) if test else {}


def select_swap(table, condition=None, **match):
    """The swap-pairing rows of a per-layer / draws / DAS table, of `condition` when given and
    with every column in `match` equal to its value (k=50, layer=21, ...)."""
    rows = table[table.pairing == "swap"]
    if condition is not None:
        rows = rows[rows.condition == condition]
    for key, value in match.items():
        rows = rows[rows[key] == value]
    return rows


def _test_row(family, condition, k, scope, layer, measure, direction, value, test, n_pairs,
              disrupts=np.nan, at_layer=np.nan):
    """A tests.csv row; rank_from_top 1 means above every draw (ties count against Z)."""
    p = test.get("p_above" if direction == "above" else "p_two_sided", np.nan)
    p_below = test.get("p_below", np.nan) if direction == "above" else np.nan
    return dict(family=family, condition=condition, k=int(k), scope=scope, layer=layer,
                at_layer=at_layer, measure=measure, direction=direction, value=value,
                n_pairs=n_pairs, disrupts=disrupts, draws=test.get("draws", 0),
                random_mean=test.get("mean", np.nan), random_max=test.get("max", np.nan),
                rank_from_top=1 + test["at_or_above"] if test else np.nan, p=p,
                p_below=p_below)


def _at_layer(per_layer, draws, condition, k, layer, measure, family, direction="above"):
    row = select_swap(per_layer, condition, k=k, layer=layer)
    value = row[measure].iloc[0] if len(row) else np.nan
    rand = select_swap(draws, k=k, layer=layer)[measure]
    test = stats.rank_test(value, rand) if len(row) else {}
    return _test_row(family, condition, k, "at the basis layer", layer, measure, direction, value,
                     test, int(row.n_pairs.iloc[0]) if len(row) else 0,
                     bool(row.disrupts.iloc[0]) if len(row) else np.nan)


def _best_layer(per_layer, draws, condition, k, measure, mode="shared", family="secondary"):
    """The family-wise best-layer test of `condition` against draws made under --random-draws
    `mode` (zcausal/conditions.py): z_layer against shared draws is not exchangeable and goes to
    the `exploratory` family (no Holm, never significant); z_basis against per-layer draws is
    conservative, and its scope says so."""
    z = select_swap(per_layer, condition, k=k).set_index("layer")[measure].sort_index()
    mine = select_swap(draws, k=k)
    wide = (mine.pivot_table(index="draw", columns="layer", values=measure, dropna=False)
            .reindex(columns=z.index).to_numpy(float) if len(mine) else np.empty((0, len(z))))
    test = best_layer_test(z.to_numpy(), wide)
    at = int(z.index[int(np.nanargmax(z.to_numpy()))]) if z.notna().any() else np.nan
    n = int(select_swap(per_layer, condition, k=k).n_pairs.max()) if len(z) else 0
    valid = not (condition == "z_layer" and mode == "shared")
    scope = (f"best of {plural(len(z), 'layer')} (family-wise"
             + {("z_basis", "per-layer"): "; conservative against per-layer draws",
                ("z_layer", "shared"): "; draws shared by the layers: not exchangeable"}
             .get((condition, mode), "") + ")")
    row = _test_row(family if valid else "exploratory", condition, k, scope, -1, measure,
                    "above", test.get("value", z.max()), test, n, at_layer=at)
    return dict(row, p_below=np.nan)  # a maximum has no lower tail to read


def tests_table(per_layer, draws, das=None, das_draws=None, config=None):
    """tests.csv: the primary test (its two components and their intersection-union p), every
    secondary test with its Holm-adjusted p (p_holm, over the secondary family), DAS against its
    draws per (layer, k) (family `control`, Holm-adjusted within it), and `significant` (p <=
    ALPHA for the primary, p_holm <= ALPHA for the others)."""
    basis, ks = primary_layer(config), sorted(int(k) for k in per_layer.k.unique())
    pk = stats.primary_k(ks)
    rows = [_at_layer(per_layer, draws, "z_basis", pk, basis, m, "primary")
            for m in PRIMARY_MEASURES]
    both, below = [r["p"] for r in rows], [r["p_below"] for r in rows]
    rows.append(dict(rows[0], measure=" and ".join(PRIMARY_MEASURES), direction="above (both)",
                     value=np.nan, random_mean=np.nan, random_max=np.nan, rank_from_top=np.nan,
                     p=np.nan if np.isnan(both).any() else max(both),
                     p_below=np.nan if np.isnan(below).any() else max(below)))
    mode = conditions.draws_mode(config)
    for k in ks:
        rows += [_best_layer(per_layer, draws, c, k, m, mode) for c in ("z_basis", "z_layer")
                 for m in PRIMARY_MEASURES]
        if k != pk:
            rows += [_at_layer(per_layer, draws, "z_basis", k, basis, m, "secondary")
                     for m in PRIMARY_MEASURES]
        rows.append(_at_layer(per_layer, draws, "z_basis", k, basis, "dlang_own", "secondary",
                              "two-sided"))
    if das is not None:
        for (layer, k), row in select_swap(das, "das").groupby(["layer", "k"]):
            for m in PRIMARY_MEASURES:
                test = stats.rank_test(row[m].iloc[0],
                                       select_swap(das_draws, k=k, layer=layer)[m])
                rows.append(_test_row("control", "das", k, "DAS layer, held-out pairs",
                                      int(layer), m, "above", row[m].iloc[0], test,
                                      int(row.n_pairs.iloc[0]), bool(row.disrupts.iloc[0])))
    table = pd.DataFrame(rows)
    table["p_holm"] = np.nan
    for family in ("secondary", "control"):  # each family Holm-adjusted within itself
        mine = table.family == family
        table.loc[mine, "p_holm"] = stats.holm(table.p[mine].to_numpy(float))
    table["significant"] = np.where(table.family == "primary", table.p <= ALPHA,
                                    table.p_holm <= ALPHA)
    return table


# ----------------------------------------------------------------------------------------------
# The question set (zcausal/question.py): the question's tokens from a counterfactual partner

QUESTION_PAIR_SET = "counterfactual partners in the same language (first digits differ)"
QUESTION_TABLES = ["question_draws.csv", "question_tests.csv", "question_per_layer.csv"]


def question_measures(rows, clean, min_span=1.0):
    """row_measures of question rows, each against its language's clean run (question_clean.csv);
    every row is a swap row (the source is the partner)."""
    parts = []
    for language, group in rows.groupby("language", sort=False):
        own = clean[clean.language == language]
        parts.append(row_measures(group.assign(pairing="swap"), own, min_span)
                     .drop(columns="pairing"))
    return pd.concat(parts, ignore_index=True)


def question_tests(per_layer, draws, ks, at, mode="shared"):
    """One language's rows of question_tests.csv: Z of the basis layer and Z of each layer at
    their best layer (family-wise over the layers, as in tests.csv) and z_basis at the primary
    test's sweep layer `at` (primary_layer), on top1_src and the p_share shift."""
    rows = [_best_layer(per_layer, draws, c, k, m, mode, family="question")
            for k in ks for c in ("z_basis", "z_layer") for m in PRIMARY_MEASURES]
    if at in set(per_layer.layer):
        rows += [_at_layer(per_layer, draws, "z_basis", k, at, m, "question")
                 for k in ks for m in PRIMARY_MEASURES]
    return rows


def question_tables(out):
    """The question set's tables from its per-row files and question_clean.csv (a dict file
    name -> frame, None without question rows): question_per_layer.csv (per language, k, layer
    and condition, as per_layer.csv: rates with Wilson intervals, ranks among the draws, the
    random band, noop_max_abs), question_draws.csv and question_tests.csv (question_tests per
    language; p_holm over all of them)."""
    out = Path(out)
    rows = load_rows(out, "question_")
    if rows is None or not (out / "question_clean.csv").is_file():
        return None
    config = read_config(out)
    measured = question_measures(rows, runs.load_csv(out / "question_clean.csv"),
                                 config.get("args", {}).get("min_span", 1.0))
    ks = sorted(int(k) for k in measured.k.unique())
    per_layer, draws, tests = [], [], []
    for language in sorted(measured.language.unique()):
        group = measured[measured.language == language].assign(pairing="swap")
        table, drawn = condition_tables(group)
        none = group[group.condition == "none"]
        noop = pd.concat([none.dlogp_own.abs(), none.dlogp_src.abs()], axis=1).max(axis=1)
        noop = noop.groupby([none.k, none.layer]).max().rename("noop_max_abs").reset_index()
        per_layer.append(table.merge(noop, on=["k", "layer"], how="left").assign(language=language))
        draws.append(drawn.assign(language=language))
        tests += [dict(t, language=language) for t in
                  question_tests(table, drawn, ks, primary_layer(config),
                                 conditions.draws_mode(config))]
    n_layers = config["model"]["num_layers"]
    frames = {}
    for name, parts in (("question_per_layer.csv", per_layer), ("question_draws.csv", draws)):
        frame = pd.concat(parts, ignore_index=True).drop(columns="pairing")
        frame["pair_set"] = QUESTION_PAIR_SET
        frame.insert(2, "depth", frame.layer / n_layers)
        frames[name] = frame[["language"] + [c for c in frame.columns if c != "language"]]
    tests = pd.DataFrame(tests)
    tests["p_holm"] = np.nan
    if len(tests):  # the exploratory rows (zcausal/conditions.py) stay out of the correction
        held = tests.family != "exploratory"
        tests.loc[held, "p_holm"] = stats.holm(tests.p[held].to_numpy(float))
    frames["question_tests.csv"] = tests[["language"] + [c for c in tests if c != "language"]]
    return frames


def write_question_tables(out):
    """question_tables(out) written to out, question_per_layer.csv (the question sweep's resume
    marker) last. Returns the paths written (none without question rows)."""
    frames = question_tables(out) or {}
    for name in QUESTION_TABLES if frames else []:
        runs.write_csv(frames[name], Path(out) / name)
    return [Path(out) / name for name in QUESTION_TABLES if frames]


# ----------------------------------------------------------------------------------------------
# Reading and writing a run's tables

def read_config(out):
    path = Path(out) / "config.json"
    if not path.is_file():
        raise runs.UsageError(f"{path} does not exist; pass the --out folder of a sweep run")
    return json.loads(path.read_text(encoding="utf-8"))


def load_rows(out, prefix=""):
    """A sweep's (prefix "") or DAS's ("das_") per-row files, named and random rows together;
    None when there are none."""
    paths = [Path(out) / f"{prefix}per_problem.csv", Path(out) / f"{prefix}random_rows.csv.gz"]
    frames = [runs.load_csv(p) for p in paths if p.is_file()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else None


def write_rows(frame, out, prefix=""):
    """The named conditions' rows to <prefix>per_problem.csv, the random draws' to
    <prefix>random_rows.csv.gz (compressed: 19+ draws x pairs x layers rows); load_rows reads
    them back."""
    random = frame.condition == "random"
    runs.write_csv(frame[~random], Path(out) / f"{prefix}per_problem.csv", append=True)
    runs.write_csv(frame[random], Path(out) / f"{prefix}random_rows.csv.gz", append=True)


def _timing(out):
    """Seconds and TFLOP per (k, layer): timing.csv, or the columns of an earlier per_layer.csv
    (runs before timing.csv carried them there; a rebuilt per_layer.csv keeps them)."""
    for name in ("timing.csv", "per_layer.csv"):
        path = Path(out) / name
        if path.is_file():
            frame = runs.load_csv(path)
            if {"k", "layer", "seconds", "tflop"} <= set(frame.columns):
                return frame.groupby(["k", "layer"])[["seconds", "tflop"]].first().reset_index()
    return None


def build_tables(out):
    """Every table of a run from its per-row files and config.json: a dict file name -> frame
    (per_layer.csv, draws.csv, tests.csv, and das.csv where DAS rows exist)."""
    out = Path(out)
    config = read_config(out)
    rows = load_rows(out)
    if rows is None or not (out / "clean.csv").is_file():
        raise runs.UsageError(f"{out} has no per_problem.csv and clean.csv: pass the --out "
                              f"folder of a sweep run")
    clean = runs.load_csv(out / "clean.csv")
    min_span = config.get("args", {}).get("min_span", 1.0)
    tables = {}
    tables["per_layer.csv"], tables["draws.csv"] = sweep_tables(
        row_measures(rows, clean, min_span), config, _timing(out))
    das_rows, das_draws = load_rows(out, "das_"), None
    if das_rows is not None and "layer" not in das_rows:  # one DAS layer, in config.json
        das_rows.insert(1, "layer", config.get("das_layer"))
    if das_rows is not None:
        tables["das.csv"], das_draws = das_tables(row_measures(das_rows, clean, min_span), config)
    tables["tests.csv"] = tests_table(tables["per_layer.csv"], tables["draws.csv"],
                                      tables.get("das.csv"), das_draws, config)
    return tables


def write_tables(out):
    """build_tables(out) written to out; per_layer.csv (the sweep's resume marker) last.
    Returns the paths written."""
    tables = build_tables(out)
    written = []
    for name in ("draws.csv", "tests.csv", "das.csv", "per_layer.csv"):
        if name in tables:
            runs.write_csv(tables[name], Path(out) / name)
            written.append(Path(out) / name)
    return written


def full_rate(out, exclude="test"):
    """Full interchange's top1_src per layer (a Series indexed by layer, ascending) over the
    swap pairs of the splits other than `exclude`, so that the test pairs choose no layer."""
    rows = runs.load_csv(Path(out) / "per_problem.csv")
    rows = rows[(rows.condition == "full") & (rows.pairing == "swap") & (rows.split != exclude)
                & (rows.k == rows.k.min())]
    measured = row_measures(rows, runs.load_csv(Path(out) / "clean.csv"))
    rate = measured[measured.in_set].groupby("layer").top1_src.mean().sort_index()
    if not len(rate):
        raise runs.UsageError("no swap pair outside the test split has partners with different "
                              "first digits; pass --das-layer and --decode-layers")
    return rate


def peak_layer(out, exclude="test"):
    """The lowest layer where full interchange's top1_src (full_rate) is largest (the default
    decode layer: the first layer where the source's first digit is carried by the last
    position as far as it ever is)."""
    return int(full_rate(out, exclude).idxmax())


def carried_layer(out, threshold=CARRIED, exclude="test"):
    """(layer, reached, rate): the first layer where full interchange's top1_src (full_rate)
    reaches `threshold`, reached True; where no layer does, peak_layer's, reached False."""
    rate = full_rate(out, exclude)
    above = rate[rate >= threshold]
    layer = int(above.index[0]) if len(above) else int(rate.idxmax())
    return layer, bool(len(above)), float(rate[layer])



def das_layers(out, basis, given=None):
    """The DAS layers of a run and why each (a dict layer -> reason, for config.json and the
    summary): `given` (--das-layer) as it is, or by default the input of the basis layer (layer
    basis - 1's output) and carried_layer() (the test pairs choose nothing)."""
    if given is not None:
        return {layer: ("the input of the basis layer" if layer == basis - 1 else "given")
                for layer in dict.fromkeys(given)}
    chosen = {}
    if basis >= 1:  # the input of layer 0 is the embeddings, where Z of no layer is read
        chosen[basis - 1] = "the input of the basis layer"
    layer, reached, rate = carried_layer(out)
    why = (f"the first layer where full interchange's top1_src reaches {CARRIED} on the train "
           f"and validation pairs ({rate:.2f})" if reached else
           f"no layer's full interchange reaches top1_src {CARRIED} on the train and validation "
           f"pairs: the layer where it is largest ({rate:.2f})")
    chosen.setdefault(layer, why)
    return chosen
