"""ard_mmd: the unbiased MMD and its masking, and Experiment C's two objectives on token clouds
with a planted structure (shared problem coordinates, language coordinates, noise)."""
import argparse
import math

import numpy as np
import pytest
import torch

from zcausal import ard_mmd as A


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


D, PROBLEM_DIMS, LANGUAGE_DIMS = 24, list(range(0, 6)), list(range(6, 12))  # 12..23: noise


def planted_clouds(n_problems=16, seed=0, strength=1.5):
    """zh/en token clouds of different lengths: each problem has its own mean on PROBLEM_DIMS
    (shared by its zh and en versions; sd `strength`, a number or one per coordinate), each
    language its own mean on LANGUAGE_DIMS; every coordinate has unit token noise. Returns Clouds
    (zh, en)."""
    gen = torch.Generator().manual_seed(seed)
    problem_mean = torch.randn(n_problems, len(PROBLEM_DIMS), generator=gen) * torch.as_tensor(
        strength, dtype=torch.float32)
    clouds = {}
    for lang, offset in (("zh", 2.0), ("en", -2.0)):
        items = []
        for i in range(n_problems):
            n = int(torch.randint(6, 15, (1,), generator=gen))
            x = torch.randn(n, D, generator=gen)
            x[:, PROBLEM_DIMS] += problem_mean[i]
            x[:, LANGUAGE_DIMS] += offset
            items.append(x)
        clouds[lang] = A.make_clouds(*A.pad_clouds(items))
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
    a, b = A.make_clouds(*A.pad_clouds(xs)), A.make_clouds(*A.pad_clouds(ys))
    inv_l = torch.tensor([[1.0, 0.5, 2.0, 0.1, 1.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    paired, matrix = A.mmd2_paired(a, b, inv_l), A.mmd2_matrix(a, b, inv_l)
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
    tight = A.make_clouds(*A.pad_clouds(xs)), A.make_clouds(*A.pad_clouds(ys))
    padded = []
    for clouds in (xs, ys):
        x, mask = A.pad_clouds(clouds, length=15)
        x[~mask] = 1e3 * torch.randn(int((~mask).sum()), 5)  # garbage under the padding
        padded.append(A.make_clouds(x, mask))
    for fn in (A.mmd2_paired, A.mmd2_matrix):
        assert torch.allclose(fn(*tight, inv_l), fn(*padded, inv_l), atol=1e-6)
    assert torch.allclose(A.within_terms(tight[0], inv_l), A.within_terms(padded[0], inv_l))


def test_mmd_is_near_zero_for_the_same_distribution_and_large_for_a_shift():
    gen = torch.Generator().manual_seed(0)
    same = [torch.randn(200, 3, generator=gen) for _ in range(2)]
    shifted = [same[0], torch.randn(200, 3, generator=gen) + 2.0]
    inv_l = torch.ones(1, 3)
    near = A.mmd2_paired(A.make_clouds(*A.pad_clouds(same[:1])), A.make_clouds(*A.pad_clouds(same[1:])), inv_l)
    far = A.mmd2_paired(A.make_clouds(*A.pad_clouds(shifted[:1])),
                        A.make_clouds(*A.pad_clouds(shifted[1:])), inv_l)
    assert abs(near.item()) < 0.02 and far.item() > 0.3


# --------------------------------------------------------------------------------------------
# The objectives on planted structure

def _cold_start(zh, l_ref, n_fits=1):
    return torch.full((n_fits, D), math.log(l_ref))


def test_contrastive_recovers_the_problem_coordinates():
    zh, en = planted_clouds()
    l_ref = A.median_pairwise_distance([zh.flat, en.flat])
    final, trace, _ = A.fit_lengthscales(A.objective_fn("contrastive", zh, en, A.TAU, l_ref),
                                         _cold_start(zh, l_ref), torch.tensor([0.01]),
                                         math.log(l_ref), fit_args(150, lr=0.1))
    in_z = set(np.flatnonzero((final[0] < math.log(l_ref)).numpy()))
    truth = set(PROBLEM_DIMS)
    precision, recall = len(in_z & truth) / max(1, len(in_z)), len(in_z & truth) / len(truth)
    assert precision >= 0.9 and recall >= 0.9, (sorted(in_z), final[0])
    # the language coordinates are switched off: their lengthscales grew past the start
    assert bool((final[0, LANGUAGE_DIMS] > math.log(l_ref) + 1).all())
    n = len(zh.x)
    chance = 2 * n * math.log(n)  # the loss of a constant kernel
    assert trace[-1, 0, 1].item() < min(0.5 * trace[0, 0, 1].item(), 0.2 * chance)
    acc, ce = A.evaluate_retrieval(*planted_clouds(seed=1), final)  # new problems, same structure
    assert acc[0] >= 0.9 and ce[0] < math.log(n)


def _plan_fit(lam, steps=300):
    zh, en = planted_clouds()
    l_ref = A.median_pairwise_distance([zh.flat, en.flat])
    final, trace, _ = A.fit_lengthscales(A.objective_fn("plan", zh, en, A.TAU, l_ref),
                                         _cold_start(zh, l_ref), torch.tensor([lam]),
                                         math.log(l_ref), fit_args(steps))
    return final[0], trace[:, 0], math.log(l_ref)


def test_plan_objective_collapses():
    log_l, trace, log_l_ref = _plan_fit(1.0)
    assert bool((log_l > log_l_ref + 2).all())  # every lengthscale grew, by more than e^2
    assert trace[-1, 3].item() == 0  # |Z| = 0
    assert abs(trace[-1, 0].item()) < 0.02 * trace[0, 0].item()  # the loss heads to 0


def test_plan_objective_at_small_lambda_keeps_noise_not_the_shared_coordinates():
    """The plan's objective: where the penalty is too weak to empty Z, the survivors are coordinates whose
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
    hit = A.compute_overlap(in_z, z_energy)
    assert hit["overlap"] == 10 and hit["overlap_expected"] == pytest.approx(1.0)
    assert hit["overlap_p"] < 1e-10 and hit["energy_share"] == 1.0 and hit["energy_chance"] == 0.1
    assert hit["overlap_p_depletion"] == 1.0 and (hit["overlap_lo"], hit["overlap_hi"]) == (0, 3)
    miss = A.compute_overlap(np.roll(in_z, 50), z_energy)
    assert miss["overlap"] == 0 and miss["overlap_p"] == 1.0 and miss["energy_share"] == 0.0
    # overlap 0 is what a random selection of 10 of 100 gives a third of the time: no depletion
    assert miss["overlap_p_depletion"] == pytest.approx(0.330, abs=0.001)


@pytest.mark.parametrize("d,a,b", [(9, 3, 4), (8, 4, 4), (10, 2, 6)])
def test_overlap_chance_matches_every_random_selection_enumerated(d, a, b):
    """Against all C(d, a) selections of a coordinates and a fixed set of b: the expected overlap,
    P(overlap >= x) (enrichment), P(overlap <= x) (depletion) and the 95% range are exact."""
    import itertools
    fixed = set(range(b))
    overlaps = np.array([len(fixed & set(pick)) for pick in itertools.combinations(range(d), a)])
    for x in range(min(a, b) + 1):
        chance = A.overlap_chance(d, a, b, x)
        assert chance["overlap_expected"] == pytest.approx(overlaps.mean())
        assert chance["p_enrichment"] == pytest.approx(np.mean(overlaps >= x))
        assert chance["p_depletion"] == pytest.approx(np.mean(overlaps <= x))
    lo, hi = A.overlap_chance(d, a, b, 0)["overlap_lo"], A.overlap_chance(d, a, b, 0)["overlap_hi"]
    assert np.mean(overlaps < lo) <= 0.025 and np.mean(overlaps > hi) <= 0.025
    assert np.mean(overlaps <= lo) > 0.025 and np.mean(overlaps >= hi) > 0.025  # the tightest


GRADED = (2.0, 1.5, 1.0, 0.7, 0.5, 0.3)  # problem coordinates from strong to weak


def test_contrastive_z_shrinks_as_lambda_grows_and_collapses_at_the_largest():
    """The penalty is on the data term's scale: with shared coordinates of graded strength, Z
    loses the weakest first as lambda grows (each Z inside the one of the smaller lambda), and the
    largest lambda of the grid empties it. Lambda 0 and 0.01 give the same Z (no effect)."""
    zh, en = planted_clouds(strength=GRADED)
    l_ref = A.median_pairwise_distance([zh.flat, en.flat])
    lambdas = [0.0, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0]
    final, _, _ = A.fit_lengthscales(A.objective_fn("contrastive", zh, en, A.TAU, l_ref),
                                     _cold_start(zh, l_ref, len(lambdas)), torch.tensor(lambdas),
                                     math.log(l_ref), fit_args(200, lr=0.1))
    zs = [set(np.flatnonzero((f < math.log(l_ref)).numpy())) for f in final]
    sizes = [len(z) for z in zs]
    assert sizes == sorted(sizes, reverse=True), sizes
    assert all(later <= earlier for earlier, later in zip(zs, zs[1:])), zs
    assert zs[0] == zs[1] and zs[0] <= set(PROBLEM_DIMS) and len(zs[0]) >= 5
    assert sizes[-1] == 0 and len(set(sizes)) >= 4  # from no effect, through steps, to collapse
    assert 0 in zs[-2] and 5 not in zs[-2]  # the strongest coordinate is the last to go


def test_penalty_equals_lambda_times_2n_at_the_isotropic_start():
    zh, en = planted_clouds()
    l_ref = A.median_pairwise_distance([zh.flat, en.flat])
    _, data, penalty = A.contrastive_loss(zh, en, _cold_start(zh, l_ref, 2),
                                          torch.tensor([0.5, 2.0]), l_ref)
    n = len(zh.x)
    torch.testing.assert_close(penalty, torch.tensor([0.5, 2.0]) * 2 * n)
    assert 0 < data[0].item() < 2 * n * math.log(n)  # better than chance already
