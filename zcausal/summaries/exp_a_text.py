"""Experiment A's SUMMARY.md, patching_table.md and verdict paragraphs: every sentence generated
from the tables of zcausal/summaries/exp_a_tables.py (no model). Counts say their pair set and n,
rates come with their Wilson interval ("4 of 44 kept problems (0.091 [0.036, 0.21])"), numbers to
2-3 significant digits (zcausal/summaries/text.py), "not measured" / "not tested" instead of nan."""
import math
from pathlib import Path

import pandas as pd

from zcausal import labels, prereg, problems, stats
from zcausal.summaries.exp_a_tables import (ALPHA, CONFIG, FIXED, LABEL, MIN_ENGLISH, NO_DRAWS,
                                            band_text, condition_rates, get_test, p_text,
                                            primary_description, primary_of, rate_text, rows_of,
                                            run_site, select_config, selection_sentence, site_text)
from zcausal.summaries.text import NOT_MEASURED, num, plural


def baseline_sentence(frame):
    """Accuracy and output languages of the unpatched rows (problems.classify_language of the whole
    answer), and whether the language criteria have their 20 English baselines."""
    none = rows_of(frame, "none", -1, "same")
    counts = {lang: int((none.baseline_language == lang).sum())
              for lang in ("en", "zh", "mixed", "none", "degenerate")}
    n_en = counts["en"]
    example = none[none.baseline_language == "en"].output.head(1).tolist()
    correct = rate_text(stats.rate(none.correct.sum(), len(none)), "kept problem")
    return (f"Unpatched, the model answered {correct} "
            f"correctly ({int(none.truncated.sum())} truncated); its outputs were English on "
            f"{n_en}, Chinese on {counts['zh']}, mixed on {counts['mixed']}, without words on "
            f"{counts['none']}, degenerate on {counts['degenerate']}"
            + (f" (e.g. {example[0].strip()!r})" if example else "")
            + (f"; the language criteria are over the {plural(n_en, 'English baseline')}." if
               n_en >= MIN_ENGLISH else f"; the language criteria need {MIN_ENGLISH} English "
               f"baselines and are not measured here."))


def scored_sentence(tests, name, condition, metric, what, value, unit=" nats"):
    """Z's (Z-perp's) scored shift, read against the scored random draws of its size."""
    t = get_test(tests, f"{condition} {metric} vs random")
    if t is None:
        return (f"{name} shifted {what} by {num(value, signed=True)}{unit}; random subspaces "
                f"{NO_DRAWS}.")
    side = {"above": "one-sided, above the draws", "below": "one-sided, below the draws"}.get(
        t["alternative"], "two-sided")
    return (f"{name} shifted {what} by {num(t['value'], signed=True)}{unit}; "
            f"{plural(t['draws'], 'random draw')} ({t['null']}): "
            f"mean {num(t['mean'], signed=True)}, "
            f"range {num(t['min'], signed=True)} to {num(t['max'], signed=True)}, rank test "
            f"({side}) {p_text(t)}.")


def to_chinese_sentence(r, controls):
    """How often each condition turned an English output Chinese (to_zh), and how often it left a
    degenerate output (counted apart, never a language change), over the English baselines."""
    if not r["z"]["to_zh"]["n"]:
        return ""
    parts = [f"{LABEL[c]} {num(r[c]['to_zh']['value'])}" for c in ("zperp", "full", "en", "noop")
             if c in r]
    degenerate = ", ".join(f"{LABEL[c]} {r[c]['degenerate']['count']}" for c in
                           ("z", "zperp", "full", "en", "noop") if c in r)
    return (f"Chinese output (to_zh, the whole answer read) on "
            f"{rate_text(r['z']['to_zh'], 'English baseline')} under Z; as a share: "
            + ", ".join(parts)
            + f", random Z {band_text(controls, 'rand_z', 'to_zh')}, random Z⊥ "
            f"{band_text(controls, 'rand_zperp', 'to_zh')}; degenerate outputs (not counted as "
            f"a language change): {degenerate}.")


