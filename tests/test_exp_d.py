"""Experiment D: the maps on synthetic pairs with a known answer, leakage-free held-out fits, the
MGSM reader, bad input, and an end-to-end run on the tiny model."""
import json

import numpy as np
import pandas as pd
import pytest

import common
from zcausal import problems, runs, stats
import exp_d_bridge as ed
from zcausal.summaries import exp_d as exp_d_summary
import synthetic_numbers

FITTED = ("lstsq", "ridge", "procrustes")


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    ed.limit_blas_threads(1)  # as main() does: small fits, no spin-waiting on a shared CPU


def planted_rotation(n=200, k=8, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, k)) * np.linspace(0.5, 2, k) + 3.0
    Q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    return X, X @ Q + 0.7 + noise * rng.normal(size=(n, k)), Q


def metrics(X, Y, n_shuffles=30):
    rows, svs, _ = ed.compute_bridge(X, Y, n_shuffles, 10, seed=0)
    return {r["map"]: r for r in rows}, pd.DataFrame(svs)


# ----------------------------------------------------------------------------------------------
# Maps

def test_planted_rotation_is_recovered():
    X, Y, Q = planted_rotation()
    rows, svs = metrics(X, Y)
    for name in FITTED:
        assert rows[name]["loo_r2"] > 0.99 and rows[name]["kfold_r2"] > 0.99, name
        assert rows[name]["null_hi"] < 0.2 and rows[name]["p_null"] == pytest.approx(1 / 31)
        assert rows[name]["retrieval_loo"] == 1.0
    assert rows["procrustes"]["orthogonality_error"] < 1e-12
    assert rows["lstsq"]["orthogonality_error"] < 0.01
    W, _, _ = ed.fit_map("procrustes", X, Y)
    np.testing.assert_allclose(W, Q, atol=5e-3)
    lstsq_sv = svs[svs["map"] == "lstsq"]["sigma"]
    np.testing.assert_allclose(lstsq_sv, 1, atol=0.01)
    assert rows["identity"]["kfold_r2"] < 0.5  # a rotation is not the identity


def test_independent_pairs_give_no_held_out_fit():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(100, 8)), rng.normal(size=(100, 8))
    rows, _ = metrics(X, Y)
    for name in FITTED:
        assert rows[name]["kfold_r2"] < 0.05 and rows[name]["loo_r2"] < 0.05, name
        assert rows[name]["p_null"] > 0.01
        assert rows[name]["retrieval_loo"] < 0.1
    assert rows["lstsq"]["in_sample_r2"] > rows["lstsq"]["loo_r2"]  # overfitting shows
    assert rows["identity"]["kfold_r2"] == pytest.approx(-1, abs=0.3)


@pytest.mark.parametrize("name", exp_d_summary.MAPS)
def test_leave_one_out_uses_no_held_out_data(name):
    """The held-out row's own target never affects its prediction, and its input enters only
    through X_i @ W with W (and the centring) from the other rows."""
    X, Y, _ = planted_rotation(n=30, k=4, noise=0.5)
    i = 7
    fold = [np.array([i])]
    before = ed.heldout_predictions(name, X, Y, fold)[i]
    Y2 = Y.copy()
    Y2[i] += 100.0
    np.testing.assert_allclose(ed.heldout_predictions(name, X, Y2, fold)[i], before, atol=1e-10)
    others = np.arange(len(X)) != i
    W, b, _ = ed.fit_map(name, X[others], Y[others])
    X2 = X.copy()
    X2[i] += 50.0
    np.testing.assert_allclose(ed.heldout_predictions(name, X2, Y, fold)[i], X2[i] @ W + b,
                               atol=1e-8)


def test_ridge_penalty_matches_brute_force_leave_one_out():
    X, Y, _ = planted_rotation(n=25, k=6, noise=2.0, seed=3)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    chosen = ed.ridge_alpha(Xc, Yc)
    s2 = np.linalg.svd(Xc, compute_uv=False) ** 2
    errors = []
    for alpha in ed.RIDGE_GRID * s2.sum() / Xc.shape[1]:
        err = 0.0
        for i in range(len(X)):
            keep = np.arange(len(X)) != i
            mx, my = X[keep].mean(0), Y[keep].mean(0)
            A, B = X[keep] - mx, Y[keep] - my
            W = np.linalg.solve(A.T @ A + alpha * np.eye(6), A.T @ B)
            err += (((X[i] - mx) @ W + my - Y[i]) ** 2).sum()
        errors.append(err)
    best = ed.RIDGE_GRID[int(np.argmin(errors))] * s2.sum() / Xc.shape[1]
    assert chosen == pytest.approx(best)
    assert len(set(np.round(errors, 6))) > 1  # the grid matters, so the check is not vacuous


