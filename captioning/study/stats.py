"""Welch's t-test and Student's t intervals for the study's arms over seeds (standard library only).

Welch's test compares two means without assuming equal variances, which suits arms whose seed
spreads differ several-fold (a hard arm against the control); with 3 seeds an arm it has few
degrees of freedom, so the report prints t, the degrees of freedom and p, not a verdict alone.
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple, Sequence

from captioning.console import InvalidValue


class WelchResult(NamedTuple):
    difference: float  # mean(a) - mean(b)
    t: float
    df: float  # Welch-Satterthwaite degrees of freedom
    p: float  # two-sided


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                          -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (not necessarily integer) degrees of freedom."""
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def _welch_df(va: float, vb: float, n_a: int, n_b: int) -> float:
    """The Welch-Satterthwaite degrees of freedom of two means' squared standard errors va, vb."""
    return (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))


def welch(a: Sequence[float], b: Sequence[float]) -> WelchResult | None:
    """Welch's two-sample t-test of mean(a) = mean(b); None with fewer than 2 values on a side or
    no spread on either."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0.0:
        return None
    difference = statistics.fmean(a) - statistics.fmean(b)
    t = difference / math.sqrt(va + vb)
    df = _welch_df(va, vb, len(a), len(b))
    return WelchResult(difference, t, df, t_two_sided_p(t, df))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile (0.5 < q < 1) of Student's t with ``df`` degrees of freedom, by bisection
    on :func:`t_two_sided_p` (P(T > t) = p / 2)."""
    if not 0.5 < q < 1.0:
        raise InvalidValue(f"t_quantile takes 0.5 < q < 1, got {q}")
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) / 2.0 > 1.0 - q:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_two_sided_p(mid, df) / 2.0 > 1.0 - q else (low, mid)
    return (low + high) / 2.0


class Interval(NamedTuple):
    difference: float  # mean(a) - mean(b)
    low: float  # the confidence interval of the difference
    high: float
    p: float  # Welch's two-sided p
    df: float


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval | None:
    """Welch's confidence interval of mean(a) - mean(b) at ``level``, with its test's p; None where
    :func:`welch` has none."""
    result = welch(a, b)
    if result is None:
        return None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    half = t_quantile(0.5 + level / 2.0, result.df) * se
    return Interval(result.difference, result.difference - half, result.difference + half, result.p, result.df)


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student's confidence interval of the mean of ``values``; None with fewer than 2."""
    if len(values) < 2:
        return None
    half = t_quantile(0.5 + level / 2.0, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    mean = statistics.fmean(values)
    return mean - half, mean + half


def paired_p(differences: Sequence[float]) -> float:
    """Two-sided p of the paired t test that ``differences`` (one per pair, at least 2, not all equal)
    have mean 0."""
    n = len(differences)
    t = statistics.fmean(differences) / (statistics.stdev(differences) / math.sqrt(n))
    return t_two_sided_p(t, n - 1)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error rate, no independence assumed), in the input's
    order: the k-th smallest p times (m - k + 1), made monotone, capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def detectable_difference(sd_a: float, sd_b: float, n_a: int, n_b: int, alpha: float = 0.05,
                          power: float = 0.8) -> float:
    """The smallest true difference of means that a two-sided Welch test at ``alpha`` detects with
    probability ``power``, given these spreads and sizes (normal approximation of the power with
    t quantiles at the Welch-Satterthwaite degrees of freedom)."""
    va, vb = sd_a ** 2 / n_a, sd_b ** 2 / n_b
    df = _welch_df(va, vb, n_a, n_b) if va + vb > 0 else n_a + n_b - 2
    return (t_quantile(1.0 - alpha / 2.0, df) + t_quantile(power, df)) * math.sqrt(va + vb)
