"""Experiment A: sources, patches, scoring positions, the noise floor, the language measured on
every row, the primary test and the verdict against en, and the script end to end (smoke command,
resume, --replot, --n-random 0, too few kept pairs, bad input) on the tiny model."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import common
from zcausal import bank, decoding, patching as P, prereg, problems, runs, transport
import exp_a_patching as A
from zcausal.summaries import exp_a as S, exp_a_text
from helpers import smoke_argv

SMOKE = smoke_argv("A")  # the README's smoke command


FAST = ["--limit", "2", "--max-new-tokens", "4"]  # for tests that run the script several times


def _run(tmp, extra=(), name="exp_a"):
    out, figures = tmp / name, tmp / "figures"
    A.main(A.parse_args(SMOKE + list(extra) + ["--out", str(out), "--figures", str(figures)]))
    return out, figures


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run shared by the tests that only read its outputs."""
    return _run(tmp_path_factory.mktemp("smoke"))


def _setup(tiny, extra=()):
    """(model, tokenizer, args, pairs, template, swap_of, ctx) for layer 2 of the tiny model."""
    model, tok = tiny
    args = A.parse_args(["--model", "tiny-random", "--layer", "2", "--k", "4", "--limit", "4",
                         "--n-random", "1", "--n-random-logprob", "1"] + list(extra))
    pairs, template = A.validate(args)
    swap_of = problems.derangement([p["answer"] for p in pairs], 0)
    ctx = A.prepare_layer(model, tok, pairs, template, 2, args, swap_of)
    return model, tok, args, pairs, template, swap_of, ctx


def _by_job(results):
    return {r["job"]: r for r in results}


# ----------------------------------------------------------------------------------------------
# Sources and patches

def test_derangement_has_no_fixed_points_and_avoids_equal_answers():
    answers = [1, 2, 3, 4, 5, 5, 7, 8, 9, 10]
    perm = problems.derangement(answers, seed=3)
    assert sorted(perm) == list(range(10))
    assert all(j != i for i, j in enumerate(perm))
    assert all(answers[i] != answers[j] for i, j in enumerate(perm))
    assert perm == problems.derangement(answers, seed=3) and perm != problems.derangement(answers, seed=4)
    assert problems.derangement([7, 7], seed=0) == [1, 0]
    answers = [12, 15, 23, 29, 31, 38, 47, 41]  # swap partners with a different first digit
    perm = problems.derangement(answers, 0, key=problems.first_digit)
    assert all(problems.first_digit(answers[i]) != problems.first_digit(answers[j])
               for i, j in enumerate(perm))


def test_derangement_avoids_a_shared_first_digit_at_the_size_of_a_real_run():
    """79 answers whose first digits follow the bank's (many 1s, 2s and 3s): 2,000 random
    permutations alone left 5 partners with the own first digit in the confirmatory A run on the
    0.5B model; the repaired derangement leaves none, has no fixed point and is seeded."""
    answers = [p["answer"] for p in bank.generate_bank(1, seed=0)[900:979]]
    digits = [problems.first_digit(a) for a in answers]
    assert max(digits.count(d) for d in set(digits)) <= len(answers) / 2
    perm = problems.derangement(answers, 0, key=problems.first_digit)
    assert sorted(perm) == list(range(79)) and all(j != i for i, j in enumerate(perm))
    assert all(digits[i] != digits[j] for i, j in enumerate(perm))
    assert perm == problems.derangement(answers, 0, key=problems.first_digit)
    # one digit on more than half the answers: six 1s have two other targets, four clashes at least
    answers = [1, 12, 13, 14, 15, 16, 27, 38]
    perm = problems.derangement(answers, 0, key=problems.first_digit)
    assert sum(str(answers[i])[0] == str(answers[j])[0] for i, j in enumerate(perm)) == 4


def test_ot_plan_marginals_and_identity():
    gen = torch.Generator().manual_seed(0)
    en, zh = torch.randn(7, 16, generator=gen), torch.randn(11, 16, generator=gen)
    source, plan = transport.ot_source(en, zh, scale=torch.rand(16, generator=gen) + 0.5)
    assert source.shape == (7, 16)
    np.testing.assert_allclose(plan.sum(1), np.full(7, 1 / 7), atol=1e-12)
    np.testing.assert_allclose(plan.sum(0), np.full(11, 1 / 11), atol=1e-12)
    same_source, same_plan = transport.ot_source(en, en)
    np.testing.assert_allclose(same_plan, np.eye(7) / 7, atol=1e-12)
    assert torch.equal(same_source, en)


def _logits(model, ctx, batch, args, patch=None):
    rows = decoding.select_prefill(ctx.prefill, [j.problem for j in batch])
    patch = patch or A.make_patch(batch, ctx, rows, args)
    out = decoding.generate_and_score(model, rows["input_ids"], rows["attention_mask"], 3, patch,
                                      return_logits=True, prefill=rows)
    return out["logits"]