def _tie_words(r, controls):
    """' (no transfer (0 of n, upper bound u)): Z and every draw at 0' where the rank test sees
    only ties, else ''."""
    tie = labels.no_transfer(r["count"], r["n"], controls[controls.condition == "rand_z"]
                             .top1_src.dropna().to_numpy())
    return f": {tie}, Z and every random draw at 0" if tie else ""


def language_margin_sentence(tests):
    """The declared paired test: Z's language margin shift against en's, per problem."""
    t = get_test(tests, "z vs en dlang_ref")
    if t is None:
        return ""
    return (f"Z moved the language margin after the answer toward Chinese more than en did on "
            f"{int(t['b'])} of {plural(t['n'], 'kept problem')}, less on {int(t['c'])} (exact "
            f"sign test, one-sided, {p_text(t)}).")


def _shared_first_digit(swap):
    """How many swap rows pair a problem with a source of the same first digit (0 wherever
    problems.derangement could avoid it, as it does since its repair step)."""
    return int(sum(problems.first_digit(a) == problems.first_digit(b)
                   for a, b in zip(swap.answer, swap.source_answer)))


def first_digit_sentence(frame, controls, tests):
    """top1_src / top1_own with intervals over the swap pairs, and the pooled p_share shift."""
    r = {c: condition_rates(frame, c) for c in ("z", "zperp", "full")}
    z = r["z"]
    if not z["top1_src"]["n"]:
        return "The first-digit measures (top1, p_share) are not measured with the cot template."
    t = get_test(tests, "z top1_src vs random")
    swap = rows_of(frame, "z", -1, "swap")
    swap = swap[swap.top1_src.notna()]
    neither = int((~swap.top1_src.astype(bool) & ~swap.top1_own.astype(bool)).sum())
    shared = _shared_first_digit(swap)
    text = (f"With another problem's Chinese prompt as the source, the first-digit argmax became "
            f"the source's first digit under Z on {rate_text(z['top1_src'], 'swap pair')}, stayed "
            f"the problem's own on {z['top1_own']['count']} and was neither on {neither}"
            + (f" ({shared} of the swap pairs' sources start with the problem's own first digit, "
               f"so an unmoved digit counts as the source's there too: top1_src over-counts by "
               f"up to {shared} in every condition, the draws included; runs paired since "
               f"problems.derangement repairs such pairs have none where a pairing avoids them)" if shared else "")
            + "; under "
            f"full replacement the source's on {rate_text(r['full']['top1_src'], 'swap pair')}, "
            f"under Z⊥ on {r['zperp']['top1_src']['count']}; random Z "
            + (f"{num(t['min'])} to {num(t['max'])}, rank {p_text(t)}" if t is not None
               else NO_DRAWS)
            + _tie_words(z["top1_src"], controls)
            + f". p_share = p_src / (p_src + p_own) over the two first digits moved by "
            f"{num(z['dp_share'], signed=True)} under Z and "
            f"{num(r['full']['dp_share'], signed=True)} under full replacement (mean shift over the {plural(z['n_swap'], 'swap pair')}).")
    return text


def attention_reached(tests):
    """Whether the patch demonstrably moved the reading layer's attention more than random
    subspaces of Z's size do (the rank test on attn_tv_all, one-sided, at its raw p: it decides
    how a null is read, it is not a finding of its own); None when not measured."""
    t = get_test(tests, "z attn_tv_all vs random")
    return None if t is None or pd.isna(t["p"]) else bool(t["p"] <= ALPHA)


