"""Experiment C's figures, drawn only from the files a run wrote (summary.csv, traces.csv,
lengthscales.npz, config.json), never from a model: `exp_c_ard_mmd.py --replot` calls plot_all.

z_size: |Z| by layer at the selected lambda, and |Z| against lambda at every layer (from no
effect to collapse); spectrum: the lengthscales at the basis layer; overlap: ARD's Z against the
SVD mask's top coordinates with the band of random selections; traces: loss and |Z| over the Adam
steps at the basis layer. overlap.csv (written beside summary.csv by the run and by --replot): the
overlap of each selected fit against its hypergeometric chance distribution.

Several k (--k 20 50): each k is its own SVD mask, with its own warm start and its own overlap
rows (a warm fit against the mask it started from, the cold fit, fitted once, against every k's);
the figures draw one line per k, or say which k they show.

Primary test (declared here, the rest Holm-corrected): the overlap of the contrastive objective's
cold-start fit at the basis layer (the cold start never saw the SVD mask; the warm start began
from it, so its overlap is not independent of the mask) with as many top coordinates of diag(P_Z)
of the rank-k mask, k = 50 (the plan's) where it ran, else the largest k; one-sided for
enrichment.

A run written before --k took several values (one k, in config.json; no k column in its CSVs,
z_energy of shape (d,)) is read as a run of that one k, and --replot rebuilds its overlap.csv
without a k column, as it was.
"""
import json
from pathlib import Path

import numpy as np

from zcausal import ard_mmd, labels, prereg, stats
from zcausal.runs import UsageError, figure_path, save_figure, write_csv
from zcausal.summaries.text import num, plural

FILES = ("summary.csv", "traces.csv", "lengthscales.npz", "config.json")
PRIMARY = {"objective": "contrastive", "start": "cold"}  # each the first choice, else what ran
ALPHA = 0.05




def primary_description(ks):
    return (f"overlap of ARD's Z ({PRIMARY['objective']} objective, {PRIMARY['start']} start, "
            f"selected lambda, basis layer) with as many top coordinates of diag(P_Z) of the "
            f"rank-{stats.primary_k(ks)} SVD mask, against a random selection (hypergeometric, "
            f"one-sided for enrichment)")


# ----------------------------------------------------------------------------------------------
# Reading a run (a run of one k from before --k took several is read as that one k)

def _config(out):
    return json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))


def run_ks(out):
    """The run's k values, in the order of --k (config.json; one int in a run of one k written
    before --k took several)."""
    k = _config(out)["args"]["k"]
    return [int(v) for v in (k if isinstance(k, list) else [k])]


def _has_k_column(out):
    with open(Path(out) / "summary.csv", encoding="utf-8") as handle:
        return "k" in handle.readline().strip().replace('"', "").split(",")


def read_summary(out):
    """summary.csv, one row per fit and mask, with its k column (added, the run's one k, where
    the run has none)."""
    import pandas as pd
    s = pd.read_csv(Path(out) / "summary.csv")
    if "k" not in s.columns:
        s.insert(s.columns.get_loc("start") + 1, "k", run_ks(out)[0])
    return s


def read_traces(out):
    """traces.csv with an integer k column: the warm start's k, 0 for the cold start (blank in
    the file: the cold start has no k); a run without the column has one k."""
    import pandas as pd
    t = pd.read_csv(Path(out) / "traces.csv")
    if "k" not in t.columns:
        t.insert(t.columns.get_loc("start") + 1, "k", run_ks(out)[0])
        t.loc[t["start"] == "cold", "k"] = 0
    t["k"] = t["k"].fillna(0).astype(int)
    return t


def read_lengthscales(out):
    """lengthscales.npz as a dict, with ks, log10_l (layers, objectives, starts, ks, lambdas, d)
    and z_energy (ks, d), also for a run of one k whose file has no k axis."""
    with np.load(Path(out) / "lengthscales.npz") as npz:
        arrays = dict(npz)
    if arrays["z_energy"].ndim == 1:
        arrays["z_energy"] = arrays["z_energy"][None]
        if "log10_l" in arrays:
            arrays["log10_l"] = arrays["log10_l"][:, :, :, None]
        arrays["ks"] = np.array(run_ks(out)[:1])
    return arrays