@pytest.mark.parametrize("source", ["last", "last:3", "ot", "mean"])
def test_own_prompt_as_source_leaves_logits_unchanged(tiny, source):
    """The English prompt patched with its own states (or own question mean written into the
    mean's place is not a no-op, so mean is checked through noop) gives the unpatched logits."""
    model, tok, args, pairs, template, swap_of, ctx = _setup(tiny, ["--source", source])
    ctx.zh_tokens, ctx.zh_means = ctx.en_tokens, ctx.en_means  # the source is the row's own prompt
    scale = transport.robust_scale(ctx.en_tokens)
    ctx.ot_sources = {(i, i): transport.ot_source(ctx.en_tokens[i], ctx.en_tokens[i], scale)[0] for i in range(4)}
    ctx.device = P.device_tables(ctx, "cpu")  # make_patch gathers from these
    none = [A.job_key(i, 2, "none", 0, "-", "-", i, -1) for i in range(4)]
    base = _logits(model, ctx, none, args)
    conditions = ["noop"] if source == "mean" else ["z", "zperp", "full", "rand_z"]
    for condition in conditions:
        jobs = [A.job_key(i, 2, condition, 4, "prompt", source, i, 0 if "rand" in condition else -1)
                for i in range(4)]
        torch.testing.assert_close(_logits(model, ctx, jobs, args), base, atol=1e-5, rtol=1e-5)


def test_last_source_patches_only_the_last_positions_and_k_d_equals_full(tiny):
    model, tok, args, pairs, template, swap_of, ctx = _setup(tiny, ["--source", "last:2"])
    d = common.hidden_size(model)
    ctx.bases[("rand", d, 0)] = common.random_basis(d, d, 0)  # a k = d subspace: all of R^d
    ctx.device = P.device_tables(ctx, "cpu")
    jobs = [A.job_key(i, 2, "rand_z", d, "prompt", "last:2", swap_of[i], 0) for i in range(4)]
    full = [A.job_key(i, 2, "full", 4, "prompt", "last:2", swap_of[i], -1) for i in range(4)]
    torch.testing.assert_close(_logits(model, ctx, jobs, args), _logits(model, ctx, full, args),
                               atol=1e-4, rtol=1e-4)
    rows = decoding.select_prefill(ctx.prefill, [0, 1])
    patch = A.make_patch(full[:2], ctx, rows, args)
    assert patch.prompt_mask.sum(1).tolist() == [2, 2] and patch.prompt_mask[:, -2:].all()
    patch.phase = "prompt"
    moved = (patch(rows["hidden"]) - rows["hidden"]).norm(dim=-1)
    assert (moved[:, :-2] == 0).all() and (moved[:, -2:] > 0).all()
    # The last position is the space token that predicts the answer's first digit (direct template).
    assert tok.decode([int(rows["input_ids"][0, -1])]) == " "


def test_skip_first_leaves_the_sink_position_alone(tiny):
    model, tok, args, pairs, template, swap_of, ctx = _setup(tiny, ["--skip-first"])
    rows = decoding.select_prefill(ctx.prefill, [0, 1, 2])
    jobs = [A.job_key(i, 2, "full", 4, "prompt", "mean", i, -1) for i in range(3)]
    patch = A.make_patch(jobs, ctx, rows, args)
    patch.phase = "prompt"
    moved = (patch(rows["hidden"]) - rows["hidden"]).norm(dim=-1)
    first = rows["attention_mask"].float().argmax(1)
    assert (moved[torch.arange(3), first] == 0).all()
    sizes = A.patch_sizes(patch, rows["hidden"], rows["attention_mask"])
    assert (sizes > 0).all()


