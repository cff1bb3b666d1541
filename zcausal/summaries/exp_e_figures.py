"""Experiment E's figures from its tables alone (no model): layer_sweep.png (per k: the first
panel top1_src, then the p_share shift, top1_own, disruption, the same-problem shift and the
language margin, each against the layer with the random band), question_sweep.png (the question
set: top1_src and the p_share shift in English and in Chinese) and das_curve.png (per DAS layer,
held-out DAS against k beside full interchange, Z and the random band; the mean cos² of its
principal angles to Z against chance)."""
from pathlib import Path

import numpy as np

from zcausal import runs, stats
from zcausal.summaries.exp_e_tables import NOT_TESTED, das_site, load_angles

STYLE = {"none": dict(color="0.5", ls=":", label="none (no-op)"),
         "full": dict(color="k", label="full interchange"),
         "z_basis": dict(color="tab:blue", label="Z of the basis layer"),
         "z_layer": dict(color="tab:orange", label="Z of the patched layer"),
         "das": dict(color="tab:red", label="DAS"),
         "random": dict(color="tab:green", ls="--",
                        label="random (mean; band: 2.5-97.5% of draws)")}

# (pairing, measure, title, y label, symmetric-log axis)
PANELS = [("swap", "top1_src", "argmax = the source's first digit (top1_src), swap",
           "share of pairs", False),
          ("swap", "p_share_shift", "shift of p_share = p_src / (p_src + p_own), swap",
           "mean shift from clean", False),
          ("swap", "top1_own", "argmax = the own first digit (top1_own), swap", "share of pairs",
           False),
          ("swap", "low_mass", "p_own + p_src below half its clean value, swap",
           "share of pairs (> 0.5: disrupts)", False),
          ("same", "dlogp_own", "Δ log p(own answer), same-problem source", "nats", True),
          ("swap", "dlang_own", "Δ language margin after the answer, swap", "nats", True)]


