"""How the summaries write numbers and counts in sentences, in one place: counts with the right
plural ("1 pair", "2 pairs"), ordinals ("1st of 21"), numbers to 2-3 significant digits, intervals
as "0.42 [0.31, 0.55]", and "not measured" instead of nan."""
import math

NOT_MEASURED = "not measured"


def plural(n, singular, plural_form=None):
    """'1 pair', '2 pairs', '0 pairs' (plural_form for irregular words)."""
    n = int(n)
    return f"{n} {singular if n == 1 else plural_form or singular + 's'}"


def ordinal(n):
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    n = int(n)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def is_missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


def num(value, digits=2, signed=False):
    """`value` to `digits` significant digits (more where rounding would reach 1 from below, so
    an R^2 of 0.998 is not written as 1), plain notation down to 0.001 (5.2e-39 below); 'not measured' for
    None or nan."""
    if is_missing(value):
        return NOT_MEASURED
    value = float(value)
    sign = "+" if signed and value > 0 else ""
    if value == int(value) and abs(value) < 10 ** digits:
        return f"{sign}{int(value)}"  # 1, not 1.0
    if abs(value) >= 10 ** digits:
        return f"{sign}{value:.0f}"
    if abs(value) < 1e-3:
        return f"{sign}{value:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    while abs(float(text)) == 1 and abs(value) < 1 and decimals < 6:
        decimals += 1
        text = f"{value:.{decimals}f}"
    return sign + text


def interval(value, low, high, digits=2, signed=False):
    """'0.42 [0.31, 0.55]'; the bracket left out where the bounds are not measured."""
    if is_missing(low) or is_missing(high):
        return num(value, digits, signed)
    return (f"{num(value, digits, signed)} [{num(low, digits, signed)}, "
            f"{num(high, digits, signed)}]")


def p_value(p):
    """A p-value to 2 significant digits ('p = 0.048'); 'p not measured' for nan."""
    return "p not measured" if is_missing(p) else f"p = {num(p)}"
