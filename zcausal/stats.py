"""Statistics shared by the experiments and report.py: Wilson intervals, exact McNemar, the rank
test that treats Z as one more random draw, Holm's correction for secondary tests, and the random
subspaces that test draws Z against (variance-matched draws and variance shares). Numpy only;
imports no project code.
"""
import math

import numpy as np

PLAN_K = 50  # the plan's k (Z's best configuration when it was found): every primary test's k
# --n-random's default in every script: the fewest random draws whose rank test (rank_test) can
# reach p = 1 / (19 + 1) = 0.05, significant at p <= 0.05 when Z lies above every draw.
N_RANDOM = 19
N_RANDOM_WHY = f"{N_RANDOM} is the fewest draws for which a rank test can give p = 0.05"


def primary_k(ks):
    """The k of a declared primary test: the plan's PLAN_K where it was run, else the largest."""
    ks = sorted(int(k) for k in ks)
    return PLAN_K if PLAN_K in ks else ks[-1]


def wilson_interval(count, n, z=1.959963984540054):
    """Wilson score 95% interval for count successes out of n; (nan, nan) when n == 0."""
    if n == 0:
        return math.nan, math.nan
    p = count / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The interval always holds p; at count 0 (or n) rounding would leave it 1e-17 off p.
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def mcnemar_exact(first, second, alternative="two-sided"):
    """Exact McNemar test on paired booleans: (b, c, p) with b = first only, c = second only, and
    the binomial p-value of b among the b + c discordant pairs (1.0 when none): two-sided, or
    alternative="greater" for "first is True more often than second" (one-sided; on booleans
    x < y vs y < x it is the exact sign test)."""
    from scipy.stats import binomtest
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    b, c = int((first & ~second).sum()), int((~first & second).sum())
    p = binomtest(b, b + c, 0.5, alternative=alternative).pvalue if b + c else 1.0
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


def holm(pvalues):
    """Holm's step-down adjusted p-values (same order as `pvalues`; NaN stays NaN): the i-th
    smallest of m p-values becomes max_{j <= i} min(1, (m - j + 1) p_(j)). Rejecting where the
    adjusted p < a keeps the family-wise error rate at a."""
    p = np.asarray(pvalues, float)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        adjusted[index] = running
    return adjusted


def rate(count, n):
    """count / n with its Wilson 95% interval: dict(count, n, value, ci_low, ci_high); value nan
    when n == 0."""
    lo, hi = wilson_interval(count, n)
    return dict(count=int(count), n=int(n), value=count / n if n else math.nan, ci_low=lo, ci_high=hi)


def covariance(states):
    """Covariance (d, d) float64 of the rows of `states` (n, d): the activations' second moment
    about their mean."""
    x = np.asarray(states, np.float64)
    x = x - x.mean(0)
    return x.T @ x / max(1, len(x) - 1)


def variance_share(basis, cov):
    """Share of the activations' variance in span(basis rows): tr(V C V^T) / tr(C). basis (k, d)
    with orthonormal rows, cov (d, d)."""
    v = np.asarray(basis, np.float64)
    return float(np.einsum("kd,de,ke->", v, cov, v) / np.trace(cov))


def covariance_sqrt(cov):
    """A symmetric square root S of a covariance (S S^T = C), from its eigendecomposition (negative
    rounding-error eigenvalues set to 0)."""
    values, vectors = np.linalg.eigh(np.asarray(cov, np.float64))
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def matched_random_basis(cov_sqrt, k, seed):
    """A random k-dim subspace drawn with the activations' covariance: k Gaussian vectors
    N(0, C) = S g, orthonormalised (QR). Such a subspace carries about as much activation variance
    as a subspace the data favour, unlike a uniform (Haar) one whose expected share is k/d.
    cov_sqrt: S (d, d) from covariance_sqrt. Returns float64 (k, d) with orthonormal rows, seeded.
    A vanishing isotropic jitter keeps the draw full rank where C is rank-deficient."""
    rng = np.random.default_rng(int(seed))
    d = cov_sqrt.shape[0]
    gauss = rng.standard_normal((d, k))
    draws = cov_sqrt @ gauss
    scale = np.sqrt(np.sum(np.square(cov_sqrt)) / d) or 1.0  # sqrt(tr C / d)
    draws = draws + 1e-6 * scale * rng.standard_normal((d, k))
    q, r = np.linalg.qr(draws)
    return (q * np.sign(np.diagonal(r))).T
