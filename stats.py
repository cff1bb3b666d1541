"""Statistics shared by Experiment A, the layer sweep (E) and report.py: Wilson intervals, exact
McNemar, and the rank test that treats Z as one more random draw. Imports no project code.
"""
import math

import numpy as np


def wilson_interval(count, n, z=1.959963984540054):
    """Wilson score 95% interval for count successes out of n; (nan, nan) when n == 0."""
    if n == 0:
        return math.nan, math.nan
    p = count / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(first, second):
    """Exact McNemar test on paired booleans: (b, c, p) with b = first only, c = second only, and
    the two-sided binomial p-value of b among the b + c discordant pairs (1.0 when none)."""
    from scipy.stats import binomtest
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    b, c = int((first & ~second).sum()), int((~first & second).sum())
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return b, c, float(p)


def rank_test(value, draws, tol=1e-12):
    """Where `value` (Z's statistic) falls among M random draws of the same statistic, Z treated as
    one more draw: p_above = (1 + #{draw >= value}) / (M + 1), p_below likewise with <=, and
    p_two_sided = min(1, 2 min(p_above, p_below)). Ties count against Z. Under the null (Z
    exchangeable with the draws) P(p <= a) <= a for each one-sided p.

    Returns a dict: draws (M), mean, sd, min, max, rank (1 + #{draw < value}), at_or_above,
    at_or_below, p_above, p_below, p_two_sided; an empty dict when there are no draws.
    """
    draws = np.asarray(draws, float)
    draws = draws[~np.isnan(draws)]
    if len(draws) == 0 or value is None or np.isnan(value):
        return {}
    m = len(draws)
    above = int((draws >= value - tol).sum())
    below = int((draws <= value + tol).sum())
    p_above, p_below = (1 + above) / (m + 1), (1 + below) / (m + 1)
    return dict(draws=m, mean=float(draws.mean()), sd=float(draws.std(ddof=1)) if m > 1 else 0.0,
                min=float(draws.min()), max=float(draws.max()),
                rank=1 + int((draws < value - tol).sum()), at_or_above=above, at_or_below=below,
                p_above=p_above, p_below=p_below, p_two_sided=min(1.0, 2 * min(p_above, p_below)))