def test_underdetermined_fit_is_flagged_exact():
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))  # N=6 <= k=8: pure noise
    rows, _ = metrics(X, Y, n_shuffles=5)
    assert rows["lstsq"]["in_sample_r2"] == pytest.approx(1.0, abs=1e-9)
    assert rows["lstsq"]["in_sample_exact"] and rows["ridge"]["underdetermined"]
    assert not rows["procrustes"]["in_sample_exact"]
    assert rows["lstsq"]["orthogonality_error"] >= np.sqrt(8 - 6 + 1) / 8 - 1e-9
    assert "exact by construction" in ed.exactness_warning(6, 8)
    assert ed.exactness_warning(20, 4) is None


def test_only_the_numbers_shared_retrieval_perfect_with_them_and_at_chance_without(tiny,
                                                                                  monkeypatch):
    """Synthetic activations (tests/synthetic_numbers.py) in which the zh and en versions of a
    problem share only their number: the identity and the language offset (mean_shift, fitted
    without the held-out pair) map every en mean nearest to its own zh mean; with --drop-numbers
    every problem's mean is the same and retrieval is at chance (1/N)."""
    n = synthetic_numbers.N_PROBLEMS
    loo = [np.array([i]) for i in range(n)]
    for drop, expected in ((False, 1.0), (True, 1 / n)):
        pooled = synthetic_numbers.activations(tiny, monkeypatch, drop, pool="mean")[:, 0]
        Y, X = pooled[:n].double().numpy(), pooled[n:].double().numpy()  # zh, en
        for name in ("mean_shift", "identity"):
            assert ed.retrieval_top1(ed.heldout_predictions(name, X, Y, loo), Y) == \
                pytest.approx(expected), (drop, name)


def test_r2_and_retrieval_definitions():
    Y = np.arange(12.0).reshape(6, 2) ** 1.5
    assert ed.r2(Y, Y) == 1.0
    assert ed.r2(Y, np.broadcast_to(Y.mean(0), Y.shape)) == pytest.approx(0.0)
    assert ed.retrieval_top1(Y, Y) == 1.0
    assert ed.retrieval_top1(Y[::-1], Y) == 0.0


# ----------------------------------------------------------------------------------------------
# MGSM reader

def write_mgsm(tmp_path, n, en_extra=(), answers=None):
    answers = answers or [f"{i + 2}" for i in range(n)]
    en = [f"Tom has {i + 2} apples and buys {3 * i} more. How many?\t{a}"
          for i, a in enumerate(answers)] + list(en_extra)
    zh = [f"小明有{i + 2}个苹果，又买了{3 * i}个。一共有多少个？\t{a}" for i, a in enumerate(answers)]
    (tmp_path / "en.tsv").write_text("\n".join(en) + "\n", encoding="utf-8")
    (tmp_path / "zh.tsv").write_text("\n".join(zh) + "\n", encoding="utf-8")
    return tmp_path / "en.tsv", tmp_path / "zh.tsv"


def test_read_mgsm_handles_thousands_separators(tmp_path):
    en, zh = write_mgsm(tmp_path, 3, answers=["1,000", "12", "2,500,000"])
    pairs = problems.read_mgsm(en, zh)
    assert [p["answer"] for p in pairs] == [1000, 12, 2500000]
    assert pairs[1]["zh"].startswith("小明有3个") and pairs[1]["en"].startswith("Tom has 3")


def test_read_mgsm_rejects_files_of_different_lengths(tmp_path):
    en, zh = write_mgsm(tmp_path, 3, en_extra=["One more question?\t5"])
    with pytest.raises(runs.UsageError, match="different lengths"):
        problems.read_mgsm(en, zh)


# ----------------------------------------------------------------------------------------------
# The script

def cli(tmp_path, *extra, n=12):
    if not (tmp_path / "en.tsv").exists():
        write_mgsm(tmp_path, n)
    return ed.parse_args(["--model", common.TINY_MODEL, "--device", "cpu", "--layer", "2",
                          "--k", "4", "8", "--prompts-en", str(tmp_path / "en.tsv"),
                          "--prompts-zh", str(tmp_path / "zh.tsv"), "--out",
                          str(tmp_path / "exp_d"), "--figures", str(tmp_path / "fig"),
                          "--cache-dir", str(tmp_path / "cache"), *extra])


