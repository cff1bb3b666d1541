"""Experiment A's tables, tests and verdicts from a run's CSVs (no model), with the constants and
selectors the summary's sentences (exp_a_text.py) and figures (exp_a_figures.py) read: the one
module below them, so the three import it and never each other (exp_a.py, the entry points,
imports all three).

What each table holds, the primary test and the verdict: see exp_a.py's description.
"""
import math

import numpy as np
import pandas as pd

from zcausal import labels, prereg, runs, stats
from zcausal.summaries.text import NOT_MEASURED, interval, num, p_value, plural

CONFIG = ["layer", "k", "positions", "source"]
FIXED = ["none", "noop", "z", "zperp", "full", "en"]
REQUIRED = ["none", "noop", "z", "zperp", "full"]
PAIRED = [("z", "rand_z"), ("zperp", "rand_zperp")]
DECODED_METRICS = ["answer_change", "language_change", "to_zh", "transfer"]
RATE_METRICS = ["top1_src", "top1_own"]  # teacher-forced, but counts: rates with intervals
SCORED_METRICS = ["dlogp_ref", "dld_same", "dld_swap", "dlang_ref", "dp_share"] + RATE_METRICS
# Z's own positive control: how far the patch moves the attention of the layer reading the patched
# stream (the basis layer at --site input), total variation averaged over heads, same-problem rows
ATTENTION_METRICS = ["attn_tv_last", "attn_tv_all"]
ALPHA = 0.05
MIN_ENGLISH = 20  # the language criteria need this many English baselines, else "not measured"
PRIMARY = dict(k=50, positions="prompt", source="mean")  # and the basis layer
# The direction each rank test's hypothesis names (one-sided p); the others are two-sided.
DIRECTION = {("z", "answer_change"): "above", ("zperp", "language_change"): "above",
             ("z", "top1_src"): "above", ("z", "dp_share"): "above", ("z", "transfer"): "above",
             ("z", "dlogp_ref"): "below", ("zperp", "dlang_ref"): "below",
             ("z", "attn_tv_last"): "above", ("z", "attn_tv_all"): "above"}
TEXT = ["problem_id", "category", "positions", "source", "condition", "pair", "source_id",
        "output", "tokens", "language", "baseline_language", "outcome", "basis"]
_READOUT_NAMES = {"logp_ref": "logp_readout", "logp_swap": "logp_readout_swap", "ld": "ld_readout",
                  "dlogp_ref": "dlogp_readout", "dlogp_swap": "dlogp_readout_swap",
                  "dld": "dld_readout"}
LABEL = {"none": "none", "noop": "noop", "z": "Z", "zperp": "Z⊥", "full": "full",
         "en": "en (Z ← English mean)", "rand_z": "random Z", "rand_zperp": "random Z⊥"}
NO_DRAWS = "not tested (no random draws)"


def measure_names(template):
    """CSV names of the scored measures: the cot template scores the answer at the unpatched
    run's own "The answer is" (logp_readout ...), the direct one right after the prompt."""
    return {} if template == "direct" else dict(_READOUT_NAMES)


def load_table(path):
    """A CSV of this experiment, text columns kept as text ("60." stays "60.", "" stays "")."""
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""],
                        dtype={c: str for c in TEXT})
    for column in set(TEXT) & set(frame.columns):
        frame[column] = frame[column].fillna("")
    return frame.rename(columns={v: k for k, v in _READOUT_NAMES.items()})


def select_config(frame, config):
    """The rows of `frame` whose (layer, k, positions, source) equal `config`."""
    mask = np.ones(len(frame), dtype=bool)
    for column, value in zip(CONFIG, config):
        mask &= (frame[column] == value).to_numpy()
    return frame[mask]


def check_complete(rows):
    """Every configuration must hold, for every problem, the same (condition, draw, pair) rows,
    once each, including none, noop, z, zperp and full: a missing row is a UsageError naming it,
    never a silent count."""
    missing, first = 0, None
    for config, frame in rows.groupby(CONFIG, sort=True):
        keys = set(zip(frame.condition, frame.draw, frame.pair))
        keys |= {(c, -1, "same") for c in REQUIRED}
        have = list(zip(frame.problem_id, frame.condition, frame.draw, frame.pair))
        if len(have) != len(set(have)):
            raise runs.UsageError(f"rows.csv has duplicate rows in configuration {config}; "
                                  f"rerun the experiment (--resume rebuilds rows.csv)")
        have = set(have)
        for pid in sorted(set(frame.problem_id)):
            for key in sorted(keys, key=str):
                if (pid,) + key not in have:
                    missing += 1
                    first = first or f"problem {pid}, condition {key[0]}, draw {key[1]}, " \
                                     f"pair {key[2]}, configuration {config}"
    if missing:
        raise runs.UsageError(f"rows.csv is incomplete: {plural(missing, 'row')} missing (first: "
                              f"{first}); rerun the experiment with --resume to rebuild it")