def one_row_per_fit(table, k):
    """The rows of `table` (summary.csv's or overlap_table's) with one row per fit: a cold fit's
    rows at every k are one fit (they differ only in the overlap columns), its row at `k` kept."""
    return table[(table["start"] != "cold") | (table["k"] == k)]


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


def _warm_label(k, several):
    return "warm" if not several else f"warm k={k}"


def plot_z_size(out, path):
    """Per objective: |Z| by layer at the selected lambda (left: one line per start, the warm
    start once per k) and |Z| against lambda at each layer (right: the warm start of the primary
    k, said in the title when there are several)."""
    from matplotlib.lines import Line2D
    plt = _pyplot()
    ks = run_ks(out)
    several, pk = len(ks) > 1, stats.primary_k(ks)
    s = one_row_per_fit(read_summary(out), pk)
    d = read_lengthscales(out)["z_energy"].shape[1]
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
        for (start, k), g in selected.groupby(["start", "k"]):
            warm_k = start == "warm" and several
            ax_layer.plot(g["layer"], g["z_size"],
                          color=plt.cm.tab10(ks.index(k)) if warm_k else "k",
                          label=f"warm start, k = {k}" if warm_k else f"{start} start",
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
        shown = rows[(rows["start"] == "cold") | (rows["k"] == pk)]
        for (layer, start), g in shown.groupby(["layer", "start"]):
            ax_lam.plot(g["lambda"], g["z_size"], color=layer_colours[layer], ms=4,
                        **_start_style(start))
        _lambda_axis(ax_lam, lambdas)
        warm = f"warm from k = {pk}" if several else "warm"
        ax_lam.set_title(f"{obj}: every λ (solid, filled: cold start; dashed, open: {warm})",
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
    """Histogram of log10 l and the sorted curve at the basis layer, selected lambda per fit (the
    warm start once per k)."""
    plt = _pyplot()
    ks = run_ks(out)
    s = one_row_per_fit(read_summary(out), stats.primary_k(ks))
    npz = read_lengthscales(out)
    layers = list(npz["layers"])
    layer = basis_layer if basis_layer in layers else layers[-1]
    li = layers.index(layer)
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(12, 4.2))
    selected = s[(s.layer == layer) & s.selected]
    spectra = [npz["log10_l"][li, list(npz["objectives"]).index(r.objective),
                              list(npz["starts"]).index(r.start), list(npz["ks"]).index(r.k),
                              list(npz["lambdas"]).index(r["lambda"])]
               for _, r in selected.iterrows()]
    low, high = min(v.min() for v in spectra), max(v.max() for v in spectra)
    bins = np.linspace(low - 0.5, high + 0.5, 61) if high - low < 1e-3 else np.linspace(low, high, 61)
    for (_, r), v in zip(selected.iterrows(), spectra):
        start = r.start if r.start == "cold" else _warm_label(r.k, len(ks) > 1)
        label = f"{r.objective}, {start}, λ={r['lambda']:g} (|Z|={r.z_size})"
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
    diag(P_Z) on ARD's Z (right). Fits of one layer are set side by side; with several k, one line
    per (objective, start, k), the cold fit against each k's mask."""
    plt = _pyplot()
    table = overlap_table(out)
    several = len(run_ks(out)) > 1
    layers = sorted(table["layer"].unique())
    groups = list(table.groupby(["objective", "start", "k"]))
    spacing = min(np.diff(layers)) if len(layers) > 1 else 1
    fig, (ax_o, ax_e) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, ((obj, start, k), g) in enumerate(groups):
        color = plt.cm.tab10(i % 10)
        label = f"{obj}, {start}, k = {k}" if several else f"{obj}, {start}"
        x = g["layer"] + spacing * 0.12 * (i - (len(groups) - 1) / 2)
        ax_o.vlines(x, g["overlap_lo"], g["overlap_hi"], color=color, lw=7, alpha=0.25)
        ax_o.plot(x, g["overlap_expected"], "_", color=color, ms=12, mew=2)
        ax_o.plot(x, g["overlap"], "o-", color=color, label=label)
        sig = g["verdict"] == "enrichment"
        ax_o.plot(x[sig], g["overlap"][sig], "*", ms=14, color=color)
        ax_e.plot(g["layer"], g["energy_share"], "o-", color=color, label=label)
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
    fig.suptitle("Selected λ per layer; SVD mask of the basis layer (the warm start began from it)"
                 if not several else "Selected λ per layer; the rank-k SVD masks of the basis "
                 "layer (each warm start began from the mask of its k)")
    save_figure(fig, path)


def _loss_ticks(loss):
    """1-2-5 ticks across the range of (positive) losses."""
    low, high = np.floor(np.log10(loss.min())), np.ceil(np.log10(loss.max()))
    return [m * 10 ** e for e in np.arange(low, high + 1) for m in (1, 2, 5)
            if loss.min() / 2 <= m * 10 ** e <= loss.max() * 2]


def plot_traces(out, path, basis_layer):
    """Loss and |Z| over steps at the basis layer, every fit (cold solid; warm dashed, with
    several k one dash pattern per k)."""
    plt = _pyplot()
    ks = run_ks(out)
    several = len(ks) > 1
    t = read_traces(out)
    layer = basis_layer if basis_layer in set(t.layer) else t.layer.max()
    t = t[t.layer == layer]
    objectives = list(dict.fromkeys(t["objective"]))
    fig, axes = plt.subplots(len(objectives), 2, figsize=(12, 3.8 * len(objectives)),
                             squeeze=False)
    lambdas = sorted(t["lambda"].unique())
    for row, obj in zip(axes, objectives):
        for (start, k, lam), g in t[t.objective == obj].groupby(["start", "k", "lambda"]):
            dashes = ["--", ":", "-."][ks.index(k) % 3] if start == "warm" and several else "--"
            name = start if start == "cold" else _warm_label(k, several)
            style = dict(color=_lambda_colour(lam, lambdas), ls="-" if start == "cold" else dashes,
                         label=f"{name}, λ={lam:g}")
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
        n_fits = len(row[1].get_lines())  # more than a column holds: two columns
        row[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      ncol=1 if n_fits <= 16 else 2)
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

def _selected(out):
    s = read_summary(out).rename(columns={"lambda": "lam"})
    return s[s["selected"]].sort_values(["objective", "layer", "start", "k"])


def _selected_fits(out):
    """The selected fits, one row each (the cold fit once, not once per k)."""
    return one_row_per_fit(_selected(out), stats.primary_k(run_ks(out)))


def _primary_index(table, basis_layer):
    """The row of the declared primary test: PRIMARY's objective and start where they ran (else
    the first that did), against the mask of primary_k, at the basis layer (else the fitted layer
    nearest to it)."""
    for key, preferred in PRIMARY.items():
        choice = preferred if (table[key] == preferred).any() else sorted(table[key])[0]
        table = table[table[key] == choice]
    table = table[table["k"] == stats.primary_k(table["k"].unique())]
    distance = (table["layer"] - basis_layer).abs()
    return table.loc[distance == distance.min()].sort_values("layer").index[0]


def _verdict(row, d, p_enrichment, p_depletion, two_sided=False):
    """The overlap's label: the primary's declared test is one-sided (enrichment, else no
    enrichment: it reads no other direction); a secondary row reads both directions, so only
    from the two-sided p (twice the smaller one-sided p) below ALPHA."""
    if row["z_size"] == 0:
        return "not measured (ARD's Z is empty)"
    if row["z_size"] >= d:
        return "not measured (ARD's Z holds every coordinate)"
    if not two_sided:
        return "enrichment" if p_enrichment < ALPHA else "no enrichment"
    if 2 * min(p_enrichment, p_depletion) < ALPHA:
        return "enrichment" if p_enrichment <= p_depletion else "depletion"
    return "no enrichment"


def overlap_table(out):
    """One row per selected fit and mask (k): ARD's |Z| (a) against the b = |Z| coordinates with
    the largest diag(P_Z) of the rank-k mask out of d (as summary.csv's overlap counts them), the
    hypergeometric chance of a random selection (ard_mmd.overlap_chance: expected, 95% range,
    one-sided p of an overlap at least as large and at most as small), `primary` for the declared
    primary test, Holm-adjusted p over the other rows, and the verdict each row's test gives (raw
    p for the primary, Holm p for the others). Rebuilt from summary.csv and lengthscales.npz
    alone."""
    import pandas as pd
    out = Path(out)
    d = read_lengthscales(out)["z_energy"].shape[1]
    rows = []
    for r in _selected(out).itertuples(index=False):
        a = int(r.z_size)
        chance = ard_mmd.overlap_chance(d, a, a, int(r.overlap))
        rows.append({"layer": r.layer, "objective": r.objective, "start": r.start, "k": int(r.k),
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
                         (r.p_enrichment_holm, r.p_depletion_holm)), two_sided=not r.primary)
        for _, r in table.iterrows()]
    return table


