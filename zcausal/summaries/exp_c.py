"""Experiment C's figures, drawn only from the files a run wrote (summary.csv, traces.csv,
lengthscales.npz, config.json), never from a model: `exp_c_ard_mmd.py --replot` calls plot_all.

z_size: |Z| by layer at the selected lambda, and |Z| against lambda at every layer (from no
effect to collapse); spectrum: the lengthscales at the basis layer; overlap: ARD's Z against the
SVD mask's top coordinates with the band of random selections; traces: loss and |Z| over the Adam
steps at the basis layer. overlap.csv (written beside summary.csv by the run and by --replot): the
overlap of each selected fit against its hypergeometric chance distribution.

Primary test (declared here, the rest Holm-corrected): the overlap of the contrastive objective's
cold-start fit at the basis layer (the cold start never saw the SVD mask; the warm start began
from it, so its overlap is not independent of the mask) with as many top coordinates of diag(P_Z),
one-sided for enrichment.
"""
import json
from pathlib import Path

import numpy as np

from zcausal import ard_mmd, stats
from zcausal.runs import UsageError, figure_path, save_figure, write_csv
from zcausal.summaries.text import num, plural

FILES = ("summary.csv", "traces.csv", "lengthscales.npz", "config.json")
PRIMARY = {"objective": "contrastive", "start": "cold"}  # each the first choice, else what ran
ALPHA = 0.05


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _lambda_colour(lam, lambdas):
    return _pyplot().cm.viridis(0.9 * sorted(lambdas).index(lam) / max(1, len(lambdas) - 1))


def _lambda_axis(ax, lambdas):
    """Symmetric-log x axis on which lambda = 0 has a place left of the smallest positive one."""
    positive = sorted(lam for lam in lambdas if lam > 0)
    if positive:
        ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
    ax.set_xticks(sorted(lambdas), [f"{lam:g}" for lam in sorted(lambdas)], fontsize=7)
    ax.minorticks_off()


def _z_axis(ax, d):
    """|Z| from 0 to d on a symmetric-log axis, with room below 0 and above d so that no marker
    is cut by the frame."""
    ax.set_yscale("symlog", linthresh=1, linscale=0.5)
    ax.set_ylim(-0.6, d * 1.6)
    ax.set_ylabel(f"|Z| = #{{j: l_j < l_ref}}  (d = {d})")
    ax.grid(alpha=0.3)


def _start_style(start):
    return dict(marker="o", ls="-") if start == "cold" else dict(marker="s", ls="--", mfc="none")