# ----------------------------------------------------------------------------------------------
# The declared primary configuration

def primary_config(layers, ks, positions, sources, plan_layer):
    """(layer, k, positions, source) of the primary test: the plan's layer, k 50, prompt
    positions, mean source, each where the run has it (else its first layer, largest k, first
    positions and source; the summary then says the declared configuration was not run)."""
    return (plan_layer if plan_layer in layers else layers[0],
            PRIMARY["k"] if PRIMARY["k"] in ks else max(ks),
            PRIMARY["positions"] if PRIMARY["positions"] in positions else positions[0],
            PRIMARY["source"] if PRIMARY["source"] in sources else sources[0])


def site_text(site, layer):
    """Where a run's patch sits, in words: 'the input of layer 21' (the stream whose keys and
    queries Z is built from) or 'the output of layer 21' (read only by the layers above)."""
    return f"the {'input' if site == 'input' else 'output'} of layer {layer}"


def run_site(config):
    """--site of a run: 'output' for runs from before the flag (they patched the output)."""
    return config.get("args", {}).get("site") or "output"


def primary_description(primary, site="input", layers=None):
    """The declared primary test in words. layers: config.json's layers_resolved (num_layers and
    the plan's layer at this depth; None: the primary layer is taken to be the plan's)."""
    resolved = layers or {}  # older runs call the plan's layer basis_layer
    layer, plan = primary[0], resolved.get("plan_layer", resolved.get("basis_layer"))
    n = resolved.get("num_layers")
    where = ("the plan's layer 32 of 36 at this depth" if plan is None or layer == plan else
             f"depth {layer / n:.2f}, layer {layer} of {n}; the plan's layer 32 of 36 at this "
             f"depth, {plan}, was not run")
    return (f"patched at {site_text(site, layer)}: " + "Z at layer {} ({where}), k {}, positions "
            "{}, source {} changes more answers than random subspaces of its size (rank test), more than en "
            "on the same problems (exact McNemar) and lowers log p(reference) more than en (exact "
            "sign test), each one-sided; p = the largest of the three (an intersection-union "
            "test), with Z's Wilson lower bound above the noop rate. 'partial' rests on it alone; "
            "'double dissociation' adds, at the same configuration, Z keeps language, Z⊥ changes "
            "language (rank test at its raw p: the label is the conjunction of its criteria) and "
            "Z⊥ keeps answers".format(*primary, where=where))


def primary_of(rows, config):
    """The run's primary configuration, from config.json (older runs: computed from rows)."""
    declared = config.get("primary_test")
    if declared:
        return tuple(declared[c] for c in CONFIG)
    keys = rows[CONFIG].drop_duplicates()
    resolved = config.get("layers_resolved", {})  # the plan's layer: basis_layer in older runs
    plan = resolved.get("plan_layer", resolved.get("basis_layer", int(keys.layer.min())))
    return primary_config(sorted(keys.layer.unique()), list(keys.k.unique()),
                          list(keys.positions.unique()), list(keys.source.unique()), plan)


# ----------------------------------------------------------------------------------------------
# Per condition and draw

def rows_of(frame, condition, draw, pair):
    return frame[(frame.condition == condition) & (frame.draw == draw) & (frame.pair == pair)]


def _mean(values):
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.mean()) if len(values) else math.nan


def _count(values):
    """stats.rate of a boolean column, rows without a value (cot's top1) left out."""
    values = values[values.notna()].astype(bool)
    return stats.rate(int(values.sum()), len(values))


