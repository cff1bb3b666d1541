"""Experiment E's tables and figures from its CSVs alone (no model): decoded-outcome rates, the
layer-sweep figure, the DAS figure, --replot (all of these again) and the printed summary.

    python exp_e_layer_sweep.py --replot --out results/exp_e     # what calls replot()
"""
import json
from pathlib import Path

import pandas as pd

from zcausal import runs, stats
from zcausal.summaries import text


def decode_summary(frame, keys):
    """Outcome and language rates (with Wilson 95% intervals for transferred and kept) per group."""
    rows = []
    for key, group in frame.groupby(keys, sort=True):
        n = len(group)
        record = dict(zip(keys, key if isinstance(key, tuple) else (key,)), n=n)
        for outcome in ("transferred", "kept", "broken"):
            count = int((group.outcome == outcome).sum())
            record[outcome] = count / n
            if outcome != "broken":
                record[f"{outcome}_lo"], record[f"{outcome}_hi"] = stats.wilson_interval(count, n)
        for lang in ("en", "zh", "mixed", "none"):
            record[f"lang_{lang}"] = float((group.language == lang).mean())
        if "logp_own_fast" in group:
            record["fast_vs_full_max_abs"] = float((group.logp_own_fast - group.logp_own_decode)
                                                   .abs().max())
        rows.append(record)
    return pd.DataFrame(rows)


STYLE = {"none": dict(color="0.5", ls=":", label="none (no-op)"),
         "full": dict(color="k", label="full"),
         "z_basis": dict(color="tab:blue", label="Z of the basis layer"),
         "z_layer": dict(color="tab:orange", label="Z of the patched layer"),
         "das": dict(color="tab:red", label="DAS"),
         "random": dict(color="tab:green", ls="--", label="random (mean; band: 2.5-97.5% of draws)")}


