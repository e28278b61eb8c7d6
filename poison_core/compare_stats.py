"""Two-sample tests for comparing a benchmark run with an earlier one (pure numpy/math, no scipy).

* Welch's unequal-variance t-test and interval of a difference of means over seeds (Welch,
  Biometrika 1947; Welch-Satterthwaite degrees of freedom), its p-value from the regularized
  incomplete beta function (Abramowitz & Stegun 26.7.1 / 26.5.8; the continued fraction of
  Numerical Recipes 3rd ed. 6.4, "betacf");
* the score test of two proportions with a pooled rate (Agresti, Categorical Data Analysis 2013,
  3.1.3) and Newcombe's hybrid score interval of their difference (Newcombe, Stat. Med. 1998,
  method 10, built from the two Wilson intervals);
* Holm's step-down adjustment of m p-values for the family-wise error rate (Holm, Scand. J. Stat. 1979).
"""

from __future__ import annotations

from typing import Any

import math
from statistics import NormalDist

import numpy as np

from poison_core.metrics import wilson_interval


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), Numerical Recipes 6.4."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with real `df` > 0: I_{df/(df+t^2)}(df/2, 1/2)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_ppf2(confidence: float, df: float) -> float:
    """The t with P(|T| < t) = `confidence` for real `df`, by bisection on :func:`t_sf2`."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while t_sf2(high, df) > 1 - confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_sf2(mid, df) > 1 - confidence else (low, mid)
    return (low + high) / 2


def welch(base: np.ndarray, new: np.ndarray, confidence: float = 0.95) -> dict[str, Any] | None:
    """Welch's test of mean(new) - mean(base) over seeds: the difference, its interval, t, df and the
    two-sided p-value; None when either side has fewer than two values (no spread to test against).
    Two constant samples give p = 1 for equal means and p = 0 otherwise (a zero-variance difference)."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(new, dtype=np.float64)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size < 2 or b.size < 2:
        return None
    diff = float(b.mean() - a.mean())
    va, vb = float(a.var(ddof=1)) / a.size, float(b.var(ddof=1)) / b.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {"diff": diff, "ci": (diff, diff), "t": 0.0 if diff == 0 else math.copysign(math.inf, diff),
                "df": float(a.size + b.size - 2), "p": 1.0 if diff == 0 else 0.0}
    df = (va + vb) ** 2 / (va * va / (a.size - 1) + vb * vb / (b.size - 1))
    t = diff / se
    half = t_ppf2(confidence, df) * se
    return {"diff": diff, "ci": (diff - half, diff + half), "t": t, "df": df, "p": t_sf2(t, df)}


def two_proportions(base_hits: int, base_n: int, new_hits: int, new_n: int,
                    confidence: float = 0.95) -> dict[str, Any] | None:
    """The difference of two pooled rates (new - base) with Newcombe's hybrid score interval and the
    two-sided p-value of the pooled score (z) test; None when either side has no trials."""
    if base_n <= 0 or new_n <= 0:
        return None
    p1, p2 = base_hits / base_n, new_hits / new_n
    l1, u1 = wilson_interval(base_hits, base_n, confidence)
    l2, u2 = wilson_interval(new_hits, new_n, confidence)
    diff = p2 - p1
    ci = (diff - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), diff + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2))
    pooled = (base_hits + new_hits) / (base_n + new_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / base_n + 1 / new_n))
    if se == 0.0:
        z, p = 0.0, 1.0  # both rates 0 or both 1: no difference
    else:
        z = diff / se
        p = 2 * (1 - NormalDist().cdf(abs(z)))
    return {"diff": diff, "ci": (max(-1.0, ci[0]), min(1.0, ci[1])), "z": z, "p": p}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest p times (m - i + 1),
    made monotone and capped at 1; reject where the adjusted value is below alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