def condition_rates(frame, condition, draw=-1):
    """One condition (one random draw) of one configuration. Rates (stats.rate dicts): answer
    change over the problems (same-problem source); over the problems whose unpatched output is
    English, language change (to another language: problems.changed_language), to_zh (to
    Chinese) and degenerate (a degenerate output, never a language change); transfer, top1_src
    and top1_own over the swap pairs, truncated.
    Means: the scored shifts dlogp_ref, dld_same, dlang_ref (same) and dld_swap, dp_share (swap)."""
    same, swap = rows_of(frame, condition, draw, "same"), rows_of(frame, condition, draw, "swap")
    english = same[same.baseline_language == "en"]
    return dict(answer_change=_count(same.answer_changed),
                language_change=_count(english.language_changed),
                to_zh=_count(english.language == "zh"),
                degenerate=_count(english.language == "degenerate"),
                transfer=_count(swap.outcome == "transferred"),
                top1_src=_count(swap.top1_src), top1_own=_count(swap.top1_own),
                truncated=stats.rate(same.truncated.sum() + swap.truncated.sum(),
                                     len(same) + len(swap)),
                dlogp_ref=_mean(same.dlogp_ref), dld_same=_mean(same.dld),
                dlang_ref=_mean(same.dlang_ref), dld_swap=_mean(swap.dld),
                dp_share=_mean(swap.dp_share), patch_size=_mean(same.patch_size),
                n_scored=int(same.dlogp_ref.notna().sum()), n_swap=len(swap),
                **{m: _mean(same[m]) if m in same else math.nan for m in ATTENTION_METRICS})


def controls_table(frame):
    """controls.csv rows of one configuration: every fixed condition and every random draw."""
    out = []
    for condition in FIXED + ["rand_z", "rand_zperp"]:
        for draw in sorted(frame[frame.condition == condition].draw.unique()):
            r = condition_rates(frame, condition, draw)
            out.append(dict(condition=condition, draw=int(draw), n=r["answer_change"]["n"],
                            n_english=r["language_change"]["n"], n_swap=r["n_swap"],
                            **{m: r[m]["value"] for m in DECODED_METRICS + RATE_METRICS},
                            truncated=r["truncated"]["count"],
                            **{m: r[m] for m in SCORED_METRICS + ["patch_size", "n_scored"]
                               + ATTENTION_METRICS if m not in RATE_METRICS}))
    return out


def metrics_table(frame):
    """metrics.csv rows of one configuration: each fixed condition's rates with Wilson 95%
    intervals (n: the pair set's size), the baseline's accuracy and language, the scored means."""
    out = []
    none = rows_of(frame, "none", -1, "same")
    for name in ("en", "zh", "none", "mixed", "degenerate"):
        out.append(dict(condition="none", metric=f"baseline_{name}",
                        **stats.rate((none.baseline_language == name).sum(), len(none))))
    out.append(dict(condition="none", metric="correct",
                    **stats.rate(none.correct.sum(), len(none))))
    for condition in FIXED:
        if not (frame.condition == condition).any():
            continue
        r = condition_rates(frame, condition)
        for metric in DECODED_METRICS + RATE_METRICS + ["degenerate", "truncated"]:
            if r[metric]["n"]:
                out.append(dict(condition=condition, metric=metric, **r[metric]))
        for metric in [m for m in SCORED_METRICS if m not in RATE_METRICS] + ["patch_size"] + [
                m for m in ATTENTION_METRICS if not math.isnan(r[m])]:
            n = r["n_swap"] if metric in ("dld_swap", "dp_share") else r["answer_change"]["n"]
            out.append(dict(condition=condition, metric=metric, value=r[metric], n=n))
    return out


def null_draws(rows, null):
    """Per configuration, random condition and scored draw: the scored measures' shifts from the
    unpatched row (dlogp_ref, dld_same, dlang_ref over the same-problem rows; dld_swap, dp_share
    and the top1 rates over the swap rows): null_draws.csv."""
    columns = CONFIG + ["condition", "draw"] + SCORED_METRICS
    if null is None or not len(null):
        return pd.DataFrame(columns=columns)
    none = rows[rows.condition == "none"].drop_duplicates("problem_id").set_index("problem_id")
    base = {c: null.problem_id.map(none[c]) for c in ("logp_ref", "ld", "lang_ref", "p_share")}
    null = null.assign(dlogp_ref=null.logp_ref - base["logp_ref"], dld=null.ld - base["ld"],
                       dlang_ref=null.lang_ref - base["lang_ref"],
                       dp_share=null.p_share - base["p_share"])
    keys = CONFIG + ["condition", "draw"]
    same = null[null.pair == "same"].groupby(keys)
    swap = null[null.pair == "swap"].groupby(keys)
    top1 = {m: swap[m].apply(lambda v: _count(v)["value"]) for m in RATE_METRICS}
    attention = [m for m in ATTENTION_METRICS if m in null and null[m].notna().any()]
    out = pd.DataFrame({"dlogp_ref": same.dlogp_ref.mean(), "dld_same": same.dld.mean(),
                        "dld_swap": swap.dld.mean(), "dlang_ref": same.dlang_ref.mean(),
                        "dp_share": swap.dp_share.mean(), **top1,
                        **{m: same[m].mean() for m in attention}})
    return out.reset_index()[columns + attention]


