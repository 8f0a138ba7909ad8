"""pass@k, mean@n and bootstrap confidence intervals over problems.

pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained
on Code", Eq. 1) from n samples with c correct: 1 − C(n−c, k) / C(n, k), computed as the stable
product 1 − Π_{i=n−c+1}^{n} (1 − k/i) (DESIGN §5), and exactly 1 when n − c < k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct (1 <= k <= n)."""
    if not (isinstance(n, int | np.integer) and isinstance(c, int | np.integer) and isinstance(k, int | np.integer)):
        raise TypeError(f"pass_at_k: n, c, k must be integers, got {n!r}, {c!r}, {k!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k} (draw more samples: --n >= k)")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def problem_scores(num_correct: Sequence[int], n: int, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-problem metrics: ``pass@k`` for each k and ``mean@n`` (= c/n), each an array [P]."""
    scores = {f"pass@{k}": np.array([pass_at_k(n, int(c), k) for c in num_correct]) for k in ks}
    scores[f"mean@{n}"] = np.asarray(num_correct, dtype=np.float64) / n
    return scores


def bootstrap_ci(groups: Sequence[np.ndarray], num_samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over groups of the per-group mean of problem scores.

    With one group this is the usual CI of a benchmark score; with several (benchmarks) problems
    are resampled within each group (stratified), matching a headline that averages benchmarks.
    """
    rng = np.random.default_rng(seed)
    total = np.zeros(num_samples)
    for scores in groups:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.size == 0:
            raise ValueError("bootstrap_ci: a group has no problems")
        picks = rng.integers(0, scores.size, size=(num_samples, scores.size))  # [B, P]
        total += scores[picks].mean(axis=1)
    total /= len(groups)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(total, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize_scores(scores: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` for per-problem score arrays of one benchmark."""
    out = {}
    for name, values in scores.items():
        low, high = bootstrap_ci([values], seed=seed)
        out[name] = {"value": float(np.mean(values)), "ci_low": low, "ci_high": high}
    return out


def summarize_mean(per_benchmark: Mapping[str, Mapping[str, np.ndarray]], seed: int = 0) -> dict[str, dict]:
    """The benchmark mean (the paper's headline: unweighted mean of benchmark scores) with a CI."""
    names = list(per_benchmark)
    metrics = set.intersection(*(set(per_benchmark[b]) for b in names))
    out = {}
    for metric in sorted(metrics):
        groups = [per_benchmark[b][metric] for b in names]
        low, high = bootstrap_ci(groups, seed=seed)
        out[metric] = {"value": float(np.mean([np.mean(g) for g in groups])), "ci_low": low, "ci_high": high}
    return out
