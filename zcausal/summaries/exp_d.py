"""Experiment D's figures and sentences from its CSVs alone (no model): singular values, held-out
R^2 against the null and the random basis, summary_lines and headline (report.py).

    python exp_d_bridge.py --replot --out results/exp_d        # redraws from the CSVs
"""
from pathlib import Path

import numpy as np
import pandas as pd

from zcausal import runs
from zcausal.runs import UsageError

MAPS = ("lstsq", "ridge", "procrustes", "identity", "mean_shift")

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
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _pooling_note(table):
    notes = ["first token kept" if not bool(table["drop_first"].iloc[0]) else "first token dropped"]
    if "drop_numbers" in table and bool(table["drop_numbers"].iloc[0]):
        notes.append("numbers dropped")
    return ", ".join(notes)


def plot_heldout_r2(out_dir, path):
    """One panel per k: held-out R^2 per map (10-fold filled, leave-one-out open, in-sample x) with
    the shuffled-pairs null band; and a panel of leave-one-out top-1 retrieval against chance.
    Maps are rows, so no legend repeats them; from metrics.csv only."""
    _require(out_dir, ["metrics.csv"])
    plt = _pyplot()
    m = pd.read_csv(Path(out_dir) / "metrics.csv")
    ks = sorted(m["k"].unique())
    rows_y = np.arange(len(MAPS))[::-1]
    fig, axes = plt.subplots(1, len(ks) + 1, figsize=(4.2 * (len(ks) + 1), 3.8), sharey=True)
    values = m[["in_sample_r2", "loo_r2", "kfold_r2", "null_lo", "null_hi"]].to_numpy()
    left = min(-0.1, np.nanmin(values)) - 0.1
    for ax, k in zip(axes, ks):
        rows = m[m["k"] == k].set_index("map").loc[list(MAPS)]
        ax.barh(rows_y, rows["null_hi"] - rows["null_lo"], left=rows["null_lo"], height=0.5,
                color="0.8", label="shuffled-pairs null (2.5-97.5%)")
        ax.plot(rows["null_hi"], rows_y, "|", color="0.45", ms=14, mew=1.5,
                label="null, 97.5% point")
        ax.plot(rows["kfold_r2"], rows_y + 0.12, "o", color="tab:blue",
                label=f"{int(m['n_folds'].iloc[0])}-fold held out")
        ax.plot(rows["loo_r2"], rows_y - 0.12, "o", mfc="none", color="tab:blue",
                label="leave-one-out")
        ax.plot(rows["in_sample_r2"], rows_y, "x", color="tab:red", label="in sample")
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
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_all(args):
    return [plot_singular_values(args.out, runs.figure_path(args, "singular_values")),
            plot_heldout_r2(args.out, runs.figure_path(args, "heldout_r2"))]


def summary_lines(out_dir):
    """The run's findings as sentences, from metrics.csv (printed at the end of a run;
    report.py's paragraph): per k and map, held-out R^2 against the shuffled-pair null."""
    _require(out_dir, ["metrics.csv"])
    table = pd.read_csv(Path(out_dir) / "metrics.csv")
    lines = [f"Basis: {_basis_name(table)}, layer {int(table['layer'].iloc[0])}, "
             f"{int(table['n_pairs'].iloc[0])} pairs, {_pooling_note(table)}; held-out R^2 by "
             f"{int(table['n_folds'].iloc[0])}-fold cross-validation, against "
             f"{int(table['n_shuffles'].iloc[0])} fits on shuffled pairs (95% band)."]
    for k, group in table.groupby("k"):
        parts = [f"{r.map} {r.kfold_r2:.3f} (null {r.null_lo:.3f} to {r.null_hi:.3f}, p = "
                 f"{r.p_null:.3f}; retrieval {r.retrieval_loo:.0%})" for r in group.itertuples()]
        lines.append(f"k = {k}: " + "; ".join(parts) + f"; retrieval at chance "
                     f"{group.retrieval_chance.iloc[0]:.1%}.")
    return lines


def headline(out_dir):
    """report.py's row and lead (dict(verdict, value, lead)): per k the best fitted map's held-out
    R^2 against its shuffled-pair null band."""
    table = pd.read_csv(Path(out_dir) / "metrics.csv")
    table = table[table["map"] != "identity"]
    best = table.loc[table.groupby("k")["kfold_r2"].idxmax()]
    above = [r.kfold_r2 > r.null_hi for r in best.itertuples()]
    verdict = ("bridge above null" if all(above) else "no bridge" if not any(above)
               else "bridge at some k")
    value = "; ".join(f"held-out R² {runs.number(r.kfold_r2)} ({r.map}, k {r.k}), shuffled null "
                      f"[{runs.number(r.null_lo)}, {runs.number(r.null_hi)}]"
                      for r in best.itertuples())
    lead = [f"k = {r.k}: the {r.map} map predicts held-out zh states from en with R² "
            f"{runs.number(r.kfold_r2)}; maps fitted on shuffled pairs reach at most "
            f"{runs.number(r.null_hi)}." for r in best.itertuples()]
    return dict(verdict=verdict, value=value, lead=lead[:3])
