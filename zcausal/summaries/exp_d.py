"""Experiment D's figures and sentences from its CSVs alone (no model): singular values, held-out
R^2 against the shuffled-pairs null and the random bases, summary_lines and headline (report.py).

    python exp_d_bridge.py --replot --out results/exp_d        # redraws from the CSVs

Primary test (declared here and in docs/preregistration.json, the rest Holm-corrected): least
squares at k = 50 (the largest k where 50 was not run), Z's n-fold held-out R^2 (--n-folds,
default 10) ranked among the random bases' (one-sided: does Z carry more of the map than random
subspaces of its size). Only that direction is tested: a Z that does not rank high enough is "not
above random" (labels.versus_random), never "below" or "= random".
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from zcausal import labels, prereg, runs, stats
from zcausal.runs import UsageError
from zcausal.summaries.text import interval, num, ordinal, plural

MAPS = ("lstsq", "ridge", "procrustes", "identity", "mean_shift")
PRIMARY_MAP = "lstsq"  # the primary test: its k-fold held-out R^2 against the random bases
ALPHA = 0.05
RANDOM_COLUMNS = [f"random_{c}" for c in ("mean", "lo", "hi", "max", "rank", "p_above",
                                          "p_below", "p_two_sided")]


def _require(out_dir, names):
    for name in names:
        if not (Path(out_dir) / name).is_file():
            raise UsageError(f"{Path(out_dir) / name} does not exist; run exp_d_bridge.py without "
                             f"--replot first, or pass the --out folder of an earlier run")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


COLORS = {"lstsq": "tab:blue", "ridge": "tab:orange", "procrustes": "tab:green",
          "identity": "tab:gray", "mean_shift": "tab:purple"}


def _basis_name(table):
    value = table["basis"] if "basis" in table else "z"
    value = value.iloc[0] if isinstance(value, pd.Series) else value
    return "Z" if value == "z" else "random k-dim"


def plot_singular_values(out_dir, path):
    """Sorted singular values of each full-data W, one panel per k, from singular_values.csv."""
    _require(out_dir, ["singular_values.csv", "metrics.csv"])
    plt = _pyplot()
    sv = pd.read_csv(Path(out_dir) / "singular_values.csv")
    meta = pd.read_csv(Path(out_dir) / "metrics.csv").iloc[0]
    ks = sorted(sv["k"].unique())
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for name in ("lstsq", "ridge", "procrustes"):
            rows = sv[(sv["k"] == k) & (sv["map"] == name)]
            ax.plot(rows["index"] + 1, rows["sigma"], marker=".", color=COLORS[name], label=name,
                    zorder=3 if name == "procrustes" else 2)
        ax.axhline(1, color="k", ls=":", lw=1, label="identity and every rotation: all 1")
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("index (sorted)")
        ax.set_ylabel("singular value of W")
        ax.set_title(f"k={k} (N={int(meta['n_pairs'])} pairs)", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Spectrum of the zh <- en bridge W (fit on all pairs; layer "
                 f"{int(meta['layer'])}, {_basis_name(meta)} basis, {_pooling_note(sv)})",
                 fontsize=11)
    return runs.save_figure(fig, path, dpi=130, rect=(0, 0.07, 1, 1))


def _pooling_note(table):
    notes = ["first token kept" if not bool(table["drop_first"].iloc[0]) else "first token dropped"]
    if "drop_numbers" in table and bool(table["drop_numbers"].iloc[0]):
        notes.append("numbers dropped")
    return ", ".join(notes)


def plot_heldout_r2(out_dir, path):
    """One panel per k: held-out R^2 per map (k-fold filled, leave-one-out open, in-sample x) with
    the shuffled-pairs null band, the random bases' band and draws, and Z's place among them
    ("1st/21"); and a panel of leave-one-out top-1 retrieval against chance. Maps are rows, so no
    legend repeats them; from metrics.csv and random_draws.csv only."""
    plt = _pyplot()
    m = _metrics(out_dir)
    ks, folds = sorted(m["k"].unique()), f"{int(m['n_folds'].iloc[0])}-fold"
    rows_y = np.arange(len(MAPS))[::-1]
    fig, axes = plt.subplots(1, len(ks) + 1, figsize=(4.2 * (len(ks) + 1), 3.8), sharey=True)
    draws = _random_draws(out_dir)
    values = m[["in_sample_r2", "loo_r2", "kfold_r2", "null_lo", "null_hi"]].to_numpy()
    values = np.concatenate([values.ravel(), draws["kfold_r2"].to_numpy()])
    left = min(-0.1, np.nanmin(values)) - 0.1
    for ax, k in zip(axes, ks):
        rows = m[m["k"] == k].set_index("map").loc[list(MAPS)]
        ax.barh(rows_y + 0.1, rows["null_hi"] - rows["null_lo"], left=rows["null_lo"],
                height=0.35, color="0.8", label="shuffled-pairs null (2.5-97.5%)")
        ax.plot(rows["null_hi"], rows_y + 0.1, "|", color="0.45", ms=10, mew=1.5,
                label="null, 97.5% point")
        if rows["n_random"].max() > 0:
            ax.barh(rows_y - 0.28, rows["random_hi"] - rows["random_lo"], left=rows["random_lo"],
                    height=0.2, color="tab:orange", alpha=0.35,
                    label=f"{int(rows['n_random'].max())} random k-dim bases (2.5-97.5%)")
            mine = draws[draws["k"] == k]
            ax.plot(mine["kfold_r2"], [rows_y[MAPS.index(name)] - 0.28 for name in mine["map"]],
                    ".", color="tab:orange", ms=3, label=f"random bases, each ({folds})")
            for y, (_, r) in zip(rows_y, rows.iterrows()):
                ax.annotate(f"Z {ordinal(r['random_rank'])}/{int(r['n_random']) + 1}",
                            (r["kfold_r2"], y + 0.1), xytext=(5, 4), textcoords="offset points",
                            fontsize=7, color="tab:blue")
        ax.plot(rows["kfold_r2"], rows_y + 0.1, "o", color="tab:blue",
                label=f"Z, {folds} held out")
        ax.plot(rows["loo_r2"], rows_y - 0.08, "o", mfc="none", color="tab:blue",
                label="Z, leave-one-out")
        ax.plot(rows["in_sample_r2"], rows_y + 0.1, "x", color="tab:red", label="Z, in sample")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlim(left, 1.05)
        ax.set_title(f"k = {k}", fontsize=10)
        ax.set_xlabel("R^2 of zh predicted from en")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(rows_y, list(MAPS))
    ax = axes[-1]
    height = 0.8 / len(ks)
    for j, k in enumerate(ks):
        rows = m[m["k"] == k].set_index("map").loc[list(MAPS)]
        ax.barh(rows_y + (len(ks) - 1) / 2 * height - j * height, rows["retrieval_loo"],
                height=height * 0.9, color=plt.cm.Greens(0.45 + 0.4 * j / max(1, len(ks) - 1)),
                label=f"k = {k}")
    ax.axvline(m["retrieval_chance"].iloc[0], color="k", ls="--", lw=1,
               label=f"chance 1/N = {m['retrieval_chance'].iloc[0]:.3g}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("top-1 retrieval, leave-one-out")
    ax.set_title("mapped en finds its own zh", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    more = ax.get_legend_handles_labels()
    fig.legend(handles + more[0], labels + [f"retrieval, {label}" for label in more[1]],
               loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Bridge zh <- en inside the {_basis_name(m)} basis: layer "
                 f"{int(m['layer'].iloc[0])}, N = {int(m['n_pairs'].iloc[0])} pairs, "
                 f"{_pooling_note(m)}", fontsize=11)
    return runs.save_figure(fig, path, dpi=130, rect=(0, 0.13, 1, 1))


def _random_draws(out_dir):
    """random_draws.csv (an empty table for runs without random bases)."""
    path = Path(out_dir) / "random_draws.csv"
    return (pd.read_csv(path) if path.is_file() else
            pd.DataFrame(columns=["k", "map", "draw", "seed", "kfold_r2"]))


def plot_all(args):
    """Both figures of the run in args.out; returns their paths (nothing is written when the run's
    CSVs are missing)."""
    _require(args.out, ["metrics.csv", "singular_values.csv"])
    return [plot_singular_values(args.out, runs.figure_path(args, "singular_values")),
            plot_heldout_r2(args.out, runs.figure_path(args, "heldout_r2"))]


# ----------------------------------------------------------------------------------------------
# The primary test, and the findings in words (printed at the end of a run; report.py)

def primary_description(ks, n_folds):
    return (f"{PRIMARY_MAP} at k = {stats.primary_k(ks)}: Z's {n_folds}-fold held-out R^2 against "
            f"the random bases', one-sided (rank test); the other maps and k Holm-corrected")


def mark_primary(table):
    """metrics rows + `primary` (the declared test's row) and random_p_above_holm /
    random_p_below_holm: Holm-adjusted over the other rows (NaN on the primary and without
    random draws)."""
    table = table.copy()
    table["primary"] = (table["map"] == PRIMARY_MAP) & (table["k"] == stats.primary_k(table["k"]))
    others = ~table["primary"].to_numpy()
    for side in ("above", "below"):
        column = f"random_p_{side}"
        holm = np.full(len(table), np.nan)
        if column in table:
            holm[others] = stats.holm(table.loc[others, column])
        table[f"{column}_holm"] = holm
    return table


def _metrics(out_dir):
    """metrics.csv with the primary marked (runs before the random bases have none: their
    random columns are NaN, read as not tested)."""
    _require(out_dir, ["metrics.csv"])
    table = pd.read_csv(Path(out_dir) / "metrics.csv")
    if "n_random" not in table:
        table["n_random"] = 0
        for column in RANDOM_COLUMNS:
            table[column] = np.nan
    return table if "primary" in table else mark_primary(table)


def verdict(row):
    """Z against the random bases from the row's own one-sided test (labels.versus_random): the
    primary at its raw p, the others at their Holm-adjusted p."""
    if not row["n_random"] or np.isnan(row["random_p_above"]):
        return "not tested (no random draws)"
    test = {f"p_{side}": row[f"random_p_{side}"] for side in ("above", "below", "two_sided")}
    return labels.versus_random(test, "greater", ALPHA,
                                None if row["primary"] else row["random_p_above_holm"])


def _random_words(r):
    """'random bases 0.50 [0.45, 0.56]; Z 3rd of 21, p = 0.14' (plus Holm for secondaries)."""
    if not r["n_random"] or np.isnan(r["random_p_above"]):
        return "random bases not tested"
    holm = "" if r["primary"] else f", Holm {num(r['random_p_above_holm'])}"
    return (f"random bases {interval(r['random_mean'], r['random_lo'], r['random_hi'])}, Z "
            f"{ordinal(r['random_rank'])} of {int(r['n_random']) + 1} (p = "
            f"{num(r['random_p_above'])}{holm})")


def _map_words(r):
    null = f"shuffled pairs [{num(r['null_lo'])}, {num(r['null_hi'])}], p = {num(r['p_null'])}"
    random = f"; {_random_words(r)}" if r["n_random"] else ""  # the first line says not tested
    return f"{r['map']} {num(r['kfold_r2'])} ({null}{random}; retrieval {r['retrieval_loo']:.0%})"


def summary_lines(out_dir):
    """The run's findings as sentences, from metrics.csv: per k and map, held-out R^2 against the
    shuffled-pairs null and Z's rank among the random bases; then the primary test."""
    table = _metrics(out_dir)
    first = table.iloc[0]
    m = int(table["n_random"].max())
    against = (f" and among {plural(m, 'Haar-random k-dim basis', 'Haar-random k-dim bases')} "
               f"fitted on the same folds (Z's place from the top of {m + 1}; one-sided p, at "
               f"least 1/{m + 1} = {num(1 / (m + 1))})" if m else
               "; Z against random bases: not tested (no random draws)")
    config_path = Path(out_dir) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    lines = [prereg.status_sentence(config, "D")]
    lines += [f"Basis: {_basis_name(table)}, layer {int(first['layer'])}, "
             f"{plural(first['n_pairs'], 'pair')}, {_pooling_note(table)}; held-out R^2 by "
             f"{int(first['n_folds'])}-fold cross-validation, against "
             f"{plural(first['n_shuffles'], 'fit')} on shuffled pairs (95% band){against}."]
    for k, group in table.groupby("k"):
        lines.append(f"k = {k}: " + "; ".join(_map_words(r) for _, r in group.iterrows())
                     + f"; retrieval at chance {group['retrieval_chance'].iloc[0]:.1%}.")
    lines.append(primary_sentence(table.loc[table["primary"]].iloc[0]))
    return lines


def primary_sentence(r):
    what = f"Primary test ({r['map']}, the plan's map, at k = {int(r['k'])})"
    v = verdict(r)
    null = (f"above the shuffled-pairs null (p = {num(r['p_null'])})" if r["p_null"] < ALPHA else
            f"not above the shuffled-pairs null (p = {num(r['p_null'])}): no linear map found")
    if v.startswith("not tested"):
        return f"{what}: held-out R^2 {num(r['kfold_r2'])}, {null}; Z against random bases {v}."
    meaning = ("in Z, en predicts zh better than in random subspaces of its size"
               if v.startswith("Z above") else
               f"Z does not predict zh from en better than random subspaces of its size (the "
               f"test is one-sided: it reads no other direction; "
               f"{labels.rank_power_words(int(r['n_random']), ALPHA)})")
    return (f"{what}: held-out R^2 {num(r['kfold_r2'])}, {null}; it ranks "
            f"{ordinal(r['random_rank'])} of {int(r['n_random']) + 1} among random bases "
            f"({interval(r['random_mean'], r['random_lo'], r['random_hi'])}): {v}: "
            f"{meaning}.")


def headline(out_dir):
    """report.py's cells: dict(verdict, value, lead) from the declared primary test."""
    table = _metrics(out_dir)
    r = table.loc[table["primary"]].iloc[0]
    v = verdict(r)
    value = f"R^2 {num(r['kfold_r2'])}"
    value += (" (random bases not tested)" if v.startswith("not tested") else
              f" vs random bases {interval(r['random_mean'], r['random_lo'], r['random_hi'])} "
              f"(rank {int(r['random_rank'])} of {int(r['n_random']) + 1})")
    lead = [f"Held-out R^2 of zh predicted from en by {r['map']} in Z (k = {int(r['k'])}, layer "
            f"{int(r['layer'])}, {plural(r['n_pairs'], 'pair')}): {num(r['kfold_r2'])}; shuffled "
            f"pairs give [{num(r['null_lo'])}, {num(r['null_hi'])}]."]
    if not v.startswith("not tested"):
        lead.append(f"Among {int(r['n_random'])} random bases of the same size Z ranks "
                    f"{ordinal(r['random_rank'])}: {v}.")
    return {"verdict": v, "value": value, "lead": lead}
