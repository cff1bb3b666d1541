"""Experiment C's figures, drawn only from the files a run wrote (summary.csv, traces.csv,
lengthscales.npz, config.json), never from a model: `exp_c_ard_mmd.py --replot` calls plot_all.

z_size: |Z| by layer at the selected lambda, and |Z| against lambda at every layer (from no
effect to collapse); spectrum: the lengthscales at the basis layer; overlap: ARD's Z against the
SVD mask's top coordinates; traces: loss and |Z| over the Adam steps at the basis layer.
"""
import json
from pathlib import Path

import numpy as np

from zcausal import runs
from zcausal.runs import UsageError, figure_path, save_figure

FILES = ("summary.csv", "traces.csv", "lengthscales.npz", "config.json")


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
    """ARD Z vs the SVD mask's top-|Z| coordinates (count and P_Z energy share) against chance."""
    import pandas as pd
    plt = _pyplot()
    s = pd.read_csv(out / "summary.csv")
    s = s[s.selected]
    layers = sorted(s["layer"].unique())
    fig, (ax_o, ax_e) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, ((obj, start), g) in enumerate(s.groupby(["objective", "start"])):
        color = plt.cm.tab10(i)
        size = g["z_size"].clip(lower=1)
        ax_o.plot(g["layer"], g["overlap"] / size, "o-", color=color, label=f"{obj}, {start}")
        ax_o.plot(g["layer"], g["overlap_expected"] / size, ":", color=color)
        sig = g[g["overlap_p"] < 0.05]
        ax_o.plot(sig["layer"], sig["overlap"] / sig["z_size"].clip(lower=1), "*", ms=12,
                  color=color)
        ax_e.plot(g["layer"], g["energy_share"], "o-", color=color, label=f"{obj}, {start}")
        ax_e.plot(g["layer"], g["energy_chance"], ":", color=color)
    ax_o.set(xlabel="layer", ylabel="overlap / |Z|", ylim=(-0.04, 1.04),
             title="ARD Z ∩ SVD top-|Z| (dotted: random; ★ hypergeom. p<0.05)")
    ax_e.set(xlabel="layer", ylabel="share of diag(P_Z) on ARD's Z", ylim=(-0.04, 1.04),
             title="P_Z energy on ARD's Z (dotted: random, |Z|/d)")
    for ax in (ax_o, ax_e):
        ax.set_xticks(layers, [str(layer) for layer in layers])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Selected λ per layer; SVD mask of the basis layer (the warm start used it)")
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
    """Every figure of the run in `out`, to figure_path(args, name)."""
    out = Path(out)
    _require(out)
    basis_layer = json.loads((out / "config.json").read_text(encoding="utf-8"))["basis_layer"]
    paths = [figure_path(args, name) for name in ("z_size", "spectrum", "overlap", "traces")]
    plot_z_size(out, paths[0])
    plot_spectrum(out, paths[1], basis_layer)
    plot_overlap(out, paths[2])
    plot_traces(out, paths[3], basis_layer)
    return paths


# ----------------------------------------------------------------------------------------------
# The findings in words (printed at the end of a run; report.py's paragraph)

def _selected(out):
    import pandas as pd
    s = pd.read_csv(Path(out) / "summary.csv").rename(columns={"lambda": "lam"})
    return s[s["selected"]].sort_values(["objective", "layer", "start"])


def summary_lines(out):
    """Per (objective, layer, start) the selected fit: lambda, |Z|, its overlap with the SVD mask's
    top-k coordinates against chance, and test retrieval before and after the fit."""
    _require(Path(out))
    config = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    d = len(np.load(Path(out) / "lengthscales.npz")["z_energy"])
    lines = [f"Fits on {config.get('n_pairs')} pairs (d = {d}); lambda selected per layer by "
             f"validation retrieval cross-entropy; overlap = |Z ∩ top-{config['args']['k']} "
             f"coordinates of the SVD mask at layer {config.get('basis_layer')}|."]
    for r in _selected(out).itertuples():
        lines.append(f"{r.objective}, layer {r.layer}, {r.start} start: lambda {r.lam:g}, "
                     f"|Z| = {r.z_size}, overlap {r.overlap} (chance {r.overlap_expected:.1f}, "
                     f"p = {r.overlap_p:.2g}); test retrieval {r.retrieval_test_init:.0%} -> "
                     f"{r.retrieval_test_final:.0%} (chance {r.retrieval_chance_test:.0%}).")
    return lines


def headline(out):
    """report.py's row and lead (dict(verdict, value, lead)): |Z| and its overlap with the SVD
    mask at the basis layer (the warm start's where there is one) against chance, per objective."""
    config = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    s = _selected(out)
    s = s[s["layer"] == config.get("basis_layer")]
    s = s[s["start"] == "warm"] if (s["start"] == "warm").any() else s
    if not len(s):
        return dict(verdict="not measured", value="no fit at the basis layer",
                    lead=[f"No fit at the basis layer {config.get('basis_layer')}."])
    words = ["overlap above chance" if r.overlap_p < 0.05 else "no overlap beyond chance"
             for r in s.itertuples()]
    value = "; ".join(f"{r.objective}: overlap {r.overlap} of |Z| {r.z_size}, chance "
                      f"{runs.number(r.overlap_expected)} (p {runs.number(float(r.overlap_p))})"
                      for r in s.itertuples())
    lead = [f"{r.objective.capitalize()} objective at layer {r.layer}: |Z| = {r.z_size}, "
            f"{r.overlap} of them among the SVD mask's top coordinates (chance "
            f"{runs.number(r.overlap_expected)}); test retrieval "
            f"{runs.number(r.retrieval_test_final)} (chance {runs.number(r.retrieval_chance_test)})."
            for r in s.itertuples()]
    return dict(verdict=" / ".join(dict.fromkeys(words)), value=value, lead=lead[:3])
