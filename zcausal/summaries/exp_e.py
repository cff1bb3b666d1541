"""Experiment E's findings in words from its tables (summary_lines, headline for report.py), the
decoded-outcome tables and --replot (every table, figure and the summary again, no model). The
tables and the declared tests are built in exp_e_tables.py, the figures in exp_e_figures.py.

    python exp_e_layer_sweep.py --replot --out results/exp_e     # what calls replot()
"""
from pathlib import Path

import numpy as np
import pandas as pd

from zcausal import conditions, labels, prereg, problems, runs, stats
from zcausal.summaries.exp_e_tables import (
    ALPHA, NAMED, NOT_TESTED, PRIMARY_MEASURES, QUESTION_TABLES, build_tables, das_site,
    load_angles, primary_description, primary_layer, primary_site, question_tables, read_config,
    select_swap)
from zcausal.summaries.text import NOT_MEASURED, interval, num, plural

LABELS = {"top1_src": "top1_src", "p_share_shift": "p_share shift",
          "dlang_own": "language margin shift"}


# ----------------------------------------------------------------------------------------------
# The findings in words (printed at the end of a run; report.py's paragraph and headline)

def read_tables(out):
    """config.json and the tables of a finished sweep: SimpleNamespace-like dict with config,
    per_layer, draws, tests, das and angles (exp_e_tables.load_angles; both None without DAS).
    A UsageError while layers are missing or when the tables predate these measures (rebuild
    them with --replot)."""
    out = Path(out)
    config = read_config(out)
    per_layer = runs.load_csv(out / "per_layer.csv") if (out / "per_layer.csv").is_file() \
        else None
    if per_layer is None or "top1_src" not in per_layer or not (out / "tests.csv").is_file():
        raise runs.UsageError(f"{out}: no tables of this version; rebuild them with "
                              f"exp_e_layer_sweep.py --replot --out {out}")
    layers = config["args"].get("layers") or range(config["model"]["num_layers"])
    ks = config["args"].get("k")
    ks = ks if isinstance(ks, list) else [ks]
    have = set(zip(per_layer.k, per_layer.layer))
    missing = sorted({layer for k in ks for layer in layers if (k, layer) not in have})
    if missing:
        raise runs.UsageError(f"{out}: the sweep has not reached layers {missing} yet; "
                              f"continue it with --resume")
    das = runs.load_csv(out / "das.csv") if (out / "das.csv").is_file() else None
    return dict(config=config, per_layer=per_layer, draws=runs.load_csv(out / "draws.csv"),
                tests=runs.load_csv(out / "tests.csv"), das=das,
                angles=load_angles(out, config), clean=runs.load_csv(out / "clean.csv"))


def swap_rows(out, k=None):
    """per_layer.csv's swap rows of a finished sweep at one k (default: the primary k)."""
    per_layer = read_tables(out)["per_layer"]
    return select_swap(per_layer, k=stats.primary_k(per_layer.k.unique()) if k is None else k)


def layer_list(layers):
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    layers, parts = sorted(int(x) for x in layers), []
    for layer in layers:
        if parts and layer == parts[-1][1] + 1:
            parts[-1][1] = layer
        else:
            parts.append([layer, layer])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def layers_phrase(layers):
    """'layer 10' for one layer, 'layers 0-2, 5' for several (layer_list)."""
    layers = list(layers)
    return f"layer{'s' if len(layers) != 1 else ''} {layer_list(layers)}"


def _rate(row, name="top1_src"):
    """'0.42 [0.31, 0.55]' for a named row (its Wilson interval)."""
    return interval(row[name], row.get(f"{name}_ci_lo"), row.get(f"{name}_ci_hi"))


def _band_of(row, measure, signed=False):
    """'random 0.01 [0, 0.05]' from a `random` row (the draws' mean and 2.5-97.5% band)."""
    return "random " + interval(row[measure], row[measure + "_lo"], row[measure + "_hi"],
                                signed=signed)


def _band(table, k, layer, measure, signed=False):
    """_band_of the `random` row of (k, layer), swap pairs, or the NOT_TESTED words."""
    row = select_swap(table, "random", k=k, layer=layer)
    return _band_of(row.iloc[0], measure, signed) if len(row) else f"random: {NOT_TESTED}"