def attention_sentence(r, controls, tests, layer, site):
    """Z's own positive control: how far the patch moved the attention of the layer reading the
    patched stream (the basis layer at --site input), against random subspaces, en and noop; and
    what that says about reading a null."""
    z = r["z"]
    if pd.isna(z.get("attn_tv_all", math.nan)):
        return ("The patch's effect on the attention of the layer that reads it was not measured "
                "(a run from before the readout): a null here cannot be told from an instrument "
                "that never reached Z's heads.")
    read = layer if site == "input" else layer + 1
    whose = (f"layer {read}'s attention (the basis layer, whose query-key kernels Z is built from)"
             if site == "input" else f"layer {read}'s attention (the first layer to read a patch "
             f"at the output of layer {layer}; the basis layer's own attention cannot see it)")
    t_all = get_test(tests, "z attn_tv_all vs random")
    t_last = get_test(tests, "z attn_tv_last vs random")
    en = get_test(tests, "z vs en attention")
    parts = [f"Patched at {site_text(site, layer)}, Z moved {whose} by a total variation of "
             f"{num(z['attn_tv_last'])} at the last prompt position and {num(z['attn_tv_all'])} "
             f"averaged over all positions (mean over heads and kept problems; noop "
             f"{num(r['noop']['attn_tv_all'])}, the floor)"]
    if t_all is not None:
        parts.append(f"random subspaces of its size {num(t_all['min'])} to {num(t_all['max'])} "
                     f"over all positions (rank {p_text(t_all)}), "
                     f"{num(t_last['min'])} to {num(t_last['max'])} at the last position "
                     f"(rank {p_text(t_last)})" if t_last is not None else "")
    if "en" in r and en is not None:
        parts.append(f"en {num(r['en']['attn_tv_all'])} (Z moved it more on {int(en['b'])} "
                     f"problems, en on {int(en['c'])}, sign test {p_text(en)})")
    reached = attention_reached(tests)
    if reached is None:
        verdict = "without random draws it cannot say whether Z reached its heads more than chance."
    elif reached:
        verdict = ("the patch moved what Z is built from more than random subspaces do, so a null "
                   "on answers or language here is informative (within its power).")
    else:
        verdict = ("the patch did not move that attention more than random subspaces do: the "
                   "instrument did not show it reached Z's heads, and a null on answers or "
                   "language here is not evidence that Z is not causal.")
    return "; ".join(p for p in parts if p) + ": " + verdict


