"""Experiment B's figure and sentences from its CSVs alone (no model): the residual-ratio figure,
summary_lines and headline (report.py), and the column names of the random bands.

    python exp_b_residual.py --replot --out results/exp_b      # redraws from the CSVs

Primary test (declared here and in docs/preregistration.json): Z's mean R over both languages on
the update into the basis layer's input (the transition basis_layer - 2 -> basis_layer - 1: the
last update the basis layer reads, the one the figure marks) at k = 50 (the plan's k; the largest
k where 50 was not run), ranked among the Haar (uniform) random subspaces, the null A, D and E use
(stats.rank_test, one-sided: does Z hold more of the update than random subspaces of its size).
The covariance-matched draws are shown beside and label nothing. The counts over all transitions
are descriptive, read against their expected value if Z were one more draw.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from zcausal import labels, prereg, runs, stats
from zcausal.runs import UsageError
from zcausal.summaries.text import interval, num, ordinal, p_value, plural

# Column prefixes of the two random-subspace bands: Haar-uniform and covariance-matched draws.
KINDS = {"uniform": "rand", "matched": "matched"}
KIND_NAMES = {"uniform": "uniform", "matched": "covariance-matched"}
PRIMARY_KIND = "uniform"  # the declared null; the matched draws are shown beside
ALPHA = 0.05
NOT_TESTED = "not tested (no random draws)"


def rank_column(kind, what):
    """frac_random_R_ge (uniform draws), frac_matched_R_ge, ...: the share of draws of `kind` at
    least as large as Z in `what` (R, absdiff), i.e. Z's empirical rank among them."""
    return f"frac_{'random' if kind == 'uniform' else KINDS[kind]}_{what}_ge"


def primary_description(ks):
    return (f"R on the update into the basis layer's input, both languages, k = "
            f"{stats.primary_k(ks)}, against the {KIND_NAMES[PRIMARY_KIND]} (Haar) random "
            f"subspaces (rank test, one-sided; the covariance-matched draws shown beside)")


def primary_transition(basis_layer):
    """to_layer of the declared transition: the update that lands in the basis layer's input
    (the output of the layer below it); None for basis layer 0, whose input is the embeddings."""
    return basis_layer - 1 if basis_layer >= 1 else None


def _layer_ticks(ax, from_layers):
    """One tick per transition, labelled by the layer it starts from (emb = the embeddings)."""
    labels = ["emb" if l == -1 else str(l) for l in from_layers]
    ax.set_xticks(from_layers, labels, fontsize=7 if len(from_layers) > 30 else 8)


def _read_tables(out_dir):
    """per_layer.csv, asymmetry.csv, random_draws.csv (empty where absent) and config.json."""
    out_dir = Path(out_dir)
    for name in ("per_layer.csv", "asymmetry.csv", "config.json"):
        if not (out_dir / name).is_file():
            raise UsageError(f"{out_dir / name} does not exist; run exp_b_residual.py without "
                             f"--replot first, or pass the --out folder of an earlier run")
    draws_path = out_dir / "random_draws.csv"
    draws = pd.read_csv(draws_path) if draws_path.is_file() else pd.DataFrame(
        columns=["kind", "draw", "from_layer", "lang", "R_mean", "k"])
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    return (pd.read_csv(out_dir / "per_layer.csv"), pd.read_csv(out_dir / "asymmetry.csv"),
            draws, config)


def _has_band(table, column):
    return column in table and table[column].notna().any()