def profile_sentence(per_layer, k):
    """Full interchange's top1_src over the layers in one sentence (where it is largest, how
    low it stays before it first reaches half the pairs, how high it stays at the top)."""
    full = select_swap(per_layer, "full", k=k).sort_values("layer")
    if not len(full):
        return "Full interchange: not measured (no swap pair with different first digits)."
    best = full.loc[full.top1_src.idxmax()]
    if best.top1_src == 0:
        return (f"Full interchange never makes the source's first digit the argmax (top1_src 0 "
                f"of {plural(best.n_pairs, 'pair')} at {layers_phrase(full.layer)}).")
    text = (f"Full interchange transfers most at layer {int(best.layer)}: the patched argmax is "
            f"the source's first digit (top1_src) on {_rate(best)} of "
            f"{plural(best.n_pairs, 'pair')}")
    half = full[full.top1_src >= 0.5]
    if not len(half):
        return text + "; it never reaches half of them."
    first = int(half.layer.iloc[0])
    low, parts = full[full.layer < first], []
    zero = low[low.top1_src.cumsum() == 0]  # the first layers, where it is exactly 0
    if len(zero):
        parts.append(f"0 at {layers_phrase(zero.layer)}")
    rest = low[~low.layer.isin(zero.layer)]
    if len(rest):
        parts.append(f"at most {num(rest.top1_src.max())} at {layers_phrase(rest.layer)}")
    tail = full[full.layer >= first]
    high = tail[::-1].top1_src.lt(0.8).cumsum().eq(0)[::-1]  # the top layers all >= 0.8
    at_first = full.set_index("layer").top1_src[first]
    parts.append(f"at least half from layer {first} ({num(at_first)})")
    if high.any():
        top = tail[high]
        low_top, high_top = num(top.top1_src.min()), num(top.top1_src.max())
        span = low_top if low_top == high_top else f"{low_top} to {high_top}"
        parts.append(f"{span} at {layers_phrase(top.layer)}")
    return text + "; " + ", ".join(parts) + "."


def disruption_sentence(per_layer, k):
    rows = select_swap(per_layer, k=k)
    rows = rows[rows.condition.isin(NAMED) & rows.disrupts.astype(bool)]
    what = ("p_own + p_src below half its clean value on most pairs: read as disruption, never "
            "as transfer")
    if not len(rows):
        return f"No named condition disrupts at any layer ({what})."
    parts = [f"{c} at {layers_phrase(g.layer)}"
             for c, g in rows.groupby("condition", sort=False)]
    return f"Disrupts ({what}): " + "; ".join(parts) + "."


def _test(tests, **match):
    rows = tests
    for key, value in match.items():
        rows = rows[rows[key] == value]
    return rows.iloc[0] if len(rows) else None


def _ranked(test):
    """'Z ranks 3rd of 20, one-sided p = 0.15' from a tests.csv row."""
    if test is None or not test.draws:
        return NOT_TESTED
    side = "one-sided" if test.direction.startswith("above") else "two-sided"
    return (f"Z ranks {int(test.rank_from_top)} of {int(test.draws) + 1} from the top, {side} "
            f"p = {num(test.p)}")


def primary_verdict(tables):
    """(verdict, the z_basis row at the basis layer or None, the primary tests.csv rows)."""
    tests, per_layer, config = tables["tests"], tables["per_layer"], tables["config"]
    k, at = stats.primary_k(per_layer.k.unique()), primary_layer(config)
    z = select_swap(per_layer, "z_basis", k=k, layer=at)
    primary = tests[tests.family == "primary"]
    if not len(z) or np.isnan(z.top1_src.iloc[0]):
        return NOT_MEASURED, None, primary
    z = z.iloc[0]
    combined = primary.iloc[-1]
    if bool(z.disrupts):
        return "Z disrupts", z, primary
    if not combined.draws:
        return NOT_TESTED, z, primary
    if combined.p <= ALPHA:
        return "Z transfers", z, primary
    share = _test(primary, measure="p_share_shift")
    draws = select_swap(tables["draws"], k=k, layer=at).top1_src.dropna()
    label = labels.count_versus_random(
        int(round(z.top1_src * z.n_pairs)), int(z.n_pairs), draws.to_numpy(), _as_rank(combined),
        "greater", ALPHA, continuous=_as_rank(share), continuous_name="p_share shift")
    return label, z, primary


def _as_rank(test):
    """A tests.csv row of a one-sided test as labels.versus_random reads it."""
    return dict(p_above=test.p, p_below=test.p_below,
                p_two_sided=min(1.0, 2 * min(test.p, test.p_below)))