def verdict_paragraph(frame, controls, tests, v, variance, template, site="output"):
    """A paragraph generated from the numbers only: baseline, noise floor, the patch's effect on
    the reading layer's attention (Z's own positive control), the primary test and which control
    explains Z's effect, the other criteria, the first-digit and scored measures, the en control,
    patch size and variance. site: the run's --site."""
    r = {c: condition_rates(frame, c) for c in FIXED if (frame.condition == c).any()}
    text = [baseline_sentence(frame)]
    noop = r["noop"]
    drift = rows_of(frame, "noop", -1, "same").dlogp_ref.abs().max()
    text.append(f"The noop patch (each row's own states, through the same code path and batches) "
                f"changed {rate_text(noop['answer_change'], 'kept problem')} and moved log "
                f"p(reference) by at most {num(drift)} nats: the noise floor.")
    text.append(attention_sentence(r, controls, tests, int(frame.layer.iloc[0]), site))
    head = "Primary test" if v["primary"] else "Z changes answers (secondary)"
    text.append(f"{head}: {v['z_changes_answers_reason']}.")
    if v["explained_by"]:
        names = {"random": "random subspaces of Z's size", "en": "the en control (a mean "
                 "written into Z without Chinese content)", "noop": "the noop patch"}
        text.append("Z's answer changes are explained by " + " and ".join(
            names[c] for c in v["explained_by"].split(", ")) + ", which change as many answers "
                    "or shift log p(reference) as much.")
    plan = get_test(tests, "z vs zperp answers")
    if plan is not None:
        text.append(f"The plan's partial criterion, Z changes answers more than Z⊥ (Z alone "
                    f"{int(plan['b'])}, Z⊥ alone {int(plan['c'])}, one-sided McNemar "
                    f"{p_text(plan)}): "
                    f"{'met' if v['plan_partial'] else 'not met'}.")
    text += [v[f"{name}_reason"] + "." for name in
             ("z_keeps_language", "zperp_changes_language", "zperp_keeps_answers")]
    text.append(to_chinese_sentence(r, controls))
    text.append(language_margin_sentence(tests))
    text.append(first_digit_sentence(frame, controls, tests))
    if r["z"]["transfer"]["n"]:
        text.append(f"Decoded, the output took the source problem's answer on "
                    f"{rate_text(r['z']['transfer'], 'swap pair')} under Z, "
                    f"{r['zperp']['transfer']['count']} under Z⊥, "
                    f"{r['full']['transfer']['count']} under full replacement, random Z "
                    f"{band_text(controls, 'rand_z', 'transfer')}.")
    what = "log p(reference) at the readout" if template == "cot" else "log p(reference)"
    for name, c, metric, said in (
            ("Z", "z", "dlogp_ref", what + " (same-problem source)"),
            ("Z", "z", "dld_swap", "ld (own minus source answer, swap source)"),
            ("Z", "z", "dlang_ref", "the language margin after the answer"),
            ("Z⊥", "zperp", "dlang_ref", "the language margin")):
        text.append(scored_sentence(tests, name, c, metric, said, r[c][metric]))
    if "en" in r:
        text.append(f"Writing the English prompt's own question mean into Z (en) changed "
                    f"{rate_text(r['en']['answer_change'], 'kept problem')} and shifted {what} by "
                    f"{num(r['en']['dlogp_ref'], signed=True)} nats (Z: "
                    f"{num(r['z']['dlogp_ref'], signed=True)}).")
    text.append(patch_size_sentence(r, controls))
    text.append(variance_sentence(variance, frame.layer.iloc[0], frame.k.iloc[0]))
    failed = v["failed"].replace("_", " ") if v["failed"] else "none"
    text.append(f"**Verdict: {v['verdict']}** (criteria not met: {failed}).")
    return " ".join(t for t in text if t)


def patch_size_sentence(r, controls):
    sizes = ", ".join(f"{LABEL[c]} {num(r[c]['patch_size'])}" for c in ("z", "zperp", "full", "en")
                      if c in r)
    rand = controls[controls.condition == "rand_z"].patch_size
    text = f"Mean patch size |P_S(s − h)| over the patched positions: {sizes}" + (
        f", random Z {num(rand.mean())} (mean over {plural(len(rand), 'draw')})." if len(rand)
        else ".")
    if len(rand) and r["z"]["patch_size"] > rand.max():
        text += (f" Z's patch moves the state further than every random draw's (largest "
                 f"{num(rand.max())}): part of any Z effect over the random band may be the size "
                 f"of the patch, not its direction.")
    return text


def variance_sentence(variance, layer, k):
    if variance is None or not len(variance):
        return ""
    v = variance[(variance.layer == layer) & (variance.k == k)]
    z = v[v.basis == "z"].share
    parts = [f"{kind} random {k}-dim subspaces {num(100 * v[v.basis == kind].share.mean())}% "
             f"(range {num(100 * v[v.basis == kind].share.min())}-"
             f"{num(100 * v[v.basis == kind].share.max())}%)"
             for kind in ("uniform", "matched") if (v.basis == kind).any()]
    return (f"Z holds {num(100 * z.iloc[0])}% of the layer's activation variance (prompt tokens, "
            f"position 0 left out); " + " and ".join(parts) + ".") if len(z) else ""


def _average(value, n, noun, qualifier=""):
    """'+1.2 on the 40 English baselines' / 'not measured (no Chinese baseline)'."""
    if not n:
        return f"{NOT_MEASURED} (no {noun}{qualifier})"
    return f"{num(value, signed=True)} on the {plural(n, noun)}{qualifier}"