def plot_z_size(out, path):
    """Per objective: |Z| by layer at the selected lambda (left) and |Z| against lambda at each
    layer (right)."""
    import pandas as pd
    from matplotlib.lines import Line2D
    plt = _pyplot()
    s = pd.read_csv(out / "summary.csv")
    d = len(np.load(out / "lengthscales.npz")["z_energy"])
    objectives = list(dict.fromkeys(s["objective"]))
    layers = sorted(s["layer"].unique())
    lambdas = sorted(s["lambda"].unique())
    fig, axes = plt.subplots(len(objectives), 2, figsize=(12, 4.2 * len(objectives)),
                             squeeze=False)
    layer_colours = {layer: plt.cm.plasma(0.85 * i / max(1, len(layers) - 1))
                     for i, layer in enumerate(layers)}
    for (ax_layer, ax_lam), obj in zip(axes, objectives):
        rows = s[s.objective == obj]
        selected = rows[rows.selected]
        for start, g in selected.groupby("start"):
            ax_layer.plot(g["layer"], g["z_size"], color="k", label=f"{start} start",
                          **_start_style(start))
        for layer, g in selected.groupby("layer"):  # one label per layer: the selected lambdas
            chosen = "/".join(f"{lam:g}" for lam in dict.fromkeys(g["lambda"]))
            ax_layer.annotate(f"λ={chosen}", (layer, g["z_size"].max()), fontsize=7,
                              xytext=(0, 7), textcoords="offset points", ha="center")
        ax_layer.set_xticks(layers, [str(layer) for layer in layers])
        ax_layer.margins(x=0.08)
        ax_layer.set_title(f"{obj}: at the selected λ (lowest validation cross-entropy)",
                           fontsize=10)
        ax_layer.set_xlabel("layer")
        for (layer, start), g in rows.groupby(["layer", "start"]):
            ax_lam.plot(g["lambda"], g["z_size"], color=layer_colours[layer], ms=4,
                        **_start_style(start))
        _lambda_axis(ax_lam, lambdas)
        ax_lam.set_title(f"{obj}: every λ (solid, filled: cold start; dashed, open: warm)",
                         fontsize=10)
        ax_lam.set_xlabel("λ")
        for ax in (ax_layer, ax_lam):
            _z_axis(ax, d)
        ax_layer.legend(fontsize=7, loc="best")
        handles = [Line2D([], [], color=layer_colours[layer], lw=2) for layer in layers]
        ax_lam.legend(handles, [f"layer {layer}" for layer in layers], fontsize=7,
                      loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("ARD-MMD: size of Z")
    save_figure(fig, path)


def plot_spectrum(out, path, basis_layer):
    """Histogram of log10 l and the sorted curve at the basis layer, selected lambda per fit."""
    import pandas as pd
    plt = _pyplot()
    s = pd.read_csv(out / "summary.csv")
    npz = np.load(out / "lengthscales.npz")
    layers = list(npz["layers"])
    layer = basis_layer if basis_layer in layers else layers[-1]
    li = layers.index(layer)
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(12, 4.2))
    selected = s[(s.layer == layer) & s.selected]
    spectra = [npz["log10_l"][li, list(npz["objectives"]).index(r.objective),
                              list(npz["starts"]).index(r.start),
                              list(npz["lambdas"]).index(r["lambda"])]
               for _, r in selected.iterrows()]
    low, high = min(v.min() for v in spectra), max(v.max() for v in spectra)
    bins = np.linspace(low - 0.5, high + 0.5, 61) if high - low < 1e-3 else np.linspace(low, high, 61)
    for (_, r), v in zip(selected.iterrows(), spectra):
        label = f"{r.objective}, {r.start}, λ={r['lambda']:g} (|Z|={r.z_size})"
        ax_h.hist(v, bins=bins, histtype="step", label=label)
        ax_c.plot(np.sort(v), label=label)
    ax_h.axvline(npz["log10_l_ref"][li], color="k", ls=":", label="l_ref (Z threshold)")
    ax_c.axhline(npz["log10_l_ref"][li], color="k", ls=":", label="l_ref (Z threshold)")
    for ax in (ax_h, ax_c):
        ax.grid(alpha=0.3)
    ax_h.set(xlabel="log10 lengthscale", ylabel="coordinates", title=f"layer {layer}: histogram")
    ax_c.set(xlabel="coordinate rank", ylabel="log10 lengthscale", title=f"layer {layer}: sorted")
    ax_c.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def plot_overlap(out, path):
    """ARD Z vs the SVD mask's top-|Z| coordinates against chance (left: the count in both, a bar
    for 95% of random selections of |Z| coordinates, a dash at the expected count, a star where
    the fit's own test finds enrichment: the primary's raw p, the others' Holm p) and the share of
    diag(P_Z) on ARD's Z (right). Fits of one layer are set side by side."""
    plt = _pyplot()
    table = overlap_table(out)
    layers = sorted(table["layer"].unique())
    groups = list(table.groupby(["objective", "start"]))
    spacing = min(np.diff(layers)) if len(layers) > 1 else 1
    fig, (ax_o, ax_e) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, ((obj, start), g) in enumerate(groups):
        color = plt.cm.tab10(i)
        x = g["layer"] + spacing * 0.12 * (i - (len(groups) - 1) / 2)
        ax_o.vlines(x, g["overlap_lo"], g["overlap_hi"], color=color, lw=7, alpha=0.25)
        ax_o.plot(x, g["overlap_expected"], "_", color=color, ms=12, mew=2)
        ax_o.plot(x, g["overlap"], "o-", color=color, label=f"{obj}, {start}")
        sig = g["verdict"] == "enrichment"
        ax_o.plot(x[sig], g["overlap"][sig], "*", ms=14, color=color)
        ax_e.plot(g["layer"], g["energy_share"], "o-", color=color, label=f"{obj}, {start}")
        ax_e.plot(g["layer"], g["energy_chance"], ":", color=color)
    top = max(1, table[["overlap", "overlap_hi"]].to_numpy().max())
    ax_o.set(xlabel="layer", ylabel="coordinates in both", ylim=(-0.3, top + 0.8),
             title="ARD's Z ∩ as many top coordinates of diag(P_Z)\n(bar: 95% of random "
                   "selections, dash: expected; ★ enrichment)")
    ax_o.yaxis.get_major_locator().set_params(integer=True)
    share_top = min(1.0, 1.5 * table[["energy_share", "energy_chance"]].to_numpy().max()) + 0.01
    ax_e.set(xlabel="layer", ylabel="share of diag(P_Z) on ARD's Z", ylim=(0, share_top),
             title="P_Z energy on ARD's Z (dotted: random, |Z|/d)")
    for ax in (ax_o, ax_e):
        ax.set_xticks(layers, [str(layer) for layer in layers])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Selected λ per layer; SVD mask of the basis layer (the warm start began from it)")
    save_figure(fig, path)


