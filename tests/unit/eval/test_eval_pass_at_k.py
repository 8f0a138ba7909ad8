"""pass@k against exact rational arithmetic, its closed forms, and the bootstrap CI."""

from fractions import Fraction
from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_opd.eval import pass_at_k
from megatron_opd.eval.metrics import bootstrap_ci, problem_scores, summarize_mean


def _exact(n, c, k):
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@st.composite
def _nck(draw):
    n = draw(st.integers(1, 300))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@settings(max_examples=400, deadline=None)
@given(_nck())
def test_matches_exact_rational(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 8, 16, 64])
def test_closed_forms(n):
    for c in range(n + 1):
        assert pass_at_k(n, c, n) == (1.0 if c > 0 else 0.0)  # pass@n = any correct
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-15)  # pass@1 = c/n
    for k in range(1, n + 1):
        assert pass_at_k(n, 0, k) == 0.0
        assert pass_at_k(n, n, k) == 1.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 8)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(TypeError, match="integers"):
        pass_at_k(4.0, 1, 1)


def test_bootstrap_ci_brackets_mean_and_shrinks_with_more_problems():
    rng = np.random.default_rng(0)
    small, large = rng.random(20) < 0.4, rng.random(2000) < 0.4
    lo_s, hi_s = bootstrap_ci([small.astype(float)])
    lo_l, hi_l = bootstrap_ci([large.astype(float)])
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < hi_s - lo_s
    # Normal approximation for the large sample: half-width ~ 1.96 * sd / sqrt(P).
    half = 1.96 * large.std() / np.sqrt(large.size)
    assert (hi_l - lo_l) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci([np.ones(5)]) == (1.0, 1.0)


def test_mean_is_unweighted_over_benchmarks():
    a = problem_scores([8, 0, 0, 0], n=8, ks=[1, 8])  # pass@8 = 0.25
    b = problem_scores([1, 2], n=8, ks=[1, 8])  # pass@8 = 1.0
    mean = summarize_mean({"a": a, "b": b})
    assert mean["pass@8"]["value"] == pytest.approx((0.25 + 1.0) / 2)
    assert mean["mean@8"]["value"] == pytest.approx((8 / 32 + 3 / 16) / 2)
    assert mean["pass@8"]["ci_low"] <= mean["pass@8"]["value"] <= mean["pass@8"]["ci_high"]
