"""Sampled-token on-policy distillation loss (DESIGN §2.1).

Per position, with the reward r_t = log q(y_t|c_t) − log π_old(y_t|c_t) (detached) and the
importance ratio ρ_t = exp(log π_θ(y_t|c_t) − log π_old(y_t|c_t)) against the behaviour student:
    ℓ_t = −ρ_t · r_t,   or PPO-clipped   ℓ_t = −min(ρ_t r_t, clip(ρ_t, 1−ε_low, 1+ε_high) r_t).
At the first update after a rollout ρ_t = 1 and ∇ℓ_t = −r_t ∇log π_θ(y_t) (REINFORCE on the
per-token reverse-KL reward). The function returns ℓ_t per position; aggregation is separate.

Departure for numerical safety: the log-ratio is capped at MAX_LOG_RATIO (ρ ≤ e^20 ≈ 4.9e8) in
value only (straight-through), since exp overflows fp32 beyond Δ ≈ 88.7 and 0·inf in the
backward would poison every gradient. Below the cap values and gradients are exact. Above it the
PPO-clipped branch still sees ρ > 1+ε (same choice, zero gradient); the unclipped branch keeps
its direction with the gradient magnitude of ρ = e^20 instead of inf.
"""

from __future__ import annotations

import torch

from megatron_opd.objectives._checks import check_finite, check_float, check_like, check_mask

MAX_LOG_RATIO = 20.0


def clip_bounds(clip_eps) -> tuple[float, float]:
    """clip_eps ε or (ε_low, ε_high) -> (1 − ε_low, 1 + ε_high)."""
    low, high = clip_eps if isinstance(clip_eps, tuple | list) else (clip_eps, clip_eps)
    if not (0 <= float(low) < 1 and float(high) >= 0):
        raise ValueError(f"clip_eps must be ε in [0, 1) or (ε_low, ε_high), got {clip_eps!r}")
    return 1.0 - float(low), 1.0 + float(high)


def capped_log_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """``log_ratio`` with its value capped at MAX_LOG_RATIO and its gradient left at 1 (straight-through),
    so exp() stays finite and a far off-policy token still gets a (bounded) gradient."""
    # (x − x.detach()) is an exact 0 with gradient 1; the where keeps −inf (ρ = 0) out of it.
    return torch.where(log_ratio > MAX_LOG_RATIO, MAX_LOG_RATIO + (log_ratio - log_ratio.detach()), log_ratio)


def clipped_branch_taken(ratio: torch.Tensor, reward: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """bool [B, T]: −min(ρr, clip(ρ)r) takes the clipped term strictly (zero gradient there):
    ρ > 1+ε with r > 0, or ρ < 1−ε with r < 0. |ρ − 1| > ε alone is not enough: with the other
    sign of r the unclipped term is the minimum and the position still trains."""
    return ((ratio > high) & (reward > 0)) | ((ratio < low) & (reward < 0))


def sampled_token_opd_loss(cur_logprobs: torch.Tensor, old_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                           clip_eps: float | tuple[float, float] | None = None, *, mask: torch.Tensor | None = None,
                           return_metrics: bool = False):
    """Per-position sampled-token OPD loss ℓ_t [B, T].

    cur_logprobs: [B, T] log π_θ(y_t) (differentiable); old_logprobs: [B, T] log π_old(y_t);
    teacher_logprobs: [B, T] log q(y_t); clip_eps: None (plain IS loss), ε or (ε_low, ε_high);
    mask: optional bool [B, T] — invalid positions get ℓ_t = 0 and may hold any value (even NaN).
    With ``return_metrics`` also returns {"ratio": ρ_t, "clip_fraction": 1[the clipped branch is
    taken] (see ``clipped_branch_taken``; 0 without clipping), "reward": r_t}, all detached [B, T].
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
    ratio = torch.exp(capped_log_ratio(torch.where(valid, cur_logprobs, old) - old))
    loss = -ratio * reward
    clipped = torch.zeros_like(valid)
    if clip_eps is not None:
        low, high = clip_bounds(clip_eps)
        loss = torch.maximum(loss, -ratio.clamp(low, high) * reward)  # −min(a, b) = max(−a, −b)
        clipped = valid & clipped_branch_taken(ratio.detach(), reward, low, high)
    loss = torch.where(valid, loss, 0.0)
    if not return_metrics:
        return loss
    metrics = {"ratio": ratio.detach(), "clip_fraction": clipped.to(loss.dtype), "reward": reward}
    return loss, metrics
