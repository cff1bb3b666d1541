"""Experiment A's statistics, verdict, SUMMARY.md and figures, from a run's CSVs alone (no model).

    python exp_a_patching.py --summarize results/exp_a     # what calls summarize()

Reads rows.csv (one row per problem x configuration x condition x draw x pair), random_scores.csv
(the teacher-forced random null), variance.csv and config.json, and writes metrics.csv,
controls.csv, null_draws.csv, tests.csv, verdicts.csv, measure_checks.csv, SUMMARY.md,
patching_table.md and three figures. Every Z number is read against random subspaces of the same
size (Z as one more draw: stats.rank_test) and against the noop patch decoded in the same batches.
"""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from zcausal import problems, runs, stats
from zcausal.summaries import text

CONFIG = ["layer", "k", "positions", "source"]
FIXED = ["none", "noop", "z", "zperp", "full", "en"]
REQUIRED = ["none", "noop", "z", "zperp", "full"]
PAIRED = [("z", "rand_z"), ("zperp", "rand_zperp")]
DECODED_METRICS = ["answer_change", "language_change", "transfer"]
SCORED_METRICS = ["dlogp_ref", "dld_same", "dld_swap"]
ALPHA = 0.05
TEXT = ["problem_id", "category", "positions", "source", "condition", "pair", "source_id",
        "output", "tokens", "language", "baseline_language", "outcome", "basis"]
_READOUT_NAMES = {"logp_ref": "logp_readout", "logp_swap": "logp_readout_swap", "ld": "ld_readout",
                  "dlogp_ref": "dlogp_readout", "dlogp_swap": "dlogp_readout_swap",
                  "dld": "dld_readout"}


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
        raise runs.UsageError(f"rows.csv is incomplete: {missing} rows missing (first: {first}); "
                              f"rerun the experiment with --resume to rebuild it")


# ----------------------------------------------------------------------------------------------
# Per condition and draw

def _part(frame, condition, draw, pair):
    return frame[(frame.condition == condition) & (frame.draw == draw) & (frame.pair == pair)]


def _mean(values):
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.mean()) if len(values) else math.nan


def condition_rates(frame, condition, draw=-1):
    """One condition (one random draw) of one configuration: the decoded rates (stats.rate dicts:
    answer change over all problems, language change over the problems whose unpatched output is
    English, transfer over the swap rows, truncated) and the scored means (NaN rows left out and
    counted)."""
    same, swap = _part(frame, condition, draw, "same"), _part(frame, condition, draw, "swap")
    english = same[same.baseline_language == "en"]
    out = dict(answer_change=stats.rate(same.answer_changed.sum(), len(same)),
               language_change=stats.rate(english.language_changed.sum(), len(english)),
               transfer=stats.rate((swap.outcome == "transferred").sum(), len(swap)),
               truncated=stats.rate(same.truncated.sum() + swap.truncated.sum(),
                                    len(same) + len(swap)),
               dlogp_ref=_mean(same.dlogp_ref), dld_same=_mean(same.dld),
               dld_swap=_mean(swap.dld), patch_size=_mean(same.patch_size),
               n_scored=int(same.dlogp_ref.notna().sum()))
    return out


def controls_table(frame):
    """controls.csv rows of one configuration: every fixed condition and every random draw."""
    out = []
    for condition in FIXED + ["rand_z", "rand_zperp"]:
        for draw in sorted(frame[frame.condition == condition].draw.unique()):
            r = condition_rates(frame, condition, draw)
            out.append(dict(condition=condition, draw=int(draw), n=r["answer_change"]["n"],
                            n_english=r["language_change"]["n"],
                            **{m: r[m]["value"] for m in DECODED_METRICS},
                            truncated=r["truncated"]["count"],
                            **{m: r[m] for m in SCORED_METRICS + ["patch_size", "n_scored"]}))
    return out


def metrics_table(frame):
    """metrics.csv rows of one configuration: each fixed condition's rates with Wilson 95%
    intervals, the baseline's accuracy and language, and the scored means."""
    out = []
    none = _part(frame, "none", -1, "same")
    for name, count in (("correct", none.correct.sum()), ("english", (none.baseline_language == "en").sum())):
        out.append(dict(condition="none", metric=name, **stats.rate(count, len(none))))
    for condition in FIXED:
        if not (frame.condition == condition).any():
            continue
        r = condition_rates(frame, condition)
        for metric in DECODED_METRICS + ["truncated"]:
            if r[metric]["n"]:
                out.append(dict(condition=condition, metric=metric, **r[metric]))
        for metric in SCORED_METRICS + ["patch_size"]:
            out.append(dict(condition=condition, metric=metric, value=r[metric],
                            n=r["n_scored"] if metric != "patch_size" else r["answer_change"]["n"]))
    return out


