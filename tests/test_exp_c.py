"""Experiment C: the unbiased MMD and its masking, the two objectives on clouds with a planted
structure, input validation, and an end-to-end run on the tiny model."""
import argparse
import json
import math

import numpy as np
import pytest
import torch

import common
import problems
import runs
import exp_c_ard_mmd as C

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and far faster on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


D, PROBLEM_DIMS, LANGUAGE_DIMS = 24, list(range(0, 6)), list(range(6, 12))  # 12..23: noise


def planted_clouds(n_problems=16, seed=0):
    """zh/en token clouds of different lengths: each problem has its own mean on PROBLEM_DIMS
    (shared by its zh and en versions), each language its own mean on LANGUAGE_DIMS; every
    coordinate has unit token noise. Returns Clouds (zh, en)."""
    gen = torch.Generator().manual_seed(seed)
    problem_mean = 1.5 * torch.randn(n_problems, len(PROBLEM_DIMS), generator=gen)
    clouds = {}
    for lang, offset in (("zh", 2.0), ("en", -2.0)):
        items = []
        for i in range(n_problems):
            n = int(torch.randint(6, 15, (1,), generator=gen))
            x = torch.randn(n, D, generator=gen)
            x[:, PROBLEM_DIMS] += problem_mean[i]
            x[:, LANGUAGE_DIMS] += offset
            items.append(x)
        clouds[lang] = C.make_clouds(*C.pad_clouds(items))
    return clouds["zh"], clouds["en"]


def fit_args(steps, lr=0.05):
    return argparse.Namespace(lr=lr, steps=steps, min_steps=0, plateau_tol=1e-4, log_every=10)


def naive_mmd2(x, y, inv_l):
    """Direct double sums over tokens (no padding, no matrix tricks)."""
    k = lambda a, b: math.exp(-0.5 * float((((a - b) * inv_l) ** 2).sum()))
    n, m = len(x), len(y)
    xx = sum(k(x[t], x[u]) for t in range(n) for u in range(n) if t != u) / (n * (n - 1))
    yy = sum(k(y[s], y[v]) for s in range(m) for v in range(m) if s != v) / (m * (m - 1))
    xy = sum(k(x[t], y[s]) for t in range(n) for s in range(m)) / (n * m)
    return xx + yy - 2 * xy


# --------------------------------------------------------------------------------------------
# The estimator

def _random_clouds(lengths, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=gen) + 0.3 * i for i, n in enumerate(lengths)]


