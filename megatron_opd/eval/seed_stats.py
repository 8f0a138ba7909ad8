"""Statistics over training seeds: mean ± Student-t 95% interval, and paired differences.

A variant trained with n seeds gives n scores (one evaluation each). Its interval is the usual
t-interval of the mean, mean ± t_{0.975, n−1} · s / √n with s the sample standard deviation
(ddof = 1). It covers seed-to-seed variation (training and evaluation sampling together), not
only the evaluation's problem sampling that the per-run bootstrap CI covers. Two variants run with
the same seeds are compared by the paired difference d_s = a_s − b_s, whose t-interval is much
tighter than the two separate ones when the seeds share most of their noise (same starting
student, same prompt order, same evaluation seed).

The t quantile comes from the exact closed form of Student's CDF for integer degrees of freedom
(Abramowitz & Stegun 26.7.3/26.7.4), inverted by bisection: no SciPy needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CONFIDENCE = 0.95


def student_t_cdf(x: float, df: int) -> float:
    """P(T ≤ x) for Student's t with integer ``df`` ≥ 1 (A&S 26.7.3 odd df, 26.7.4 even df)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"student_t_cdf: df must be an int >= 1, got {df!r}")
    theta = math.atan(abs(x) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    # A(|x| | df) = P(|T| <= |x|): a finite series in cos²θ whose first term and ratios depend on parity.
    if df % 2 == 1:
        series, term = 0.0, 1.0
        for j in range(1, (df - 1) // 2):  # 1 + 2/3 c² + (2·4)/(3·5) c⁴ + … up to c^{df−3}
            series += term
            term *= (2 * j) / (2 * j + 1) * cos2
        series += term if df > 1 else 0.0
        two_sided = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    else:
        series, term = 0.0, 1.0
        for j in range(1, df // 2 + 1):  # 1 + 1/2 c² + (1·3)/(2·4) c⁴ + … up to c^{df−2}
            series += term
            term *= (2 * j - 1) / (2 * j) * cos2
        two_sided = math.sin(theta) * series
    return 0.5 + 0.5 * two_sided if x >= 0 else 0.5 - 0.5 * two_sided


def student_t_quantile(p: float, df: int) -> float:
    """The x with P(T ≤ x) = p, for 0.5 ≤ p < 1 (bisection on the exact CDF, to 1e-12)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"student_t_quantile: p must be in [0.5, 1), got {p!r}")
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2
    while high - low > 1e-12 * max(1.0, high):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """``{mean, std, half_width, ci_low, ci_high, n}`` of the t-interval of the mean of ``values``.

    One value has no spread estimate: the half-width is then NaN (reported as "n=1, no CI")."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "std": float("nan"), "half_width": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "n": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "half_width": half, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> dict:
    """t-interval of a − b over the seeds both have (``{seed: score}`` each); adds ``seeds``."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"paired_difference: no common seeds (a has {sorted(a)}, b has {sorted(b)})")
    out = t_interval([a[s] - b[s] for s in seeds], confidence)
    out["seeds"] = seeds
    return out


def format_interval(stats: dict, digits: int = 3, signed: bool = False) -> str:
    """``0.412 ± 0.031`` (n=3); ``0.412 (n=1, no CI)`` for one seed."""
    sign = "+" if signed else ""
    mean = f"{stats['mean']:{sign}.{digits}f}"
    if stats["n"] < 2:
        return f"{mean} (n=1, no CI)"
    return f"{mean} ± {stats['half_width']:.{digits}f}"


def all_equal(diff: dict) -> bool:
    """Every paired difference the same (e.g. two seeds that moved pass@8 by the same 1/128): the t-interval
    then has zero width, which is no evidence either way."""
    return diff["n"] >= 2 and diff["std"] <= 1e-12


def verdict(diff: dict) -> str:
    """Plain words for a paired difference: which side its 95% interval excludes zero on, if any."""
    if diff["n"] < 2:
        return "one seed: no verdict"
    if all_equal(diff):
        return f"all {diff['n']} paired differences equal: no verdict"
    if diff["ci_low"] > 0:
        return "better (CI excludes 0)"
    if diff["ci_high"] < 0:
        return "worse (CI excludes 0)"
    return "no detectable difference (CI contains 0)"
