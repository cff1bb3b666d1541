"""Experiment B's figure and sentences from its CSVs alone (no model): the residual-ratio figure,
summary_lines and headline (report.py), and the column names of the random bands.

    python exp_b_residual.py --replot --out results/exp_b      # redraws from the CSVs
"""
from pathlib import Path

import pandas as pd

from zcausal import runs
from zcausal.runs import UsageError

# Column prefixes of the two random-subspace bands: Haar-uniform and covariance-matched draws.
KINDS = {"uniform": "rand", "matched": "matched"}


def rank_column(kind, what):
    """frac_random_R_ge (uniform draws), frac_matched_R_ge, ...: the share of draws of `kind` at
    least as large as Z in `what` (R, absdiff), i.e. Z's empirical rank among them."""
    return f"frac_{'random' if kind == 'uniform' else KINDS[kind]}_{what}_ge"


def _layer_ticks(ax, from_layers):
    """One tick per transition, labelled by the layer it starts from (emb = the embeddings)."""
    labels = ["emb" if l == -1 else str(l) for l in from_layers]
    ax.set_xticks(from_layers, labels, fontsize=7 if len(from_layers) > 30 else 8)


def _read_tables(out_dir):
    out_dir = Path(out_dir)
    for name in ("per_layer.csv", "asymmetry.csv"):
        if not (out_dir / name).is_file():
            raise UsageError(f"{out_dir / name} does not exist; run exp_b_residual.py without "
                             f"--replot first, or pass the --out folder of an earlier run")
    return pd.read_csv(out_dir / "per_layer.csv"), pd.read_csv(out_dir / "asymmetry.csv")