# ----------------------------------------------------------------------------------------------
# Tests: rank tests against the random draws, paired tests against en and Z-perp, the primary

def _p(result, alternative):
    return result[{"above": "p_above", "below": "p_below", "two-sided": "p_two_sided"}[alternative]]


def rank_tests(controls, draws):
    """Z's (Z-perp's) value of every metric among the random draws of its size (decoded draws for
    the decoded metrics, the scored null for the scored ones), p in DIRECTION's sense."""
    out = []
    for condition, rand in PAIRED:
        own = controls[(controls.condition == condition) & (controls.draw == -1)]
        if not len(own):
            continue
        for metric in DECODED_METRICS + SCORED_METRICS + ATTENTION_METRICS:
            scored = (metric in SCORED_METRICS or metric in draws) and len(draws)
            null = (draws if scored else controls)
            null = null[null.condition == rand]
            value = float(own[metric].iloc[0]) if metric in own else math.nan
            result = stats.rank_test(value, null[metric].to_numpy(float)) \
                if metric in null and not math.isnan(value) else {}
            if result:
                alternative = DIRECTION.get((condition, metric), "two-sided")
                out.append(dict(test=f"{condition} {metric} vs random", condition=condition,
                                metric=metric, null="scored draws" if scored else "decoded draws",
                                alternative=alternative, value=value, draws=result["draws"],
                                mean=result["mean"], min=result["min"], max=result["max"],
                                rank=result["rank"], p=_p(result, alternative)))
    return out


def _paired(frame, first, second, column, mode="bool"):
    """Per problem (same-problem rows), the two conditions side by side on `column`: booleans
    (mode "bool"), or for the exact sign test first < second against second < first ("lower")
    or first > second against second > first ("higher")."""
    a = rows_of(frame, first, -1, "same").set_index("problem_id")[column]
    b = rows_of(frame, second, -1, "same").set_index("problem_id")[column].reindex(a.index)
    if mode == "lower":
        return (a < b).to_numpy(), (b < a).to_numpy()
    if mode == "higher":
        return (a > b).to_numpy(), (b > a).to_numpy()
    return a.astype(bool).to_numpy(), b.astype(bool).to_numpy()


def paired_tests(frame):
    """Exact one-sided paired tests on the same problems: Z changes more answers than en, Z
    lowers log p(reference) more than en (sign test), Z changes more answers than Z-perp (the
    plan's partial criterion), Z moves the reading layer's attention more than en (sign test on
    attn_tv_all), Z moves the language margin after the answer toward Chinese (lower) more than
    en does (sign test; a declared test of the preregistration). b: problems where only the
    first condition does it, c: only the second."""
    out = []
    for name, first, second, column, mode in (
            ("z vs en answers", "z", "en", "answer_changed", "bool"),
            ("z vs en dlogp_ref", "z", "en", "dlogp_ref", "lower"),
            ("z vs zperp answers", "z", "zperp", "answer_changed", "bool"),
            ("z vs en attention", "z", "en", "attn_tv_all", "higher"),
            ("z vs en dlang_ref", "z", "en", "dlang_ref", "lower")):
        if not (frame.condition == second).any() or column not in frame \
                or frame[column].isna().all():
            continue
        x, y = _paired(frame, first, second, column, mode)
        b, c, p = stats.mcnemar_exact(x, y, alternative="greater")
        out.append(dict(test=name, condition=first, metric=column, null=second,
                        alternative="greater", value=int(x.sum()), n=len(x), b=b, c=c, p=p))
    return out


COMPONENTS = ("z answer_change vs random", "z vs en answers", "z vs en dlogp_ref")


def changes_answers_test(tests):
    """The intersection-union row "z changes answers": p = the largest of COMPONENTS' p-values
    (NaN when one is missing: no random draws, or no en control)."""
    parts = tests[tests.test.isin(COMPONENTS)] if len(tests) else tests
    p = float(parts.p.max()) if len(parts) == len(COMPONENTS) else math.nan
    return dict(test="z changes answers", condition="z", metric="answer_change",
                null="random, en", alternative="greater", p=p)


