"""Public entry point ``drift_gates``: validation, gates, and their statistics."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.gating.config import DriftGateConfig
from megatron_opd.gating.corrections import CORRECTIONS, importance_weights
from megatron_opd.gating.gates import _dp_sum, gate_values, normalize_gates, unit_drift
from megatron_opd.gating.units import _group_size


def _check_inputs(cur_logprobs, old_logprobs, mask, config, span_ends, positions) -> None:
    if not isinstance(config, DriftGateConfig):
        raise TypeError(f"config must be a DriftGateConfig, got {type(config).__name__}")
    if not isinstance(cur_logprobs, torch.Tensor) or cur_logprobs.dim() != 2:
        raise ValueError(f"cur_logprobs must be a [B, T] tensor, got {tuple(getattr(cur_logprobs, 'shape', ()))}")
    shape = tuple(cur_logprobs.shape)
    expected = {"old_logprobs": old_logprobs, "mask": mask, "span_ends": span_ends, "positions": positions}
    for name, tensor in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} (to match cur_logprobs)")
        if tensor is not None and tensor.device != cur_logprobs.device:
            raise ValueError(f"{name} is on {tensor.device} but cur_logprobs is on {cur_logprobs.device}")
    if mask.dtype != torch.bool or (span_ends is not None and span_ends.dtype != torch.bool):
        raise TypeError("mask and span_ends must be bool tensors")
    if config.granularity == "span" and span_ends is None:
        raise ValueError("DriftGateConfig.granularity='span' needs span_ends (bool [B, T]; see newline_span_ends)")
    if positions is not None and positions.dtype.is_floating_point:
        raise ValueError("positions must hold non-negative integer global response indices")
    if cur_logprobs.is_meta:  # meta tensors (shape/device dry runs) hold no values to check
        return
    if positions is not None and bool((positions < 0).any()):  # host-device sync
        raise ValueError("positions must hold non-negative integer global response indices")
    drift = cur_logprobs.detach() - old_logprobs.detach()
    bad = ~torch.isfinite(drift) & mask
    if bool(bad.any()):  # host-device sync: fail early instead of gating on NaN
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"log π_θ − log π_old is not finite at valid position {index}: check cur/old_logprobs")


def _masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0-dim max of ``values`` over ``mask`` (−inf when nothing is valid)."""
    if values.numel() == 0:
        return values.new_full((), float("-inf"))
    return torch.where(mask, values, float("-inf")).amax()


def gate_stats(gates, drift, mask, num_units, dp_group, cp_group) -> dict[str, torch.Tensor]:
    """Gate mean/std/min/max, fraction < 0.5, |δ| mean/max and the number of units, over the whole batch."""
    # Masked with where, never boolean indexing: no host sync, and it runs on any device.
    g = torch.where(mask, gates.double(), 0.0)
    d = torch.where(mask, drift.double().abs(), 0.0)
    below_half = ((gates < 0.5) & mask).sum().double()
    sums = _dp_sum(torch.stack([g.sum(), (g * g).sum(), below_half, d.sum(), mask.sum().double(),
                                num_units.to(g.device).double() / _group_size(cp_group)]), dp_group)
    extremes = torch.stack([_masked_max(g, mask), _masked_max(-g, mask), _masked_max(d, mask)])  # −inf if empty
    if _group_size(dp_group) > 1:
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=dp_group)  # collective: DP(×CP) max
    extremes = torch.where(torch.isfinite(extremes), extremes, 0.0)  # an all-empty batch reports 0
    count = sums[4].clamp_min(1)
    mean = sums[0] / count
    return {"gate_mean": mean, "gate_std": (sums[1] / count - mean * mean).clamp_min(0).sqrt(),
            "gate_min": -extremes[1], "gate_max": extremes[0], "gate_frac_below_half": sums[2] / count,
            "abs_drift_mean": sums[3] / count, "abs_drift_max": extremes[2], "num_units": sums[5].round()}


@torch.no_grad()
def drift_gates(cur_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, config: DriftGateConfig,
                span_ends: torch.Tensor | None = None, positions: torch.Tensor | None = None, cp_group=None,
                dp_group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Detached per-position gates ĝ [B, T] (float32, 0 at invalid positions) and 0-dim stats.

    cur_logprobs / old_logprobs: [B, T_local] log π_θ(y_t) / log π_old(y_t), response-aligned;
    mask: bool [B, T_local] valid positions; span_ends: bool [B, T_local] (span granularity);
    positions: [B, T_local] global response index of each local token (default arange; needed
    under CP); cp_group: the sequence's CP group; dp_group: ranks holding the batch exactly once.
    """
    _check_inputs(cur_logprobs, old_logprobs, mask, config, span_ends, positions)
    drift = torch.where(mask, cur_logprobs.double() - old_logprobs.double(), 0.0)
    if config.granularity == "none":
        gates, num_units = torch.ones_like(drift), torch.zeros((), dtype=torch.long)
    elif config.granularity in CORRECTIONS:  # drift = log ratio λ; a CP split would need Σλ all-reduced first
        if config.granularity == "sequence_is" and cp_group is not None and _group_size(cp_group) > 1:
            raise ValueError("granularity sequence_is does not support a context-parallel split yet")
        gates = normalize_gates(importance_weights(drift, mask, config.granularity, config.is_cap), mask, config,
                                dp_group)
        num_units = mask.sum()
    else:
        unit_values, num_units = unit_drift(drift, mask, config, None if positions is None else positions.long(),
                                            span_ends, cp_group)
        gates = normalize_gates(gate_values(unit_values, config), mask, config, dp_group)
    gates = torch.where(mask, gates, 0.0)
    return gates.float(), gate_stats(gates, drift, mask, num_units, dp_group, cp_group)