def primary_sentence(tables):
    verdict, z, primary = primary_verdict(tables)
    per_layer, config = tables["per_layer"], tables["config"]
    k, basis = stats.primary_k(per_layer.k.unique()), primary_layer(config)
    site = "input" if basis == int(config["basis_layer"]) - 1 else "output"
    head = (f"Primary test: "
            f"{primary_description(per_layer.k.unique(), int(config['basis_layer']), site)}.")
    if z is None:
        return f"{head} Not measured: layer {basis} was not swept or has no swap pair."
    top1, share = (_test(primary, measure=m) for m in PRIMARY_MEASURES)
    z_text = (f"Z: top1_src {_rate(z)} of {plural(z.n_pairs, 'pair')}",
              f"p_share shift {num(z.p_share_shift, signed=True)}")
    if not top1.draws:
        return f"{head} {z_text[0]}, {z_text[1]}; against random draws: {verdict}."
    size = (f" Z's patch carries {num(z.patch_share)} of |s - h| at the patched position "
            f"({_band(per_layer, k, basis, 'patch_share')}).")
    return (f"{head} {z_text[0]} ({_band(per_layer, k, basis, 'top1_src')}; {_ranked(top1)}); "
            f"{z_text[1]} ({_band(per_layer, k, basis, 'p_share_shift', True)}; "
            f"{_ranked(share)}): {verdict}.{size}")


def best_layer_sentence(tests, k, mode="shared"):
    """'At any layer ...': the family-wise best-layer tests at k, against draws made under
    --random-draws `mode` (conditions.draws_mode)."""
    rows = tests[tests.family.isin(["secondary", "exploratory"])
                 & tests.scope.str.startswith("best of") & (tests.k == k)]
    if not len(rows):
        return None
    parts, tested = [], bool(rows.draws.max())
    for condition, group in rows.groupby("condition", sort=False):
        pieces = []
        for _, t in group.iterrows():
            p = f" (family-wise p = {num(t.p)}, Holm {num(t.p_holm)})" if tested else ""
            if tested and t.get("family") == "exploratory":
                p = f" (p = {num(t.p)}, {conditions.NOT_EXCHANGEABLE})"
            value = num(t.value, signed=t.measure != "top1_src")
            pieces.append(f"{LABELS[t.measure]} {value} at layer {int(t.at_layer)}{p}")
        parts.append(f"{condition}: " + ", ".join(pieces))
    how = ("Z's largest value over the layers against each random draw's largest, "
           + ("the same draws at every layer" if mode == "shared"
              else "independent draws at every layer")
           if tested else f"Z's largest value over the layers; against "
                                                 f"random draws {NOT_TESTED}")
    return f"At any layer (k = {k}; {how}): " + "; ".join(parts) + "."


def attention_sentence(tables):
    """Z's own positive control at the primary layer: how far each condition's last-position patch
    moved the basis layer's attention there (total variation averaged over heads), against the
    random band and full interchange, the no-op as the floor; None where it was not measured."""
    per_layer, config = tables["per_layer"], tables["config"]
    k, at = stats.primary_k(per_layer.k.unique()), primary_layer(config)
    basis = int(config["basis_layer"])
    z, full = (select_swap(per_layer, c, k=k, layer=at) for c in ("z_basis", "full"))
    if "attn_tv_last" not in per_layer or not len(z) or np.isnan(z.attn_tv_last.iloc[0]):
        return (f"The patch's effect on layer {basis}'s attention was not measured at "
                f"{primary_site(config)} (a run from before the readout, or a patch at or above "
                f"the basis layer, which its attention cannot see).")
    none = per_layer[(per_layer.condition == "none") & (per_layer.k == k) & (per_layer.layer == at)]
    z = z.iloc[0]
    p = z.get("attn_tv_last_p_above", np.nan)
    above = not np.isnan(p) and p <= ALPHA
    return (f"Z's own positive control: patched at {primary_site(config)} (last position, swap "
            f"pairs), Z moved layer {basis}'s attention at that position by a total variation of "
            f"{num(z.attn_tv_last)} ({_band(per_layer, k, at, 'attn_tv_last')}; "
            f"rank p = {num(p)}), full interchange {num(full.attn_tv_last.iloc[0])}, the no-op "
            f"{num(none.attn_tv_last.max()) if len(none) else NOT_MEASURED}: "
            + ("the patch moved what Z is built from more than random subspaces do, so a null on "
               "the answer here is informative (within its power)." if above else
               "the patch did not move that attention more than random subspaces do, so this "
               "readout lends a null on the answer no support: Z's heads did not see the patch "
               "(whether some subspace here can carry the answer is DAS's control, below)."))


def language_sentence(tables, k):
    per_layer, basis = tables["per_layer"], primary_layer(tables["config"])
    z = select_swap(per_layer, "z_basis", k=k, layer=basis)
    full = select_swap(per_layer, "full", k=k)
    if not len(z) or not len(full):
        return None
    test = _test(tables["tests"], measure="dlang_own", k=k, scope="at the basis layer")
    versus = (f" ({_band(per_layer, k, basis, 'dlang_own', True)}; two-sided p = "
              f"{num(test.p)}, Holm {num(test.p_holm)})" if test is not None and test.draws
              else f" (against random draws {NOT_TESTED})")
    big = full.loc[full.dlang_own.abs().idxmax()]
    return (f"Language margin after the answer (dlang_own, nats, swap pairs): Z at sweep layer {basis} "
            f"{num(z.dlang_own.iloc[0], signed=True)}{versus}; full interchange moves it most "
            f"at layer {int(big.layer)} ({num(big.dlang_own, signed=True)}).")