def config_tests(frame, controls, draws):
    """tests rows of one configuration (rank tests, paired tests, the z-changes-answers test)."""
    tests = pd.DataFrame(rank_tests(controls, draws) + paired_tests(frame))
    if not len(tests):
        tests = pd.DataFrame(columns=["test", "p"])
    tests["part_of"] = np.where(tests.test.isin(COMPONENTS), "z changes answers", "")
    return pd.concat([tests, pd.DataFrame([dict(changes_answers_test(tests), part_of="")])],
                     ignore_index=True)


def is_control(tests):
    """(n,) bool: the rows of tests.csv that are the attention readout (every condition's rank
    test on attn_tv_last / attn_tv_all, and Z against en on it): the positive control."""
    return (tests.get("metric", pd.Series("", index=tests.index)).isin(ATTENTION_METRICS)
            | (tests.test == "z vs en attention")).to_numpy()


def mark_primary(tests, primary):
    """tests + primary (the declared test's row) and p_holm: Holm-adjusted over every secondary
    test (all rows but the primary, its components, the dissociation criterion and the
    preregistration's declared secondary tests at the primary configuration, and the attention
    readouts anywhere, part_of 'control'; NaN there)."""
    at = np.ones(len(tests), dtype=bool)
    for column, value in zip(CONFIG, primary):
        at &= (tests[column] == value).to_numpy()
    tests["primary"] = at & (tests.test == "z changes answers").to_numpy()
    # The label "double dissociation" is the conjunction of the primary and the dissociation
    # criteria at the same configuration (an intersection-union test: each at its raw level).
    dissociation = at & (tests.test == "zperp language_change vs random").to_numpy()
    tests.loc[dissociation, "part_of"] = "double dissociation"
    # The preregistration's declared secondary tests stand on their own: read at their raw p.
    declared = {t["test"] for t in prereg.declaration("A").get("secondary", [])}
    tests.loc[at & tests.test.isin(declared).to_numpy(), "part_of"] = "declared"
    # The attention readouts are the patch's positive control (did it reach the reading layer's
    # heads?): they decide how a null is read, at their raw p, and are no hypothesis about Z, so
    # they neither take nor give Holm's correction.
    tests.loc[is_control(tests), "part_of"] = "control"
    family = (~tests.primary.to_numpy() & ~(at & (tests.part_of != "").to_numpy())
              & (tests.part_of != "control").to_numpy())
    holm = np.full(len(tests), np.nan)
    if family.any():
        holm[family] = stats.holm(tests.p.to_numpy(float)[family])
    tests["p_holm"] = holm
    return tests


# ----------------------------------------------------------------------------------------------
# The verdict

def rate_text(r, of):
    """'4 of 44 kept problems (0.091 [0.036, 0.21])': count, pair set and n, rate with interval."""
    if not r["n"]:
        return f"{NOT_MEASURED} (no {of})"
    return (f"{r['count']} of {plural(r['n'], of)} "
            f"({interval(r['value'], r['ci_low'], r['ci_high'])})")


def get_test(tests, name):
    t = tests[tests.test == name] if len(tests) else tests
    return t.iloc[0] if len(t) else None


def _raw(t):
    """Whether a test is read at its raw p: the primary, the criteria that join it in a label
    (part_of), the preregistration's declared secondary tests and the attention readouts (the
    patch's positive control); every other test is read at its Holm-adjusted p."""
    return bool(t.get("primary", False)) or t.get("part_of", "") in ("double dissociation",
                                                                      "declared", "control")


def _used_p(t):
    return t["p"] if _raw(t) else t.get("p_holm", t["p"])


def p_text(t):
    if t is None or pd.isna(t["p"]):
        return NOT_MEASURED
    holm = "" if _raw(t) or pd.isna(t.get("p_holm", math.nan)) else \
        f", Holm-adjusted {num(t['p_holm'])}"
    return f"{p_value(t['p'])}{holm}"