def test_site_input_equals_site_output_one_layer_below(tiny):
    model, tok = tiny
    ids, mask, _ = common.tokenize_left_padded(tok, ["Question: Tom buys 3 apples. Answer:",
                                                     "问题：小明有3个苹果。答案："])
    basis = common.random_basis(64, 6, 0)[None].repeat(2, 1, 1)
    source = torch.randn(2, 64)

    def patch(layer, site):
        return common.SubspacePatch(layer=layer, basis=basis, complement=torch.tensor([False, True]),
                                    source_mean=source, patch_generated=torch.tensor([False, True]),
                                    site=site)
    a = decoding.generate_and_score(model, ids, mask, 4, patch(2, "input"), return_logits=True)
    b = decoding.generate_and_score(model, ids, mask, 4, patch(1, "output"), return_logits=True)
    assert torch.equal(a["logits"], b["logits"])
    # Layer 0's input is the embeddings (stream -1): the shared prefill works from there too.
    whole = decoding.generate_and_score(model, ids, mask, 4, patch(0, "input"), return_logits=True)
    rows = decoding.select_prefill(decoding.shared_prefill(model, ids, mask, -1), [0, 1])
    fast = decoding.generate_and_score(model, rows["input_ids"], rows["attention_mask"], 4,
                                       patch(0, "input"), return_logits=True, prefill=rows)
    torch.testing.assert_close(fast["logits"], whole["logits"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(whole["logits"], a["logits"])


def test_site_input_rows_equal_site_output_rows_one_layer_below(tmp_path):
    """End to end: every condition that does not depend on Z's layer gives the same rows."""
    a, _ = _run(tmp_path, FAST + ["--layer", "2", "--site", "input"], "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")  # an earlier run in the folder: replaced
    (tmp_path / "b" / "logprob_tests.csv").write_text("stale")
    b, _ = _run(tmp_path, FAST + ["--layer", "1", "--site", "output", "--overwrite"], "b")
    assert not (b / "logprob_tests.csv").exists()
    rows = [S.load_table(out / "rows.csv") for out in (a, b)]
    keep = ["none", "noop", "full", "rand_z", "rand_zperp"]
    rows = [r[r.condition.isin(keep)].drop(columns="layer").reset_index(drop=True) for r in rows]
    pd.testing.assert_frame_equal(rows[0], rows[1])


# ----------------------------------------------------------------------------------------------
# Scoring positions and the noise floor

def _full_forward_logp(model, ids, answer, hook=None):
    full = torch.tensor([ids + answer])
    with torch.no_grad():
        if hook is None:
            logits = model(full).logits
        else:
            # --site input at layer 2 (the default): the stream entering layer 2 = layer 1's output
            with common.layer_output_hook(model, 1, hook):
                logits = model(full).logits
    logp = torch.log_softmax(logits[0].float(), -1)
    return sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(answer))


def test_direct_logp_ref_is_log_p_of_the_answer_digits_after_the_prompt(tiny):
    model, tok, args, pairs, template, swap_of, ctx = _setup(tiny)
    answer_ids = A.answer_token_ids(tok, pairs)
    jobs = [A.job_key(i, 2, c, 4, "prompt", "mean", i, -1) for i in range(4) for c in ("none", "z")]
    results = _by_job(A.run_batch(model, tok, ctx, jobs, args, True, (answer_ids, swap_of, None)))
    texts, _ = A.prompt_texts(pairs, template, "en")
    v = ctx.bases[("z", 4, -1)]
    for job in jobs:
        ids = tok(texts[job.problem], add_special_tokens=False)["input_ids"]
        n, s = len(ids), ctx.zh_means[job.problem]

        def z_patch(hidden, n=n, s=s):  # prompt positions only, as the decoding loop does
            head = hidden[:, :n] + ((s - hidden[:, :n]) @ v.T) @ v
            return torch.cat([head, hidden[:, n:]], 1)
        hook = z_patch if job.condition == "z" else None
        want_ref = _full_forward_logp(model, ids, answer_ids[job.problem][""], hook)
        want_swap = _full_forward_logp(model, ids, answer_ids[swap_of[job.problem]][""], hook)
        assert results[job]["logp_ref"] == pytest.approx(want_ref, abs=1e-3)
        assert results[job]["logp_swap"] == pytest.approx(want_swap, abs=1e-3)


def test_cot_logp_readout_is_scored_after_the_teacher_forced_readout(tiny):
    model, tok, args, pairs, template, swap_of, ctx = _setup(tiny, ["--template", "cot"])
    answer_ids = A.answer_token_ids(tok, pairs)
    prefix = tok(" 3 + 4 = 7. The answer is", add_special_tokens=False)["input_ids"]
    readouts = {0: (prefix, " "), 1: (prefix, " "), 2: None, 3: (prefix, " ")}
    jobs = [A.job_key(i, -1, "none", 0, "-", "-", i, -1) for i in range(4)]
    results = _by_job(A.run_batch(model, tok, ctx, jobs, args, False, (answer_ids, swap_of, readouts)))
    texts, _ = A.prompt_texts(pairs, template, "en")
    for job in jobs:
        if readouts[job.problem] is None:  # no "The answer is": not scored
            assert np.isnan(results[job]["logp_ref"])
            continue
        ids = tok(texts[job.problem], add_special_tokens=False)["input_ids"] + prefix
        want = _full_forward_logp(model, ids, answer_ids[job.problem][" "])
        assert results[job]["logp_ref"] == pytest.approx(want, abs=1e-3)


def test_noop_rows_decode_exactly_like_none_rows_in_the_same_batches(tiny):
    model, tok, args, pairs, template, swap_of, ctx = _setup(tiny, ["--source", "mean", "ot"])
    answer_ids = A.answer_token_ids(tok, pairs)
    jobs = [A.job_key(i, 2, c, 4, "prompt", src, j, 0 if "rand" in c else -1)
            for i in range(4) for c, src, j in (("none", "-", i), ("noop", "-", i),
                                                ("z", "ot", swap_of[i]), ("rand_z", "mean", i))]
    results = _by_job(A.run_batch(model, tok, ctx, jobs, args, True, (answer_ids, swap_of, None)))
    for i in range(4):
        none = results[A.job_key(i, -1, "none", 0, "-", "-", i, -1)]
        noop = results[A.job_key(i, 2, "noop", 0, "-", "-", i, -1)]
        for field in ("output", "tokens", "logp_ref", "logp_swap", "first_ref", "first_swap",
                      "top1", "lang_ref", "patch_size", "attn_tv_last", "attn_tv_all"):
            assert noop[field] == none[field], field
        assert noop["attn_tv_all"] == 0 and noop["attn_tv_last"] == 0  # the noise floor is 0


def test_every_direct_row_carries_its_language_and_first_digit_scores(tiny):
    """Language measured on a direct-template row: the decoded output ends at the word after the
    number, its language is that of that word, and the teacher-forced language margin after the
    reference answer, the first digits' log p and the argmax are on every row."""
    model, tok, args, pairs, template, swap_of, ctx = _setup(tiny)
    answer_ids = A.answer_token_ids(tok, pairs)
    jobs = [A.job_key(i, 2, c, 4, "prompt", "mean", i, -1) for i in range(4) for c in ("none", "z")]
    results = A.run_batch(model, tok, ctx, jobs, args, True, (answer_ids, swap_of, None))
    for r in results:
        assert r["language"] == problems.classify_language(r["output"])
        end, _ = problems.answer_end(tok, json.loads(r["tokens"]))
        assert end in (None, len(json.loads(r["tokens"])))  # cut where the answer ends
        assert all(np.isfinite(r[f]) for f in ("lang_ref", "first_ref", "first_swap", "top1"))
        assert r["first_ref"] >= r["logp_ref"] - 1e-4  # the first digit is part of the answer


def test_a_swap_source_with_the_own_first_digit_is_named_and_never_gives_a_negative_count(
        smoke, tmp_path):
    """A run paired before problems.derangement's repair (the confirmatory 0.5B A: 5 of 79) has
    swap rows where top1_src and top1_own both hold; the summary counted 'neither' as n - src -
    own (-1 there). It counts it from the rows and says how many sources share the digit."""
    out = tmp_path / "copy"
    shutil.copytree(smoke[0], out)
    rows = S.load_table(out / "rows.csv")
    swap = rows.index[(rows.condition == "z") & (rows.draw == -1) & (rows.pair == "swap")]
    first = swap[0]
    rows.loc[first, "source_answer"] = rows.loc[first, "answer"]
    rows.loc[first, ["top1_src", "top1_own"]] = True
    runs.write_csv(rows, out / "rows.csv")
    S.summarize(out, tmp_path / "figures")
    summary = (out / "SUMMARY.md").read_text(encoding="utf-8")
    z = rows.loc[swap]
    neither = int((~z.top1_src.astype(bool) & ~z.top1_own.astype(bool)).sum())
    assert f"was neither on {neither} (1 of the swap pairs' sources start with the " \
           f"problem's own first digit" in summary
    assert "neither on -" not in summary


# ----------------------------------------------------------------------------------------------
# The script end to end

def test_readme_smoke_command_runs(tmp_path):
    """The README's command exactly, from a fresh folder (outputs under it)."""
    result = subprocess.run([sys.executable, str(runs.REPO / "exp_a_patching.py"), "--model",
                             "tiny-random", "--smoke"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "results" / "exp_a"
    for name in ("rows.csv", "SUMMARY.md", "verdicts.csv", "tests.csv", "config.json"):
        assert (out / name).is_file()
    assert sorted(p.name for p in (tmp_path / "figures").rglob("*.png")) == [
        "attention_shift.png", "change_rates.png", "logprob_shift.png", "transfer_rates.png"]
    # like B-E: the verdict and every file written, figures included
    assert "**Verdict: " in result.stdout and "Layer 2 · k 8" in result.stdout
    for path in (tmp_path / "figures").rglob("*.png"):
        assert f"wrote {path.relative_to(tmp_path)}" in result.stdout
    # --smoke's depth 0.5 is layer 2 of 4, not the plan's layer at this depth (3 of 4)
    summary = (out / "SUMMARY.md").read_text(encoding="utf-8")
    assert "Z at layer 2 (depth 0.50, layer 2 of 4; the plan's layer 32 of 36 at this depth, 3, " \
           "was not run)" in summary and "plan's layer 32 of 36 at this depth)" not in summary


def test_smoke_outputs(smoke):
    out, figures = smoke
    for name in ("rows.csv", "generations.csv", "scores.csv", "random_scores.csv", "variance.csv",
                 "metrics.csv", "controls.csv", "null_draws.csv", "tests.csv", "verdicts.csv",
                 "measure_checks.csv", "SUMMARY.md", "patching_table.md", "config.json",
                 "solved.csv"):
        assert (out / name).is_file(), name
    rows = S.load_table(out / "rows.csv")
    # 4 problems x (none, noop, en + 2 x (z, zperp, full) + 2 draws x 2 random x 2 pairs)
    assert len(rows) == 4 * (3 + 6 + 8)
    none, noop = (rows[rows.condition == c].reset_index(drop=True) for c in ("none", "noop"))
    for column in ("output", "answer", "logp_ref", "logp_swap", "truncated", "lang_ref", "top1"):
        pd.testing.assert_series_equal(none[column], noop[column])
    assert (none.dlogp_ref == 0).all() and not none.answer_changed.any()
    np.testing.assert_allclose(rows.ld, rows.logp_ref - rows.logp_swap)
    assert rows.lang_ref.notna().all() and rows.first_ref.notna().all()
    np.testing.assert_allclose(rows.p_share, 1 / (1 + np.exp(rows.first_ref - rows.first_swap)))
    swap = rows[rows.pair == "swap"]
    assert not (swap.top1_own & swap.top1_src).any()  # the partner's first digit differs
    truncated = rows[rows.truncated]
    assert truncated.answer.isna().all() and (truncated.outcome == "truncated").all()
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["depth"] == [0.5] and config["layers_resolved"]["layer"] == [2]
    assert config["args"]["layer"] == [2] and config["args"]["max_new_tokens"] == 10
    assert config["args"]["prompts"] == "bank" and config["solved"]["tried"] == 4
    assert config["solved"]["kept"] == 4 and config["solved"]["mode"] == "off"
    assert config["primary_test"]["layer"] == 2 and config["primary_test"]["k"] == 8
    assert "intersection-union" in config["primary_test"]["description"]
    assert config["preregistration"]["sha256"] == prereg.sha256()  # the declaration in force
    variance = S.load_table(out / "variance.csv")
    assert set(variance.basis) == {"z", "uniform", "matched"} and variance.share.between(0, 1).all()
    null = S.load_table(out / "random_scores.csv")
    # problems x (random Z: 4 scored draws + random Z-perp: its 2 decoded draws) x pairs
    assert len(null) == 4 * (4 + 2) * 2
    assert set(null[null.condition == "rand_zperp"].draw) == {0, 1}
    decoded = rows[(rows.condition == "rand_z") & (rows.draw == 0) & (rows.pair == "same")]
    merged = decoded.merge(null[(null.condition == "rand_z") & (null.draw == 0) & (null.pair == "same")],
                           on=["problem_id", "k"])
    for column in ("logp_ref", "lang_ref", "p_share"):
        np.testing.assert_allclose(merged[f"{column}_x"], merged[f"{column}_y"])
    tests = S.load_table(out / "tests.csv")
    assert {"answer_change", "transfer", "dlogp_ref", "dld_swap", "top1_src", "dp_share",
            "dlang_ref"} <= set(tests.metric)
    scored = tests[tests.null == "scored draws"]
    assert (scored[scored.condition == "z"].draws == 4).all()  # Z: every scored draw
    assert (scored[scored.condition == "zperp"].draws == 2).all()  # Z-perp: its decoded draws
    assert tests.primary.sum() == 1 and tests[tests.primary].test.iloc[0] == "z changes answers"
    declared = tests[tests.part_of == "declared"]  # the preregistration's: read at its raw p
    assert list(declared.test) == ["z vs en dlang_ref"] and declared.p_holm.isna().all()
    assert {"language_change", "to_zh"} <= set(S.load_table(out / "controls.csv").columns)
    secondary = tests[~tests.primary & (tests.part_of == "")]
    assert secondary.p_holm.notna().all() and (secondary.p_holm >= secondary.p - 1e-12).all()
    control = tests[tests.part_of == "control"]  # the attention readout: raw p, outside Holm
    assert {"z attn_tv_last vs random", "z attn_tv_all vs random", "z vs en attention"} <= \
        set(control.test) and control.p_holm.isna().all()
    assert not set(secondary.metric) & {"attn_tv_last", "attn_tv_all"}
    summary = (out / "SUMMARY.md").read_text()
    assert "Verdict:" in summary and "not measured" in summary and "noise floor" in summary
    assert "4 pairs tried, 4 kept" in summary and "Primary test (config.json)" in summary
    assert "Exploratory run" in summary  # a smoke run is not the declared run
    assert not re.search(r"\bnan\b", summary) and " - " not in summary
    for name in ("change_rates", "transfer_rates", "logprob_shift"):
        assert (runs.figure_dir(out, figures) / f"{name}.png").is_file()


def test_smoke_reads_the_basis_layers_attention_at_the_input_site(smoke):
    """Z's own positive control on every row: the patch at the input of the basis layer (the
    default site) moves that layer's attention; none and noop rows move it by exactly 0; the
    random draws, scored and decoded, carry the same readout; the summary reads it against them."""
    out, _ = smoke
    rows = S.load_table(out / "rows.csv")
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["site"] == "input" and config["primary_test"]["site"] == "input"
    for column in ("attn_tv_last", "attn_tv_all"):
        assert rows[column].between(0, 1).all()
        assert (rows[rows.condition.isin(["none", "noop"])][column] == 0).all()
    moved = rows[rows.condition.isin(["z", "full", "rand_z"]) & (rows.patch_size > 0)]
    assert len(moved) and (moved.attn_tv_all > 0).all()
    null = S.load_table(out / "random_scores.csv")
    assert null.attn_tv_all.notna().all() and null.attn_tv_last.between(0, 1).all()
    tests = S.load_table(out / "tests.csv")
    assert {"z attn_tv_all vs random", "z attn_tv_last vs random",
            "z vs en attention"} <= set(tests.test)
    summary = (out / "SUMMARY.md").read_text()
    assert "the input of layer 2" in summary and "total variation" in summary
    assert "a null on answers or language here is" in summary
    assert (runs.figure_dir(out, smoke[1]) / "attention_shift.png").is_file()


def test_headline_is_the_primary_tests_verdict_value_and_lead(smoke):
    out, _ = smoke
    cell = S.headline(out)
    assert set(cell) == {"verdict", "value", "lead"}
    verdicts = S.load_table(out / "verdicts.csv")
    assert cell["verdict"] == verdicts[verdicts.primary].verdict.iloc[0]
    assert "answers changed by Z vs random" in cell["value"] and "[" in cell["value"]
    assert 1 <= len(cell["lead"]) <= 3 and all(isinstance(line, str) for line in cell["lead"])
    assert "4 pairs tried, 4 kept" in cell["lead"][0]


def test_replot_rebuilds_without_a_model_and_refuses_a_partial_rows_csv(smoke, tmp_path,
                                                                        monkeypatch, capsys):
    out = tmp_path / "copy"
    shutil.copytree(smoke[0], out)

    def no_model(*a, **k):
        raise AssertionError("the summary must not need a model")
    monkeypatch.setattr(common, "load_model", no_model)
    before = (out / "SUMMARY.md").read_text()
    A.main(A.parse_args(["--replot", "--out", str(out), "--figures", str(tmp_path / "figures")]))
    assert (out / "SUMMARY.md").read_text() == before
    printed = capsys.readouterr().out
    assert f"wrote {out / 'SUMMARY.md'}" in printed and "change_rates.png" in printed
    rows = S.load_table(out / "rows.csv")
    runs.write_csv(rows.drop(index=5), out / "rows.csv")  # one row deleted
    with pytest.raises(runs.UsageError, match="rows.csv is incomplete: 1 row missing"):
        S.summarize(out, tmp_path / "figures")
    empty = tmp_path / "empty"
    with pytest.raises(runs.UsageError, match="has no rows.csv"):
        A.main(A.parse_args(["--replot", "--out", str(empty), "--figures", str(tmp_path / "f2")]))
    assert not empty.exists() and not (tmp_path / "f2").exists()


def test_jobs_all_done_before_a_resume_print_no_progress_bar(capsys):
    """A resumed run whose jobs are all in its stores runs no batch and shows no empty bar."""
    from types import SimpleNamespace
    ctx = SimpleNamespace(prefill={"attention_mask": torch.ones(2, 5)})
    jobs = [A.job_key(i, 2, "noop", 0, "-", "-", i, -1) for i in range(2)]
    ran = []
    A.run_jobs(None, None, ctx, jobs, SimpleNamespace(batch_size=4), set(jobs), ran.extend, True,
               None, "layer 2 decode")
    assert ran == [] and "layer 2 decode" not in capsys.readouterr().err


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    extra = FAST + ["--source", "mean", "last", "--batch-size", "8"]
    full, figures = _run(tmp_path, extra, "r1/exp_a")
    calls = {"n": 0}
    original = A.run_batch

    def interrupt_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*a, **k)
    monkeypatch.setattr(A, "run_batch", interrupt_on_third)
    argv = SMOKE + extra + ["--out",
                    str(tmp_path / "r2/exp_a"), "--figures", str(figures)]
    with pytest.raises(KeyboardInterrupt):
        A.main(A.parse_args(argv))
    assert not (tmp_path / "r2/exp_a/rows.csv").exists()
    monkeypatch.setattr(A, "run_batch", original)
    with pytest.raises(runs.UsageError, match="already holds results"):
        A.main(A.parse_args(argv))
    with pytest.raises(runs.UsageError, match="--resume: this command differs"):
        A.main(A.parse_args(argv[:-4] + ["--k", "6"] + argv[-4:] + ["--resume"]))
    A.main(A.parse_args(argv + ["--resume"]))
    resumed = tmp_path / "r2/exp_a"
    # The batches left after the interrupt are the ones the uninterrupted run made: the same
    # tables. Floats are compared to 1e-9: the resumed half is read back from CSV text, and some
    # pandas versions parse the last bit of a float differently from how it was written.
    for name in ("rows.csv", "generations.csv", "scores.csv", "random_scores.csv", "variance.csv",
                 "metrics.csv", "controls.csv", "null_draws.csv", "tests.csv", "verdicts.csv",
                 "measure_checks.csv", "solved.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(full / name), pd.read_csv(resumed / name),
                                      check_exact=False, rtol=1e-9, atol=1e-12, obj=name)
    assert (full / "patching_table.md").read_text() == (resumed / "patching_table.md").read_text()
    # both runs' figures survive: same --figures, same --out basename
    for out in (full, resumed):
        assert len(list(runs.figure_dir(out, figures).glob("*.png"))) == 4


def _synthetic(n, z=0, zperp=0, en=0, z_lang=0, zp_lang=0, rand=0, noop=0, draws=19, english=None,
               en_same_as_z=False):
    """rows.csv-like rows of one configuration: the first `z` problems' answers changed by Z (and
    their log p(reference) lowered by 1 nat), the first `en` (or, with en_same_as_z, the same
    ones, lowered as much) by en, and so on; `english` problems with an English baseline."""
    english = n if english is None else english
    records = []
    for i in range(n):
        def row(condition, draw=-1, changed=False, lang=False, pair="same"):
            return dict(problem_id=f"p{i}", layer=1, k=2, positions="prompt", source="mean",
                        condition=condition, draw=draw, pair=pair, answer_changed=changed,
                        baseline_language="en" if i < english else "zh", language_changed=lang,
                        language="zh" if lang or i >= english else "en",
                        truncated=False, outcome="kept", correct=True, logp_ref=-1.0, ld=1.0,
                        dlogp_ref=-1.0 if changed else 0.0, dld=0.0, patch_size=1.0,
                        top1_src=False, top1_own=True, dp_share=0.0, dlang_ref=0.0,
                        lang_ref=3.0, p_share=0.1, output="1 apple")
        en_changed = i < z if en_same_as_z else i < en
        records += [row("none"), row("noop", changed=i < noop), row("full"),
                    row("z", changed=i < z, lang=i < z_lang), row("en", changed=en_changed),
                    row("zperp", changed=i < zperp, lang=i < zp_lang)]
        records += [row("rand_z", d, changed=i < rand) for d in range(draws)]
        records += [row("rand_zperp", d) for d in range(draws)]
    return pd.DataFrame(records)


def _verdict(frame):
    return S.compute_tables(frame)[4].iloc[0]


def test_verdict_criteria():
    clean = _verdict(_synthetic(40, z=20, zp_lang=20, rand=2))
    assert clean.verdict == "double dissociation" and clean.failed == "" and clean.primary
    assert clean.plan_partial and clean.explained_by == ""
    # Random subspaces of Z's size change as many answers: Z is not special.
    same = _verdict(_synthetic(40, z=20, zp_lang=20, rand=20))
    assert same.verdict == "null" and not same.z_changes_answers and same.explained_by == "random"
    # The noop patch (batch noise) changes as many: the Wilson lower bound is not above it.
    noisy = _verdict(_synthetic(40, z=8, zp_lang=20, rand=2, noop=8))
    assert not noisy.z_changes_answers and "not above" in noisy.z_changes_answers_reason
    assert "noop" in noisy.explained_by
    # "Keeps answers" must not pass merely because N is small: 0 of 5 changed is not keeping.
    small = _verdict(_synthetic(5, z=5, zp_lang=5))
    assert not small.zperp_keeps_answers and "zperp_keeps_answers" in small.failed
    # Too few draws for a p of 0.05: never "changes answers".
    few = _verdict(_synthetic(40, z=20, zp_lang=20, rand=2, draws=10))
    assert not few.z_changes_answers and few.verdict == "null"


def test_verdict_when_en_explains_zs_effect_is_not_partial():
    """The en control (the English prompt's own mean written into Z) changes the same answers and
    lowers log p(reference) as much: Z beats random, but its effect needs no Chinese content."""
    v = _verdict(_synthetic(40, z=20, zp_lang=20, rand=2, en_same_as_z=True))
    assert v.verdict == "null" and not v.z_changes_answers and v.explained_by == "en"
    assert "Z alone 0, en alone 0" in v.z_changes_answers_reason
    frame = _synthetic(40, z=20, zp_lang=20, rand=2, en_same_as_z=True)
    tables = S.compute_tables(frame)
    paragraph = exp_a_text.verdict_paragraph(frame, tables[1], tables[3], tables[4].iloc[0], None,
                                             "direct")
    assert "explained by the en control" in paragraph and "Verdict: null" in paragraph
    # en changes fewer answers but lowers log p(reference) as much: still explained by en.
    weaker = _synthetic(40, z=20, zp_lang=20, rand=2, en=0)
    weaker.loc[(weaker.condition == "en") & (weaker.problem_id.isin([f"p{i}" for i in range(20)])),
               "dlogp_ref"] = -1.0
    v = _verdict(weaker)
    assert v.verdict == "null" and v.explained_by == "en"


def test_language_criteria_need_twenty_english_baselines():
    """19 English baselines: "Z keeps language" and "Z⊥ changes language" are not measured,
    never passed, even where every other criterion passes; 20 suffice."""
    v = _verdict(_synthetic(40, z=20, zp_lang=19, rand=2, english=19))
    assert pd.isna(v.z_keeps_language) and pd.isna(v.zperp_changes_language)
    assert v.verdict == "partial" and "not measured (19 English baselines, 20 needed)" in \
        v.zperp_changes_language_reason
    assert _verdict(_synthetic(40, z=20, zp_lang=20, rand=2, english=20)).verdict == \
        "double dissociation"


def test_secondary_configurations_are_holm_adjusted_and_never_carry_the_label():
    """Two configurations: the primary (k 2 here) is read at its raw p, the other's "Z changes
    answers" at its Holm-adjusted p."""
    first = _synthetic(40, z=20, zp_lang=20, rand=2)
    second = first.assign(k=3)
    tables = S.compute_tables(pd.concat([first, second], ignore_index=True), primary=(1, 3, "prompt", "mean"))
    tests, verdicts = tables[3], tables[4]
    assert tests.primary.sum() == 1 and tests[tests.primary].k.iloc[0] == 3
    other = tests[(tests.k == 2) & (tests.test == "z changes answers")].iloc[0]
    assert other.p_holm >= other.p and not other.primary
    assert list(verdicts.primary) == [False, True]


def test_interchange_outcomes():
    pairs = [{"id": "a", "category": "c", "answer": 10}, {"id": "b", "category": "c", "answer": 20}]
    none = A.job_key(0, -1, "none", 0, "-", "-", 0, -1)
    scores = dict(first_ref=-0.5, first_swap=-2.0, top1=5.0, lang_ref=2.0)
    base = dict(output="", language="en", truncated=False, patch_size=0.0, logp_ref=-1.0,
                logp_swap=-5.0, **scores)
    decodes = {none: dict(base, answer=10.0)}
    for answer, truncated, expected in ((20.0, False, "transferred"), (10.0, False, "kept"),
                                        (33.0, False, "broken"), (None, True, "truncated")):
        key = A.job_key(0, 1, "z", 2, "prompt", "mean", 1, -1)
        decodes[key] = dict(base, answer=answer, truncated=truncated, logp_ref=-2.0, logp_swap=-1.0,
                            first_ref=-3.0, first_swap=-1.0, top1=7.0, lang_ref=-1.0)
        row = dict(problem=0, layer=1, k=2, positions="prompt", source="mean", condition="z",
                   draw=-1, pair="swap", source_problem=1, job=key)
        table = A.table_rows([row], decodes, {}, pairs, [1, 0], [5, 7]).iloc[0]
        assert table.outcome == expected
        assert table.dld == pytest.approx((-2.0 + 1.0) - (-1.0 + 5.0))
        assert table.top1_src and not table.top1_own and table.dlang_ref == pytest.approx(-3.0)
        share, share0 = 1 / (1 + np.exp(-3.0 + 1.0)), 1 / (1 + np.exp(-0.5 + 2.0))
        assert table.p_share == pytest.approx(share) and table.dp_share == pytest.approx(share - share0)


def test_too_few_kept_pairs_stop_before_the_long_part_and_leave_nothing(tmp_path):
    """The tiny random model answers nothing: with --solved both one line names the flags to
    change, and neither the output folder nor a figure folder is left behind."""
    out = tmp_path / "out"
    argv = ["--model", "tiny-random", "--limit", "4", "--out", str(out), "--figures",
            str(tmp_path / "f")]
    with pytest.raises(runs.UsageError, match="only 0 of 4 pairs kept by --solved both.*"
                                              "--min-pairs.*--solved en / any / off"):
        A.main(A.parse_args(argv))
    assert not out.exists() and not (tmp_path / "f").exists()
    with pytest.raises(runs.UsageError, match="needs at least 5"):  # 4 kept, 5 asked for
        A.main(A.parse_args(argv + ["--solved", "off", "--min-pairs", "5"]))
    assert not out.exists()


def test_default_layer_is_the_plans_layer_at_the_same_depth():
    args = A.parse_args(["--model", "tiny-random", "--limit", "2"])
    A.validate(args)
    assert args.layer == [common.plan_layer_at_depth(common.load_model_config("tiny-random"))] == [3]


def test_no_random_draws_is_summarised_as_not_tested(tmp_path):
    out, _ = _run(tmp_path, FAST + ["--n-random", "0", "--n-random-logprob", "0"])
    summary = (out / "SUMMARY.md").read_text()
    assert "not tested (no random draws)" in summary and "Verdict: null" in summary
    cell = S.headline(out)
    assert cell["verdict"] == "null" and "not tested (no random draws)" in cell["value"]


@pytest.mark.parametrize("extra, message", [
    (["--layer", "4"], "layers 0..3"), (["--layer", "-2"], "layers 0..3"),
    (["--k", "0"], "--k between 1 and 63"), (["--k", "64"], "Z-perp empty"),
    (["--depth", "1.5"], "--depth 1.5 is not a fraction"),
    (["--depth", "0.5", "--layer", "2"], "--layer or --depth"),
    (["--limit", "99999"], "--limit between 1 and"),
    (["--prompts", "/nonexistent/prompts.json"], "does not exist"),
    (["--device", "cuda"], "no CUDA device"), (["--source", "last:0"], None),
    (["--keep-threshold", "2"], "--keep-threshold"),
    (["--positions", "all", "--source", "last"], "--positions all"),
    (["--template", "nope"], None), ("empty", "no pairs"), ("duplicate", "duplicate id"),
    (["--min-pairs", "1"], "--min-pairs 1"), (["--n-random", "-1"], "--n-random"),
    ("file_out", "is a file, not a folder"),
])
def test_bad_input_errors_and_writes_nothing(tmp_path, extra, message):
    if extra == "file_out":
        (tmp_path / "taken").write_text("x")
        out, extra = tmp_path / "taken" / "exp_a", []
    else:
        out = tmp_path / "out"
    if isinstance(extra, str):
        data = json.loads(problems.DEFAULT_PROMPTS.read_text(encoding="utf-8"))
        {"empty": lambda d: d.update(pairs=[]),
         "duplicate": lambda d: d["pairs"].append(d["pairs"][0])}[extra](data)
        path = tmp_path / "prompts.json"
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        extra = ["--prompts", str(path)]
    argv = ["--model", "tiny-random", "--layer", "2", "--out", str(out), "--figures", str(tmp_path / "f")]
    if "--depth" in extra and "--layer" not in extra:
        argv = argv[:2] + argv[4:]
    if message is None:  # argparse's own refusal: exit status 2
        with pytest.raises(SystemExit) as err:
            A.parse_args(argv + extra)
        assert err.value.code == 2
    else:
        with pytest.raises(runs.UsageError, match=message):
            A.main(A.parse_args(argv + extra))
    assert not out.exists() and not (tmp_path / "f").exists()


def test_cli_exit_status_two_and_offline_model_message(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, str(runs.REPO / "exp_a_patching.py"), "--model",
         "no-such-org/no-such-model", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--model PATH" in last
    assert not (tmp_path / "out").exists()


def test_every_flag_has_help_and_help_shows_defaults():
    parser = A.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = " ".join(parser.format_help().split())
    assert "(default: 19)" in text and "(default: 200)" in text and "(default: direct)" in text