def null_draws(rows, null):
    """Per configuration, random condition and scored draw: the mean shifts of log p(reference)
    (same pair) and of ld (same and swap pairs) from the unpatched row (null_draws.csv)."""
    if null is None or not len(null):
        return pd.DataFrame(columns=CONFIG + ["condition", "draw"] + SCORED_METRICS)
    none = rows[rows.condition == "none"].drop_duplicates("problem_id").set_index("problem_id")
    null = null.assign(dlogp_ref=null.logp_ref - null.problem_id.map(none.logp_ref),
                       dld=null.ld - null.problem_id.map(none.ld))
    same = null[null.pair == "same"].groupby(CONFIG + ["condition", "draw"])
    swap = null[null.pair == "swap"].groupby(CONFIG + ["condition", "draw"])
    out = pd.DataFrame({"dlogp_ref": same.dlogp_ref.mean(), "dld_same": same.dld.mean(),
                        "dld_swap": swap.dld.mean()})
    return out.reset_index()


def rank_tests(controls, draws):
    """tests.csv rows of one configuration: Z's (Z-perp's) value of every metric among the random
    draws of the same size (decoded draws for the decoded metrics, the scored null for the scored
    ones, else the decoded draws), one- and two-sided."""
    out = []
    for condition, rand in PAIRED:
        own = controls[(controls.condition == condition) & (controls.draw == -1)]
        if not len(own):
            continue
        for metric in DECODED_METRICS + SCORED_METRICS:
            null = draws[draws.condition == rand] if metric in SCORED_METRICS and len(draws) else \
                controls[controls.condition == rand]
            result = stats.rank_test(float(own[metric].iloc[0]), null[metric].to_numpy(float))
            if result:
                kind = "scored" if metric in SCORED_METRICS and len(draws) else "decoded"
                out.append(dict(condition=condition, metric=metric, null=kind,
                                value=float(own[metric].iloc[0]), **result))
    return out


# ----------------------------------------------------------------------------------------------
# The verdict

def _pct(r):
    return (f"{r['count']}/{r['n']} ({100 * r['value']:.0f}%, 95% CI "
            f"{100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f}%)")


def _test(tests, condition, metric):
    t = tests[(tests.condition == condition) & (tests.metric == metric)] if len(tests) else tests
    return t.iloc[0] if len(t) else None


def changes(rates, noop, test, what, name):
    """(passes, reason) for "<name> changes <what>": the rank test against random draws of its
    size passes (one-sided p <= ALPHA) and the Wilson lower bound is above the noop rate."""
    if rates["n"] == 0:
        return None, f"{name} changes {what}: not measured (no English baseline output)"
    if test is None:
        return False, f"{name} changes {what}: not tested (no random draws)"
    ranked = test["p_above"] <= ALPHA
    floor = rates["ci_low"] > noop["value"]
    reason = (f"{name} changed {what} on {_pct(rates)}; {int(test['draws'])} random draws: mean "
              f"{100 * test['mean']:.0f}%, range {100 * test['min']:.0f}-{100 * test['max']:.0f}%, "
              f"rank p = {test['p_above']:.3f} ({'passes' if ranked else 'fails'}); noop "
              f"{100 * noop['value']:.0f}%, CI lower bound {'above' if floor else 'not above'} it")
    return bool(ranked and floor), reason


def keeps(rates, threshold, what, name):
    """(passes, reason) for "<name> keeps <what>": Wilson upper bound of the change rate <= the
    threshold (absence of evidence is not evidence of keeping)."""
    if rates["n"] == 0:
        return None, f"{name} keeps {what}: not measured (no English baseline output)"
    ok = rates["ci_high"] <= threshold
    return bool(ok), (f"{name} changed {what} on {_pct(rates)}: upper bound "
                      f"{'at most' if ok else 'above'} {100 * threshold:.0f}%")


