"""Labels that follow the tests, in one place: what a summary may say about Z against its null, and
how much a null result can say at its N. Every summary (zcausal/summaries/exp_*.py) words its
verdicts with these functions.

    labels.versus_random(test, "greater")     # 'Z above random' / 'not above random (...)'
    labels.no_transfer(0, 26, [0] * 19)       # 'no transfer (0 of 26, upper bound 0.11)'
    labels.detectable_rate(29, 5)             # 0.23: the rate a 5-of-29 test finds 80% of the time

The rules: a label never comes from ties ("Z = random" where Z and every draw sit at 0 is "no
transfer", with the one-sided 95% upper bound of Z's rate); a direction ("below random") is read
only from a two-sided test below alpha, and only where both directions are read; a one-sided test
that does not reject says "not above random", nothing more; every null states the smallest effect
its test would find at its N (80% power). Scipy for the distributions; imports only
zcausal/summaries/text.py.
"""
import math

from zcausal.summaries.text import num, plural

ALPHA = 0.05
POWER = 0.8  # the power at which a minimum detectable effect is stated
TAILS = ("greater", "less", "two-sided")


# ----------------------------------------------------------------------------------------------
# Bounds and power

def upper_bound(count, n, alpha=ALPHA):
    """One-sided (1 - alpha) Clopper-Pearson upper bound of a rate seen as count of n: the largest
    true rate under which so few would be seen with probability alpha. 0 of n gives
    1 - alpha^(1/n) (0 of 75: 0.039); nan for n = 0."""
    from scipy.stats import beta
    if n <= 0:
        return math.nan
    if count >= n:
        return 1.0
    return float(beta.ppf(1 - alpha, count + 1, n - count))


def sign_test_critical(alpha=ALPHA):
    """The fewest discordant pairs, all one way, with which an exact one-sided sign test (McNemar
    against a control that changes none) rejects at alpha: the smallest b with 0.5^b <= alpha
    (5 at 0.05)."""
    return math.ceil(math.log(alpha) / math.log(0.5) - 1e-9)


def binomial_critical(n, null_rate, alpha=ALPHA):
    """The smallest count c of n with P(X >= c) <= alpha for X ~ Binomial(n, null_rate): the count
    an exact one-sided binomial test against `null_rate` needs (1 for a null rate of 0); None
    when no count of n is enough."""
    from scipy.stats import binom
    for c in range(n + 1):
        if binom.sf(c - 1, n, null_rate) <= alpha:
            return max(c, 1)
    return None


def detectable_rate(n, critical, power=POWER):
    """The minimum detectable effect of a count test that rejects at `critical` or more of n: the
    smallest true rate r with P(Binomial(n, r) >= critical) >= power (the Beta(critical,
    n - critical + 1) quantile at `power`). Falls as n grows; nan when critical > n or is None."""
    from scipy.stats import beta
    if critical is None or critical > n or n <= 0:
        return math.nan
    return float(beta.ppf(power, critical, n - critical + 1))


def count_mde(n, alpha=ALPHA, power=POWER):
    """The minimum detectable rate of a count test of n pairs against a control that changes
    none (A's answers against `en`: an exact sign test needs sign_test_critical(alpha) changes):
    detectable_rate(n, sign_test_critical(alpha))."""
    return detectable_rate(n, sign_test_critical(alpha), power)


def min_draws(alpha=ALPHA, tail="greater"):
    """The fewest random draws M with which a rank test can reach alpha: the smallest p is
    1 / (M + 1) one-sided, 2 / (M + 1) two-sided (19 and 39 draws at 0.05)."""
    sides = 2 if tail == "two-sided" else 1
    return math.ceil(sides / alpha - 1 - 1e-9)


def rank_mde(draws, alpha=ALPHA, power=POWER, tail="greater"):
    """The smallest effect a rank test among `draws` random draws finds with `power`, as the
    share of the draws' distribution Z must lie beyond (quantile) and, for normal draws, in draw
    standard deviations from their mean (sd): the test rejects when at most r = floor(a (M + 1))
    - 1 draws reach Z (a = alpha, or alpha / 2 two-sided). dict(draws, at_most, quantile, sd);
    quantile and sd nan when M draws cannot reach alpha."""
    from scipy.stats import beta, norm
    a = alpha / 2 if tail == "two-sided" else alpha
    at_most = math.floor(a * (draws + 1) + 1e-9) - 1
    if at_most < 0 or draws <= at_most:
        return dict(draws=int(draws), at_most=at_most, quantile=math.nan, sd=math.nan)
    # P(Binomial(M, q) <= at_most) >= power, q the share of draws beyond Z: q <= this quantile
    q = float(beta.ppf(1 - power, at_most + 1, draws - at_most))
    return dict(draws=int(draws), at_most=at_most, quantile=1 - q, sd=float(norm.isf(q)))


# ----------------------------------------------------------------------------------------------
# Labels

def _p_words(p, tail):
    side = "two-sided" if tail == "two-sided" else "one-sided"
    return f"{side} p {num(p)}"


