"""Small diagnostics for the trainer's logs (DESIGN §2.6), all detached.

Per-position helpers return [B, T] tensors (so micro-batches can be summed); ``masked_mean``
reduces one over the valid positions.
"""

from __future__ import annotations

import torch

from megatron_opd.objectives.sampled_token import capped_log_ratio, clip_bounds, clipped_branch_taken


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, T] over ``mask`` [B, T] (0 when no position is valid); 0-dim."""
    total = torch.where(mask, values.detach().float(), 0.0).sum()
    return total / mask.sum().clamp_min(1)


def reverse_kl_estimate(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Sampled-token estimate of KL(π || q): mean over valid positions of log π(y_t) − log q(y_t)."""
    return masked_mean(student_logprobs.detach() - teacher_logprobs.detach(), mask)


def ppo_clipped(cur_logprobs: torch.Tensor, old_logprobs: torch.Tensor, clip_eps, reward: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the PPO-clipped loss −min(ρr, clip(ρ, 1−ε, 1+ε)r) takes its clipped term (PPO clip
    fraction = its masked mean). That needs both ρ outside the range and the matching sign of the
    reward r: ρ > 1+ε with r > 0, or ρ < 1−ε with r < 0. ``clip_eps``: ε or (ε_low, ε_high)."""
    low, high = clip_bounds(clip_eps)
    ratio = torch.exp(capped_log_ratio(cur_logprobs.detach() - old_logprobs.detach()))
    return clipped_branch_taken(ratio, reward.detach(), low, high)


def student_topk_mass(student_logits_at_topk: torch.Tensor, log_normalizer: torch.Tensor) -> torch.Tensor:
    """Σ_{k∈S_t} π_θ(k) [B, T] from logits at S_t [B, T, K] and log Z [B, T]: how much mass the student puts on S_t."""
    return torch.exp(student_logits_at_topk.detach().float() - log_normalizer.detach().float()[..., None]).sum(-1)


def topk_overlap(student_topk_ids: torch.Tensor, teacher_topk_ids: torch.Tensor) -> torch.Tensor:
    """|S_student ∩ S_teacher| / K per position [B, T]; ids [B, T, K] (distinct within a position)."""
    hits = (student_topk_ids[..., :, None] == teacher_topk_ids[..., None, :]).any(-1)
    return hits.float().mean(-1)


def sampled_outside_topk(sampled_ids: torch.Tensor, teacher_topk_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the sampled token y_t is not among the teacher's top-K ids [B, T, K]."""
    return ~(teacher_topk_ids == sampled_ids[..., None]).any(-1)
