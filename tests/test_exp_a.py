"""Experiment A: sources (derangement, OT), statistics, verdict logic, and the script end to end."""
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import common
import problems
import runs
import stats
import exp_a_patching as A


def test_derangement_has_no_fixed_points_and_avoids_equal_answers():
    answers = [1, 2, 3, 4, 5, 5, 7, 8, 9, 10]
    perm = A.derangement(answers, seed=3)
    assert sorted(perm) == list(range(10))
    assert all(j != i for i, j in enumerate(perm))
    assert all(answers[i] != answers[j] for i, j in enumerate(perm))
    assert perm == A.derangement(answers, seed=3) and perm != A.derangement(answers, seed=4)
    assert A.derangement([7, 7], seed=0) == [1, 0]


def test_ot_plan_marginals_and_identity():
    gen = torch.Generator().manual_seed(0)
    en, zh = torch.randn(7, 16, generator=gen), torch.randn(11, 16, generator=gen)
    source, plan = A.ot_source(en, zh, scale=torch.rand(16, generator=gen) + 0.5)
    assert source.shape == (7, 16)
    np.testing.assert_allclose(plan.sum(1), np.full(7, 1 / 7), atol=1e-12)
    np.testing.assert_allclose(plan.sum(0), np.full(11, 1 / 11), atol=1e-12)
    same_source, same_plan = A.ot_source(en, en)
    np.testing.assert_allclose(same_plan, np.eye(7) / 7, atol=1e-12)
    assert torch.equal(same_source, en)


def test_ot_patch_from_own_prompt_leaves_logits_unchanged(tiny):
    model, tok = tiny
    texts = ["Question: Tom buys 3 apples. Answer:", "Question: A train travels 60 km. Answer:"]
    ids, mask, _ = common.tokenize_left_padded(tok, texts)
    with torch.no_grad():
        baseline = model(input_ids=ids, attention_mask=mask,
                         position_ids=common.position_ids_from_mask(mask)).logits
    states, means = A.capture_prompt_states(model, tok, texts, [(0, len(t)) for t in texts], 2, 8)
    scale = A.robust_scale(states)
    ot_sources = {(i, i): A.ot_source(states[i], states[i], scale)[0] for i in range(2)}
    bases = A.make_bases(model, 2, [4], 1, 0)
    for condition in ("z", "zperp", "full", "rand_z"):
        jobs = [(i, 2, condition, 4, "prompt", "ot", i, 0 if condition == "rand_z" else -1)
                for i in range(2)]
        patch = A.make_patch(jobs, 2, bases, means, ot_sources, ids.shape[1], 64)
        with common.layer_output_hook(model, 2, patch), torch.no_grad():
            patched = model(input_ids=ids, attention_mask=mask,
                            position_ids=common.position_ids_from_mask(mask)).logits
        real = mask.bool()
        torch.testing.assert_close(patched[real], baseline[real], atol=1e-5, rtol=1e-5)


def test_wilson_interval_against_hand_computed_values():
    lo, hi = stats.wilson_interval(10, 20)
    assert abs(lo - 0.2993) < 1e-4 and abs(hi - 0.7007) < 1e-4
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0 and abs(hi - 0.2775) < 1e-4
    lo, hi = stats.wilson_interval(15, 15)
    assert abs(lo - 0.7961) < 1e-4 and hi == 1
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))


def test_mcnemar_exact_against_hand_computed_values():
    first = [True] * 6 + [False] * 4
    second = [False] * 6 + [False] * 4
    assert stats.mcnemar_exact(first, second) == (6, 0, pytest.approx(2 * 0.5 ** 6))
    first = [True] * 5 + [False] + [True] * 4
    second = [False] * 5 + [True] + [True] * 4
    assert stats.mcnemar_exact(first, second)[2] == pytest.approx(2 * 7 / 64)
    assert stats.mcnemar_exact([True, False], [True, False])[2] == 1.0