def save_overlap_table(out):
    """overlap.csv; without the k column for a run whose summary.csv has none (a run of one k
    from before --k took several: rebuilt as it was written)."""
    path = Path(out) / "overlap.csv"
    table = overlap_table(out)
    write_csv(table if _has_k_column(out) else table.drop(columns="k"), path)
    return path


def _overlap_words(r):
    """'2 with the top 18 (chance 0.36 [0, 2]; P(>= 2) = 0.048, P(<= 2) = 0.99' (no bracket)."""
    return (f"{r.overlap} with the top {r.top_coordinates} (chance "
            f"{num(r.overlap_expected)} [{r.overlap_lo}, {r.overlap_hi}]; P(≥ {r.overlap}) = "
            f"{num(r.p_enrichment)}, P(≤ {r.overlap}) = {num(r.p_depletion)}")


def _overlap_clause(r, several):
    """'overlap 2 with the top 18 (...; the primary test): no enrichment'; with several k,
    'overlap with the rank-50 mask 2 with ...'."""
    test = "the primary test" if r.primary else (
        f"Holm-adjusted {num(r.p_enrichment_holm)} and {num(r.p_depletion_holm)}")
    overlap = (r.verdict if r.verdict.startswith("not measured") else
               f"{_overlap_words(r)}; {test}): {r.verdict}")
    return f"overlap with the rank-{r.k} mask {overlap}" if several else f"overlap {overlap}"