def test_unbiased_mmd_equals_direct_double_sum():
    xs, ys = _random_clouds([3, 7, 5], seed=1), _random_clouds([6, 2, 4], seed=2)
    a, b = C.make_clouds(*C.pad_clouds(xs)), C.make_clouds(*C.pad_clouds(ys))
    inv_l = torch.tensor([[1.0, 0.5, 2.0, 0.1, 1.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    paired, matrix = C.mmd2_paired(a, b, inv_l), C.mmd2_matrix(a, b, inv_l)
    assert matrix.shape == (2, 3, 3) and paired.shape == (2, 3)
    for f in range(2):
        for i in range(3):
            assert paired[f, i].item() == pytest.approx(naive_mmd2(xs[i], ys[i], inv_l[f]), abs=1e-5)
            for j in range(3):
                assert matrix[f, i, j].item() == pytest.approx(
                    naive_mmd2(xs[i], ys[j], inv_l[f]), abs=1e-5)


def test_padding_does_not_change_the_value():
    xs, ys = _random_clouds([3, 9, 4]), _random_clouds([8, 2, 5], seed=3)
    inv_l = torch.rand(2, 5) + 0.2
    tight = C.make_clouds(*C.pad_clouds(xs)), C.make_clouds(*C.pad_clouds(ys))
    padded = []
    for clouds in (xs, ys):
        x, mask = C.pad_clouds(clouds, length=15)
        x[~mask] = 1e3 * torch.randn(int((~mask).sum()), 5)  # garbage under the padding
        padded.append(C.make_clouds(x, mask))
    for fn in (C.mmd2_paired, C.mmd2_matrix):
        assert torch.allclose(fn(*tight, inv_l), fn(*padded, inv_l), atol=1e-6)
    assert torch.allclose(C.within_terms(tight[0], inv_l), C.within_terms(padded[0], inv_l))


def test_mmd_is_near_zero_for_the_same_distribution_and_large_for_a_shift():
    gen = torch.Generator().manual_seed(0)
    same = [torch.randn(200, 3, generator=gen) for _ in range(2)]
    shifted = [same[0], torch.randn(200, 3, generator=gen) + 2.0]
    inv_l = torch.ones(1, 3)
    near = C.mmd2_paired(C.make_clouds(*C.pad_clouds(same[:1])), C.make_clouds(*C.pad_clouds(same[1:])), inv_l)
    far = C.mmd2_paired(C.make_clouds(*C.pad_clouds(shifted[:1])),
                        C.make_clouds(*C.pad_clouds(shifted[1:])), inv_l)
    assert abs(near.item()) < 0.02 and far.item() > 0.3


# --------------------------------------------------------------------------------------------
# The objectives on planted structure

def _cold_start(zh, l_ref, n_fits=1):
    return torch.full((n_fits, D), math.log(l_ref))


def test_contrastive_recovers_the_problem_coordinates():
    zh, en = planted_clouds()
    l_ref = C.median_pairwise_distance([zh.flat, en.flat])
    final, trace, _ = C.fit_lengthscales(C.objective_fn("contrastive", zh, en, C.TAU),
                                         _cold_start(zh, l_ref), torch.tensor([0.01]),
                                         math.log(l_ref), fit_args(150, lr=0.1))
    in_z = set(np.flatnonzero((final[0] < math.log(l_ref)).numpy()))
    assert C.summarise_fit(final[0], math.log(l_ref), torch.ones(D))["z_size"] == len(in_z)
    truth = set(PROBLEM_DIMS)
    precision, recall = len(in_z & truth) / max(1, len(in_z)), len(in_z & truth) / len(truth)
    assert precision >= 0.9 and recall >= 0.9, (sorted(in_z), final[0])
    # the language coordinates are switched off: their lengthscales grew past the start
    assert bool((final[0, LANGUAGE_DIMS] > math.log(l_ref) + 1).all())
    n = len(zh.x)
    chance = 2 * n * math.log(n)  # the loss of a constant kernel
    assert trace[-1, 0, 1].item() < min(0.5 * trace[0, 0, 1].item(), 0.2 * chance)
    acc, ce = C.evaluate_retrieval(*planted_clouds(seed=1), final)  # new problems, same structure
    assert acc[0] >= 0.9 and ce[0] < math.log(n)


def _plan_fit(lam, steps=300):
    zh, en = planted_clouds()
    l_ref = C.median_pairwise_distance([zh.flat, en.flat])
    final, trace, _ = C.fit_lengthscales(C.objective_fn("plan", zh, en, C.TAU),
                                         _cold_start(zh, l_ref), torch.tensor([lam]),
                                         math.log(l_ref), fit_args(steps))
    return final[0], trace[:, 0], math.log(l_ref)


def test_plan_objective_collapses():
    log_l, trace, log_l_ref = _plan_fit(1.0)
    assert bool((log_l > log_l_ref + 2).all())  # every lengthscale grew, by more than e^2
    assert trace[-1, 3].item() == 0  # |Z| = 0
    assert abs(trace[-1, 0].item()) < 0.02 * trace[0, 0].item()  # the loss heads to 0


def test_plan_objective_at_small_lambda_keeps_noise_not_the_shared_coordinates():
    """NOTES 4: where the penalty is too weak to empty Z, the survivors are coordinates whose
    unbiased MMD^2 went negative by chance, not the planted shared ones."""
    log_l, trace, log_l_ref = _plan_fit(0.1)
    survivors = set(np.flatnonzero((log_l < log_l_ref).numpy()))
    assert trace[-1, 1].item() < 0  # the data term went below zero: the estimator is exploited
    assert not survivors & set(LANGUAGE_DIMS)
    assert len(survivors & set(PROBLEM_DIMS)) <= len(PROBLEM_DIMS) // 2  # recall <= 0.5
    assert (log_l > log_l_ref).sum() >= 0.8 * D  # most coordinates still switched off


def test_overlap_against_the_hypergeometric_null():
    z_energy = np.zeros(100)
    z_energy[:10] = 1.0
    in_z = np.zeros(100, bool)
    in_z[:10] = True
    hit = C.compute_overlap(in_z, z_energy)
    assert hit["overlap"] == 10 and hit["overlap_expected"] == pytest.approx(1.0)
    assert hit["overlap_p"] < 1e-10 and hit["energy_share"] == 1.0 and hit["energy_chance"] == 0.1
    miss = C.compute_overlap(np.roll(in_z, 50), z_energy)
    assert miss["overlap"] == 0 and miss["overlap_p"] == 1.0 and miss["energy_share"] == 0.0


def test_layers_scale_to_the_same_fraction_of_depth():
    assert [C.scale_layer(l, 36) for l in C.PLAN_LAYERS] == C.PLAN_LAYERS
    assert [C.scale_layer(l, 24) for l in C.PLAN_LAYERS] == [7, 10, 13, 17, 19, 20, 21, 22, 23, 23]
    assert C.scale_layer(32, 24) == 21 and C.scale_layer(35, 4) == 3


# --------------------------------------------------------------------------------------------
# The script

@pytest.fixture
def prompts_file(tmp_path):
    pairs = json.loads(problems.DEFAULT_PROMPTS.read_text(encoding="utf-8"))["pairs"][:8]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"templates": {"cot": {"en": "Q: {question}", "zh": "问：{question}"}},
                                "pairs": pairs}, ensure_ascii=False), encoding="utf-8")
    return path


