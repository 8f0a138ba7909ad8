"""Settings of the blockwise policy-drift gate (arXiv 2606.24084; DESIGN §2.4)."""

from __future__ import annotations

from dataclasses import dataclass

GRANULARITIES = ("none", "token", "block", "span", "sequence", "tis", "masked_is", "sequence_is")
AGGREGATIONS = ("mean", "mean_abs", "k3")
GATE_FNS = ("exp", "clip")
NORMALIZATIONS = ("mean", "none", "clipped", "residual")


def _choice(field: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DriftGateConfig.{field} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(kw_only=True)
class DriftGateConfig:
    """How drift δ_t = log π_θ(y_t) − log π_old(y_t) turns into per-position loss weights ĝ_t."""

    granularity: str = "block"
    """Units: none (gates ≡ 1) | token | block (block_size positions) | span (ends at span_ends) | sequence; or an
    importance-sampling correction in the gate's place: tis | masked_is | sequence_is (``corrections.py``)."""
    block_size: int = 64
    """N of block granularity: blocks are response positions [kN, (k+1)N); the paper's default is 64."""
    tau: float = 1.0
    """Temperature of the exp gate g = exp(−τ·|D_u|)."""
    aggregation: str = "mean"
    """Unit drift D_u over valid positions: mean of δ (signed, the paper's), mean_abs of |δ|, or k3 = mean(e^δ − 1 − δ)."""
    gate_fn: str = "exp"
    """exp: g = exp(−τ|D|); clip: g = 1 if |D| ≤ clip_eps else 0."""
    clip_eps: float | None = None
    """Threshold ε of gate_fn clip (required then)."""
    normalization: str = "mean"
    """mean: ĝ = g / mean(g) over valid positions of the batch; none; clipped: mean then clamp to clip_range;
    residual: 1 − α + α·(g / mean(g))."""
    clip_range: tuple[float, float] = (0.0, 2.0)
    """[a, b] of normalization clipped."""
    residual_alpha: float = 0.5
    """α of normalization residual, in [0, 1]."""
    is_cap: float = 2.0
    """C of the IS corrections (tis: min(ρ, C); masked_is: keep ρ in [1/C, C]; sequence_is: min(Πρ, C))."""

    def __post_init__(self) -> None:
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("gate_fn", self.gate_fn, GATE_FNS)
        _choice("normalization", self.normalization, NORMALIZATIONS)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"DriftGateConfig.block_size must be a positive int, got {self.block_size!r}")
        if not self.tau >= 0:
            raise ValueError(f"DriftGateConfig.tau must be >= 0, got {self.tau!r}")
        if self.gate_fn == "clip" and (self.clip_eps is None or not self.clip_eps >= 0):
            raise ValueError(f"DriftGateConfig.clip_eps must be a number >= 0 with gate_fn='clip', got {self.clip_eps!r}")
        low, high = self.clip_range
        if not 0 <= low <= high:
            raise ValueError(f"DriftGateConfig.clip_range must be (a, b) with 0 <= a <= b, got {self.clip_range!r}")
        self.clip_range = (float(low), float(high))
        if not self.is_cap > 1:
            raise ValueError(f"DriftGateConfig.is_cap must be > 1, got {self.is_cap!r}")
        if not 0 <= self.residual_alpha <= 1:
            raise ValueError(f"DriftGateConfig.residual_alpha must be in [0, 1], got {self.residual_alpha!r}")