def versus_random(test, tail, alpha=ALPHA, p=None):
    """The label of a rank test (a stats.rank_test dict) read in its declared tail:
    greater: 'Z above random (one-sided p x)' where p_above <= alpha, else 'not above random
    (one-sided p x)'; less likewise ('Z below random' / 'not below random'); two-sided:
    'Z above random' or 'Z below random (two-sided p x)' where the two-sided p <= alpha, else
    'not different from random (two-sided p x)'. `p` replaces the test's own p in the tail (a
    Holm-adjusted p). Without draws: 'not tested (no random draws)'."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, not {tail!r}")
    if not test:
        return "not tested (no random draws)"
    if tail == "two-sided":
        p = test["p_two_sided"] if p is None else p
        if p <= alpha:
            side = "above" if test["p_above"] <= test["p_below"] else "below"
            return f"Z {side} random ({_p_words(p, tail)})"
        return f"not different from random ({_p_words(p, tail)})"
    side = "above" if tail == "greater" else "below"
    p = test[f"p_{side}"] if p is None else p
    if p <= alpha:
        return f"Z {side} random ({_p_words(p, tail)})"
    return f"not {side} random ({_p_words(p, tail)})"


def all_zero(count, draw_counts):
    """Whether Z's count and every random draw's sit at 0: a rank test then compares ties only."""
    return count == 0 and len(draw_counts) > 0 and all(c == 0 for c in draw_counts)


def no_transfer(count, n, draw_counts, alpha=ALPHA):
    """'no transfer (0 of n, upper bound u)' where Z and every random draw sit at 0 (u the
    one-sided (1 - alpha) Clopper-Pearson bound of Z's rate), else None: ties at 0 say nothing
    about Z against random, only that Z moved none."""
    if not all_zero(count, draw_counts):
        return None
    return f"no transfer (0 of {n}, upper bound {num(upper_bound(0, n, alpha))})"


def count_versus_random(count, n, draw_counts, test, tail, alpha=ALPHA, continuous=None,
                        continuous_name="the continuous measure"):
    """The label of a count measure against random draws: 'no transfer (0 of n, upper bound u)'
    where Z and every draw sit at 0, followed, where a continuous measure's rank test is given,
    by the direction it shows in a two-sided test ('; p_share shift: not different from random
    (two-sided p 0.1)'): counts that cannot move cannot give a direction. Otherwise the count's
    own versus_random in `tail`."""
    tie = no_transfer(count, n, draw_counts, alpha)
    if tie is None:
        return versus_random(test, tail, alpha)
    if continuous:
        return f"{tie}; {continuous_name}: {versus_random(continuous, 'two-sided', alpha)}"
    return tie


def null_statement(count, n, critical, alpha=ALPHA, power=POWER, what="Z changes answers",
                   unit="kept pair"):
    """A null read as an equivalence statement with its bound and its power: 'Z changes answers
    on fewer than 0.039 of kept pairs (0 of 75: one-sided 95% upper bound 0.039); this test finds
    a true rate of 0.087 with 80% power'."""
    bound = upper_bound(count, n, alpha)
    mde = detectable_rate(n, critical, power)
    power_words = (f"this test finds a true rate of {num(mde)} with {num(100 * power)}% power"
                   if not math.isnan(mde) else
                   f"this test cannot reject at {plural(n, unit)} (it needs {critical})")
    return (f"{what} on fewer than {num(bound)} of {unit}s ({count} of {n}: one-sided "
            f"{num(100 * (1 - alpha))}% upper bound {num(bound)}); {power_words}")


def rank_power_words(draws, alpha=ALPHA, power=POWER, tail="greater"):
    """'with 19 draws the test rejects only where Z is beyond all of them (beyond the draws'
    0.99 quantile, 2.3 SD for normal draws, for 80% power)', or why it cannot reject."""
    m = rank_mde(draws, alpha, power, tail)
    if math.isnan(m["quantile"]):
        return (f"with {plural(draws, 'draw')} the test cannot reach {_p_words(alpha, tail)} (it "
                f"needs at least {min_draws(alpha, tail)})")
    where = "all of them" if m["at_most"] == 0 else f"all but {m['at_most']} of them"
    return (f"with {plural(draws, 'draw')} the test rejects only where Z is beyond {where}; "
            f"{num(100 * power)}% power needs Z beyond the draws' {num(m['quantile'], 3)} "
            f"quantile ({num(m['sd'])} SD for normal draws)")


def solved_before_fit(before, chance, ceiling=0.95):
    """Why a sparsity penalty cannot win, or None: held-out retrieval already at `ceiling` or
    above before any fit leaves the validation loss nothing to gain from dropping coordinates."""
    if before is None or math.isnan(before) or before < ceiling:
        return None
    return (f"held-out retrieval is {num(before)} before any fit (chance {num(chance)}): the task "
            f"is solved before fitting, so the sparsity penalty can only lose and lambda = 0 is "
            f"a property of the task, not a finding about Z")