def _argv(tmp_path, prompts_file, *extra):
    return ["--model", common.TINY_MODEL, "--prompts", str(prompts_file),
            "--out", str(tmp_path / "out"), "--figures", str(tmp_path / "fig"),
            "--cache-dir", str(tmp_path / "cache"), *extra]


@pytest.mark.parametrize("bad", [["--layers", "1", "9"], ["--basis-layer", "4"], ["--k", "0"],
                                 ["--k", "65"]])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, prompts_file, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        runs.run_cli(C.main, C.parse_args(_argv(tmp_path, prompts_file, *bad)))
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "fig").exists()


def test_main_end_to_end(tmp_path, prompts_file):
    args = C.parse_args(_argv(tmp_path, prompts_file, "--layers", "1", "3", "--steps", "10",
                              "--min-steps", "0", "--objective", "contrastive", "plan",
                              "--basis-layer", "2", "--k", "8"))
    summary = C.main(args)
    out = tmp_path / "out"
    assert len(summary) == 2 * 2 * 2 * 3 and summary["selected"].sum() == 2 * 2 * 2
    npz = np.load(out / "lengthscales.npz")
    assert npz["log10_l"].shape == (2, 2, 2, 3, 64) and np.isfinite(npz["log10_l"]).all()
    assert npz["z_energy"].sum() == pytest.approx(8, rel=1e-4)
    traces = (out / "traces.csv").read_text().splitlines()
    assert traces[0].startswith("layer,objective,start,lambda,step,loss") and len(traces) > 24
    config = json.loads((out / "config.json").read_text())
    assert config["layers"] == [1, 3] and config["basis_layer"] == 2
    assert set(config["splits"]) == {"train", "val", "test"}
    for name in ("z_size", "spectrum", "overlap", "traces"):
        assert (runs.figure_dir(tmp_path / "out", tmp_path / "fig") / f"{name}.png").stat().st_size > 10_000
    assert summary["retrieval_test_final"].between(0, 1).all()
