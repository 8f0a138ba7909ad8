"""Blockwise policy-drift gates (arXiv 2606.24084; DESIGN §2.4).

δ_t = log π_θ(y_t) − log π_old(y_t) on the sampled path (detached). For each unit u (token /
block / span / sequence) D_u = mean_{t∈u, m_t=1} a(δ_t) with a = identity (the paper's signed
mean), |·| or k3 (e^δ − 1 − δ, the KL(π_old‖π_θ) estimate with samples from π_old). Gate
g_u = exp(−τ|D_u|) (or a hard 0/1 clip at ε), broadcast to positions, then normalised:
ĝ_t = g_t / mean_{m=1}(g) so the average weight over the batch is 1.

Reductions and groups:
- cp_group: a unit may straddle CP ranks; the per-unit [Σ a(δ), count] table is all-reduced (sum)
  over cp_group, so gates equal the unsplit computation.
- dp_group: the normalising mean Σ m g / Σ m and the stats are all-reduced (sum / max) over
  dp_group, which must be the group whose ranks together hold every token of the batch exactly
  once — with CP that is Megatron's data-parallel-with-context-parallel group (dp_cp_group).
  The mean is over the tensors of this call: under gradient accumulation the trainer may use
  ``normalization="none"`` and normalise over the whole step itself.
Departures from the paper: none for the defaults; mean_abs, k3, clip gates and the clipped /
residual normalisations are the paper's "future work" options.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.gating.config import DriftGateConfig
from megatron_opd.gating.units import _group_size, global_length, unit_index


def _per_token_drift(drift: torch.Tensor, aggregation: str) -> torch.Tensor:
    """a(δ) summed into unit drift: δ (mean), |δ| (mean_abs) or e^δ − 1 − δ (k3)."""
    if aggregation == "mean":
        return drift
    if aggregation == "mean_abs":
        return drift.abs()
    return torch.expm1(drift) - drift


def unit_drift(drift: torch.Tensor, mask: torch.Tensor, config: DriftGateConfig, positions: torch.Tensor | None,
               span_ends, cp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_{u(t)} broadcast to every local position [B, T] (0 where a unit has no valid position),
    number of units with a valid position). ``positions`` None = 0..T-1 (no host sync for the length)."""
    batch = drift.shape[0]
    length = global_length(positions, drift.shape[1], cp_group)
    if positions is None:
        positions = torch.arange(drift.shape[1], device=drift.device).expand_as(drift)
    units, num_units = unit_index(config.granularity, positions, length, config.block_size, span_ends, cp_group)
    # Every position is added, invalid ones with weight 0: no boolean indexing (a host sync on GPUs).
    flat = (units + torch.arange(batch, device=units.device)[:, None] * num_units).reshape(-1)
    table = torch.zeros(2, batch * num_units, dtype=torch.float64, device=drift.device)
    table[0].index_add_(0, flat, torch.where(mask, _per_token_drift(drift, config.aggregation), 0.0).reshape(-1))
    table[1].index_add_(0, flat, mask.reshape(-1).to(torch.float64))
    if _group_size(cp_group) > 1:
        dist.all_reduce(table, group=cp_group)  # collective: CP sum of per-unit [Σ a(δ), count]
    mean = table[0] / table[1].clamp_min(1)
    return mean.view(batch, num_units).gather(1, units), (table[1] > 0).sum()


def gate_values(unit_drift_values: torch.Tensor, config: DriftGateConfig) -> torch.Tensor:
    """g = exp(−τ|D|) or 1[|D| ≤ ε]."""
    if config.gate_fn == "exp":
        return torch.exp(-config.tau * unit_drift_values.abs())
    return (unit_drift_values.abs() <= config.clip_eps).to(unit_drift_values.dtype)


def _dp_sum(values: torch.Tensor, dp_group) -> torch.Tensor:
    if _group_size(dp_group) > 1:
        dist.all_reduce(values, group=dp_group)  # collective: DP(×CP) sum over the batch
    return values


def normalize_gates(gates: torch.Tensor, mask: torch.Tensor, config: DriftGateConfig, dp_group=None) -> torch.Tensor:
    """ĝ from raw gates [B, T] per ``config.normalization``; the mean is over valid positions of all dp_group ranks."""
    if config.normalization == "none":
        return gates
    totals = _dp_sum(torch.stack([torch.where(mask, gates, 0.0).sum(), mask.sum().to(gates.dtype)]), dp_group)
    mean = totals[0] / totals[1].clamp_min(1)
    normalized = gates / mean.clamp_min(torch.finfo(gates.dtype).tiny)  # all-zero gates stay zero
    if config.normalization == "clipped":
        return normalized.clamp(*config.clip_range)
    if config.normalization == "residual":
        return 1 - config.residual_alpha + config.residual_alpha * normalized
    return normalized