def plot_residual_ratio(out_dir, path):
    """Two panels from per_layer.csv and asymmetry.csv only: R per transition (zh, en, chance line,
    random band) and R_zh - R_en with its random band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table, asym = _read_tables(out_dir)
    first = table.iloc[0]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12.5, 7.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 2]})
    both = table[table["lang"] == "all"]
    x = both["from_layer"].to_numpy()
    ax.fill_between(x, both["rand_R_lo"], both["rand_R_hi"], color="0.8", alpha=0.8,
                    label=f"uniform random {int(first['k'])}-dim subspaces (2.5-97.5%)")
    if "matched_R_lo" in both:
        ax.fill_between(x, both["matched_R_lo"], both["matched_R_hi"], color="tab:orange",
                        alpha=0.25, label=f"random subspaces drawn with the covariance of layer "
                                          f"{int(first['basis_layer'])}'s states (2.5-97.5%)")
    ax.axhline(first["R_chance"], color="k", ls="--", lw=1,
               label=f"chance sqrt(k/(d-k)) = {first['R_chance']:.3f}")
    for lang, color in (("zh", "tab:red"), ("en", "tab:blue")):
        rows = table[table["lang"] == lang]
        ax.errorbar(rows["from_layer"], rows["R_mean"], yerr=rows["R_sem"], color=color,
                    marker="o", ms=3, capsize=2, label=f"R, {lang} prompts (mean ± sem)")
    basis_in = int(first["basis_layer"]) - 1  # the update that produces the basis layer's output
    for a in (ax, ax2):
        a.axvline(basis_in, color="tab:green", ls=":", lw=1.2,
                  label=f"update into the basis layer ({basis_in} -> {basis_in + 1})"
                  if a is ax else None)
        a.grid(axis="y", alpha=0.3)
    ax.set_ylabel("R = ||P_Z u|| / ||P_Zperp u||")
    pooled = ("first token kept" if not bool(first["drop_first"]) else "first token dropped") + (
        ", numbers dropped" if bool(first.get("drop_numbers", False)) else "")
    ax.set_title(f"Residual updates u against Z of layer {int(first['basis_layer'])} "
                 f"(k={int(first['k'])}, d={int(first['d'])}, N={int(asym['n_pairs'].iloc[0])} "
                 f"pairs; {pooled})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax2.fill_between(asym["from_layer"], asym["rand_diff_lo"], asym["rand_diff_hi"], color="0.8",
                     alpha=0.8, label="uniform random subspaces (2.5-97.5%)")
    if "matched_diff_lo" in asym:
        ax2.fill_between(asym["from_layer"], asym["matched_diff_lo"], asym["matched_diff_hi"],
                         color="tab:orange", alpha=0.25, label="covariance-matched (2.5-97.5%)")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.errorbar(asym["from_layer"], asym["diff_mean"], yerr=asym["diff_sem"], color="tab:purple",
                 marker="o", ms=3, capsize=2, label="R_zh - R_en (paired mean ± sem)")
    ax2.set_ylabel("R_zh - R_en")
    ax2.set_xlabel("transition l -> l+1, plotted at l (emb: embeddings -> layer 0)")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _layer_ticks(ax2, x)
    runs.save_figure(fig, path, dpi=130)
    return path


def summary_lines(out_dir):
    """The run's findings as sentences, from its CSVs (printed at the end of a run; report.py's
    paragraph)."""
    per_layer, asym = _read_tables(out_dir)
    both = per_layer[per_layer["lang"] == "all"]
    top, low = both.loc[both["R_over_chance"].idxmax()], both.loc[both["R_over_chance"].idxmin()]
    lines = [f"R = |P_Z u| / |P_Z⊥ u| of each layer's update u is {both['R_chance'].iloc[0]:.4f} "
             f"at chance; the largest R/chance is {top['R_over_chance']:.2f} "
             f"at {int(top['from_layer'])}->{int(top['to_layer'])}, the smallest "
             f"{low['R_over_chance']:.2f} at {int(low['from_layer'])}->{int(low['to_layer'])}."]
    for kind, name in (("uniform", "uniform"), ("matched", "covariance-matched")):
        above = both[both[rank_column(kind, "R")] == 0]
        below = both[both[rank_column(kind, "R")] == 1]
        lines.append(f"Transitions with R above every {name} random subspace: {len(above)} of "
                     f"{len(both)}; below every one: {len(below)}.")
    big = asym.loc[asym["diff_mean"].abs().idxmax()]
    lines.append(f"The largest |R_zh - R_en| is {big['diff_mean']:+.4f} at "
                 f"{int(big['from_layer'])}->{int(big['to_layer'])} (Wilcoxon p = "
                 f"{big['wilcoxon_p']:.2g}; random subspaces with a difference at least as "
                 f"large: {big['frac_random_absdiff_ge']:.0%}).")
    return lines


def headline(out_dir):
    """report.py's row and lead (dict(verdict, value, lead)): the transition with the largest
    R/chance, its R with a 95% interval against the covariance-matched random band, and how many
    transitions lie above every matched draw."""
    per_layer, _ = _read_tables(out_dir)
    both = per_layer[per_layer["lang"] == "all"]
    top = both.loc[both["R_over_chance"].idxmax()]
    above = int((both[rank_column("matched", "R")] == 0).sum())
    half = 1.96 * top["R_sem"]
    where = f"{int(top['from_layer'])}->{int(top['to_layer'])}"
    value = (f"R {runs.interval(top['R_mean'], top['R_mean'] - half, top['R_mean'] + half)} at "
             f"{where}, matched random [{runs.number(top['matched_R_lo'])}, "
             f"{runs.number(top['matched_R_hi'])}]")
    verdict = (f"above matched random at {above} of {len(both)}" if above else "no enrichment")
    lead = [f"Z's share of the residual updates peaks at {where}, "
            f"{runs.number(top['R_over_chance'])} times its chance value "
            f"{runs.number(top['R_chance'])}.",
            f"Against random subspaces matched to the updates' covariance, {above} of {len(both)} "
            f"transitions have R above every draw."]
    return dict(verdict=verdict, value=value, lead=lead)