def _synthetic_rows(n, z_change, zperp_lang, random_change, n_random=5):
    """rows.csv-like frame for one configuration with chosen outcomes."""
    records = []
    for i in range(n):
        def row(condition, draw=-1, changed=False, language="en", pair="same"):
            return dict(problem_id=f"p{i}", category="c", layer=1, k=2, positions="prompt",
                        source="mean", condition=condition, draw=draw, pair=pair, source_id="q",
                        output="o", answer=1.0, reference=1.0, source_answer=2.0,
                        correct=not changed, answer_changed=changed, language=language,
                        language_changed=language != "en", outcome="broken" if changed else "kept",
                        logp_ref=-1.0, logp_swap=-2.0, dlogp_ref=0.0, dlogp_swap=0.0)
        records += [row("none"), row("z", changed=z_change), row("zperp", language=zperp_lang),
                    row("full", changed=True, language="zh")]
        records += [row("rand_z", d, changed=random_change) for d in range(n_random)]
        records += [row("rand_zperp", d, language="en") for d in range(n_random)]
    return pd.DataFrame(records)


def test_verdict_needs_z_outside_the_random_band():
    clean = _synthetic_rows(20, z_change=True, zperp_lang="zh", random_change=False)
    metrics, _, _ = A.compute_summary_tables(clean)
    assert metrics.verdict.iloc[0] == "double dissociation"
    # Random subspaces change every answer too: the same Z numbers no longer count.
    confounded = _synthetic_rows(20, z_change=True, zperp_lang="zh", random_change=True)
    metrics, _, _ = A.compute_summary_tables(confounded)
    assert metrics.verdict.iloc[0] == "null"
    assert metrics.verdict_without_controls.iloc[0] == "double dissociation"
    nothing = _synthetic_rows(20, z_change=False, zperp_lang="en", random_change=False)
    assert A.compute_summary_tables(nothing)[0].verdict.iloc[0] == "null"


def test_logprob_null_p_values():
    rows = pd.DataFrame([dict(problem_id=f"p{i}", layer=1, k=2, positions="prompt", source="mean",
                              condition=c, pair="same", draw=-1, logp_ref=-5.0,
                              dlogp_ref=2.0 if c == "z" else -1.0 if c == "zperp" else 0.0)
                         for i in range(3) for c in ("none", "z", "zperp")])
    null = pd.DataFrame([dict(problem_id=f"p{i}", layer=1, k=2, positions="prompt", source="mean",
                              condition=c, draw=d, logp_ref=-5.0 + 0.1 * d)
                         for i in range(3) for c in ("rand_z", "rand_zperp") for d in range(9)])
    tests = A.logprob_null_tests(rows, null).set_index("condition")
    assert tests.loc["z", "p_above"] == pytest.approx(1 / 10)  # above all 9 draws (0 .. 0.8)
    assert tests.loc["z", "p_two_sided"] == pytest.approx(2 / 10)
    assert tests.loc["zperp", "p_below"] == pytest.approx(1 / 10)
    assert tests.loc["z", "null_max"] == pytest.approx(0.8)


def test_interchange_outcomes():
    pairs = [{"id": "a", "category": "c", "answer": 10}, {"id": "b", "category": "c", "answer": 20}]
    none = A.job_key(0, -1, "none", 0, "-", "-", 0, -1)
    gens = {none: dict(output="", answer=10.0, language="en", logp_ref=-1.0, logp_swap=-5.0)}
    for answer, expected in ((20.0, "transferred"), (10.0, "kept"), (33.0, "broken"), (None, "broken")):
        key = A.job_key(0, 1, "z", 2, "prompt", "mean", 1, -1)
        gens[key] = dict(output="", answer=answer, language="en", logp_ref=-2.0, logp_swap=-1.0)
        row = dict(problem=0, layer=1, k=2, positions="prompt", source="mean", condition="z",
                   draw=-1, pair="swap", source_problem=1, job=key)
        table = A.table_rows([row, dict(row, condition="none", pair="same", source_problem=0,
                                        job=none)], gens, pairs)
        assert table.outcome.iloc[0] == expected
        assert table.dlogp_swap.iloc[0] == pytest.approx(4.0)


ARGS = ["--model", "tiny-random", "--layer", "1", "2", "--k", "4", "--positions", "prompt", "all",
        "--source", "mean", "ot", "--n-random", "2", "--limit", "4", "--max-new-tokens", "6",
        "--batch-size", "64"]