def verdict(frame, tests, keep_threshold):
    """The plan's criteria, each read against random draws and the noop floor. Returns a dict:
    the four criteria (True / False / None = not measurable), their reasons, the verdict."""
    rates = {c: condition_rates(frame, c) for c in ("noop", "z", "zperp")}
    c = {}
    c["z_changes_answers"] = changes(rates["z"]["answer_change"], rates["noop"]["answer_change"],
                                     _test(tests, "z", "answer_change"), "answers", "Z")
    c["z_keeps_language"] = keeps(rates["z"]["language_change"], keep_threshold, "language", "Z")
    c["zperp_changes_language"] = changes(
        rates["zperp"]["language_change"], rates["noop"]["language_change"],
        _test(tests, "zperp", "language_change"), "language", "Z⊥")
    c["zperp_keeps_answers"] = keeps(rates["zperp"]["answer_change"], keep_threshold, "answers", "Z⊥")
    passed = {name: ok for name, (ok, _) in c.items()}
    if all(passed.values()):
        word = "double dissociation"
    elif passed["z_changes_answers"]:
        word = "partial"
    else:
        word = "null"
    failed = [name for name, ok in passed.items() if ok is not True]
    return dict(verdict=word, failed=", ".join(failed), **passed,
                **{f"{name}_reason": reason for name, (_, reason) in c.items()})


# ----------------------------------------------------------------------------------------------
# Tables for every configuration

def measure_checks(rows):
    """Does the scored measure track knowing the answer? On the unpatched rows: mean logp_ref on
    problems answered correctly and on those missed, and the share of correct ones with ld > 0."""
    none = rows[rows.condition == "none"].drop_duplicates("problem_id")
    correct, missed = none[none.correct.astype(bool)], none[~none.correct.astype(bool)]
    return dict(n=len(none), n_correct=len(correct), n_missed=len(missed),
                n_unscored=int(none.logp_ref.isna().sum()),
                logp_ref_correct=_mean(correct.logp_ref), logp_ref_missed=_mean(missed.logp_ref),
                ld_positive_correct=int((correct.ld > 0).sum()),
                ld_scored_correct=int(correct.ld.notna().sum()),
                ld_positive_missed=int((missed.ld > 0).sum()),
                ld_scored_missed=int(missed.ld.notna().sum()))


def compute_tables(rows, null=None, keep_threshold=0.2):
    """metrics, controls, null_draws, tests and verdicts frames for every configuration."""
    check_complete(rows)
    draws_all = null_draws(rows, null)
    metrics, controls, tests, verdicts = [], [], [], []
    for config, frame in rows.groupby(CONFIG, sort=True):
        keys = dict(zip(CONFIG, config))
        c = pd.DataFrame(controls_table(frame))
        t = pd.DataFrame(rank_tests(c, select_config(draws_all, config)))
        metrics += [dict(keys, **r) for r in metrics_table(frame)]
        controls += [dict(keys, **r) for r in c.to_dict("records")]
        tests += [dict(keys, **r) for r in t.to_dict("records")]
        verdicts.append(dict(keys, **verdict(frame, t, keep_threshold)))
    return (pd.DataFrame(metrics), pd.DataFrame(controls), draws_all, pd.DataFrame(tests),
            pd.DataFrame(verdicts))


# ----------------------------------------------------------------------------------------------
# SUMMARY.md (sentences generated from the numbers) and the patching table

LABEL = {"none": "none", "noop": "noop", "z": "Z", "zperp": "Z⊥", "full": "full", "en": "en (Z ← English mean)",
         "rand_z": "random Z", "rand_zperp": "random Z⊥"}


def _f(value, digits=2, signed=True):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _band(controls, condition, column):
    draws = controls[controls.condition == condition][column].dropna()
    return (f"{100 * draws.mean():.0f}% ({100 * draws.min():.0f}-{100 * draws.max():.0f}%)"
            if len(draws) else "-")