def _fit_groups(table):
    """The rows of overlap_table by fit, in its order: a cold fit's rows of every k together (one
    fit), a warm fit's one row alone."""
    groups = []
    for _, r in table.iterrows():
        last = groups[-1][0] if groups else None
        if (last is not None and r.start == "cold" == last.start
                and (r.objective, r.layer) == (last.objective, last.layer)):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _fit_sentence(rows, several):
    r = rows[0]
    start = (f"warm start from the rank-{r.k} mask" if r.start == "warm" and several else
             f"{r.start} start")
    overlaps = (f"overlap {r.verdict}" if r.verdict.startswith("not measured") else  # as |Z|
                "; ".join(_overlap_clause(x, several) for x in rows))
    return (f"{r.objective}, layer {r.layer}, {start}: lambda {r['lambda']:g}, |Z| = "
            f"{r.z_size}; {overlaps}; test retrieval "
            f"{r.retrieval_test_init:.0%} before the fit, {r.retrieval_test_final:.0%} after "
            f"(chance {r.retrieval_chance_test:.0%}).")


def lambda_sentence(selected, short=False):
    """What the selected lambdas say (`selected`: one row per fit): lambda = 0 everywhere means
    the sparsity penalty never lowered the validation cross-entropy (ties go to the larger
    lambda, so 0 won outright)."""
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


def _masks_words(ks, basis_layer):
    """'the rank-50 SVD mask at layer 21'; several k: 'the rank-k SVD mask at layer 21, for each k
    of 20 and 50 (...)'."""
    if len(ks) == 1:
        return f"the rank-{ks[0]} SVD mask at layer {basis_layer}"
    listed = ", ".join(map(str, ks[:-1])) + f" and {ks[-1]}"
    return (f"the rank-k SVD mask at layer {basis_layer}, for each k of {listed} (a warm fit "
            f"against the mask it started from, the cold fit, fitted once, against each)")


def summary_lines(out):
    """Per (objective, layer, start) the selected fit: lambda, |Z|, its overlap with as many top
    coordinates of the SVD mask (of each k) against chance, and test retrieval; the lambda = 0
    sentence; the primary test."""
    out = Path(out)
    _require(out)
    config = _config(out)
    ks = run_ks(out)
    table = overlap_table(out)
    d = (int(table["d"].iloc[0]) if len(table) else
         read_lengthscales(out)["z_energy"].shape[1])
    lines = [prereg.status_sentence(config, "C")]
    lines += [f"Fits on {plural(config.get('n_pairs'), 'pair')} (d = {d}); lambda selected per "
             f"(layer, objective, start) by validation retrieval cross-entropy. Overlap: ARD's Z "
             f"(|Z| coordinates) against the |Z| coordinates with the largest diag(P_Z) of "
             f"{_masks_words(ks, config.get('basis_layer'))}, read "
             f"against a random selection of |Z| coordinates (hypergeometric: expected |Z|^2/d, "
             f"95% range, one-sided P of an overlap at least as large and at most as small)."]
    lines += [_fit_sentence(rows, len(ks) > 1) for rows in _fit_groups(table)]
    lam = lambda_sentence(_selected_fits(out))
    lines += [lam] if lam else []
    primary = table.loc[table["primary"]].iloc[0]
    lines.append(primary_sentence(primary, config, ks))
    solved = solved_sentence(primary)
    return lines + ([solved] if solved else [])


