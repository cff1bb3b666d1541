"""Experiment A's figures, from the tables of zcausal/summaries/exp_a_tables.py alone (no model):
change_rates.png (answers and language changed), transfer_rates.png (the first-digit argmax became
the source's, and the decoded transfer), logprob_shift.png (the scored shifts) and, for runs with the
attention readout, attention_shift.png (how far each patch moves the reading layer's attention). Each fixed
condition is a bar with its Wilson interval; the random draws of Z's size are the shaded band."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from zcausal import runs
from zcausal.summaries.exp_a_tables import CONFIG, LABEL, select_config

COLOURS = {"noop": "tab:gray", "z": "tab:blue", "zperp": "tab:orange", "full": "black",
           "en": "tab:green"}


def _bars(ax, configs, conditions, value, error=None, band=None, ylabel="", title=""):
    """Grouped bars per configuration and condition; every value also gets a marker, so a bar of
    height 0 is visible; band(config, condition) -> (min, max, mean) shades the random draws."""
    width = 0.8 / len(conditions)
    for j, cond in enumerate(conditions):
        xs = np.arange(len(configs)) + (j - (len(conditions) - 1) / 2) * width
        values = np.array([value(cfg, cond) for cfg in configs], float)
        yerr = None
        if error is not None:
            lo_hi = np.array([error(cfg, cond) for cfg in configs], float)
            yerr = np.abs(np.stack([values - lo_hi[:, 0], lo_hi[:, 1] - values]))
        ax.bar(xs, np.nan_to_num(values), width * 0.85, color=COLOURS[cond], alpha=0.8,
               label=LABEL[cond], yerr=yerr, capsize=2, error_kw=dict(lw=0.8))
        ax.plot(xs, values, "o", color=COLOURS[cond], ms=6, mec="black", mew=0.6, zorder=3)
        for x, cfg in zip(xs, configs):
            b = band(cfg, cond) if band is not None else None
            if b is not None:
                ax.fill_between([x - width / 2, x + width / 2], b[0], b[1], color=COLOURS[cond],
                                alpha=0.18, lw=0)
                ax.plot([x - width / 2, x + width / 2], [b[2]] * 2, color=COLOURS[cond], ls=":", lw=1)
    ax.set_xticks(np.arange(len(configs)),
                  ["L{} k{}\n{} {}".format(*cfg) for cfg in configs], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.axhline(0, color="k", lw=0.5)
    ax.margins(y=0.08)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def _say(ax, text):
    ax.text(0.5, 0.9, text, transform=ax.transAxes, ha="center", va="top", fontsize=8,
            bbox=dict(fc="white", ec="0.7"))


def plot_figures(out_dir, figures_dir, tables, template):
    """change_rates, transfer_rates and logprob_shift PNGs, from the tables alone; their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics, controls, draws, tests, _ = tables
    where = SimpleNamespace(out=Path(out_dir), figures=Path(figures_dir))
    configs = sorted(set(map(tuple, controls[CONFIG].itertuples(index=False))))
    m = metrics.set_index(CONFIG + ["condition", "metric"])

    def value(metric):
        return lambda cfg, c: m.value.get(cfg + (c, metric), np.nan)

    def error(metric):
        return lambda cfg, c: (m.ci_low.get(cfg + (c, metric), np.nan),
                               m.ci_high.get(cfg + (c, metric), np.nan))

    def band(frame, column):
        def fn(cfg, c):
            d = select_config(frame, cfg)
            if column not in d:
                return None
            d = d[d.condition == {"z": "rand_z", "zperp": "rand_zperp"}.get(c, "")][column].dropna()
            return (d.min(), d.max(), d.mean()) if len(d) else None
        return fn

    conds, named = ["noop", "z", "zperp", "full", "en"], ["z", "zperp", "full"]
    width = max(6, 1.8 * len(configs)) + 1.5  # room for the legend on the right
    scored = draws if len(draws) else controls
    paths = []

    fig, axes = plt.subplots(2, 1, figsize=(width, 7))
    _bars(axes[0], configs, conds, value("answer_change"), error("answer_change"),
          band(controls, "answer_change"), "share of kept problems",
          "answer changed vs no patch (same-problem source)\nerror bars: Wilson 95%; shaded: "
          "random draws of Z's size (range; dotted: mean)")
    _bars(axes[1], configs, conds, value("language_change"), error("language_change"),
          band(controls, "language_change"), "share of English baselines",
          "output language changed (problems whose unpatched output is English)")
    if not metrics[metrics.metric == "language_change"].n.fillna(0).gt(0).any():
        _say(axes[1], "no English baseline output: language not measured")
    for ax in axes:
        ax.set_ylim(-0.05, 1.05)
    paths.append(runs.save_figure(fig, runs.figure_path(where, "change_rates")))

    fig, axes = plt.subplots(2, 1, figsize=(width, 7))
    _bars(axes[0], configs, named, value("top1_src"), error("top1_src"), band(scored, "top1_src"),
          "share of swap pairs", "the first-digit argmax became the source problem's first digit "
          "(swap source)\nshaded: scored random draws of Z's size")
    _bars(axes[1], configs, named, value("transfer"), error("transfer"),
          band(controls, "transfer"), "share of swap pairs",
          "decoded: the output took the source problem's answer")
    for ax, metric in zip(axes, ("top1_src", "transfer")):
        ax.set_ylim(-0.05, 1.05)
        if not (metrics[metrics.metric == metric].value.fillna(0) > 0).any():
            _say(ax, "no condition moved any answer to the source's: every bar is 0"
                 if (metrics.metric == metric).any() else "not measured (cot template)")
    paths.append(runs.save_figure(fig, runs.figure_path(where, "transfer_rates")))

    fig, axes = plt.subplots(2, 2, figsize=(2 * width, 7))
    what = "log p(reference) at the readout" if template == "cot" else "log p(reference answer)"
    panels = [("dlogp_ref", conds, f"shift in {what}, same-problem source"),
              ("dld_swap", named, "shift in ld = log p(own) − log p(source's answer), swap source"
                                  "\n(negative: toward the source's answer)"),
              ("dp_share", named, "shift in p_share = p_src / (p_src + p_own), first digits, swap"),
              ("dlang_ref", conds, "shift in the language margin after the answer\n(log P(Latin) − "
                                   "log P(CJK); negative: toward Chinese)")]
    for ax, (metric, shown, title) in zip(axes.flat, panels):
        _bars(ax, configs, shown, value(metric), None, band(scored, metric), "shift", title)
        if not metrics[metrics.metric == metric].value.notna().any():
            _say(ax, "not measured")
    paths.append(runs.save_figure(fig, runs.figure_path(where, "logprob_shift")))
    if (metrics.metric == "attn_tv_all").any():  # runs from before the readout have none
        paths.append(plot_attention(where, configs, conds, value, band(scored, "attn_tv_last"),
                                    band(scored, "attn_tv_all"), width))
    return paths


def plot_attention(where, configs, conditions, value, band_last, band_all, width):
    """attention_shift.png: Z's own positive control, how far each condition's patch moves the
    attention of the layer reading the patched stream (the basis layer at --site input), at the
    last prompt position and over all positions, over the scored random draws' band."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, 3.8))
    panels = (("attn_tv_last", band_last, "the last prompt position"),
              ("attn_tv_all", band_all, "all prompt positions"))
    for ax, (metric, band, at) in zip(axes, panels):
        _bars(ax, configs, conditions, value(metric), None, band, "total variation",
              f"attention of the reading layer moved by the patch, at {at}\n(mean over heads and "
              f"kept problems; shaded: random draws of Z's size)")
        ax.set_ylim(-0.02, 1.02)
    return runs.save_figure(fig, runs.figure_path(where, "attention_shift"))
