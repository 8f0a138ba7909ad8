"""Sampled-token on-policy distillation loss (DESIGN §2.1).

Per position, with the reward r_t = log q(y_t|c_t) − log π_old(y_t|c_t) (detached) and the
importance ratio ρ_t = exp(log π_θ(y_t|c_t) − log π_old(y_t|c_t)) against the behaviour student:
    ℓ_t = −ρ_t · r_t,   or PPO-clipped   ℓ_t = −min(ρ_t r_t, clip(ρ_t, 1−ε_low, 1+ε_high) r_t).
At the first update after a rollout ρ_t = 1 and ∇ℓ_t = −r_t ∇log π_θ(y_t) (REINFORCE on the
per-token reverse-KL reward). The function returns ℓ_t per position; aggregation is separate.
"""

from __future__ import annotations

import torch

from megatron_opd.objectives._checks import check_finite, check_float, check_like, check_mask


def _clip_bounds(clip_eps) -> tuple[float, float]:
    """clip_eps ε or (ε_low, ε_high) -> (1 − ε_low, 1 + ε_high)."""
    low, high = clip_eps if isinstance(clip_eps, tuple | list) else (clip_eps, clip_eps)
    if not (0 <= float(low) < 1 and float(high) >= 0):
        raise ValueError(f"clip_eps must be ε in [0, 1) or (ε_low, ε_high), got {clip_eps!r}")
    return 1.0 - float(low), 1.0 + float(high)


def sampled_token_opd_loss(cur_logprobs: torch.Tensor, old_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                           clip_eps: float | tuple[float, float] | None = None, *, mask: torch.Tensor | None = None,
                           return_metrics: bool = False):
    """Per-position sampled-token OPD loss ℓ_t [B, T].

    cur_logprobs: [B, T] log π_θ(y_t) (differentiable); old_logprobs: [B, T] log π_old(y_t);
    teacher_logprobs: [B, T] log q(y_t); clip_eps: None (plain IS loss), ε or (ε_low, ε_high);
    mask: optional bool [B, T] — invalid positions get ℓ_t = 0 and may hold any value (even NaN).
    With ``return_metrics`` also returns {"ratio": ρ_t, "clip_fraction": 1[|ρ_t − 1| > ε] (0 without
    clipping), "reward": r_t}, all detached [B, T].
    """
    check_float("cur_logprobs", cur_logprobs)
    check_like("old_logprobs", old_logprobs, "cur_logprobs", cur_logprobs)
    check_like("teacher_logprobs", teacher_logprobs, "cur_logprobs", cur_logprobs)
    mask = check_mask(mask, "cur_logprobs", cur_logprobs)
    check_finite("teacher_logprobs", teacher_logprobs, mask)
    check_finite("old_logprobs", old_logprobs, mask)
    valid = mask if mask is not None else torch.ones_like(cur_logprobs, dtype=torch.bool)
    old = torch.where(valid, old_logprobs.detach(), 0.0)
    reward = torch.where(valid, teacher_logprobs.detach() - old_logprobs.detach(), 0.0)
    ratio = torch.exp(torch.where(valid, cur_logprobs, old) - old)
    loss = -ratio * reward
    clipped = torch.zeros_like(valid)
    if clip_eps is not None:
        low, high = _clip_bounds(clip_eps)
        loss = torch.maximum(loss, -ratio.clamp(low, high) * reward)  # −min(a, b) = max(−a, −b)
        clipped = valid & ((ratio < low) | (ratio > high))
    loss = torch.where(valid, loss, 0.0)
    if not return_metrics:
        return loss
    metrics = {"ratio": ratio.detach(), "clip_fraction": clipped.to(loss.dtype), "reward": reward}
    return loss, metrics
