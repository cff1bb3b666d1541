"""stats.py: Wilson intervals, exact McNemar, the rank test (Z as one more draw) and the random
subspaces Z is read against."""
import math

import numpy as np
import pytest

import common
from zcausal import stats


def test_wilson_interval_against_hand_computed_values():
    lo, hi = stats.wilson_interval(10, 20)
    assert abs(lo - 0.2993) < 1e-4 and abs(hi - 0.7007) < 1e-4
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0 and abs(hi - 0.2775) < 1e-4
    lo, hi = stats.wilson_interval(15, 15)
    assert abs(lo - 0.7961) < 1e-4 and hi == 1
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    for n in range(1, 300):  # the interval holds p exactly: error bars are never negative
        assert stats.wilson_interval(0, n)[0] == 0 and stats.wilson_interval(n, n)[1] == 1
    assert stats.rate(10, 20) == dict(count=10, n=20, value=0.5, ci_low=pytest.approx(0.2993, abs=1e-4),
                                      ci_high=pytest.approx(0.7007, abs=1e-4))


def test_mcnemar_exact_against_hand_computed_values():
    first = [True] * 6 + [False] * 4
    second = [False] * 6 + [False] * 4
    assert stats.mcnemar_exact(first, second) == (6, 0, pytest.approx(2 * 0.5 ** 6))
    first = [True] * 5 + [False] + [True] * 4
    second = [False] * 5 + [True] + [True] * 4
    assert stats.mcnemar_exact(first, second)[2] == pytest.approx(2 * 7 / 64)
    assert stats.mcnemar_exact([True, False], [True, False])[2] == 1.0


@pytest.mark.parametrize("draws", [19, 199])
def test_rank_test_false_positive_rate_when_z_is_one_more_draw(draws):
    """Z drawn from the same distribution as the M draws: p <= 0.05 in about 5% of runs (the
    McNemar against a majority vote it replaces gave 19-42%)."""
    rng = np.random.default_rng(0)
    runs_ = 4000
    one, two = 0, 0
    for _ in range(runs_):
        sample = rng.normal(size=draws + 1)
        result = stats.rank_test(sample[0], sample[1:])
        one += result["p_above"] <= 0.05
        two += result["p_two_sided"] <= 0.05
    assert 0.035 < one / runs_ < 0.065
    assert two / runs_ < 0.065


def test_rank_test_is_conservative_on_discrete_rates():
    """Change rates at N = 44 tie often; ties count against Z, so p <= 0.05 happens at most ~5%."""
    rng = np.random.default_rng(1)
    hits = sum(stats.rank_test(*(lambda s: (s[0], s[1:]))(rng.binomial(44, 0.1, 20) / 44))
               ["p_above"] <= 0.05 for _ in range(4000))
    assert hits / 4000 <= 0.055


def test_rank_test_z_clearly_outside():
    draws = np.linspace(-1, 1, 19)
    above = stats.rank_test(5.0, draws)
    assert above["p_above"] == pytest.approx(1 / 20) and above["p_below"] == 1.0
    assert above["p_two_sided"] == pytest.approx(2 / 20) and above["rank"] == 20
    below = stats.rank_test(-5.0, draws)
    assert below["p_below"] == pytest.approx(1 / 20) and below["rank"] == 1
    tie = stats.rank_test(1.0, draws)  # a tie with the largest draw counts against Z
    assert tie["p_above"] == pytest.approx(2 / 20)
    assert stats.rank_test(1.0, []) == {} and stats.rank_test(float("nan"), draws) == {}


def _planted_covariance(d=64, strong=20.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4000, d))
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    x += strong * rng.normal(size=(4000, 1)) * direction  # one dominant direction
    return stats.covariance(x), direction


def test_matched_random_basis_orthonormal_seeded_and_follows_the_variance():
    cov, _ = _planted_covariance()
    root = stats.covariance_sqrt(cov)
    np.testing.assert_allclose(root @ root.T, cov, atol=1e-8)
    a, b, c = (stats.matched_random_basis(root, 5, s) for s in (3, 3, 4))
    np.testing.assert_allclose(a @ a.T, np.eye(5), atol=1e-10)
    assert np.array_equal(a, b) and not np.allclose(a, c)
    matched = np.mean([stats.variance_share(stats.matched_random_basis(root, 5, s), cov)
                       for s in range(50)])
    uniform = np.mean([stats.variance_share(common.random_basis(64, 5, s).numpy(), cov)
                       for s in range(50)])
    # The planted direction holds most of the variance: matched draws find it, uniform ones do not.
    assert uniform < 0.2 and matched > 0.8 and matched > 5 * uniform


def test_variance_share_identities():
    cov, direction = _planted_covariance(strong=0.0)
    assert stats.variance_share(np.eye(64), cov) == pytest.approx(1.0)
    shares = [stats.variance_share(common.random_basis(64, 8, s).numpy(), cov) for s in range(200)]
    assert np.mean(shares) == pytest.approx(8 / 64, abs=0.01)  # isotropic data: k/d