def test_main_end_to_end_and_summary_rebuilds_without_model(tmp_path, monkeypatch):
    out, figures = tmp_path / "exp_a", tmp_path / "figures"
    A.main(A.parse_args(ARGS + ["--out", str(out), "--figures", str(figures),
                                "--n-random-logprob", "3"]))
    for name in ("rows.csv", "generations.csv", "metrics.csv", "controls.csv", "tests.csv",
                 "SUMMARY.md", "patching_table.md", "config.json", "logprob_null.csv",
                 "logprob_tests.csv"):
        assert (out / name).is_file(), name
    for name in ("change_rates", "transfer_rates", "logprob_shift"):
        assert (runs.figure_dir(out, figures) / f"{name}.png").is_file()
    rows = runs.load_csv(out / "rows.csv")
    # 4 problems x 2 layers x 1 k x 2 positions x 2 sources x (none + 2*(3 + 2*2) swap/same rows)
    assert len(rows) == 4 * 2 * 2 * 2 * (1 + 2 * (3 + 2 * 2))
    none = rows[rows.condition == "none"]
    assert not none.answer_changed.any() and (none.dlogp_ref == 0).all()
    assert set(rows.outcome) <= {"kept", "broken", "transferred"}
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name_or_path"] == "tiny-random" and config["args"]["k"] == [4]
    summary = (out / "SUMMARY.md").read_text()
    assert "Verdict:" in summary and "| layer | k |" in summary
    null = runs.load_csv(out / "logprob_null.csv")
    # 4 problems x 2 layers x 2 positions x 2 sources x 2 random conditions x 3 draws
    assert len(null) == 4 * 2 * 2 * 2 * 2 * 3
    # the first draws are the decoded random subspaces: scoring alone gives their decode's score
    decoded = rows[(rows.condition == "rand_z") & (rows.pair == "same") & (rows.draw == 0)]
    merged = decoded.merge(null[(null.condition == "rand_z") & (null.draw == 0)],
                           on=["problem_id", "layer", "k", "positions", "source"])
    assert len(merged) == len(decoded) and np.allclose(merged.logp_ref_x, merged.logp_ref_y, atol=1e-4)
    lp = runs.load_csv(out / "logprob_tests.csv")
    assert ((lp.p_two_sided > 0) & (lp.p_two_sided <= 1)).all() and (lp.null_draws == 3).all()
    assert "against 3 random subspaces" in summary

    def no_model(*a, **k):
        raise AssertionError("the summary must not need a model")
    monkeypatch.setattr(common, "load_model", no_model)
    (out / "SUMMARY.md").unlink()
    A.main(A.parse_args(["--summarize", str(out), "--figures", str(figures)]))
    assert (out / "SUMMARY.md").read_text() == summary
    with pytest.raises(runs.UsageError, match="already holds results"):  # no silent overwrite
        A.main(A.parse_args(ARGS + ["--out", str(out), "--figures", str(figures)]))


def _prompts(tmp_path, mutate):
    data = json.loads(problems.DEFAULT_PROMPTS.read_text(encoding="utf-8"))
    mutate(data)
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("extra, message", [
    (["--layer", "4"], "layers 0..3"), (["--layer", "-2"], "layers 0..3"),
    (["--k", "0"], "--k between 1 and 64"), (["--k", "65"], "--k between 1 and 64"),
    (["--limit", "999"], "--limit between 1 and"),
    (["--prompts", "/nonexistent/prompts.json"], "does not exist"),
    ("empty", "no pairs"), ("missing", 'no "answer"'), ("type", "wrong type"),
    ("duplicate", "duplicate id"),
])
def test_bad_input_errors_and_writes_nothing(tmp_path, extra, message):
    mutations = {"empty": lambda d: d.update(pairs=[]),
                 "missing": lambda d: d["pairs"][0].pop("answer"),
                 "type": lambda d: d["pairs"][0].update(en=5),
                 "duplicate": lambda d: d["pairs"].append(d["pairs"][0])}
    if isinstance(extra, str):
        extra = ["--prompts", _prompts(tmp_path, mutations[extra])]
    out = tmp_path / "out"
    argv = ["--model", "tiny-random", "--layer", "2", "--out", str(out), "--figures", str(tmp_path / "f")]
    with pytest.raises(runs.UsageError, match=message):
        A.main(A.parse_args(argv + extra))
    assert not out.exists() and not (tmp_path / "f").exists()


def test_cli_exit_status_two_and_offline_model_message(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    import os
    env = dict(os.environ, **env)
    result = subprocess.run(
        [sys.executable, str(runs.REPO / "exp_a_patching.py"), "--model",
         "no-such-org/no-such-model", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--model PATH" in last
    assert not (tmp_path / "out").exists()