def checks_markdown(checks, template):
    at = ("at the unpatched run's own 'The answer is'" if template == "cot"
          else "right after the prompt")
    groups = checks["n_correct"] and checks["n_missed"]
    higher = checks["logp_ref_correct"] > checks["logp_ref_missed"]
    lines = [f"Scored {at}. Unpatched, log p(reference) averages "
             + _average(checks["logp_ref_correct"], checks["n_correct"], "problem",
                        " answered correctly")
             + f" and {_average(checks['logp_ref_missed'], checks['n_missed'], 'problem', ' missed')} ("
             + ("cannot be compared: one of the groups is empty" if not groups else
                "higher where the model knows the answer, as a measure of it must be" if higher else
                "NOT higher where the model knows the answer: read the scored numbers with suspicion")
             + "). The language margin log P(Latin word) − log P(Chinese word) after the "
             f"reference answer averages "
             f"{_average(checks['lang_ref_english'], checks['n_english'], 'English baseline')}"
             + (f" (positive on {checks['lang_ref_english_positive']})" if checks["n_english"] else "")
             + f" and {_average(checks['lang_ref_chinese'], checks['n_chinese'], 'Chinese baseline')}."]
    if checks["n_unscored"]:
        lines.append(f"{checks['n_unscored']} of {checks['n']} unpatched outputs have no "
                     f"'The answer is': their rows are not scored and left out of the means.")
    return lines


# ----------------------------------------------------------------------------------------------
# SUMMARY.md and the patching table