def _boot(row, measure, signed=False):
    return interval(row[measure], row.get(f"{measure}_boot_lo"), row.get(f"{measure}_boot_hi"),
                    signed=signed)


def _rate_of(row, name):
    """A named row's rate with its Wilson interval; a random row's mean with the draws' band."""
    if row.condition == "random":
        return interval(row[name], row.get(f"{name}_lo"), row.get(f"{name}_hi"))
    return _rate(row, name)


def _curve(rows):
    """'0.02 [0, 0.1] at k = 1, ..., 0.72 [0.6, 0.82] at k = 50' from DAS's rows by k."""
    return ", ".join(f"{_rate(r, 'top1_src')} at k = {int(k)}" for k, r in rows.items())


def _beside(rows, measure, basis, layer, boot=False):
    """'full 1 [0.94, 1], Z of layer 21 0 [0, 0.06], ..., random 0.02 [0, 0.05]' at one k."""
    signed = measure != "top1_src"
    named = [(c, name) for c, name in (("full", "full"), ("z_basis", f"Z of layer {basis}"),
                                       ("z_layer", f"Z of layer {layer}")) if c in rows]
    parts = [f"{name} {_boot(rows[c], measure, signed) if boot else _rate_of(rows[c], measure)}"
             for c, name in named]
    if "random" in rows:
        parts.append(_band_of(rows["random"], measure, signed))
    else:
        parts.append(f"random: {NOT_TESTED}")
    return ", ".join(parts)


def _das_above_full(rows):
    """The caveat where DAS's value is above full replacement's on the same pairs, or ''."""
    d = rows["das"]
    diffs = []
    for m in PRIMARY_MEASURES:
        if "full" not in rows or not d[m] > rows["full"][m]:
            continue
        low, high = d.get(f"das_minus_full_{m}_lo"), d.get(f"das_minus_full_{m}_hi")
        zero = "; the interval includes 0" if low is not None and low <= 0 <= high else ""
        diffs.append(f"{LABELS[m]} by {interval(d[f'das_minus_full_{m}'], low, high, signed=True)}"
                     f"{zero}")
    if not diffs:
        return ""
    return (f" At k = {int(d.k)} DAS exceeds full replacement on the same pairs "
            f"({'; '.join(diffs)}): a learned subspace can use directions the source's state "
            f"does not carry in the form the model reads (Makelov et al. 2024), so it is not an "
            f"upper bound for Z.")


def _angles(angles, layer, k):
    """' the mean cos² of the principal angles between DAS and Z of the basis layer is 0.06
    (chance k/d 0.056; random subspaces 0.05-0.06)' at (layer, k), or ''."""
    if angles is None:
        return ""
    a = angles[(angles.layer == layer) & (angles.k == k)]
    z, rand = a[a.versus == "z_basis"], a[a.versus == "random"]
    if not len(z):
        return ""
    versus = (f"; random subspaces {num(rand.mean_cos2.min())}-{num(rand.mean_cos2.max())}"
              if len(rand) else "")
    return (f"; the mean cos² of the principal angles between DAS and Z of the basis layer is "
            f"{num(z.mean_cos2.iloc[0])} (chance k/d {num(z.chance_mean_cos2.iloc[0])}"
            f"{versus})")


def _das_attention(rows, basis):
    """' At k = 50 DAS moves layer 21's attention at the last position by a total variation of
    0.3 (Z ..., full ..., random ...).' below the basis layer; '' where it was not measured."""
    d = rows["das"]
    if np.isnan(d.get("attn_tv_last", np.nan)):
        return ""
    beside = [f"{name} {num(rows[c].attn_tv_last)}" for c, name in
              (("z_basis", f"Z of layer {basis}"), ("full", "full")) if c in rows]
    if "random" in rows:
        beside.append(_band_of(rows["random"], "attn_tv_last"))
    return (f" At k = {int(d.k)} DAS moves layer {basis}'s attention at the last position by a "
            f"total variation of {num(d.attn_tv_last)} ({', '.join(beside)}).")