def _plain(ax, symlog):
    """Plain tick labels ('0.5', '-2', never '8.47×10⁻³'); symlog axes without minor labels."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    if symlog:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _panel(ax, per_layer, pairing, measure, symlog):
    frame = per_layer[per_layer.pairing == pairing].sort_values("layer")
    for condition, style in STYLE.items():
        rows = frame[frame.condition == condition]
        if not len(rows) or rows[measure].isna().all():
            continue
        ax.plot(rows.layer, rows[measure], marker=".", lw=1.2, **style)
        if condition == "random":
            ax.fill_between(rows.layer, rows[f"{measure}_lo"], rows[f"{measure}_hi"],
                            color=style["color"], alpha=0.2, lw=0)
        elif measure in ("top1_src", "p_share_shift") and "disrupts" in rows:
            bad = rows[rows.disrupts.astype(bool)]  # disruption, not transfer: crossed out
            ax.plot(bad.layer, bad[measure], "x", color=style["color"], ms=7, mew=1.5)
    values = frame[[c for c in (measure, f"{measure}_lo", f"{measure}_hi") if c in frame]]
    symlog = symlog and np.nanmax(np.abs(values.to_numpy(float)), initial=0) > 1
    if symlog:  # only where shifts of several nats sit beside small ones
        ax.set_yscale("symlog", linthresh=0.1)
    if measure in ("top1_src", "top1_own", "low_mass"):
        ax.set_ylim(-0.03, 1.03)
    _plain(ax, symlog)
    return symlog


def plot_sweep(per_layer, config, k, path):
    """Six panels against the patched layer (top axis: fraction of depth), random band shaded,
    the basis layer dash-dotted, the primary test's layer dotted, layers where a condition disrupts crossed out; the legend in
    its own row below the panels, so it covers no data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    n_layers, basis = config["model"]["num_layers"], config["basis_layer"]
    primary = config.get("primary_layer", basis)  # the output of b - 1 is the input of b
    per_layer = per_layer[per_layer.k == k]
    fig = plt.figure(figsize=(12, 11.5))
    grid = fig.add_gridspec(4, 2, height_ratios=[1, 1, 1, 0.28])
    axes = [fig.add_subplot(grid[i // 2, i % 2]) for i in range(6)]
    for ax, (pairing, measure, title, ylabel, symlog) in zip(axes, PANELS):
        symlog = _panel(ax, per_layer, pairing, measure, symlog)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(basis, color="tab:blue", lw=0.8, ls="-.")
        ax.axvline(primary, color="tab:red", lw=0.8, ls=":")
        ax.axhline(0, color="0.8", lw=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel + (" (symmetric log)" if symlog else ""), fontsize=8)
        ax.set_xlabel("patched layer l", fontsize=8)
        top = ax.secondary_xaxis("top", functions=(lambda x: x / n_layers,
                                                   lambda f: f * n_layers))
        top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2f}"))
        top.tick_params(labelsize=7)
    handles = [Line2D([], [], marker=".", **style) for name, style in STYLE.items()
               if (per_layer.condition == name).any()]
    handles += [Line2D([], [], color="tab:blue", ls="-.", lw=0.8,
                       label=f"basis layer {basis} (its output)"),
                Line2D([], [], color="tab:red", ls=":", lw=0.8,
                       label=f"primary test: layer {primary}" + (
                           f" (= input of {basis})" if primary == basis - 1 else "")),
                Line2D([], [], color="0.3", marker="x", ls="", label="disrupts (not transfer)")]
    legend = fig.add_subplot(grid[3, :])
    legend.axis("off")
    legend.legend(handles=handles, loc="center", ncol=4, fontsize=8, frameon=False)
    n_random = int(per_layer[per_layer.condition == "random"].n_draws.max()) \
        if (per_layer.condition == "random").any() else 0
    name = Path(str(config["model"].get("name_or_path"))).name
    n_pairs = int(per_layer[(per_layer.pairing == "swap")].n_pairs.max())
    draws = f"{n_random} random draws" if n_random else NOT_TESTED
    fig.suptitle(f"{name}: last-position interchange, k = {k}, {n_pairs} swap pairs with "
                 f"different first digits, {draws}; top axis: l / L", fontsize=10)
    return runs.save_figure(fig, path)


QUESTION_PANELS = [("top1_src", "argmax = the partner's first digit (top1_src)", "share of pairs"),
                   ("p_share_shift", "shift of p_share = p_src / (p_src + p_own)",
                    "mean shift from clean"),
                   ("attn_tv_last", "the basis layer's attention at the last position, moved",
                    "total variation (mean over heads)")]
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese"}


def plot_question(per_layer, config, k, path):
    """The question set (question_per_layer.csv) at one k: top1_src, the p_share shift and the
    attention readout (layers below the basis layer) against the patched layer, English and
    Chinese side by side, every condition with the random band, the basis layer dash-dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    per_layer = per_layer[per_layer.k == k]
    languages = [lang for lang in LANGUAGE_NAMES if (per_layer.language == lang).any()]
    fig, axes = plt.subplots(len(QUESTION_PANELS), len(languages),
                             figsize=(6 * len(languages), 12), squeeze=False)
    for col, language in enumerate(languages):
        frame = per_layer[per_layer.language == language].assign(pairing="question")
        n_pairs = int(frame.n_pairs.max())
        for row, (measure, title, ylabel) in enumerate(QUESTION_PANELS):
            ax = axes[row, col]
            _panel(ax, frame, "question", measure, False)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.axvline(config["basis_layer"], color="tab:blue", lw=0.8, ls="-.")
            ax.axvline(config.get("primary_layer", config["basis_layer"]), color="tab:red",
                       lw=0.8, ls=":")
            ax.axhline(0, color="0.8", lw=0.6)
            ax.set_title(f"{LANGUAGE_NAMES[language]}, {n_pairs} pairs: {title}", fontsize=9)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_xlabel("patched layer l", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="best")
    name = Path(str(config["model"].get("name_or_path"))).name
    fig.suptitle(f"{name}: every token of the question from a counterfactual partner (same "
                 f"language, other numbers), k = {k};\ndash-dotted: basis layer "
                 f"{config['basis_layer']}, dotted: the primary test's layer; x: disrupts",
                 fontsize=10)
    return runs.save_figure(fig, path)


def _interval_columns(frame, condition, measure):
    """(lo, hi) of a condition's rows: the random band, a rate's Wilson interval, or the
    bootstrap interval of a shift."""
    if condition == "random":
        return frame[f"{measure}_lo"], frame[f"{measure}_hi"]
    if f"{measure}_ci_lo" in frame:
        return frame[f"{measure}_ci_lo"], frame[f"{measure}_ci_hi"]
    return frame.get(f"{measure}_boot_lo"), frame.get(f"{measure}_boot_hi")


def _curve_panel(ax, table, measure):
    """One measure against k for every condition of one DAS layer: intervals as error bars
    (each condition shifted a little along the log k axis, so that equal values stay apart),
    the random draws as a shaded band."""
    for shift, condition in enumerate(("full", "das", "z_basis", "z_layer", "random")):
        rows = table[table.condition == condition].sort_values("k")
        if not len(rows) or rows[measure].isna().all():
            continue
        style = dict(STYLE[condition])
        lo, hi = _interval_columns(rows, condition, measure)
        if condition == "random":
            ax.plot(rows.k, rows[measure], marker=".", lw=1.2, **style)
            ax.fill_between(rows.k, lo, hi, color=style["color"], alpha=0.2, lw=0)
            continue
        values = rows[measure].to_numpy(float)
        err = None if lo is None else np.nan_to_num(np.abs(np.array(
            [values - lo.to_numpy(float), hi.to_numpy(float) - values])))
        ax.errorbar(rows.k * 1.04 ** (shift - 1.5), values, yerr=err, marker="o", ms=4,
                    capsize=3, lw=1.2, **style)
        if condition == "das" and "disrupts" in rows:
            bad = rows[rows.disrupts.astype(bool)]
            ax.plot(bad.k * 1.04 ** (shift - 1.5), bad[measure], "x", color=style["color"],
                    ms=9, mew=1.5)


def _angle_panel(ax, angles):
    """Mean cos² of the principal angles between DAS and Z (both), and the random draws' range,
    against k, with the chance value k / d."""
    for versus in ("z_basis", "z_layer"):
        rows = angles[angles.versus == versus].sort_values("k")
        if len(rows):
            ax.plot(rows.k, rows.mean_cos2, marker="o", ms=4, color=STYLE[versus]["color"],
                    label=f"DAS vs {STYLE[versus]['label']}")
    rand = angles[angles.versus == "random"].groupby("k").mean_cos2
    if len(rand.size()):
        ax.fill_between(rand.min().index, rand.min(), rand.max(), color=STYLE["random"]["color"],
                        alpha=0.2, lw=0, label="DAS vs random subspaces (range)")
    chance = angles.groupby("k").chance_mean_cos2.first()
    ax.plot(chance.index, chance, color="0.4", ls=":", lw=1, label="chance k / d")


def plot_das_curve(table, angles, basis, title, path, order=()):
    """One column per DAS layer: held-out top1_src (Wilson intervals) and p_share shift
    (bootstrap intervals) against k for DAS, full, Z of the basis layer, Z of the patched layer
    and the random band; the mean cos² of the principal angles between DAS and Z against its
    chance value k / d. Swap pairs of the test split; the columns in `order` (the run's DAS
    layers) first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    table = table[table.pairing == "swap"]
    found = sorted(int(layer) for layer in table.layer.unique())
    layers = [l for l in order if l in found] + [l for l in found if l not in order]
    fig = plt.figure(figsize=(max(7.5, 5.5 * len(layers)), 12.5))
    grid = fig.add_gridspec(4, len(layers), height_ratios=[1, 1, 1, 0.22])
    for col, layer in enumerate(layers):
        mine = table[table.layer == layer]
        axes = [fig.add_subplot(grid[row, col]) for row in range(3)]
        _curve_panel(axes[0], mine, "top1_src")
        axes[0].set_ylim(-0.03, 1.03)
        _curve_panel(axes[1], mine, "p_share_shift")
        axes[1].axhline(0, color="0.8", lw=0.6)
        if angles is not None:
            _angle_panel(axes[2], angles[angles.layer == layer])
            axes[2].legend(fontsize=7, loc="upper left", frameon=False)
        small = " (too small)" if mine.too_small.astype(bool).any() else ""
        n_train = f", {int(mine.n_train.iloc[0])} train problems" if "n_train" in mine else ""
        axes[0].set_title(f"DAS at {das_site(layer, basis)}\n{int(mine.n_pairs.max())} held-out "
                          f"swap pairs{n_train}{small}", fontsize=9)
        for ax, ylabel in zip(axes, ("top1_src (share of pairs)", "p_share shift",
                                     "mean cos² of the principal angles")):
            ax.set_xscale("log")
            ks = sorted(int(k) for k in mine.k.unique())
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xlim(min(ks) / 1.3, max(ks) * 1.3)
            ax.minorticks_off()
            ax.set_xlabel("k (dimensions)", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            _plain(ax, False)
    handles = [Line2D([], [], marker="o", ms=4, **STYLE[name]) for name in
               ("full", "das", "z_basis", "z_layer", "random") if (table.condition == name).any()]
    handles.append(Line2D([], [], color="tab:red", marker="x", ls="", label="DAS disrupts"))
    legend = fig.add_subplot(grid[3, :])
    legend.axis("off")
    legend.legend(handles=handles, loc="center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title + "\nbars: Wilson 95% intervals (rates), bootstrap 95% intervals over "
                 "the test problems (shift);\nrandom: 2.5-97.5% of the draws", fontsize=9)
    return runs.save_figure(fig, path)


def plot_all(args, config, tables):
    """layer_sweep.png and question_sweep.png (the primary k; <name>_k<k>.png for the others)
    and das_curve.png from build_tables' and question_tables' frames, each where its table
    exists.
    Returns the paths written."""
    written = []
    for table, stem, plot in (("per_layer.csv", "layer_sweep", plot_sweep),
                              ("question_per_layer.csv", "question_sweep", plot_question)):
        per_layer = tables.get(table)
        ks = sorted(int(k) for k in per_layer.k.unique()) if per_layer is not None else []
        for k in ks:
            name = stem if k == stats.primary_k(ks) else f"{stem}_k{k}"
            written.append(plot(per_layer, config, k, runs.figure_path(args, name)))
    if "das.csv" in tables:
        model = Path(str(config["model"].get("name_or_path"))).name
        written.append(plot_das_curve(tables["das.csv"], load_angles(args.out, config),
                                      int(config["basis_layer"]),
                                      f"DAS against k, held-out test pairs: {model}",
                                      runs.figure_path(args, "das_curve"),
                                      config.get("das_layers", ())))
    return written