def _cell(text, width=60):
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def render_patching_table(frame):
    """The plan's table for one configuration (same-problem source), as markdown lines."""
    lines = ["| problem | original (en) | Z-patched (en←zh) | Z⊥-patched (en←zh) | full-patched |",
             "|---|---|---|---|---|"]
    cells = {c: rows_of(frame, c, -1, "same").set_index("problem_id")
             for c in ("none", "z", "zperp", "full")}
    for pid in cells["none"].index:
        row = [pid]
        for c in ("none", "z", "zperp", "full"):
            r = cells[c].loc[pid]
            answer = "truncated" if r.truncated else "no number" if pd.isna(r.answer) else \
                problems.format_number(r.answer)
            row.append(f"{_cell(r.output)} **[{answer}, {r.language}]**")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def conditions_markdown(frame):
    """One line per fixed condition: rates with intervals, truncation, scored shifts, patch size."""
    lines = ["| condition | answers changed (kept problems) | language changed (English baselines) "
             "| top1 = source digit (swap pairs) | transferred (swap pairs) | truncated | Δ log p(ref) "
             "| Δ ld (same) | Δ ld (swap) | Δ p_share (swap) | Δ language margin | patch size |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in FIXED:
        if not (frame.condition == c).any():
            continue
        r = condition_rates(frame, c)
        cells = [rate_text(r[m], "row") if r[m]["n"] else NOT_MEASURED for m in
                 ("answer_change", "language_change", "top1_src", "transfer")]
        cells += [f"{r['truncated']['count']} of {r['truncated']['n']}"]
        cells += [num(r[m], signed=True) for m in ("dlogp_ref", "dld_same", "dld_swap", "dp_share",
                                                  "dlang_ref")] + [num(r["patch_size"])]
        lines.append(f"| {LABEL[c]} | " + " | ".join(cells) + " |")
    return lines


def raw_reason(t):
    """Why a test is read at its raw p: '' (the primary's own row), 'raw: control', 'raw: declared',
    'raw: part of <label>'."""
    part = getattr(t, "part_of", "") or ""
    if t.primary or not part or pd.isna(part):
        return ""
    return f"raw: {part}" if part in ("control", "declared") else f"raw: part of {part}"


def tests_markdown(tests):
    """The tests table; the Holm column names why a row has no Holm p (read at its raw p)."""
    lines = ["| test | null | alternative | value | draws or pairs | null range | p | Holm p |",
             "|---|---|---|---|---|---|---|---|"]
    for t in tests.itertuples():
        spread = (f"{num(t.min)} to {num(t.max)}" if not pd.isna(getattr(t, "min", math.nan))
                  else f"{int(t.b)} vs {int(t.c)}" if not pd.isna(getattr(t, "b", math.nan)) else "")
        size = t.draws if not pd.isna(getattr(t, "draws", math.nan)) else getattr(t, "n", math.nan)
        lines.append(f"| {t.test}{' (primary)' if t.primary else ''} | {t.null} | "
                     f"{t.alternative} | {'' if pd.isna(t.value) else num(t.value)} | "
                     f"{'' if pd.isna(size) else int(size)} | {spread} | {num(t.p)} | "
                     f"{raw_reason(t) if pd.isna(t.p_holm) else num(t.p_holm)} |")
    return lines


def write_summary(out_dir, rows, tables, checks, variance, config):
    """SUMMARY.md and patching_table.md, both generated from the CSV frames."""
    metrics, controls, draws, tests, verdicts = tables
    args, model = config.get("args", {}), config.get("model", {})
    template = args.get("template", "direct")
    primary = primary_of(rows, config)
    head = ["# Experiment A: activation patching of Z", "",
            f"Model `{model.get('name_or_path')}` ({model.get('dtype')}, {model.get('device_name')}), "
            f"{plural(rows.problem_id.nunique(), 'problem')}, template `{template}`, site "
            f"`{args.get('site')}`, skip first position: {args.get('skip_first')}, random "
            f"subspaces: `{args.get('random_kind')}`, command `{config.get('command')}`, git "
            f"{config.get('git_commit')}. {selection_sentence(config)} Every number and sentence "
            f"here is generated from the CSVs in this folder; rebuild with `python "
            f"exp_a_patching.py --replot --out <this folder>`.", "",
            f"Primary test (config.json): "
            f"{primary_description(primary, run_site(config), config.get('layers_resolved'))}. "
            f"Every other test is secondary, its p Holm-adjusted over tests.csv, but for the "
            f"declared ones. {prereg.status_sentence(config, 'A')}", "",
            "## Checks on the measure", ""] + checks_markdown(checks, template) + [
            "", "## Overview", "",
            "| layer | k | positions | source | Z answers changed | random Z | en | p (Z changes "
            "answers) | Z top1 = source digit | Z language changed | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    body, table = [], ["# Experiment A: the plan's patching tables", ""]
    for config_key, frame in rows.groupby(CONFIG, sort=True):
        c, t = (select_config(f, config_key) for f in (controls, tests))
        v = select_config(verdicts, config_key).iloc[0]
        r = {name: condition_rates(frame, name) for name in ("z", "en")
             if (frame.condition == name).any()}
        head.append("| {} | {} | {} | {} | ".format(*config_key) + " | ".join([
            rate_text(r["z"]["answer_change"], "problem"), band_text(c, "rand_z", "answer_change"),
            rate_text(r["en"]["answer_change"], "problem") if "en" in r else "not run",
            p_text(get_test(t, "z changes answers")), rate_text(r["z"]["top1_src"], "swap pair"),
            rate_text(r["z"]["language_change"], "English baseline"),
            v["verdict"] + (" (primary)" if v["primary"] else "")]) + " |")
        name = "layer {} · k {} · positions {} · source {}".format(*config_key) + \
            f" · {site_text(run_site(config), config_key[0])}"
        body += [f"## {name}", "", verdict_paragraph(frame, c, t, v, variance, template,
                                                     run_site(config)), "",
                 "### Conditions (95% Wilson intervals; scored shifts in nats)", ""]
        body += conditions_markdown(frame) + ["", "### Tests", ""] + tests_markdown(t)
        body += ["", "### Patching table (same-problem source; [answer, language])", ""]
        body += render_patching_table(frame) + [""]
        table += [f"## {name}", ""] + render_patching_table(frame) + [""]
    Path(out_dir, "SUMMARY.md").write_text("\n".join(head + [""] + body), encoding="utf-8")
    Path(out_dir, "patching_table.md").write_text("\n".join(table), encoding="utf-8")