def _plot_k(ax, ax2, table, asym):
    """R per transition (zh, en, chance line, random bands) and R_zh - R_en with its bands, for
    the rows of one k."""
    first = table.iloc[0]
    both = table[table["lang"] == "all"]
    x = both["from_layer"].to_numpy()
    if _has_band(both, "rand_R_lo"):
        ax.fill_between(x, both["rand_R_lo"], both["rand_R_hi"], color="0.8", alpha=0.8,
                        label=f"uniform random {int(first['k'])}-dim subspaces (2.5-97.5%)")
    if _has_band(both, "matched_R_lo"):
        ax.fill_between(x, both["matched_R_lo"], both["matched_R_hi"], color="tab:orange",
                        alpha=0.25, label=f"random subspaces drawn with the covariance of layer "
                                          f"{int(first['basis_layer'])}'s states (2.5-97.5%)")
    ax.axhline(first["R_chance"], color="k", ls="--", lw=1,
               label=f"chance sqrt(k/(d-k)) = {first['R_chance']:.3f}")
    for lang, color in (("zh", "tab:red"), ("en", "tab:blue")):
        rows = table[table["lang"] == lang]
        ax.errorbar(rows["from_layer"], rows["R_mean"], yerr=rows["R_sem"], color=color,
                    marker="o", ms=3, capsize=2, label=f"R, {lang} prompts (mean ± sem)")
    basis_in = int(first["basis_layer"]) - 2  # plotted at its from_layer: the primary transition
    for a in (ax, ax2):
        a.axvline(basis_in, color="tab:green", ls=":", lw=1.2,
                  label=f"update into the basis layer's input ({basis_in} -> {basis_in + 1})"
                  if a is ax else None)
        a.grid(axis="y", alpha=0.3)
    ax.set_ylabel("R = ||P_Z u|| / ||P_Zperp u||")
    pooled = ("first token kept" if not bool(first["drop_first"]) else "first token dropped") + (
        ", numbers dropped" if bool(first.get("drop_numbers", False)) else "")
    bands = "" if _has_band(both, "rand_R_lo") else "; random subspaces not tested"
    ax.set_title(f"Residual updates u against Z of layer {int(first['basis_layer'])} "
                 f"(k={int(first['k'])}, d={int(first['d'])}, N={int(asym['n_pairs'].iloc[0])} "
                 f"pairs; {pooled}{bands})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if _has_band(asym, "rand_diff_lo"):
        ax2.fill_between(asym["from_layer"], asym["rand_diff_lo"], asym["rand_diff_hi"],
                         color="0.8", alpha=0.8, label="uniform random subspaces (2.5-97.5%)")
    if _has_band(asym, "matched_diff_lo"):
        ax2.fill_between(asym["from_layer"], asym["matched_diff_lo"], asym["matched_diff_hi"],
                         color="tab:orange", alpha=0.25, label="covariance-matched (2.5-97.5%)")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.errorbar(asym["from_layer"], asym["diff_mean"], yerr=asym["diff_sem"], color="tab:purple",
                 marker="o", ms=3, capsize=2, label="R_zh - R_en (paired mean ± sem)")
    ax2.set_ylabel("R_zh - R_en")
    ax2.set_xlabel("transition l -> l+1, plotted at l (emb: embeddings -> layer 0)")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for a in (ax, ax2):
        _layer_ticks(a, x)
        a.set_xlim(x.min() - 0.5, x.max() + 0.5)


def plot_residual_ratio(out_dir, path):
    """Two panels per k (one k under the other), from per_layer.csv and asymmetry.csv only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table, asym, _, _ = _read_tables(out_dir)
    ks = sorted(table["k"].unique())
    fig, axes = plt.subplots(2 * len(ks), 1, figsize=(12.5, 7.5 * len(ks)), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2] * len(ks)})
    for i, k in enumerate(ks):
        _plot_k(axes[2 * i][0], axes[2 * i + 1][0], table[table["k"] == k],
                asym[asym["k"] == k])
    runs.save_figure(fig, path, dpi=130)
    return path


def plot_all(args):
    """residual_ratio.png of the run in args.out (nothing written when its CSVs are missing)."""
    _read_tables(args.out)
    return plot_residual_ratio(args.out, runs.figure_path(args, "residual_ratio"))


# ----------------------------------------------------------------------------------------------
# The findings in words (printed at the end of a run; report.py's paragraph and headline)

def primary_test(per_layer, draws, config, k):
    """Z's R (both languages) on the update into the basis layer's input at this k, with the rank
    test among the PRIMARY_KIND draws (an empty test without draws), the verdict (labels.
    versus_random, one-sided) and each kind's band (mean, lo, hi). Row None where the basis
    layer's input is the embeddings (no update)."""
    to_layer = primary_transition(int(config["basis_layer"]))
    rows = per_layer[(per_layer["lang"] == "all") & (per_layer["k"] == k)
                     & (per_layer["to_layer"] == to_layer)]
    if not len(rows):
        return None, {}, "not measured (the basis layer's input is the embeddings)", {}
    row = rows.iloc[0]
    tests = {}
    for kind in KINDS:
        mine = draws[(draws["kind"] == kind) & (draws["lang"] == "all")
                     & (draws["from_layer"] == row["from_layer"])]
        tests[kind] = stats.rank_test(row["R_mean"], (mine[mine["k"] == k] if "k" in mine
                                                      else mine)["R_mean"])
    test = tests[PRIMARY_KIND]
    verdict = labels.versus_random(test, "greater", ALPHA) if test else NOT_TESTED
    bands = {kind: (row.get(f"{KINDS[kind]}_R_mean"), row.get(f"{KINDS[kind]}_R_lo"),
                    row.get(f"{KINDS[kind]}_R_hi")) for kind in KINDS}
    return row, dict(tests, primary=test), verdict, bands


def _transition(row):
    return f"{int(row['from_layer'])}->{int(row['to_layer'])}".replace("-1->", "emb->")


def _band_counts(both, n_random):
    """'R is above every one of the 20 uniform random subspaces at 17 of 24 transitions ...'."""
    if not n_random:
        return f"Against random subspaces: {NOT_TESTED}."
    n = len(both)
    parts = []
    for kind in KINDS:
        frac = both[rank_column(kind, "R")]
        parts.append(f"above every one of the {plural(n_random, KIND_NAMES[kind] + ' draw')} at "
                     f"{int((frac == 0).sum())} and below every one at {int((frac == 1).sum())}")
    return (f"Of the {plural(n, 'transition')}, R is " + "; ".join(parts) + f" (about "
            f"{num(n / (n_random + 1))} each if Z were one more random draw).")


def _asymmetry_sentence(asym, n_random):
    big = asym.loc[asym["diff_mean"].abs().idxmax()]
    larger = "R_zh > R_en" if big["diff_mean"] > 0 else "R_zh < R_en"
    wilcoxon = ("Wilcoxon p not measured (no nonzero paired difference)" if np.isnan(
        big["wilcoxon_p"]) else f"Wilcoxon {p_value(big['wilcoxon_p'])}, uncorrected")
    if n_random:
        count = int(round(big["frac_random_absdiff_ge"] * n_random))
        versus = (f"uniform random subspaces with a difference at least as large: {count} of "
                  f"{n_random}")
    else:
        versus = f"against random subspaces {NOT_TESTED}"
    return (f"The largest |R_zh - R_en| is {num(abs(big['diff_mean']))} ({larger}) at "
            f"{_transition(big)} (paired over {plural(big['n_pairs'], 'pair')}; {wilcoxon}; "
            f"{versus}).")


def _beside(tests, bands):
    """'covariance-matched draws (shown beside, no label) 0.66 [0.61, 0.76], Z 21st of 21'."""
    kind = next(k for k in KINDS if k != PRIMARY_KIND)
    test = tests.get(kind)
    if not test:
        return ""
    return (f"; {KIND_NAMES[kind]} draws (shown beside, no label) {interval(*bands[kind])}, Z "
            f"{ordinal(1 + test['at_or_above'])} of {test['draws'] + 1}")


def _primary_sentence(per_layer, draws, config, k):
    row, tests, verdict, bands = primary_test(per_layer, draws, config, k)
    if row is None:
        return f"Primary test (k = {k}): {verdict}."
    test = tests["primary"]
    what = (f"Primary test (the update into the basis layer's input, {_transition(row)}, both "
            f"languages, k = {k}): R {num(row['R_mean'])}")
    if not test:
        return f"{what} (chance {num(row['R_chance'])}); against random subspaces {NOT_TESTED}."
    return (f"{what} against {KIND_NAMES[PRIMARY_KIND]} (Haar) random subspaces, the declared "
            f"null, {interval(*bands[PRIMARY_KIND])}: Z ranks "
            f"{ordinal(1 + test['at_or_above'])} of {test['draws'] + 1}: {verdict}"
            f"{_beside(tests, bands)}. A null here: "
            f"{labels.rank_power_words(test['draws'], ALPHA)}.")


def summary_lines(out_dir):
    """The run's findings as sentences, from its CSVs, per k (printed at the end of a run;
    report.py's paragraph)."""
    per_layer, asym, draws, config = _read_tables(out_dir)
    n_random = int(config.get("n_random", 0))
    lines = [prereg.status_sentence(config, "B")]
    for k in sorted(per_layer["k"].unique()):
        both = per_layer[(per_layer["lang"] == "all") & (per_layer["k"] == k)]
        top = both.loc[both["R_over_chance"].idxmax()]
        low = both.loc[both["R_over_chance"].idxmin()]
        lines += [f"k = {k} (d = {int(both['d'].iloc[0])}): R = |P_Z u| / |P_Z⊥ u| of each "
                  f"layer's update u is {num(both['R_chance'].iloc[0], 3)} at chance "
                  f"(sqrt(k/(d-k))); the largest R/chance is {num(top['R_over_chance'], 3)} at "
                  f"{_transition(top)}, the smallest {num(low['R_over_chance'], 3)} at "
                  f"{_transition(low)}.",
                  _band_counts(both, n_random),
                  _asymmetry_sentence(asym[asym["k"] == k], n_random)]
    lines.append(_primary_sentence(per_layer, draws, config,
                                   stats.primary_k(per_layer["k"].unique())))
    return lines


def headline(out_dir):
    """report.py's cells: dict(verdict, value, lead) from the declared primary test."""
    per_layer, _, draws, config = _read_tables(out_dir)
    k = stats.primary_k(per_layer["k"].unique())
    row, tests, verdict, bands = primary_test(per_layer, draws, config, k)
    if row is None:
        return {"verdict": verdict, "value": verdict, "lead": []}
    test = tests["primary"]
    if test:
        value = (f"R {num(row['R_mean'])} vs {KIND_NAMES[PRIMARY_KIND]} (Haar) random "
                 f"{interval(*bands[PRIMARY_KIND])} (rank {1 + test['at_or_above']} of "
                 f"{test['draws'] + 1}){_beside(tests, bands)}")
        versus = (f", against {interval(*bands[PRIMARY_KIND])} for Haar random subspaces: "
                  f"{verdict}")
    else:
        value, versus = f"R {num(row['R_mean'])} (chance {num(row['R_chance'])})", ""
    lead = [f"On the update into the basis layer's input ({_transition(row)}), Z (k = {k}) "
            f"holds R = {num(row['R_mean'])} of it, chance {num(row['R_chance'])}{versus}."]
    both = per_layer[(per_layer["lang"] == "all") & (per_layer["k"] == k)]
    if test:
        above = int((both[rank_column("uniform", "R")] == 0).sum())
        lead.append(f"R is above every uniform random subspace at {above} of "
                    f"{plural(len(both), 'transition')}, above every covariance-matched one at "
                    f"{int((both[rank_column('matched', 'R')] == 0).sum())}.")
    return {"verdict": verdict, "value": value, "lead": lead}