def plot_sweep(per_layer, n_layers, basis_layer, k, title, path):
    """Transfer (all digits and first digit), log-prob and language-margin shifts against layer,
    random band shaded. Shifts in nats on a symmetric-log axis, so that Z and the random band stay
    readable beside full replacement's shifts of several nats."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("swap", "transfer", "transfer fraction of ld, all digits (swap source)"),
              ("swap", "transfer_first", "transfer fraction, first digit only (swap source)"),
              ("swap", "dlogp_src", "Δ log p(source's answer), swap source"),
              ("swap", "dlogp_own", "Δ log p(own answer), swap source"),
              ("same", "dlogp_own", "Δ log p(own answer), same-problem source"),
              ("swap", "dlang_own", "Δ language margin after the answer (en - zh full stop), swap")]
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    for ax, (pairing, measure, label) in zip(axes.flat, panels):
        frame = per_layer[per_layer.pairing == pairing].sort_values("layer")
        for condition, style in STYLE.items():
            rows = frame[frame.condition == condition]
            if not len(rows) or measure not in rows:
                continue
            ax.plot(rows.layer, rows[measure], marker=".", lw=1.2, **style)
            if condition == "random" and f"{measure}_lo" in rows:
                ax.fill_between(rows.layer, rows[f"{measure}_lo"], rows[f"{measure}_hi"],
                                color=style["color"], alpha=0.2, lw=0)
        if not measure.startswith("transfer"):
            ax.set_yscale("symlog", linthresh=0.1)
        ax.axvline(basis_layer, color="tab:blue", lw=0.8, ls="-.")
        ax.axhline(0, color="0.8", lw=0.6)
        ax.set_title(label, fontsize=9)
        top = ax.secondary_xaxis("top", functions=(lambda x: x / n_layers, lambda f: f * n_layers))
        top.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("patched layer l (top axis: l / L)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{title}\nlast-position interchange, k = {k}; dash-dot: basis layer "
                 f"{basis_layer}; shifts in nats (symmetric log scale)", fontsize=10)
    runs.save_figure(fig, path)


def plot_das(table, angles, title, path):
    """Per k: held-out transfer of full, DAS, Z and the random band; overlap of DAS with Z and
    with the random draws against chance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = sorted(table.k.unique())
    fig, axes = plt.subplots(2, len(ks), figsize=(5 * len(ks), 7), squeeze=False)
    for col, k in enumerate(ks):
        frame = table[(table.k == k) & (table.pairing == "swap")].set_index("condition")
        names = [n for n in ("full", "das", "z_basis", "z_layer", "random") if n in frame.index]
        values = [frame.loc[n, "transfer"] for n in names]
        ax = axes[0, col]
        ax.bar(range(len(names)), values, color=[STYLE[n]["color"] for n in names])
        if "random" in frame.index:
            r = frame.loc["random"]
            ax.errorbar(names.index("random"), r.transfer, yerr=[[r.transfer - r.transfer_lo],
                        [r.transfer_hi - r.transfer]], color="k", capsize=4)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.set_title(f"k = {k}: transfer on {int(frame.n_transfer.iloc[0])} held-out swap pairs "
                     f"(layer {int(frame.layer.iloc[0])})", fontsize=9)
        ax = axes[1, col]
        a = angles[angles.k == k]
        rand = a[a.versus == "random"]
        ax.bar([0, 1], [a[a.versus == v].overlap.iloc[0] for v in ("z_basis", "z_layer")],
               color=[STYLE["z_basis"]["color"], STYLE["z_layer"]["color"]])
        if len(rand):
            ax.bar([2], [rand.overlap.mean()], color=STYLE["random"]["color"],
                   yerr=[[rand.overlap.mean() - rand.overlap.min()],
                         [rand.overlap.max() - rand.overlap.mean()]], capsize=4)
        ax.axhline(a.chance_overlap.iloc[0], color="0.4", ls=":", lw=1, label="chance k/d")
        ax.set_xticks([0, 1, 2], ["DAS vs Z(basis)", "DAS vs Z(layer)", "DAS vs random"], fontsize=8)
        ax.set_title("overlap ||V_DAS V^T||²/k (mean cos² of principal angles)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    runs.save_figure(fig, path)


def replot(args):
    """Rebuild the decoded-outcome tables and redraw every figure of the run in --out from its
    CSVs and config.json (no model)."""
    out = Path(args.out)
    if not (out / "per_layer.csv").is_file():
        raise runs.UsageError(f"{out} has no per_layer.csv: pass the --out folder of a sweep run")
    for rows, table, keys in (("decode.csv", "decode_summary.csv", ["layer", "pairing", "condition"]),
                              ("das_decode.csv", "das_decode_summary.csv",
                               ["k", "layer", "pairing", "condition"])):
        if (out / rows).is_file():
            runs.write_csv(decode_summary(runs.load_csv(out / rows), keys), out / table)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    model = config.get("model", {})
    name = Path(str(model.get("name_or_path"))).name
    title = (f"{name} ({model.get('dtype')}, {model.get('device_name')}), "
             f"{config.get('n_pairs')} pairs, {config['args'].get('n_random')} random draws")
    plot_sweep(runs.load_csv(out / "per_layer.csv"), model["num_layers"], config["basis_layer"],
               config["args"]["k"], title, runs.figure_path(args, "layer_sweep"))
    if (out / "das.csv").is_file() and (out / "das_angles.csv").is_file():
        plot_das(runs.load_csv(out / "das.csv"), runs.load_csv(out / "das_angles.csv"),
                 f"DAS: {title}", runs.figure_path(args, "das"))


def swap_rows(out):
    """per_layer.csv's swap rows of a finished sweep (a UsageError while layers are missing)."""
    config = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    per_layer = runs.load_csv(Path(out) / "per_layer.csv")
    layers = config["args"].get("layers") or range(config["model"]["num_layers"])
    missing = sorted(set(layers) - set(per_layer.layer))
    if missing:
        raise runs.UsageError(f"{out}: the sweep has not reached layers {missing} yet; "
                              f"continue it with --resume")
    return per_layer[per_layer.pairing == "swap"]


def _at(swap, layer, condition):
    return swap[(swap.layer == layer) & (swap.condition == condition)].iloc[0]


def summary_lines(out):
    """The run's findings as sentences, from its CSVs (printed at the end of a run; report.py's
    paragraph): where full interchange transfers most, Z against the random band there and at the
    basis layer, and DAS on held-out problems."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    swap, basis = swap_rows(out), config["basis_layer"]
    full = swap[swap.condition == "full"].sort_values("transfer").iloc[-1]
    lines = [f"{config.get('n_pairs')} swap pairs, {config['args'].get('n_random')} random draws of "
             f"k = {config['args'].get('k')}; transfer = the share of the logit difference "
             f"(own minus source answer) moved to the source's, last position patched. Full "
             f"interchange transfers most at layer {int(full.layer)} ({full.transfer:.2f}; first "
             f"digit {full.transfer_first:.2f})."]
    for layer, where in ((int(full.layer), "there"), (basis, f"at the basis layer {basis}")):
        z, rand = _at(swap, layer, "z_basis"), _at(swap, layer, "random")
        lines.append(f"Z {where}: {z.transfer:+.3f} (random band {rand.transfer_lo:+.3f} to "
                     f"{rand.transfer_hi:+.3f}, rank p = {z.transfer_p:.2f}); full "
                     f"{_at(swap, layer, 'full').transfer:.3f}.")
    best_z = swap[swap.condition == "z_basis"].sort_values("transfer").iloc[-1]
    lines.append(f"Z's largest transfer at any layer: {best_z.transfer:+.3f} at layer "
                 f"{int(best_z.layer)} (rank p = {best_z.transfer_p:.2f}).")
    if (out / "das.csv").is_file():
        das = runs.load_csv(out / "das.csv")
        das = das[das.pairing == "swap"]
        for k, group in das.groupby("k"):
            t = dict(zip(group.condition, group.transfer))
            lines.append(f"DAS at layer {int(group.layer.iloc[0])}, k = {k}, held-out: transfer "
                         f"{t.get('das', float('nan')):.3f} (full {t.get('full', float('nan')):.3f}, "
                         f"Z {t.get('z_basis', float('nan')):+.3f}, random "
                         f"{t.get('random', float('nan')):+.3f})" + _angles(out, k) + ".")
    return lines


def _angles(out, k):
    """', median principal angle to Z ... vs random ...' for DAS of dimension k, or ''."""
    if not (out / "das_angles.csv").is_file():
        return ""
    a = runs.load_csv(out / "das_angles.csv")
    a = a[a.k == k]
    z, rand = a[a.versus == "z_basis"], a[a.versus == "random"]
    if not len(z) or not len(rand):
        return ""
    return (f"; median principal angle DAS-Z {z.median_angle.iloc[0]:.1f}° (random "
            f"{rand.median_angle.min():.1f}-{rand.median_angle.max():.1f}°)")


def headline(out):
    """report.py's row and lead (dict(verdict, value, lead)): Z's transfer at the basis layer
    against the random band and its rank p; full interchange's best layer in the lead."""
    config = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    swap, basis = swap_rows(out), config["basis_layer"]
    full = swap[swap.condition == "full"].sort_values("transfer").iloc[-1]
    z, rand = _at(swap, basis, "z_basis"), _at(swap, basis, "random")
    verdict = ("not tested (no random draws)" if not z.transfer_p == z.transfer_p else
               "Z above random" if z.transfer_p < 0.05 else "Z = random")
    value = (f"transfer {text.num(z.transfer, signed=True)} by Z at layer {basis}, random "
             f"[{text.num(rand.transfer_lo, signed=True)}, "
             f"{text.num(rand.transfer_hi, signed=True)}] (rank {text.p_value(z.transfer_p)})")
    lead = [f"Replacing the whole last-position state moves the answer most at layer "
            f"{int(full.layer)} (transfer {text.num(full.transfer)}).",
            f"Z alone at the basis layer {basis} transfers {text.num(z.transfer, signed=True)} "
            f"(rank {text.p_value(z.transfer_p)} among "
            f"{text.plural(config['args'].get('n_random') or 0, 'random subspace')} of the same "
            f"size)."]
    return dict(verdict=verdict, value=value, lead=lead)


def print_summary(out):
    print(f"wrote {out}")
    print("\n".join(summary_lines(out)))