def _cell(text, width=60):
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def render_patching_table(frame):
    """The plan's table for one configuration (same-problem source), as markdown lines."""
    lines = ["| problem | original (en) | Z-patched (en←zh) | Z⊥-patched (en←zh) | full-patched |",
             "|---|---|---|---|---|"]
    cells = {c: _part(frame, c, -1, "same").set_index("problem_id")
             for c in ("none", "z", "zperp", "full")}
    for pid in cells["none"].index:
        row = [pid]
        for c in ("none", "z", "zperp", "full"):
            r = cells[c].loc[pid]
            answer = "truncated" if r.truncated else "-" if pd.isna(r.answer) else \
                problems.format_number(r.answer)
            row.append(f"{_cell(r.output)} **[{answer}, {r.language}]**")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def conditions_markdown(frame):
    """One line per fixed condition: rates with intervals, truncation, scored shifts, patch size."""
    lines = ["| condition | answers changed | language changed (English baselines) | transferred "
             "(swap source) | truncated | Δ log p(ref) | Δ ld (same) | Δ ld (swap) | patch size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in FIXED:
        if not (frame.condition == c).any():
            continue
        r = condition_rates(frame, c)
        cells = [_pct(r[m]) if r[m]["n"] else "-" for m in DECODED_METRICS]
        cells += [f"{r['truncated']['count']}/{r['truncated']['n']}"]
        cells += [_f(r[m]) for m in SCORED_METRICS] + [_f(r["patch_size"], 1, False)]
        lines.append(f"| {LABEL[c]} | " + " | ".join(cells) + " |")
    return lines


def tests_markdown(tests):
    lines = ["| condition | metric | null | value | draws | random mean | random range | rank | "
             "p (above) | p (below) | p (two-sided) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in tests.itertuples():
        lines.append(f"| {LABEL[t.condition]} | {t.metric} | {t.null} | {t.value:.3g} | {t.draws} | "
                     f"{t.mean:.3g} | {t.min:.3g} to {t.max:.3g} | {t.rank} | {t.p_above:.3f} | "
                     f"{t.p_below:.3f} | {t.p_two_sided:.3f} |")
    return lines


def variance_sentence(variance, layer, k):
    if variance is None or not len(variance):
        return ""
    v = variance[(variance.layer == layer) & (variance.k == k)]
    z = v[v.basis == "z"].share
    parts = []
    for kind in ("uniform", "matched"):
        s = v[v.basis == kind].share
        if len(s):
            parts.append(f"{kind} random {k}-dim subspaces {100 * s.mean():.1f}% (range "
                         f"{100 * s.min():.1f}-{100 * s.max():.1f}%)")
    return (f"Z holds {100 * z.iloc[0]:.1f}% of the layer's activation variance (prompt tokens, "
            f"position 0 left out); " + " and ".join(parts) + ".") if len(z) else ""


def scored_sentence(tests, name, condition, metric, what):
    t = _test(tests, condition, metric)
    if t is None:
        return ""
    return (f"{name} shifted {what} by {t['value']:+.2f} nats; {int(t['draws'])} random draws "
            f"({t['null']}): mean {t['mean']:+.2f}, range {t['min']:+.2f} to {t['max']:+.2f}, "
            f"two-sided p = {t['p_two_sided']:.3f}.")


def verdict_paragraph(frame, controls, tests, v, variance, template):
    """A paragraph generated from the numbers only: baseline, noise floor, the four criteria with
    the reason each passes or fails, transfer, the scored measures, patch size and variance."""
    r = {c: condition_rates(frame, c) for c in FIXED if (frame.condition == c).any()}
    none = _part(frame, "none", -1, "same")
    n_en = int((none.baseline_language == "en").sum())
    text = [f"Unpatched, the model answered {_pct(stats.rate(none.correct.sum(), len(none)))} "
            f"correctly ({int(none.truncated.sum())} truncated); {n_en} of {len(none)} outputs were "
            f"English, and the language rates are over those"
            + (" (the direct template's outputs are numbers: language is not measured here; "
               "use --template cot)." if n_en == 0 and template == "direct" else
               " (direct template: the language is that of the words after the number, such as "
               "' minutes', where the model writes any)." if template == "direct" else ".")]
    noop = r["noop"]
    drift = _part(frame, "noop", -1, "same").dlogp_ref.abs().max()
    text.append(f"The noop patch (each row's own states, through the same code path and batches) "
                f"changed {_pct(noop['answer_change'])} answers and moved log p(reference) by at "
                f"most {drift:.1g} nats: the noise floor.")
    text += [v[f"{name}_reason"] + "." for name in
             ("z_changes_answers", "z_keeps_language", "zperp_changes_language", "zperp_keeps_answers")]
    if r["z"]["transfer"]["n"]:
        text.append(f"With another problem's Chinese prompt as the source, the output took that "
                    f"problem's answer on {_pct(r['z']['transfer'])} under Z, "
                    f"{_pct(r['zperp']['transfer'])} under Z⊥, {_pct(r['full']['transfer'])} under "
                    f"full replacement, and {_band(controls, 'rand_z', 'transfer')} under random Z.")
    what = "log p(reference) at the readout" if template == "cot" else "log p(reference)"
    text += [scored_sentence(tests, "Z", "z", "dlogp_ref", what + " (same-problem source)"),
             scored_sentence(tests, "Z", "z", "dld_swap", "ld (own minus source answer, swap source)"),
             scored_sentence(tests, "Z⊥", "zperp", "dlogp_ref", what)]
    if "en" in r:
        text.append(f"Writing the English prompt's own question mean into Z (en) changed "
                    f"{_pct(r['en']['answer_change'])} answers and shifted {what} by "
                    f"{_f(r['en']['dlogp_ref'])} nats (Z: {_f(r['z']['dlogp_ref'])}): what a mean "
                    f"does without any Chinese content"
                    + (" — as many answers as Z changed, so Z's answer changes here need no "
                       "Chinese content." if r["en"]["answer_change"]["count"] >=
                       r["z"]["answer_change"]["count"] > 0 else "."))
    sizes = ", ".join(f"{LABEL[c]} {_f(r[c]['patch_size'], 1, False)}" for c in ("z", "zperp", "full", "en")
                      if c in r)
    rand = controls[controls.condition.isin(["rand_z", "rand_zperp"])].groupby("condition").patch_size.mean()
    text.append(f"Mean patch size |P_S(s − h)| over the patched positions: {sizes}"
                + "".join(f", {LABEL[c]} {s:.1f} (mean over draws)" for c, s in rand.items()) + ".")
    largest = controls[controls.condition == "rand_z"].patch_size.max()
    if r["z"]["patch_size"] > largest:
        text.append(f"Z's patch moves the state further than every random draw's (largest "
                    f"{largest:.1f}): part of any Z effect over the random band may be the size "
                    f"of the patch, not its direction.")
    text.append(variance_sentence(variance, frame.layer.iloc[0], frame.k.iloc[0]))
    failed = v["failed"].replace("_", " ") if v["failed"] else "none"
    text.append(f"**Verdict: {v['verdict']}** (criteria not met: {failed}).")
    return " ".join(t for t in text if t)


def checks_markdown(checks, template):
    at = "at the unpatched run's own 'The answer is'" if template == "cot" else "right after the prompt"
    higher = checks["logp_ref_correct"] > checks["logp_ref_missed"]
    lines = [f"Scored {at}. Unpatched, log p(reference) averages {_f(checks['logp_ref_correct'])} "
             f"nats on the {checks['n_correct']} problems answered correctly and "
             f"{_f(checks['logp_ref_missed'])} on the {checks['n_missed']} missed ("
             + ("cannot be compared: one of the groups is empty" if not (
                 checks["n_correct"] and checks["n_missed"]) else
                "higher where the model knows the answer, as a measure of it must be" if higher else
                "NOT higher where the model knows the answer: read the scored numbers with suspicion")
             + f"); ld > 0 on {checks['ld_positive_correct']} of {checks['ld_scored_correct']} "
             f"correctly answered problems and {checks['ld_positive_missed']} of "
             f"{checks['ld_scored_missed']} missed ones."]
    if checks["n_unscored"]:
        lines.append(f"{checks['n_unscored']} of {checks['n']} unpatched outputs have no "
                     f"'The answer is': their rows are not scored (NaN) and left out of the means.")
    return lines


def write_summary(out_dir, rows, tables, checks, variance, config):
    """SUMMARY.md and patching_table.md, both generated from the CSV frames."""
    metrics, controls, draws, tests, verdicts = tables
    args, model = config.get("args", {}), config.get("model", {})
    template = args.get("template", "direct")
    head = ["# Experiment A: activation patching of Z", "",
            f"Model `{model.get('name_or_path')}` ({model.get('dtype')}, {model.get('device_name')}), "
            f"{rows.problem_id.nunique()} problems, template `{template}`, site `{args.get('site')}`"
            f", skip first position: {args.get('skip_first')}, random subspaces: "
            f"`{args.get('random_kind')}`, command `{config.get('command')}`, git "
            f"{config.get('git_commit')}. Every number and sentence here is generated from the CSVs "
            f"in this folder; rebuild with `python exp_a_patching.py --summarize <this folder>`.", "",
            "## Checks on the measure", ""] + checks_markdown(checks, template) + [
            "", "## Overview", "",
            "| layer | k | positions | source | Z answers changed | random Z | rank p | noop | "
            "Z⊥ answers changed | Z language changed | Z⊥ language changed | Z transferred | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    body, table = [], ["# Experiment A: the plan's patching tables", ""]
    for config_key, frame in rows.groupby(CONFIG, sort=True):
        c, t = (select_config(f, config_key) for f in (controls, tests))
        v = select_config(verdicts, config_key).iloc[0]
        r = {name: condition_rates(frame, name) for name in ("noop", "z", "zperp")}
        test = _test(t, "z", "answer_change")
        head.append("| {} | {} | {} | {} | ".format(*config_key) + " | ".join([
            _pct(r["z"]["answer_change"]), _band(c, "rand_z", "answer_change"),
            f"{test['p_above']:.3f}" if test is not None else "-",
            f"{100 * r['noop']['answer_change']['value']:.0f}%", _pct(r["zperp"]["answer_change"]),
            _pct(r["z"]["language_change"]) if r["z"]["language_change"]["n"] else "not measured",
            _pct(r["zperp"]["language_change"]) if r["zperp"]["language_change"]["n"] else "not measured",
            _pct(r["z"]["transfer"]), v["verdict"]]) + " |")
        name = "layer {} · k {} · positions {} · source {}".format(*config_key)
        body += [f"## {name}", "", verdict_paragraph(frame, c, t, v, variance, template), "",
                 "### Conditions (95% Wilson intervals; scored shifts in nats)", ""]
        body += conditions_markdown(frame) + ["", "### Rank tests against random subspaces", ""]
        body += tests_markdown(t) + ["", "### Patching table (same-problem source; [answer, "
                                          "language])", ""] + render_patching_table(frame) + [""]
        table += [f"## {name}", ""] + render_patching_table(frame) + [""]
    Path(out_dir, "SUMMARY.md").write_text("\n".join(head + [""] + body), encoding="utf-8")
    Path(out_dir, "patching_table.md").write_text("\n".join(table), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Figures (from the tables only)

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
    """change_rates, transfer_rates and logprob_shift PNGs, from the tables alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from types import SimpleNamespace
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
            d = d[d.condition == {"z": "rand_z", "zperp": "rand_zperp"}.get(c, "")][column].dropna()
            return (d.min(), d.max(), d.mean()) if len(d) else None
        return fn

    conds = ["noop", "z", "zperp", "full", "en"]
    width = max(6, 1.8 * len(configs)) + 1.5  # room for the legend on the right
    fig, axes = plt.subplots(2, 1, figsize=(width, 7))
    _bars(axes[0], configs, conds, value("answer_change"), error("answer_change"),
          band(controls, "answer_change"), "share of problems",
          "answer changed vs no patch (same-problem source)\nerror bars: Wilson 95%; shaded: "
          "random draws of Z's size (range; dotted: mean)")
    _bars(axes[1], configs, conds, value("language_change"), error("language_change"),
          band(controls, "language_change"), "share of English baselines",
          "output language changed (problems whose unpatched output is English)")
    if not metrics[metrics.metric == "language_change"].n.fillna(0).gt(0).any():
        _say(axes[1], "no English baseline output: language not measured"
             + (" (direct template: the outputs are numbers)" if template == "direct" else ""))
    for ax in axes:
        ax.set_ylim(-0.05, 1.05)
    runs.save_figure(fig, runs.figure_path(where, "change_rates"))

    fig, ax = plt.subplots(figsize=(width, 3.8))
    _bars(ax, configs, ["z", "zperp", "full"], value("transfer"), error("transfer"),
          band(controls, "transfer"), "share of swap rows",
          "interchange: the output takes the source problem's answer")
    ax.set_ylim(-0.05, 1.05)
    if not (metrics[metrics.metric == "transfer"].value.fillna(0) > 0).any():
        _say(ax, "no condition transferred any answer: every bar is 0")
    runs.save_figure(fig, runs.figure_path(where, "transfer_rates"))

    fig, axes = plt.subplots(2, 1, figsize=(width, 7))
    null = draws if len(draws) else controls
    what = "log p(reference) at the readout" if template == "cot" else "log p(reference answer)"
    _bars(axes[0], configs, conds, value("dlogp_ref"), None, band(null, "dlogp_ref"),
          "shift (nats)", f"shift in {what} vs no patch, same-problem source\nshaded: random "
          f"draws of Z's size (range; dotted: mean)")
    _bars(axes[1], configs, ["z", "zperp", "full"], value("dld_swap"), None, band(null, "dld_swap"),
          "shift (nats)", "shift in ld = log p(own answer) − log p(source's answer), swap source\n"
          "(negative: toward the source's answer)")
    for ax, metric in zip(axes, ("dlogp_ref", "dld_swap")):
        if not metrics[metrics.metric == metric].value.notna().any():
            _say(ax, "no scored rows")
    runs.save_figure(fig, runs.figure_path(where, "logprob_shift"))


def load_run(out_dir):
    """(rows, random null or None, variance or None, config) of a run folder, from its files."""
    out_dir = Path(out_dir)
    if not (out_dir / "rows.csv").is_file():
        raise runs.UsageError(f"{out_dir} has no rows.csv; run the experiment first or pass the "
                              f"folder of a finished run")
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8")) \
        if (out_dir / "config.json").is_file() else {}
    optional = [load_table(out_dir / name) if (out_dir / name).is_file() else None
                for name in ("random_scores.csv", "variance.csv")]
    return load_table(out_dir / "rows.csv"), *optional, config


def summarize(out_dir, figures_dir=Path("figures")):
    """Rebuild every table, SUMMARY.md, patching_table.md and the figures from a run's CSVs."""
    out_dir = Path(out_dir)
    rows, null, variance, config = load_run(out_dir)
    args = config.get("args", {})
    tables = compute_tables(rows, null, args.get("keep_threshold", 0.2))
    names = measure_names(args.get("template", "direct"))
    for name, frame in zip(("metrics", "controls", "null_draws", "tests", "verdicts"), tables):
        runs.write_csv(frame, out_dir / f"{name}.csv")
    checks = measure_checks(rows)
    runs.write_csv(pd.DataFrame([checks]).rename(columns=names), out_dir / "measure_checks.csv")
    write_summary(out_dir, rows, tables, checks, variance, config)
    plot_figures(out_dir, figures_dir, tables, args.get("template", "direct"))
    return tables[4]


def summary_lines(out_dir):
    """SUMMARY.md's check on the measure and its verdict paragraph per configuration (report.py)."""
    rows, null, variance, config = load_run(out_dir)
    args = config.get("args", {})
    template = args.get("template", "direct")
    _, controls, _, tests, verdicts = compute_tables(rows, null, args.get("keep_threshold", 0.2))
    lines = checks_markdown(measure_checks(rows), template)
    for config_key, frame in rows.groupby(CONFIG, sort=True):
        c, t = (select_config(f, config_key) for f in (controls, tests))
        v = select_config(verdicts, config_key).iloc[0]
        lines.append("Layer {} · k {} · positions {} · source {}: ".format(*config_key)
                     + verdict_paragraph(frame, c, t, v, variance, template))
    return lines


def headline(out_dir):
    """report.py's row and lead (dict(verdict, value, lead)): per configuration, Z's answer-change
    rate with its Wilson interval against the random draws' range and rank p, and the verdict."""
    rows, null, _, config = load_run(out_dir)
    _, controls, _, tests, verdicts = compute_tables(
        rows, null, config.get("args", {}).get("keep_threshold", 0.2))
    words, values, lead = [], [], []
    for config_key, frame in rows.groupby(CONFIG, sort=True):
        c, t = (select_config(f, config_key) for f in (controls, tests))
        change = _test(t, "z", "answer_change")
        z = condition_rates(frame, "z")["answer_change"]
        draws = c[c.condition == "rand_z"]["answer_change"].dropna()
        where = "layer {}, k {}, positions {}, source {}".format(*config_key)
        value = (f"{text.interval(z['value'], z['ci_low'], z['ci_high'])} answers changed by Z"
                 + (f", random [{text.num(draws.min())}, {text.num(draws.max())}]"
                    if len(draws) else "")
                 + (f" (rank {text.p_value(change['p_above'])})" if change is not None else ""))
        v = select_config(verdicts, config_key).iloc[0]
        words.append(v["verdict"])
        values.append(value + (f" [{where}]" if rows.groupby(CONFIG).ngroups > 1 else ""))
        lead.append(f"{where}: Z changed {z['count']} of {text.plural(z['n'], 'answer')}; "
                    f"verdict {v['verdict']}"
                    + (f" (criteria not met: {v['failed'].replace('_', ' ')})." if v["failed"]
                       else "."))
    return dict(verdict=" / ".join(dict.fromkeys(words)), value="; ".join(values), lead=lead[:3])
