"""Experiment E's figures from its tables alone (no model): layer_sweep.png (per k: the first
panel top1_src, then the p_share shift, top1_own, disruption, the same-problem shift and the
language margin, each against the layer with the random band), question_sweep.png (the question
set: top1_src and the p_share shift in English and in Chinese) and das.png (held-out DAS beside
full interchange, Z and the random band; its overlap with Z)."""
from pathlib import Path

import numpy as np

from zcausal import runs, stats
from zcausal.summaries.exp_e_tables import NOT_TESTED

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
                 f"language, other numbers), k = {k}; dash-dotted: basis layer "
                 f"{config['basis_layer']}, dotted: the primary test's layer; x: disrupts",
                 fontsize=10)
    return runs.save_figure(fig, path)


def plot_das(table, angles, title, path):
    """Per k (columns): held-out top1_src and p_share shift of full, DAS, Z and the random band
    (bars; bootstrap 95% intervals over the test problems, the band for random), and the overlap
    of DAS with Z and with the random draws against chance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = sorted(table.k.unique())
    fig, axes = plt.subplots(3, len(ks), figsize=(max(7, 5 * len(ks)), 10), squeeze=False)
    for col, k in enumerate(ks):
        frame = table[(table.k == k) & (table.pairing == "swap")].set_index("condition")
        names = [n for n in ("full", "das", "z_basis", "z_layer", "random") if n in frame.index]
        for row, (measure, ylabel) in enumerate((("top1_src", "top1_src (share of pairs)"),
                                                 ("p_share_shift", "p_share shift"))):
            ax = axes[row, col]
            values = np.array([frame.loc[n, measure] for n in names], float)
            lo = [frame.loc[n, f"{measure}_lo" if n == "random" else f"{measure}_boot_lo"]
                  for n in names]
            hi = [frame.loc[n, f"{measure}_hi" if n == "random" else f"{measure}_boot_hi"]
                  for n in names]
            err = np.nan_to_num(np.abs(np.array([values - np.array(lo, float),
                                                 np.array(hi, float) - values])))
            ax.bar(range(len(names)), values, yerr=err, capsize=4,
                   color=[STYLE[n]["color"] for n in names])
            ax.set_xticks(range(len(names)), names, fontsize=8)
            ax.axhline(0, color="0.6", lw=0.6)
            ax.set_ylabel(ylabel, fontsize=8)
            if measure == "top1_src":
                ax.set_ylim(-0.03, 1.05)
            small = " (too small)" if bool(frame.too_small.iloc[0]) else ""
            ax.set_title(f"k = {k}, layer {int(frame.layer.iloc[0])}: "
                         f"{int(frame.n_pairs.iloc[0])} held-out swap pairs{small}", fontsize=9)
            _plain(ax, False)
        ax = axes[2, col]
        a = angles[angles.k == k]
        rand = a[a.versus == "random"]
        ax.bar([0, 1], [a[a.versus == v].overlap.iloc[0] for v in ("z_basis", "z_layer")],
               color=[STYLE["z_basis"]["color"], STYLE["z_layer"]["color"]])
        if len(rand):
            ax.bar([2], [rand.overlap.mean()], color=STYLE["random"]["color"],
                   yerr=[[rand.overlap.mean() - rand.overlap.min()],
                         [rand.overlap.max() - rand.overlap.mean()]], capsize=4)
        ax.axhline(a.chance_overlap.iloc[0], color="0.4", ls=":", lw=1)
        ax.set_xticks([0, 1, 2], ["DAS vs Z(basis)", "DAS vs Z(layer)", "DAS vs random"],
                      fontsize=8)
        ax.set_ylabel("||V_DAS V^T||² / k", fontsize=8)
        ax.set_title("overlap (mean cos² of principal angles); dotted: chance k/d", fontsize=9)
        _plain(ax, False)
    fig.suptitle(title + "\nbars: bootstrap 95% intervals over the test problems;\nrandom: "
                 "2.5-97.5% of the draws", fontsize=10)
    return runs.save_figure(fig, path)


def plot_all(args, config, tables):
    """layer_sweep.png and question_sweep.png (the primary k; <name>_k<k>.png for the others)
    and das.png from build_tables' and question_tables' frames, each where its table exists.
    Returns the paths written."""
    written = []
    for table, stem, plot in (("per_layer.csv", "layer_sweep", plot_sweep),
                              ("question_per_layer.csv", "question_sweep", plot_question)):
        per_layer = tables.get(table)
        ks = sorted(int(k) for k in per_layer.k.unique()) if per_layer is not None else []
        for k in ks:
            name = stem if k == stats.primary_k(ks) else f"{stem}_k{k}"
            written.append(plot(per_layer, config, k, runs.figure_path(args, name)))
    angles = Path(args.out) / "das_angles.csv"
    if "das.csv" in tables and angles.is_file():
        model = Path(str(config["model"].get("name_or_path"))).name
        written.append(plot_das(tables["das.csv"], runs.load_csv(angles), f"DAS: {model}",
                                runs.figure_path(args, "das")))
    return written
