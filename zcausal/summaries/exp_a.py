"""Experiment A's statistics, the declared primary test, the verdict, SUMMARY.md and the report's
headline, from a run's CSVs alone (no model).

    python exp_a_patching.py --replot --out results/exp_a     # what calls replot() / summarize()

Reads rows.csv (one row per problem x configuration x condition x draw x pair), random_scores.csv
(the teacher-forced random null), variance.csv and config.json, and writes metrics.csv,
controls.csv, null_draws.csv, tests.csv, verdicts.csv, measure_checks.csv, SUMMARY.md and
patching_table.md and three figures: the tables and tests in exp_a_tables.py, their sentences in
exp_a_text.py, the figures in exp_a_figures.py; this module is the entry points. Every Z number is
read against random subspaces of the same size (Z as one more draw: stats.rank_test), the noop
patch decoded in the same batches, and the `en` control (the English prompt's own mean written
into Z).

The primary test, declared in config.json before the run (primary_config): at the plan's layer 32
of 36 at this model's depth where it was run (else the first --layer), k 50, mean source, prompt positions, Z changes more
answers than random subspaces of its size (rank test), more than `en` on the same problems (exact
McNemar on the problems where they differ) and lowers log p(reference) more than `en` (exact sign
test), all one-sided: an intersection-union test whose p-value is the largest of the three, with the
Wilson lower bound of Z's rate above the noop rate. The label "partial" rests on the primary test
only; "double dissociation" is the conjunction of it and, at the same configuration, Z keeps
language, Z-perp changes language and Z-perp keeps answers (each at its raw level: a conjunction
needs no correction). Every other test in tests.csv is secondary and Holm-adjusted (p_holm), but
the preregistration's declared secondary test (Z's language-margin shift against en's, exact sign
test per problem), read at its raw p, and the attention readouts (part_of `control`: the patch's
positive control, read at their raw p, outside Holm's family). The language criteria are "not
measured" with fewer than 20 English baselines. Languages are read again from each output
(problems.classify_language).
"""
import json
from pathlib import Path

import pandas as pd

from zcausal import prereg, problems, runs
from zcausal.summaries import exp_a_figures, exp_a_text
from zcausal.summaries.exp_a_tables import (CONFIG, band_text, compute_tables, condition_rates,
                                            get_test, load_table, measure_checks, measure_names,
                                            p_text, primary_of, rate_text, run_site, select_config,
                                            selection_sentence, site_text)
from zcausal.summaries.text import NOT_MEASURED, interval, num, plural


# ----------------------------------------------------------------------------------------------
# Entry points: summarize / replot (the script), summary_lines / headline (report.py)

def read_languages(rows):
    """rows with language, baseline_language (the unpatched output's, same problem and
    configuration), language_changed and to_zh read again from each output by
    problems.classify_language (the whole answer), so that a replot of an older run reads the
    language as a new run does."""
    rows = rows.copy()
    rows["language"] = rows.output.map(problems.classify_language)
    keys = CONFIG + ["problem_id"]
    none = rows[(rows.condition == "none") & (rows.pair == "same")].drop_duplicates(keys)
    baseline = none.set_index(keys).language
    rows["baseline_language"] = baseline.reindex(pd.MultiIndex.from_frame(rows[keys])).to_numpy()
    rows["language_changed"] = [problems.changed_language(b, g) for b, g in
                                zip(rows.baseline_language, rows.language)]
    rows["to_zh"] = (rows.baseline_language == "en") & (rows.language == "zh")
    return rows


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
    rows = load_table(out_dir / "rows.csv")
    rows = read_languages(rows) if "output" in rows else rows
    missing = sorted({"lang_ref", "top1_src", "p_share"} - set(rows.columns))
    if missing:
        raise runs.UsageError(f"{out_dir}/rows.csv was written by an older exp_a_patching.py (no "
                              f"{', '.join(missing)}); rerun the experiment (--overwrite)")
    return rows, *optional, config


def _tables(out_dir):
    rows, null, variance, config = load_run(out_dir)
    tables = compute_tables(rows, null, config.get("args", {}).get("keep_threshold", 0.2),
                            primary_of(rows, config))
    return rows, variance, config, tables