def _controls(tests, layer):
    """' DAS ranks above all 19 random draws on both measures at k = 20, 50; after Holm over
    the 12 DAS control tests p <= 0.05 at k = 50.' from the control tests of a layer."""
    rows = tests[(tests.family == "control") & (tests.layer == layer) & (tests.draws > 0)]
    if not len(rows):
        return ""
    listed = lambda ks: f"at k = {', '.join(map(str, ks))}" if ks else "at no k"  # noqa: E731
    top = [int(k) for k, g in rows.groupby("k") if (g.rank_from_top == 1).all()]
    hits = [int(k) for k, g in rows.groupby("k") if g.significant.astype(bool).all()]
    n, draws = int((tests.family == "control").sum()), int(rows.draws.min())
    floor = min(1.0, n / (draws + 1))  # the smallest Holm-adjusted p these draws allow
    why = (f" (with {plural(draws, 'draw')} none can: the smallest is {num(floor)})"
           if not hits and floor > ALPHA else "")
    return (f" DAS ranks above all {plural(draws, 'random draw')} on both top1_src and the "
            f"p_share shift {listed(top)}; after Holm over the {n} DAS control tests p <= "
            f"{ALPHA} {listed(hits)}{why}.")


def _control_reading(d):
    """What DAS's largest k says about reading Z at its layer: ' A 50-dimensional subspace
    here carries ...' or ' No learned ... so Z's null here cannot be read as ...'."""
    k = int(d.k)
    if d.top1_src > 0.5 and not bool(d.disrupts):
        return (f" A learned {k}-dimensional subspace here carries the source's first digit on "
                f"most held-out pairs: the positive control works at this layer, and Z of the "
                f"same size is read against it.")
    return (f" No learned {k}-dimensional subspace here carries the source's first digit on "
            f"most held-out pairs: at this layer a null for Z cannot be read as Z in particular "
            f"not carrying the answer.")


def das_sentences(tables):
    """One sentence per DAS layer: held-out top1_src against k (Wilson intervals), and at the
    largest k beside full, Z and the random band on the same test pairs, top1_own, neither,
    the p_share shift (bootstrap intervals), the mean cos² of the principal angles to Z against
    chance; then the control tests, disruption, the too-small note and the caveat where DAS
    exceeds full replacement."""
    das, config = tables["das"], tables["config"]
    if das is None:
        return []
    basis, lines = int(config["basis_layer"]), []
    reasons = config.get("das_layer_reasons", {})
    swap = select_swap(das)
    found = sorted(int(layer) for layer in swap.layer.unique())
    order = [l for l in config.get("das_layers", []) if l in found]  # the run's order
    for layer in order + [l for l in found if l not in order]:
        group = swap[swap.layer == layer]
        by_k = {int(k): {c: g.iloc[0] for c, g in rows.groupby("condition")}
                for k, rows in group.groupby("k")}
        by_k = {k: rows for k, rows in by_k.items() if "das" in rows}
        if not by_k:
            continue
        top = max(by_k)
        rows, d = by_k[top], by_k[top]["das"]
        why = f" ({reasons[str(layer)]})" if reasons.get(str(layer), "given") not in \
            ("given", "the input of the basis layer") else ""
        trained = f"trained on {plural(d.n_train, 'problem')}, " if "n_train" in d else ""
        curve = _curve({k: r["das"] for k, r in by_k.items()})
        line = (f"DAS at {das_site(layer, basis)}{why}, {trained}held out on "
                f"{plural(d.n_pairs, 'test pair')}: top1_src {curve} (Wilson 95% intervals); "
                f"at k = {top} beside {_beside(rows, 'top1_src', basis, layer)}; top1_own "
                f"{_rate(d, 'top1_own')}, neither {_rate(d, 'neither')}; p_share shift "
                f"{_boot(d, 'p_share_shift', True)} (bootstrap over the test problems; "
                f"{_beside(rows, 'p_share_shift', basis, layer, boot=True)})"
                f"{_angles(tables.get('angles'), layer, top)}.")
        line += _das_attention(rows, basis) + _controls(tables["tests"], layer)
        disrupted = [k for k, r in by_k.items() if bool(r["das"].disrupts)]
        if disrupted:
            line += (f" DAS leaves p_own + p_src below half its clean value on most pairs at "
                     f"k = {', '.join(map(str, disrupted))}: read there as disruption, not "
                     f"transfer.")
        note = d.get("note")
        if isinstance(note, str) and note:
            note = note.replace(": too small", "")
            line += f" Its splits are too small for this reading: {note}."
        lines.append(line + _das_above_full(rows) + _control_reading(d))
    return lines


