"""Importance-sampling corrections, the baselines the drift gates are compared with (plain tensors).

λ_t = log π_target(y_t) − log μ(y_t) on the sampled path (detached); ρ_t = e^{λ_t}; C > 1 the cap.
- token-level truncated IS (TIS; slime ``--use-tis``, verl ``rollout_correction``): w_t = min(ρ_t, C);
- masked IS (NeMo-RL ``icepop``): w_t = ρ_t when ρ_t ∈ [1/C, C], else 0 (the token is dropped);
- sequence-level truncated IS: w_t = min(Π_{s∈seq, m_s=1} ρ_s, C) for every position of the sequence.
They fill the gates' slot (``drift_gates`` with ``granularity`` tis / masked_is / sequence_is): detached
per-position weights, then the same normalisation as the gates — with ``mean`` (the default)
ŵ_t = w_t / mean_{m=1}(w) over the optimizer step's batch (self-normalised IS), so the average weight
is 1 exactly as for the gates and the loss scale does not depend on the correction.
In the trainer λ is the gates' drift δ = log π_θ − log π_old (the chosen behaviour policy), except under
``--logprob-source proximal`` where it is log π_prox − log μ (decoupled PPO's off-policy factor).
Departure from the anchors: they multiply unnormalised weights into the loss; here they are mean-normalised
like every gate, so that gating and correction differ only in how the weights are shaped.
"""

from __future__ import annotations

import math

import torch

CORRECTIONS = ("tis", "masked_is", "sequence_is")


def _check(log_ratio: torch.Tensor, mask: torch.Tensor, cap: float) -> None:
    if log_ratio.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError(f"log_ratio {tuple(log_ratio.shape)} and a bool mask of the same shape are needed, "
                         f"got mask {tuple(mask.shape)} {mask.dtype}")
    if not cap > 1:
        raise ValueError(f"the IS cap C must be > 1, got {cap}")


def truncated_is_weights(log_ratio: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """min(ρ_t, C) [B, T]; 0 at invalid positions."""
    _check(log_ratio, mask, cap)
    return torch.where(mask, torch.exp(log_ratio.double().clamp(max=math.log(cap))), 0.0)


def masked_is_weights(log_ratio: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """ρ_t inside [1/C, C], else 0 [B, T]; 0 at invalid positions."""
    _check(log_ratio, mask, cap)
    lam = log_ratio.double()
    inside = mask & (lam.abs() <= math.log(cap))
    return torch.where(inside, torch.exp(torch.where(inside, lam, 0.0)), 0.0)


def sequence_is_weights(log_ratio: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """min(Π_t ρ_t, C) of each sequence, broadcast to its valid positions [B, T]."""
    _check(log_ratio, mask, cap)
    total = torch.where(mask, log_ratio.double(), 0.0).sum(dim=1, keepdim=True)  # (B, 1) log Π ρ
    return torch.where(mask, torch.exp(total.clamp(max=math.log(cap))).expand_as(mask), 0.0)


def importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, kind: str, cap: float) -> torch.Tensor:
    """Unnormalised weights of correction ``kind`` (one of ``CORRECTIONS``), float64 [B, T]."""
    fns = {"tis": truncated_is_weights, "masked_is": masked_is_weights, "sequence_is": sequence_is_weights}
    if kind not in fns:
        raise ValueError(f"importance correction must be one of {', '.join(CORRECTIONS)}, got {kind!r}")
    return fns[kind](log_ratio, mask, cap)