def test_the_figure_and_the_declared_test_name_the_runs_own_folds(tmp_path, monkeypatch):
    """--n-folds 3: the legend and config.json's primary test say 3-fold (they said 10-fold)."""
    ed.main(cli(tmp_path, "--n-folds", "3", "--n-shuffles", "5", "--n-random", "2"))
    legends = {}
    monkeypatch.setattr(runs, "save_figure", lambda fig, path, **kw: legends.setdefault(
        path.stem, [t.get_text() for t in fig.legends[0].get_texts()]))
    exp_d_summary.plot_heldout_r2(tmp_path / "exp_d", tmp_path / "heldout_r2.png")
    assert "Z, 3-fold held out" in legends["heldout_r2"]
    assert "random bases, each (3-fold)" in legends["heldout_r2"]
    assert not any("10-fold" in text for text in legends["heldout_r2"])
    config = json.loads((tmp_path / "exp_d" / "config.json").read_text())
    assert "3-fold held-out" in config["primary_test"]


@pytest.mark.parametrize("extra", [["--layer", "4"], ["--k", "0"], ["--k", "4", "65"],
                                   ["--k", "4", "64"], ["--k", "4", "4"], ["--n-random", "-1"],
                                   ["--n-shuffles", "0"], ["--prompts-zh", "MISSING"],
                                   ["--limit", "2"], ["--prompts-en", "SHORT"],
                                   ["--depth", "1.5"], ["--depth", "0.5"]])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra):
    args = cli(tmp_path, *extra)
    if extra[0] == "--prompts-zh":
        args.prompts_zh = tmp_path / "missing.tsv"
    if extra[1] == "SHORT":  # a file with a different number of rows
        (tmp_path / "short.tsv").write_text("Only one?\t2\n", encoding="utf-8")
        args.prompts_en = tmp_path / "short.tsv"
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(ed.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    for name in ("exp_d", "fig", "cache"):
        assert not (tmp_path / name).exists()


def test_main_end_to_end(tiny, tmp_path, capsys, monkeypatch):
    rows = ed.main(cli(tmp_path, "--n-shuffles", "20"))
    out = tmp_path / "exp_d"
    m = pd.read_csv(out / "metrics.csv")
    assert len(rows) == len(m) == 2 * len(exp_d_summary.MAPS)
    assert set(m["k"]) == {4, 8} and (m["n_pairs"] == 12).all() and not m["in_sample_exact"].any()
    assert ((m["null_lo"] <= m["null_hi"]) & np.isclose(m["retrieval_chance"], 1 / 12)).all()
    assert len(pd.read_csv(out / "null.csv")) == 2 * len(exp_d_summary.MAPS) * 20
    # Z among the random bases: the saved rank and p follow from random_draws.csv
    draws = pd.read_csv(out / "random_draws.csv")
    assert len(draws) == 2 * len(exp_d_summary.MAPS) * stats.N_RANDOM
    assert (m["n_random"] == stats.N_RANDOM).all()  # the default
    row = m[(m["k"] == 8) & (m["map"] == "ridge")].iloc[0]
    mine = draws[(draws["k"] == 8) & (draws["map"] == "ridge")]["kfold_r2"]
    assert row["random_rank"] == 1 + (mine >= row["kfold_r2"] - 1e-12).sum()
    assert row["random_p_above"] == pytest.approx(row["random_rank"] / (stats.N_RANDOM + 1))
    assert m["primary"].sum() == 1 and m[m["primary"]][["map", "k"]].values.tolist() == \
        [["lstsq", 8]]  # the plan's k = 50 was not run: the largest k
    assert m[m["primary"]]["random_p_above_holm"].isna().all()
    assert m[~m["primary"]]["random_p_above_holm"].notna().all()
    assert len(pd.read_csv(out / "singular_values.csv")) == (4 + 8) * len(exp_d_summary.MAPS)
    config = json.loads((out / "config.json").read_text())
    assert (config["layer"], config["k"], config["drop_first"], config["n_pairs"]) == \
        (2, [4, 8], True, 12)
    for name in ("singular_values", "heldout_r2"):
        assert (runs.figure_dir(tmp_path / "exp_d", tmp_path / "fig") / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "exact by construction" not in capsys.readouterr().out

    # identity: the saved R^2 equals one recomputed from the activations and the basis directly
    model, tokenizer = tiny
    pairs = problems.read_mgsm(tmp_path / "en.tsv", tmp_path / "zh.tsv")
    pooled = common.extract_activations(model, tokenizer, [p["zh"] for p in pairs]
                                        + [p["en"] for p in pairs], [2], cache_dir=None)[:, 0]
    coords = pooled.double().numpy() @ common.z_basis(model, 2, 4).double().numpy().T
    expected = ed.r2(coords[:12], coords[12:])
    assert m[(m["k"] == 4) & (m["map"] == "identity")]["in_sample_r2"].iloc[0] == \
        pytest.approx(expected, rel=1e-5)

    for name in ("singular_values", "heldout_r2"):
        (runs.figure_dir(tmp_path / "exp_d", tmp_path / "fig") / f"{name}.png").unlink()
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    capsys.readouterr()
    ed.main(cli(tmp_path, "--replot"))
    assert (runs.figure_dir(tmp_path / "exp_d", tmp_path / "fig") / "heldout_r2.png").is_file()
    printed = capsys.readouterr().out
    assert "wrote" in printed and "heldout_r2.png" in printed and "Primary test" in printed


def test_main_flags_an_exact_fit_when_n_is_at_most_k(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: tiny)  # the same seed-0 model
    ed.main(cli(tmp_path, "--limit", "4", "--k", "4", "--n-shuffles", "20"))
    assert "exact by construction" in capsys.readouterr().out
    m = pd.read_csv(tmp_path / "exp_d" / "metrics.csv").set_index("map")
    assert m.loc["lstsq", "in_sample_exact"] and m.loc["lstsq", "in_sample_r2"] == \
        pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Z among random bases

def planted_in_z(n=80, d=24, k=4, seed=0):
    """Pooled states where Z (the first k axes) carries a rotation from en to zh and every other
    direction of zh is independent noise: zh, en (n, d) and Z (k, d)."""
    rng = np.random.default_rng(seed)
    en = rng.normal(size=(n, d))
    Q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    zh = rng.normal(size=(n, d))
    zh[:, :k] = en[:, :k] @ Q + 0.05 * rng.normal(size=(n, k))
    return zh, en, np.eye(d)[:k]


def test_a_map_planted_in_z_ranks_z_first_among_random_bases():
    zh, en, z = planted_in_z()
    rows, _, _, draws = ed.compute_k(zh, en, z, n_shuffles=5, n_folds=5, n_random=20, seed=0)
    assert len(draws) == 20 * len(exp_d_summary.MAPS)
    rows = {r["map"]: r for r in rows}
    for name in FITTED:
        r = rows[name]
        assert r["kfold_r2"] > 0.9 and r["random_hi"] < 0.5, name
        assert r["random_rank"] == 1 and r["random_p_above"] == pytest.approx(1 / 21)
        assert r["random_p_two_sided"] == pytest.approx(2 / 21)
    table = exp_d_summary.mark_primary(pd.DataFrame(list(rows.values())))
    primary = table[table["primary"]].iloc[0]
    assert exp_d_summary.verdict(primary) == "Z above random (one-sided p 0.048)"
    assert "ranks 1st of 21 among random bases" in exp_d_summary.primary_sentence(primary)
    # the same Z last of 21 (two-sided p 0.095): the one-sided test says only "not above"
    last = primary.copy()
    last[["random_rank", "random_p_above", "random_p_below"]] = 21, 1.0, 1 / 21
    assert exp_d_summary.verdict(last) == "not above random (one-sided p 1)"
    assert "below" not in exp_d_summary.primary_sentence(last).split(": ", 1)[1]


def test_z_as_one_more_random_basis_gets_no_small_p():
    """Z is a random subspace too, not among the draws: its p-values must look like draws from a
    uniform distribution, not cluster near the floor 1/21."""
    rng = np.random.default_rng(0)
    d, k, n = 16, 3, 60
    en = rng.normal(size=(n, d))
    zh = en @ (rng.normal(size=(d, d)) / np.sqrt(d)) + 0.5 * rng.normal(size=(n, d))
    p = []
    for rep in range(10):
        folds = ed.kfold_indices(n, 5, rep)
        z = ed.basis_r2(zh, en, common.random_basis(d, k, 10_000 + rep).numpy(), folds)["lstsq"]
        draws = [r["kfold_r2"] for r in ed.compute_random_draws(zh, en, k, 20, folds, rep)
                 if r["map"] == "lstsq"]
        p.append(ed.random_columns(z, draws)["random_p_above"])
    assert np.median(p) > 0.2 and sum(v <= 0.1 for v in p) <= 3, p


def test_no_random_draws_is_not_tested(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: tiny)
    ed.main(cli(tmp_path, "--k", "4", "--n-random", "0", "--n-shuffles", "5"))
    out = tmp_path / "exp_d"
    m = pd.read_csv(out / "metrics.csv")
    assert (m["n_random"] == 0).all() and m["random_p_above"].isna().all()
    assert pd.read_csv(out / "random_draws.csv").empty
    text = " ".join(exp_d_summary.summary_lines(out))
    assert "not tested (no random draws)" in text and "nan" not in text
    head = exp_d_summary.headline(out)
    assert set(head) == {"verdict", "value", "lead"}
    assert head["verdict"] == "not tested (no random draws)" and 1 <= len(head["lead"]) <= 3
    assert (runs.figure_dir(out, tmp_path / "fig") / "heldout_r2.png").is_file()


def test_headline_of_an_unfinished_run_is_a_usage_error(tmp_path):
    with pytest.raises(runs.UsageError, match="metrics.csv"):
        exp_d_summary.headline(tmp_path)