def secondary_sentence(tests):
    rows = tests[tests.family == "secondary"]
    tested = rows[rows.draws > 0]
    if not len(tested):
        return f"Secondary tests: {NOT_TESTED}."
    hits = tested[tested.significant.astype(bool)]
    head = (f"Secondary tests (tests.csv, Holm-adjusted over {plural(len(tested), 'test')}): ")
    floor = 1 / (tested.draws.min() + 1)  # the smallest rank p these draws allow
    if not len(hits) and floor * len(tested) > ALPHA:
        return head + (f"none at or below {ALPHA}, nor could any be: with "
                       f"{plural(tested.draws.min(), 'random draw')} the smallest rank p is "
                       f"{num(floor)}, {num(min(1, floor * len(tested)))} after Holm over "
                       f"{len(tested)}; more draws are needed for these.")
    if not len(hits):
        return head + f"none at or below {ALPHA}."
    found = [f"{t.condition} {LABELS[t.measure]} {t.scope} at k = {int(t.k)} (Holm p = "
             f"{num(t.p_holm)})" for _, t in hits.iterrows()]
    return head + "; ".join(found) + f" at or below {ALPHA}."


def _question_reach(full):
    """'on at least half of them up to layer 12 (0.85 [0.71, 0.93]; 0.10 at layer 13)': the
    highest layer where full interchange of the question still gives the partner's first digit
    on at least half the pairs (and the next layer's rate), or where it never does, its largest
    rate."""
    full = full.sort_values("layer")
    high = full[full.top1_src >= 0.5]
    if not len(high):
        best = full.loc[full.top1_src.idxmax()]
        return (f"on at most {num(best.top1_src)} of them (layer {int(best.layer)}), never half "
                f"of them")
    last = high.iloc[-1]
    above = full[full.layer > last.layer]
    after = (f"; {num(above.top1_src.iloc[0])} at layer {int(above.layer.iloc[0])}"
             if len(above) else "")
    return f"on at least half of them up to layer {int(last.layer)} ({_rate(last)}{after})"


def _question_z(per_layer, tests, language, k, condition):
    """'Z of the basis layer at most 0.10 at layer 5 (random 0.05 [0, 0.2], family-wise p =
    0.3, Holm 0.9): no more than random subspaces' for one language."""
    test = tests[(tests.language == language) & (tests.k == k) & (tests.condition == condition)
                 & (tests.measure == "top1_src") & tests.scope.str.startswith("best of")]
    if not len(test) or np.isnan(test.value.iloc[0]):
        return None
    t = test.iloc[0]
    name = "Z of the basis layer" if condition == "z_basis" else "Z of each layer"
    text = f"{name} at most {num(t.value)} at layer {int(t.at_layer)}"
    if not t.draws:
        return f"{text} (against random draws {NOT_TESTED})"
    band = _band(per_layer[per_layer.language == language].assign(pairing="swap"), k,
                 int(t.at_layer), "top1_src")
    if t.get("family") == "exploratory":
        return f"{text} ({band}; p = {num(t.p)}, {conditions.NOT_EXCHANGEABLE})"
    if t.p_holm <= ALPHA:
        verdict = "carries it" if t.value >= 0.5 else "moves it above random, on fewer than half"
    else:
        verdict = "no more than random subspaces"
    return f"{text} ({band}; family-wise p = {num(t.p)}, Holm {num(t.p_holm)}): {verdict}"


def _question_readout(per_layer, config, language, k):
    """'patched at the input of layer 21, Z moves that layer's attention at the last position by
    0.31 (random ...; rank p = 0.05), full 0.6, the no-op 0' for one language, or None where the
    readout was not measured (a run from before it, or a sweep without the primary layer)."""
    at, basis = primary_layer(config), int(config["basis_layer"])
    rows = per_layer[(per_layer.language == language) & (per_layer.k == k)
                     & (per_layer.layer == at)].set_index("condition")
    if "attn_tv_last" not in rows or "z_basis" not in rows.index \
            or np.isnan(rows.attn_tv_last["z_basis"]):
        return None
    tv = rows.attn_tv_last
    band = _band(rows.reset_index().assign(pairing="swap"), k, at, "attn_tv_last")
    p = rows.get("attn_tv_last_p_above", pd.Series(dtype=float)).get("z_basis", np.nan)
    others = ", ".join(f"{name} {num(tv[c])}" for c, name in (("full", "full"),
                                                              ("none", "the no-op"))
                       if c in tv.index)
    return (f"patched at {primary_site(config)}, Z moves layer {basis}'s attention at the last "
            f"position by a total variation of {num(tv['z_basis'])} ({band}; rank p = {num(p)})"
            + (f", {others}" if others else ""))