def solved_sentence(r):
    """Why lambda cannot win, where the primary fit's held-out retrieval is at its ceiling before
    any fit (labels.solved_before_fit), or None."""
    words = labels.solved_before_fit(r.retrieval_test_init, r.retrieval_chance_test)
    return f"At the primary fit, {words}." if words else None


def _primary_k_words(k, ks):
    """'' for one k; else ', k = 50 as in the plan' or ', k = 20, the largest k run; the plan's 50
    was not'."""
    if len(ks) == 1:
        return ""
    return f", k = {k}" + (" as in the plan" if k == stats.PLAN_K else
                           f", the largest k run; the plan's {stats.PLAN_K} was not")


def _mask_name(r, ks):
    return "SVD mask" if len(ks) == 1 else f"rank-{r.k} SVD mask"


def primary_sentence(r, config, ks=None):
    ks = ks or [r.k]
    where = (f"at the basis layer {r.layer}" if r.layer == config.get("basis_layer") else
             f"at layer {r.layer}, the fitted layer nearest the basis layer "
             f"{config.get('basis_layer')}")
    which = f"{r.objective}, {r.start} start{_primary_k_words(r.k, ks)}, {where}"
    if r.verdict.startswith("not measured"):
        return f"Primary test ({which}): overlap {r.verdict}."
    caveat = ("" if r.start == "cold" else " (the warm start began from the SVD mask, so this "
              "overlap is not independent of it)")
    meaning = {"no enrichment": f"no more than a random selection of {r.z_size} coordinates "
                                f"would share",
               "enrichment": "more than a random selection would share",
               "depletion": "fewer than a random selection would share"}[r.verdict]
    return (f"Primary test ({which}){caveat}: overlap "
            f"{_overlap_words(r)}): {r.verdict}, {meaning} with the {_mask_name(r, ks)}'s top "
            f"coordinates.")


def headline(out):
    """report.py's cells: dict(verdict, value, lead) from the declared primary test."""
    out = Path(out)
    _require(out)
    ks = run_ks(out)
    table = overlap_table(out)
    r = table.loc[table["primary"]].iloc[0]
    fit = f"ARD-MMD's Z at layer {r.layer} ({r.objective}, {r.start} start)"
    at_k = "" if len(ks) == 1 else f" at k = {r.k}"
    if r.verdict.startswith("not measured"):
        value = f"|Z| = {r.z_size} of d = {r.d}"
        lead = [f"{fit} holds {plural(r.z_size, 'coordinate')}: its overlap with the "
                f"{_mask_name(r, ks)} is {r.verdict}."]
    else:
        value = (f"overlap {r.overlap} of {r.z_size}{at_k} vs chance {num(r.overlap_expected)} "
                 f"[{r.overlap_lo}, {r.overlap_hi}] (P(≥ {r.overlap}) = {num(r.p_enrichment)})")
        lead = [f"{fit} holds {plural(r.z_size, 'coordinate')} and shares {r.overlap} with the "
                f"{_mask_name(r, ks)}'s top {r.top_coordinates}, where a random selection shares "
                f"{num(r.overlap_expected)} [{r.overlap_lo}, {r.overlap_hi}]: {r.verdict}."]
    lead.append(f"Same-problem retrieval across languages on held-out problems: "
                f"{r.retrieval_test_final:.0%} (chance {r.retrieval_chance_test:.0%}).")
    lam = lambda_sentence(_selected_fits(out), short=True)
    lead += [lam] if lam else []
    solved = solved_sentence(r)
    lead = lead[:2] + [solved] if solved else lead
    return {"verdict": r.verdict, "value": value, "lead": lead}
