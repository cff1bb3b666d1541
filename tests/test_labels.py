"""The labels that follow the tests (zcausal/labels.py), on synthetic tables: ties at 0 give "no
transfer" with Z's upper bound, never "= random"; a direction only from a two-sided p below alpha;
a one-sided test that does not reject says "not above random"; the minimum detectable effect
falls as N grows, and 0 of 75 bounds a rate below 0.05."""
import math

import numpy as np
import pytest

from zcausal import labels, stats


def test_ties_at_zero_give_no_transfer_with_the_upper_bound_never_equal_to_random():
    draws = [0] * 19
    test = stats.rank_test(0.0, np.zeros(19))
    assert test["p_above"] == 1.0 and test["p_below"] == 1.0  # the rank test sees only ties
    label = labels.count_versus_random(0, 26, draws, test, "greater")
    assert label == f"no transfer (0 of 26, upper bound {labels.num(1 - 0.05 ** (1 / 26))})"
    assert "random" not in label
    # one draw above 0: the draws are not all tied with Z, so the rank test speaks
    moved = labels.count_versus_random(0, 26, [0] * 18 + [1], stats.rank_test(0, [0] * 18 + [1]),
                                       "greater")
    assert moved.startswith("not above random (one-sided p")


def test_a_continuous_measure_gives_the_direction_where_the_counts_cannot():
    # E's case: Z and every draw at top1_src 0, Z's p_share shift below all 19 draws
    rng = np.random.default_rng(0)
    shift_draws = rng.uniform(0.008, 0.023, 19)
    p_share = stats.rank_test(4.4e-4, shift_draws)
    label = labels.count_versus_random(0, 44, [0] * 19, stats.rank_test(0, np.zeros(19)),
                                       "greater", continuous=p_share,
                                       continuous_name="p_share shift")
    # below all 19: two-sided p = 2/20 = 0.1, above alpha: no direction
    assert label.startswith("no transfer (0 of 44, upper bound")
    assert label.endswith("p_share shift: not different from random (two-sided p 0.10)")
    # with 39 draws the same place is a two-sided p of 0.05: the direction is read
    p39 = stats.rank_test(4.4e-4, rng.uniform(0.008, 0.023, 39))
    label = labels.count_versus_random(0, 44, [0] * 39, stats.rank_test(0, np.zeros(39)),
                                       "greater", continuous=p39, continuous_name="p_share shift")
    assert label.endswith("p_share shift: Z below random (two-sided p 0.050)")


@pytest.mark.parametrize("value, expected", [
    (-1.0, "not different from random (two-sided p 0.095)"),  # D's 1.5B: lowest of 21
    (5.0, "not different from random (two-sided p 0.095)"),   # highest of 21: no side either
])
def test_a_two_sided_p_of_0095_gives_no_direction(value, expected):
    test = stats.rank_test(value, np.linspace(0, 1, 20))
    assert math.isclose(test["p_two_sided"], 2 / 21)
    assert labels.versus_random(test, "two-sided") == expected


def test_a_two_sided_p_below_alpha_reads_the_side_it_is_on():
    low = stats.rank_test(-1.0, np.linspace(0, 1, 59))
    high = stats.rank_test(2.0, np.linspace(0, 1, 59))
    assert labels.versus_random(low, "two-sided").startswith("Z below random (two-sided p")
    assert labels.versus_random(high, "two-sided").startswith("Z above random (two-sided p")


def test_a_one_sided_test_says_only_not_above_unless_it_rejects():
    lowest = stats.rank_test(-1.0, np.linspace(0, 1, 20))
    assert labels.versus_random(lowest, "greater") == "not above random (one-sided p 1)"
    highest = stats.rank_test(2.0, np.linspace(0, 1, 19))
    assert labels.versus_random(highest, "greater") == "Z above random (one-sided p 0.050)"
    assert labels.versus_random({}, "greater") == "not tested (no random draws)"
    with pytest.raises(ValueError):
        labels.versus_random(highest, "above")


def test_upper_bound_of_zero_of_n_is_clopper_pearson_and_75_pairs_bound_below_005():
    for n in (1, 10, 29, 75):
        assert math.isclose(labels.upper_bound(0, n), 1 - 0.05 ** (1 / n))
    assert labels.upper_bound(0, 75) < 0.05 < labels.upper_bound(0, 58)
    assert math.isclose(labels.upper_bound(0, 75), 0.039, abs_tol=5e-4)
    assert labels.upper_bound(5, 5) == 1.0 and math.isnan(labels.upper_bound(0, 0))
    # the bound holds: at the bound, seeing <= count has probability alpha
    from scipy.stats import binom
    assert math.isclose(binom.cdf(3, 40, labels.upper_bound(3, 40)), 0.05, rel_tol=1e-6)


def test_minimum_detectable_effect_falls_with_n_and_has_the_stated_power():
    from scipy.stats import binom
    ns = [10, 23, 29, 40, 75, 150, 300]
    mde = [labels.count_mde(n) for n in ns]
    assert all(a > b for a, b in zip(mde, mde[1:]))
    assert labels.sign_test_critical() == 5  # 0.5^5 = 0.031 <= 0.05 < 0.5^4
    # A's committed runs: 80% power needs a true rate near 0.23 (29 pairs) and 0.27 (23 pairs)
    assert 0.2 < labels.count_mde(29) < 0.24 < labels.count_mde(23) < 0.3
    for n in ns:
        assert math.isclose(binom.sf(4, n, labels.count_mde(n)), 0.8, rel_tol=1e-6)
    assert math.isnan(labels.detectable_rate(4, 5))  # 5 changes needed of 4 pairs
    assert labels.binomial_critical(29, 0.0) == 1 and labels.binomial_critical(29, 0.1) == 7


def test_rank_test_power_needs_enough_draws():
    assert labels.min_draws() == 19 and labels.min_draws(tail="two-sided") == 39
    assert math.isnan(labels.rank_mde(19, tail="two-sided")["quantile"])
    one = labels.rank_mde(19)
    assert one["at_most"] == 0 and math.isclose(one["quantile"], 0.8 ** (1 / 19))
    assert labels.rank_mde(99)["quantile"] < one["quantile"]  # more draws: a smaller effect
    assert "cannot reach two-sided p 0.050" in labels.rank_power_words(19, tail="two-sided")


def test_null_statement_is_an_equivalence_with_its_bound_and_power():
    text = labels.null_statement(0, 75, labels.sign_test_critical())
    assert text.startswith("Z changes answers on fewer than 0.039 of kept pairs (0 of 75")
    assert "finds a true rate of 0.088 with 80% power" in text
    assert "cannot reject" in labels.null_statement(0, 3, 5)


def test_a_task_solved_before_fitting_says_why_lambda_cannot_win():
    assert "can only lose" in labels.solved_before_fit(1.0, 0.09)
    assert labels.solved_before_fit(0.4, 0.09) is None