def summarize(out_dir, figures_dir=Path("figures")):
    """Rebuild every table, SUMMARY.md, patching_table.md and the figures from a run's CSVs.
    Returns the verdicts frame and the paths written."""
    out_dir = Path(out_dir)
    rows, variance, config, tables = _tables(out_dir)
    names = measure_names(config.get("args", {}).get("template", "direct"))
    written = []
    for name, frame in zip(("metrics", "controls", "null_draws", "tests", "verdicts"), tables):
        runs.write_csv(frame, out_dir / f"{name}.csv")
        written.append(out_dir / f"{name}.csv")
    checks = measure_checks(rows)
    runs.write_csv(pd.DataFrame([checks]).rename(columns=names), out_dir / "measure_checks.csv")
    exp_a_text.write_summary(out_dir, rows, tables, checks, variance, config)
    written += [out_dir / n for n in ("measure_checks.csv", "SUMMARY.md", "patching_table.md")]
    written += exp_a_figures.plot_figures(out_dir, figures_dir, tables,
                                          config.get("args", {}).get("template", "direct"))
    return tables[4], written


def replot(args):
    """--replot, and the end of a run: every table, SUMMARY.md and figure of the run in --out,
    rebuilt from its CSVs (no model); prints the verdicts (summary_lines) and each path written.
    A folder without a finished run is a UsageError, nothing written."""
    verdicts, written = summarize(args.out, args.figures)
    print("\n".join(summary_lines(args.out)))
    for path in written:
        print(f"wrote {path}")
    return verdicts


def summary_lines(out_dir):
    """The selection, the check on the measure and the verdict paragraph per configuration
    (report.py)."""
    rows, variance, config, (_, controls, _, tests, verdicts) = _tables(out_dir)
    template = config.get("args", {}).get("template", "direct")
    lines = [prereg.status_sentence(config, "A")]
    lines += [selection_sentence(config)] if config.get("solved") else []
    lines += exp_a_text.checks_markdown(measure_checks(rows), template)
    for config_key, frame in rows.groupby(CONFIG, sort=True):
        c, t = (select_config(f, config_key) for f in (controls, tests))
        v = select_config(verdicts, config_key).iloc[0]
        lines.append("Layer {} · k {} · positions {} · source {}: ".format(*config_key)
                     + f"patched at {site_text(run_site(config), config_key[0])}. "
                     + exp_a_text.verdict_paragraph(frame, c, t, v, variance, template, run_site(config)))
    return lines


def headline(out_dir):
    """report.py's row and lead: dict(verdict, value, lead) from the declared primary test."""
    rows, _, config, (_, controls, _, tests, verdicts) = _tables(out_dir)
    primary = primary_of(rows, config)
    frame = select_config(rows, primary)
    if not len(frame):
        return dict(verdict=NOT_MEASURED, value="the declared primary configuration (layer {}, "
                    "k {}, {}, {}) was not run".format(*primary), lead=[selection_sentence(config)])
    t, c = select_config(tests, primary), select_config(controls, primary)
    v = select_config(verdicts, primary).iloc[0]
    z = condition_rates(frame, "z")
    en = condition_rates(frame, "en")["answer_change"] if (frame.condition == "en").any() else None
    a = z["answer_change"]
    site = site_text(run_site(config), primary[0])
    value = (f"at {site}: {interval(a['value'], a['ci_low'], a['ci_high'])} of answers changed by Z vs "
             f"random {band_text(c, 'rand_z', 'answer_change')}"
             + (f" and en {num(en['value'])}" if en is not None else "")
             + f" ({p_text(get_test(t, 'z changes answers'))}, {plural(a['n'], 'kept problem')})")
    lead = [s for s in [selection_sentence(config)] if s]
    lead.append(f"Patched at {site}: " + "at layer {}, k {} (positions {}, source {}), Z changed ".format(*primary)
                + rate_text(a, "kept problem") + (f", en {en['count']}" if en is not None else "")
                + (f"; explained by {v['explained_by']}" if v["explained_by"] else "")
                + "; the first digit went to the source's under Z on "
                + rate_text(z["top1_src"], "swap pair") + ".")
    failed = f" (criteria not met: {v['failed'].replace('_', ' ')})" if v["failed"] else ""
    lead.append(f"Verdict: {v['verdict']}{failed}.")
    return dict(verdict=v["verdict"], value=value, lead=lead[:3])