def question_sentence(out):
    """The question set in one sentence: per language, down to which layer full interchange of
    the question's tokens still moves the answer to the partner's (the answer is read from the
    question there), whether Z's part of the question carries it (Z's best layer against the
    draws' best), and how far Z's patch at the primary site moves the basis layer's attention at
    the last position (the readout: what Z is built from). None without question tables."""
    out = Path(out)
    if not (out / "question_per_layer.csv").is_file() or not (out / "question_tests.csv").is_file():
        return None
    per_layer = runs.load_csv(out / "question_per_layer.csv")
    tests = runs.load_csv(out / "question_tests.csv")
    clean = runs.load_csv(out / "question_clean.csv")
    config = read_config(out)
    k = stats.primary_k(per_layer.k.unique())
    parts = []
    for language, name in (("en", "English"), ("zh", "Chinese")):
        full = per_layer[(per_layer.language == language) & (per_layer.k == k)
                         & (per_layer.condition == "full")]
        if not len(full):
            continue
        own = clean[clean.language == language].source_top1_own.astype(bool)
        z = [t for t in (_question_z(per_layer, tests, language, k, c)
                         for c in ("z_basis", "z_layer")) if t]
        z += [t for t in (_question_readout(per_layer, config, language, k),) if t]
        parts.append(f"in {name} ({plural(int(full.n_pairs.max()), 'pair')}; the partners' own "
                     f"argmax is their first digit on {int(own.sum())}), full interchange gives "
                     f"the partner's first digit {_question_reach(full)}"
                     + (", " + ", ".join(z) if z else ""))
    if not parts:
        return None
    return (f"Question positions (every token of the question at layer l from a counterfactual "
            f"partner's prompt in the same language, the same problem with other numbers; "
            f"k = {k}; the answer is read from the question down to the last layer where full "
            f"interchange still moves it): " + "; ".join(parts) + ".")


def pairs_sentence(config, per_layer, k, clean):
    solved = config.get("solved") or {}
    kept = (f"{solved['kept']} of {plural(solved['tried'], 'pair')} kept (--solved "
            f"{solved.get('mode')}: correct in English {solved.get('correct_en')}, in Chinese "
            f"{solved.get('correct_zh')}, both {solved.get('correct_both')})" if solved
            else f"{plural(config.get('n_pairs'), 'pair')}")
    row = select_swap(per_layer, "full", k=k).iloc[0]
    n_random = int(config["args"].get("n_random") or 0)
    every = ("the same at every layer" if conditions.draws_mode(config) == "shared"
             else "drawn independently at every layer")
    draws = (f"{plural(n_random, 'random draw')} of k = {k} ({every}; random: "
             f"their mean [2.5%, 97.5% of draws])" if n_random else f"random draws: {NOT_TESTED}")
    limit = config["args"].get("sweep_limit")
    if limit and limit < int(solved.get("kept") or config.get("n_pairs") or 0):
        kept += f"; the sweeps ran on the first {limit} of them (--sweep-limit), DAS on all"
    own = int(clean.top1_own.astype(bool).sum())
    return (f"{kept}; unpatched, the last position's argmax is the own first digit on {own} of "
            f"them; {int(row.n_pairs)} of the {plural(row.n_rows, 'swap pair')} have partners "
            f"with a different first digit, and every swap measure below is over those "
            f"{int(row.n_pairs)}; the last position interchanged; {draws}.")


def question_only(out):
    """Whether `out` holds a run of the question set alone (--position-sets question): question
    rows, no last-position rows."""
    return not (Path(out) / "per_problem.csv").is_file() and \
        (Path(out) / "question_per_problem.csv").is_file()


def summary_lines(out):
    """The run's findings as sentences, from its CSVs (printed at the end of a run and by
    --replot; report.py's paragraph)."""
    question = [s for s in (question_sentence(out),) if s]
    if question and question_only(out):
        return question
    tables = read_tables(out)
    per_layer, tests = tables["per_layer"], tables["tests"]
    ks = sorted(int(k) for k in per_layer.k.unique())
    pk = stats.primary_k(ks)
    lines = [prereg.status_sentence(tables["config"], "E"),
             pairs_sentence(tables["config"], per_layer, pk, tables["clean"]),
             profile_sentence(per_layer, pk),
             disruption_sentence(per_layer, pk), primary_sentence(tables),
             attention_sentence(tables)]
    draws = conditions.draws_mode(tables["config"])
    for k in ks:
        lines += [s for s in (best_layer_sentence(tests, k, draws),
                              language_sentence(tables, k)) if s]
    return lines + das_sentences(tables) + question + [secondary_sentence(tests)]