def _loss_ticks(loss):
    """1-2-5 ticks across the range of (positive) losses."""
    low, high = np.floor(np.log10(loss.min())), np.ceil(np.log10(loss.max()))
    return [m * 10 ** e for e in np.arange(low, high + 1) for m in (1, 2, 5)
            if loss.min() / 2 <= m * 10 ** e <= loss.max() * 2]


def plot_traces(out, path, basis_layer):
    """Loss and |Z| over steps at the basis layer, every fit."""
    import pandas as pd
    plt = _pyplot()
    t = pd.read_csv(out / "traces.csv")
    layer = basis_layer if basis_layer in set(t.layer) else t.layer.max()
    t = t[t.layer == layer]
    objectives = list(dict.fromkeys(t["objective"]))
    fig, axes = plt.subplots(len(objectives), 2, figsize=(12, 3.8 * len(objectives)),
                             squeeze=False)
    lambdas = sorted(t["lambda"].unique())
    for row, obj in zip(axes, objectives):
        for (start, lam), g in t[t.objective == obj].groupby(["start", "lambda"]):
            style = dict(color=_lambda_colour(lam, lambdas), ls="-" if start == "cold" else "--",
                         label=f"{start}, λ={lam:g}")
            row[0].plot(g["step"], g["loss"], **style)
            row[1].plot(g["step"], g["z_size"], **style)
        row[0].set(title=f"{obj}: loss (layer {layer})", xlabel="Adam step", ylabel="loss")
        loss = t[t.objective == obj]["loss"]
        if (loss > 0).all():
            row[0].set_yscale("log")
            row[0].yaxis.set_major_formatter(plt.ScalarFormatter())
            row[0].yaxis.set_minor_formatter(plt.NullFormatter())
            row[0].set_yticks(_loss_ticks(loss))
        else:  # the plan objective's unbiased MMD^2 can go below 0
            row[0].set_yscale("symlog", linthresh=1)
        row[1].set(title=f"{obj}: |Z| (layer {layer})", xlabel="Adam step", ylabel="|Z|")
        for ax in row:
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def _require(out):
    for name in FILES:
        if not (out / name).is_file():
            raise UsageError(f"{out / name} does not exist; run exp_c_ard_mmd.py without --replot "
                             f"first, or pass the --out folder of a finished run")


def plot_all(args, out):
    """overlap.csv and every figure of the run in `out` (figures to figure_path(args, name));
    returns the paths written."""
    out = Path(out)
    _require(out)
    basis_layer = _config(out)["basis_layer"]
    paths = [save_overlap_table(out)]
    paths += [figure_path(args, name) for name in ("z_size", "spectrum", "overlap", "traces")]
    plot_z_size(out, paths[1])
    plot_spectrum(out, paths[2], basis_layer)
    plot_overlap(out, paths[3])
    plot_traces(out, paths[4], basis_layer)
    return paths


# ----------------------------------------------------------------------------------------------
# The overlap against chance, and the findings in words (printed at the end of a run; report.py)

def _config(out):
    return json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))


def _selected(out):
    import pandas as pd
    s = pd.read_csv(Path(out) / "summary.csv").rename(columns={"lambda": "lam"})
    return s[s["selected"]].sort_values(["objective", "layer", "start"])


