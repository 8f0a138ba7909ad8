"""Seed statistics against independent references: the t density integrated numerically, textbook
t quantiles, and hand arithmetic for the intervals."""

import math

import numpy as np
import pytest

from megatron_opd.eval.seed_stats import (
    format_interval,
    paired_difference,
    student_t_cdf,
    student_t_quantile,
    t_interval,
    verdict,
)

# Two-sided 95% critical values t_{0.975, df} (any statistics table, e.g. NIST/SEMATECH 1.3.6.7.2).
TEXTBOOK_T975 = {1: 12.7062047, 2: 4.30265273, 3: 3.18244631, 4: 2.77644511, 5: 2.57058184, 6: 2.44691185,
                 9: 2.26215716, 10: 2.22813885, 19: 2.09302405, 30: 2.04227246}


def _cdf_by_integration(x: float, df: int) -> float:
    """P(T <= x) = 1/2 + ∫_0^x f(t) dt with the t density f, by the trapezoid rule on a fine grid."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    grid = np.linspace(0.0, abs(x), 200_001)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
    area = float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(grid)))
    return 0.5 + area if x >= 0 else 0.5 - area


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 6, 7, 8, 11, 12])
@pytest.mark.parametrize("x", [-3.0, -0.4, 0.0, 0.7, 2.0, 5.5])
def test_cdf_matches_integrated_density(df, x):
    assert student_t_cdf(x, df) == pytest.approx(_cdf_by_integration(x, df), abs=1e-9)


@pytest.mark.parametrize("df,expected", sorted(TEXTBOOK_T975.items()))
def test_quantile_matches_textbook_values(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


def test_t_interval_by_hand():
    stats = t_interval([0.1, 0.2, 0.3])
    assert stats["mean"] == pytest.approx(0.2) and stats["std"] == pytest.approx(0.1)
    assert stats["half_width"] == pytest.approx(TEXTBOOK_T975[2] * 0.1 / math.sqrt(3), rel=1e-6)
    assert stats["ci_low"] == pytest.approx(0.2 - stats["half_width"]) and stats["n"] == 3
    assert format_interval(stats) == "0.200 ± 0.248"


def test_one_seed_has_no_interval():
    stats = t_interval([0.4])
    assert stats["n"] == 1 and math.isnan(stats["half_width"])
    assert format_interval(stats) == "0.400 (n=1, no CI)"
    assert verdict(stats) == "one seed: no verdict"


def test_paired_difference_uses_common_seeds_and_is_tighter():
    # Seed noise shared by both variants (+-0.1) dominates; the gap is a steady +0.02.
    base = {1: 0.30, 2: 0.50, 3: 0.40, 4: 0.20}
    gated = {1: 0.32, 2: 0.52, 3: 0.43, 5: 0.90}
    diff = paired_difference(gated, base)
    assert diff["seeds"] == [1, 2, 3]
    expected = [0.02, 0.02, 0.03]
    assert diff["mean"] == pytest.approx(np.mean(expected))
    assert diff["std"] == pytest.approx(np.std(expected, ddof=1))
    assert diff["half_width"] < t_interval([base[s] for s in (1, 2, 3)])["half_width"] / 10
    assert verdict(diff) == "better (CI excludes 0)"
    assert verdict(paired_difference(base, gated)) == "worse (CI excludes 0)"
    assert verdict(paired_difference({1: 0.1, 2: 0.3}, {1: 0.2, 2: 0.2})) == "no detectable difference (CI contains 0)"
    assert verdict(paired_difference({1: 0.5, 2: 0.75}, {1: 0.25, 2: 0.5})) == "all 2 paired differences equal: no verdict"


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="no common seeds"):
        paired_difference({1: 0.1}, {2: 0.1})
    with pytest.raises(ValueError, match="df must be an int"):
        student_t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="no values"):
        t_interval([])