def explained_by(z, noop, tests):
    """The controls that change (or shift) as much as Z: 'random', 'en', 'noop' (the ones whose
    test fails), for a Z that changed at least one answer."""
    if not z["count"]:
        return []
    rank, en, shift = (get_test(tests, name) for name in COMPONENTS)
    out = [name for name, t in (("random", rank), ("en", en)) if t is not None and t["p"] > ALPHA]
    if shift is not None and shift["p"] > ALPHA and "en" not in out:
        out.append("en")
    return out + (["noop"] if z["ci_low"] <= noop["value"] else [])


def z_changes(rates, tests):
    """(passes, reason) for "Z changes answers" (the intersection-union test, see the module
    docstring): its p (raw at the primary configuration, else Holm) and the noop floor."""
    z, noop = rates["z"]["answer_change"], rates["noop"]["answer_change"]
    t = get_test(tests, "z changes answers")
    rank, en, shift = (get_test(tests, name) for name in COMPONENTS)
    parts = [f"Z changed the answer on {rate_text(z, 'kept problem')}"]
    parts.append(f"random Z: {NO_DRAWS}" if rank is None else
                 f"{plural(rank['draws'], 'random draw')} of its size {num(rank['min'])} to "
                 f"{num(rank['max'])} (mean {num(rank['mean'])}), rank {p_text(rank)}")
    if en is None:
        parts.append("en: not run (source not mean)")
    else:
        parts.append(f"en changed {int(rates['en']['answer_change']['count'])}; Z alone "
                     f"{int(en['b'])}, en alone {int(en['c'])}, one-sided McNemar {p_text(en)}; "
                     f"log p(reference) lower under Z than under en on {int(shift['b'])} problems, "
                     f"higher on {int(shift['c'])}, sign test {p_text(shift)}")
    above = "above" if z["ci_low"] > noop["value"] else "not above"
    parts.append(f"noop {num(noop['value'])}, Z's lower bound {above} it")
    if t is None or pd.isna(t["p"]):
        return False, "; ".join(parts) + ": not tested (" + (
            "no random draws" if rank is None else "no en control") + ")"
    ok = bool(_used_p(t) <= ALPHA and z["ci_low"] > noop["value"])
    null = "" if ok else "; read as a null: " + labels.null_statement(
        z["count"], z["n"], labels.sign_test_critical(ALPHA), ALPHA, unit="kept problem")
    return ok, "; ".join(parts) + f": {'passes' if ok else 'fails'} ({p_text(t)}){null}"


def zperp_changes_language(rates, tests):
    r, noop = rates["zperp"]["language_change"], rates["noop"]["language_change"]
    if r["n"] < MIN_ENGLISH:
        return None, (f"Z⊥ changes language: not measured ({plural(r['n'], 'English baseline')}, "
                      f"{MIN_ENGLISH} needed)")
    t = get_test(tests, "zperp language_change vs random")
    if t is None:
        return False, f"Z⊥ changes language: {NO_DRAWS}"
    ok = bool(_used_p(t) <= ALPHA and r["ci_low"] > noop["value"])
    return ok, (f"Z⊥ changed the language on {rate_text(r, 'English baseline')}; random Z⊥ "
                f"{num(t['min'])} to {num(t['max'])}, rank {p_text(t)}; noop "
                f"{num(noop['value'])}: {'passes' if ok else 'fails'}")


def keeps(r, threshold, what, name, minimum=1):
    """(passes, reason) for "<name> keeps <what>": Wilson upper bound of the change rate <= the
    threshold (absence of evidence is not evidence of keeping), on at least `minimum` problems."""
    of = "English baseline" if what == "language" else "kept problem"
    if r["n"] < minimum:
        return None, (f"{name} keeps {what}: not measured ({plural(r['n'], of)}, {minimum} "
                      f"needed)")
    ok = r["ci_high"] <= threshold
    return bool(ok), (f"{name} changed {what} on {rate_text(r, of)}: upper bound "
                      f"{'at most' if ok else 'above'} {num(threshold)}")