def _primary_index(table, basis_layer):
    """The row of the declared primary test: PRIMARY's objective and start where they ran (else
    the first that did), at the basis layer (else the fitted layer nearest to it)."""
    for key, preferred in PRIMARY.items():
        choice = preferred if (table[key] == preferred).any() else sorted(table[key])[0]
        table = table[table[key] == choice]
    distance = (table["layer"] - basis_layer).abs()
    return table.loc[distance == distance.min()].sort_values("layer").index[0]


def _verdict(row, d, p_enrichment, p_depletion):
    if row["z_size"] == 0:
        return "not measured (ARD's Z is empty)"
    if row["z_size"] >= d:
        return "not measured (ARD's Z holds every coordinate)"
    if p_enrichment < ALPHA:
        return "enrichment"
    return "depletion" if p_depletion < ALPHA else "no enrichment"


def overlap_table(out):
    """One row per selected fit: ARD's |Z| (a) against the b = |Z| coordinates with the largest
    diag(P_Z) out of d (as summary.csv's overlap counts them), the hypergeometric chance of a
    random selection (ard_mmd.overlap_chance: expected, 95% range, one-sided p of an overlap at
    least as large and at most as small), `primary` for the declared primary test, Holm-adjusted
    p over the other rows, and the verdict each row's test gives (raw p for the primary, Holm p
    for the others). Rebuilt from summary.csv and lengthscales.npz alone."""
    import pandas as pd
    out = Path(out)
    d = len(np.load(out / "lengthscales.npz")["z_energy"])
    rows = []
    for r in _selected(out).itertuples(index=False):
        a = int(r.z_size)
        chance = ard_mmd.overlap_chance(d, a, a, int(r.overlap))
        rows.append({"layer": r.layer, "objective": r.objective, "start": r.start,
                     "lambda": r.lam, "d": d, "z_size": a, "top_coordinates": a,
                     "overlap": int(r.overlap), **chance, "energy_share": r.energy_share,
                     "energy_chance": r.energy_chance,
                     "retrieval_test_init": r.retrieval_test_init,
                     "retrieval_test_final": r.retrieval_test_final,
                     "retrieval_chance_test": r.retrieval_chance_test})
    table = pd.DataFrame(rows)
    table["primary"] = False
    table.loc[_primary_index(table, _config(out)["basis_layer"]), "primary"] = True
    for side in ("enrichment", "depletion"):
        holm = np.full(len(table), np.nan)
        others = ~table["primary"].to_numpy()
        holm[others] = stats.holm(table.loc[others, f"p_{side}"])
        table[f"p_{side}_holm"] = holm
    table["verdict"] = [
        _verdict(r, d, *((r.p_enrichment, r.p_depletion) if r.primary else
                         (r.p_enrichment_holm, r.p_depletion_holm)))
        for _, r in table.iterrows()]
    return table


def save_overlap_table(out):
    path = Path(out) / "overlap.csv"
    write_csv(overlap_table(out), path)
    return path


def _overlap_words(r):
    """'2 with the top 18 (chance 0.36 [0, 2]; P(>= 2) = 0.048, P(<= 2) = 0.99' (no bracket)."""
    return (f"{r.overlap} with the top {r.top_coordinates} (chance "
            f"{num(r.overlap_expected)} [{r.overlap_lo}, {r.overlap_hi}]; P(≥ {r.overlap}) = "
            f"{num(r.p_enrichment)}, P(≤ {r.overlap}) = {num(r.p_depletion)}")


def _fit_sentence(r):
    test = "the primary test" if r.primary else (
        f"Holm-adjusted {num(r.p_enrichment_holm)} and {num(r.p_depletion_holm)}")
    overlap = (r.verdict if r.verdict.startswith("not measured") else
               f"{_overlap_words(r)}; {test}): {r.verdict}")
    return (f"{r.objective}, layer {r.layer}, {r.start} start: lambda {r['lambda']:g}, |Z| = "
            f"{r.z_size}; overlap {overlap}; test retrieval "
            f"{r.retrieval_test_init:.0%} before the fit, {r.retrieval_test_final:.0%} after "
            f"(chance {r.retrieval_chance_test:.0%}).")