def question_headline(out):
    """report.py's cells for a run of the question set alone (--position-sets question): per
    language, down to which layer full interchange of the question moves the answer and Z of the
    basis layer's best layer against the draws' (Holm over question_tests.csv). FileNotFoundError
    without question tables (an unfinished run)."""
    out = Path(out)
    per_layer = runs.load_csv(out / "question_per_layer.csv")
    tests = runs.load_csv(out / "question_tests.csv")
    k = stats.primary_k(per_layer.k.unique())
    values, above = [], []
    for language, name in (("en", "English"), ("zh", "Chinese")):
        mine = per_layer[(per_layer.language == language) & (per_layer.k == k)]
        full = mine[mine.condition == "full"]
        if not len(full):
            continue
        z = _question_z(per_layer, tests, language, k, "z_basis")
        values.append(f"{name} ({plural(int(full.n_pairs.max()), 'pair')}): full interchange "
                      f"gives the partner's first digit {_question_reach(full)}; {z}")
        best = tests[(tests.language == language) & (tests.condition == "z_basis")
                     & (tests.k == k) & tests.scope.str.startswith("best of")]
        if (best.p_holm <= ALPHA).any():
            above.append(name)
    verdict = (f"Z's part of the question above random in {' and '.join(above)}" if above else
               "Z's part of the question: no more than random subspaces")
    return dict(verdict=verdict, value="; ".join(values), lead=[])  # the summary says the rest


def headline(out):
    """report.py's cells: dict(verdict, value, lead) from the declared primary test (a run of the
    question set alone: question_headline)."""
    if question_only(out):
        return question_headline(out)  # FileNotFoundError until its tables are written
    tables = read_tables(out)
    per_layer, basis = tables["per_layer"], primary_layer(tables["config"])
    k = stats.primary_k(per_layer.k.unique())
    verdict, z, primary = primary_verdict(tables)
    site = primary_site(tables["config"])
    lead = [profile_sentence(per_layer, k)]
    if z is None:
        return dict(verdict=verdict, value=f"{NOT_MEASURED} (layer {basis} not swept)", lead=lead)
    test = _test(primary, measure="top1_src")
    p = f", p = {num(test.p)}" if test is not None and test.draws else ""
    value = (f"top1_src {_rate(z)} of {plural(z.n_pairs, 'pair')} at {site} vs "
             f"{_band(per_layer, k, basis, 'top1_src')}{p}")
    lead.append(f"Z (k = {k}) patched at {site} (sweep layer {basis}) gives the source's first digit "
                f"on {_rate(z)} of the pairs ({_band(per_layer, k, basis, 'top1_src')}) and "
                f"shifts p_share by {num(z.p_share_shift, signed=True)} "
                f"({_band(per_layer, k, basis, 'p_share_shift', True)}): {verdict}.")
    return dict(verdict=verdict, value=value, lead=lead)


# ----------------------------------------------------------------------------------------------
# Decoded outcomes and --replot

def decode_summary(frame, keys):
    """Outcome and language rates (with Wilson 95% intervals for transferred and kept) per group;
    the language read again from each output (problems.classify_language), so that a replot of
    an older run reads it as a new run would."""
    rows = []
    for key, group in frame.groupby(keys, sort=True):
        n = len(group)
        record = dict(zip(keys, key if isinstance(key, tuple) else (key,)), n=n)
        for outcome in ("transferred", "kept", "broken"):
            count = int((group.outcome == outcome).sum())
            record[outcome] = count / n
            if outcome != "broken":
                record[f"{outcome}_lo"], record[f"{outcome}_hi"] = stats.wilson_interval(count, n)
        language = group.output.fillna("").map(problems.classify_language)  # today's reading
        for lang in ("en", "zh", "mixed", "none", "degenerate"):
            record[f"lang_{lang}"] = float((language == lang).mean())
        if "logp_own_fast" in group:
            record["fast_vs_full_max_abs"] = float((group.logp_own_fast - group.logp_own_decode)
                                                   .abs().max())
        rows.append(record)
    return pd.DataFrame(rows)


def replot(args):
    """Rebuild every table (build_tables), the decoded-outcome tables and every figure of the
    run in --out from its per-row CSVs and config.json (no model); print what was written and,
    for a finished sweep, the summary. Nothing is written for a folder without a run."""
    from zcausal.summaries import exp_e_figures
    out = Path(args.out)
    # build_tables raises a UsageError before anything is written
    tables = {} if question_only(out) else build_tables(out)
    tables.update(question_tables(out) or {})
    written = []
    for name in ["draws.csv", "tests.csv", "das.csv", "per_layer.csv"] + QUESTION_TABLES:
        if name in tables:
            runs.write_csv(tables[name], out / name)
            written.append(out / name)
    for rows, table, keys in (("decode.csv", "decode_summary.csv",
                               ["layer", "pairing", "condition"]),
                              ("das_decode.csv", "das_decode_summary.csv",
                               ["k", "layer", "pairing", "condition"])):
        if (out / rows).is_file() and len(frame := runs.load_csv(out / rows, text=["output"])):
            runs.write_csv(decode_summary(frame, keys), out / table)
            written.append(out / table)
    written += exp_e_figures.plot_all(args, read_config(out), tables)
    for path in written:
        print(f"wrote {path}")
    try:
        print("\n".join(summary_lines(out)))
    except runs.UsageError as err:
        print(f"no summary yet: {err}")
    return written