def verdict(frame, tests, keep_threshold):
    """The plan's criteria, each read against its controls. Returns a dict: the four criteria
    (True / False / None = not measured), the plan's partial criterion (Z changes answers more
    than Z-perp), their reasons, the controls that explain Z's answer changes, the verdict."""
    rates = {c: condition_rates(frame, c) for c in ("noop", "z", "zperp", "en")
             if (frame.condition == c).any()}
    c = {"z_changes_answers": z_changes(rates, tests),
         "z_keeps_language": keeps(rates["z"]["language_change"], keep_threshold, "language", "Z",
                                   MIN_ENGLISH),
         "zperp_changes_language": zperp_changes_language(rates, tests),
         "zperp_keeps_answers": keeps(rates["zperp"]["answer_change"], keep_threshold, "answers",
                                      "Z⊥")}
    passed = {name: ok for name, (ok, _) in c.items()}
    if all(ok is True for ok in passed.values()):
        word = "double dissociation"
    else:
        word = "partial" if passed["z_changes_answers"] else "null"
    plan = get_test(tests, "z vs zperp answers")
    explain = explained_by(rates["z"]["answer_change"], rates["noop"]["answer_change"], tests)
    return dict(verdict=word, primary=bool(tests.primary.any()) if len(tests) else False,
                failed=", ".join(n for n, ok in passed.items() if ok is not True), **passed,
                plan_partial=bool(plan is not None and plan["p_holm"] <= ALPHA),
                plan_partial_p=plan["p"] if plan is not None else math.nan,
                explained_by=", ".join(explain),
                **{f"{name}_reason": reason for name, (_, reason) in c.items()})


# ----------------------------------------------------------------------------------------------
# Tables for every configuration

def measure_checks(rows):
    """Do the scored measures track what they claim? On the unpatched rows: mean logp_ref on
    problems answered correctly and on those missed, the share of correct ones with ld > 0, and
    the language margin on English and on Chinese baselines (large and positive on English ones)."""
    none = rows[rows.condition == "none"].drop_duplicates("problem_id")
    correct, missed = none[none.correct.astype(bool)], none[~none.correct.astype(bool)]
    margin = {lang: none[none.baseline_language == lang].lang_ref for lang in ("en", "zh")}
    return dict(n=len(none), n_correct=len(correct), n_missed=len(missed),
                n_unscored=int(none.logp_ref.isna().sum()),
                logp_ref_correct=_mean(correct.logp_ref), logp_ref_missed=_mean(missed.logp_ref),
                ld_positive_correct=int((correct.ld > 0).sum()),
                ld_scored_correct=int(correct.ld.notna().sum()),
                ld_positive_missed=int((missed.ld > 0).sum()),
                ld_scored_missed=int(missed.ld.notna().sum()),
                n_english=len(margin["en"]), lang_ref_english=_mean(margin["en"]),
                n_chinese=len(margin["zh"]), lang_ref_chinese=_mean(margin["zh"]),
                lang_ref_english_positive=int((margin["en"] > 0).sum()))


def compute_tables(rows, null=None, keep_threshold=0.2, primary=None):
    """metrics, controls, null_draws, tests and verdicts frames for every configuration; primary:
    the declared (layer, k, positions, source) (None: primary_config of the rows' first layer)."""
    check_complete(rows)
    primary = primary or primary_of(rows, {})
    draws_all = null_draws(rows, null)
    metrics, controls, tests, frames = [], [], [], {}
    for config, frame in rows.groupby(CONFIG, sort=True):
        keys = dict(zip(CONFIG, config))
        c = pd.DataFrame(controls_table(frame))
        t = config_tests(frame, c, select_config(draws_all, config))
        metrics += [dict(keys, **r) for r in metrics_table(frame)]
        controls += [dict(keys, **r) for r in c.to_dict("records")]
        tests.append(t.assign(**keys))
        frames[config] = frame
    tests = mark_primary(pd.concat(tests, ignore_index=True), primary)
    tests = tests[CONFIG + [c for c in tests.columns if c not in CONFIG]]
    verdicts = [dict(zip(CONFIG, config), **verdict(frame, select_config(tests, config),
                                                    keep_threshold))
                for config, frame in frames.items()]
    return (pd.DataFrame(metrics), pd.DataFrame(controls), draws_all, tests,
            pd.DataFrame(verdicts))


def band_text(controls, condition, column):
    draws = controls[controls.condition == condition][column].dropna()
    return (f"{num(draws.min())} to {num(draws.max())} (mean {num(draws.mean())}, "
            f"{plural(len(draws), 'draw')})" if len(draws) else NO_DRAWS)


def selection_sentence(config):
    """Tried and kept pairs per language, from config.json's solved record."""
    s = config.get("solved")
    if not s:
        return ""
    return (f"Problems: {plural(s['tried'], 'pair')} tried, {s['kept']} kept by --solved "
            f"{s['mode']} (answered correctly unpatched: {s['correct_en']} in English, "
            f"{s['correct_zh']} in Chinese, {s['correct_both']} in both).")