def lambda_sentence(selected, short=False):
    """What the selected lambdas say: lambda = 0 everywhere means the sparsity penalty never
    lowered the validation cross-entropy (ties go to the larger lambda, so 0 won outright)."""
    n, zero = len(selected), int((selected["lam"] == 0).sum())
    if n == 0 or zero == 0:
        return None
    if zero < n:
        return f"lambda = 0 was selected in {zero} of {plural(n, 'selected fit')}."
    where = {1: "the only selected fit", 2: "both selected fits"}.get(n, f"all {n} selected fits")
    if short:
        return f"lambda = 0 won in {where}: the sparsity penalty never helped held-out retrieval."
    return (f"lambda = 0 was selected in {where} (ties go to the larger lambda, so 0 won "
            f"outright): the sparsity penalty never helped held-out retrieval, and |Z| is what "
            f"the unpenalised fit leaves below l_ref, not a size the penalty chose.")


def summary_lines(out):
    """Per (objective, layer, start) the selected fit: lambda, |Z|, its overlap with as many top
    coordinates of the SVD mask against chance, and test retrieval; the lambda = 0 sentence; the
    primary test."""
    out = Path(out)
    _require(out)
    config = _config(out)
    table = overlap_table(out)
    d = int(table["d"].iloc[0]) if len(table) else len(np.load(out / "lengthscales.npz")["z_energy"])
    lines = [f"Fits on {plural(config.get('n_pairs'), 'pair')} (d = {d}); lambda selected per "
             f"(layer, objective, start) by validation retrieval cross-entropy. Overlap: ARD's Z "
             f"(|Z| coordinates) against the |Z| coordinates with the largest diag(P_Z) of the "
             f"rank-{config['args']['k']} SVD mask at layer {config.get('basis_layer')}, read "
             f"against a random selection of |Z| coordinates (hypergeometric: expected |Z|^2/d, "
             f"95% range, one-sided P of an overlap at least as large and at most as small)."]
    lines += [_fit_sentence(r) for _, r in table.iterrows()]
    lam = lambda_sentence(_selected(out))
    lines += [lam] if lam else []
    lines.append(primary_sentence(table.loc[table["primary"]].iloc[0], config))
    return lines


def primary_sentence(r, config):
    where = (f"at the basis layer {r.layer}" if r.layer == config.get("basis_layer") else
             f"at layer {r.layer}, the fitted layer nearest the basis layer "
             f"{config.get('basis_layer')}")
    if r.verdict.startswith("not measured"):
        return f"Primary test ({r.objective}, {r.start} start, {where}): overlap {r.verdict}."
    caveat = ("" if r.start == "cold" else " (the warm start began from the SVD mask, so this "
              "overlap is not independent of it)")
    meaning = {"no enrichment": f"no more than a random selection of {r.z_size} coordinates "
                                f"would share",
               "enrichment": "more than a random selection would share",
               "depletion": "fewer than a random selection would share"}[r.verdict]
    return (f"Primary test ({r.objective}, {r.start} start, {where}){caveat}: overlap "
            f"{_overlap_words(r)}): {r.verdict}, {meaning} with the SVD mask's top "
            f"coordinates.")


def headline(out):
    """report.py's cells: dict(verdict, value, lead) from the declared primary test."""
    out = Path(out)
    _require(out)
    table = overlap_table(out)
    r = table.loc[table["primary"]].iloc[0]
    fit = f"ARD-MMD's Z at layer {r.layer} ({r.objective}, {r.start} start)"
    if r.verdict.startswith("not measured"):
        value = f"|Z| = {r.z_size} of d = {r.d}"
        lead = [f"{fit} holds {plural(r.z_size, 'coordinate')}: its overlap with the SVD mask "
                f"is {r.verdict}."]
    else:
        value = (f"overlap {r.overlap} of {r.z_size} vs chance {num(r.overlap_expected)} "
                 f"[{r.overlap_lo}, {r.overlap_hi}] (P(≥ {r.overlap}) = {num(r.p_enrichment)})")
        lead = [f"{fit} holds {plural(r.z_size, 'coordinate')} and shares {r.overlap} with the "
                f"SVD mask's top {r.top_coordinates}, where a random selection shares "
                f"{num(r.overlap_expected)} [{r.overlap_lo}, {r.overlap_hi}]: {r.verdict}."]
    lead.append(f"Same-problem retrieval across languages on held-out problems: "
                f"{r.retrieval_test_final:.0%} (chance {r.retrieval_chance_test:.0%}).")
    lam = lambda_sentence(_selected(out), short=True)
    lead += [lam] if lam else []
    return {"verdict": r.verdict, "value": value, "lead": lead}
