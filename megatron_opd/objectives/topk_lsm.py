"""Teacher-TopK / LSM (local support matching, arXiv 2603.25562; DESIGN §2.2).

S_t = the teacher's top-K ids at position t. Student and teacher are renormalised on S_t,
p̃_θ = softmax(z_θ[S_t]) and q̃ = softmax(log q[S_t]), and the position loss is the truncated
reverse KL, student first:
    ℓ_t = Σ_{k∈S_t} p̃_θ(k) (log p̃_θ(k) − log q̃(k)).
It is a direct differentiable loss (coefficient 1), not an advantage term. K = 1 gives ℓ ≡ 0.
Optional tail bucket (the paper's K+1 option): the sampled token y_t joins the support when it
lies outside S_t, with the teacher's log q(y_t); when y_t ∈ S_t the extra slot is left out so
no id is counted twice.
"""

from __future__ import annotations

import torch

from megatron_opd.objectives._checks import check_finite, check_float, check_like, check_mask
from megatron_opd.objectives.metrics import sampled_outside_topk, student_topk_mass


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """fp32 for half types and fp32, fp64 kept (gradcheck)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def renormalized_reverse_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
                            support: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k p̃(k)(log p̃(k) − log q̃(k)) over the slots where ``support`` [B, T, K'] is True -> [B, T].

    student_logits [B, T, K'] (any shift: only differences matter); teacher_logprobs [B, T, K'].
    Slots outside the support are replaced before any arithmetic so they give neither NaN values
    nor NaN gradients.
    """
    if support is None:
        student_log_p = torch.log_softmax(_upcast(student_logits), dim=-1)
        teacher_log_q = torch.log_softmax(_upcast(teacher_logprobs), dim=-1)
        return (student_log_p.exp() * (student_log_p - teacher_log_q)).sum(-1)
    neg_inf = torch.tensor(float("-inf"), device=student_logits.device)
    student_log_p = torch.log_softmax(torch.where(support, _upcast(student_logits), neg_inf), dim=-1)
    teacher_log_q = torch.log_softmax(torch.where(support, _upcast(teacher_logprobs), neg_inf), dim=-1)
    student_log_p = torch.where(support, student_log_p, 0.0)
    teacher_log_q = torch.where(support, teacher_log_q, 0.0)
    prob = torch.where(support, student_log_p.exp(), 0.0)
    return (prob * (student_log_p - teacher_log_q)).sum(-1)


def _tail_support(teacher_topk_logprobs, sampled_ids, teacher_topk_ids, teacher_sampled_logprobs, mask):
    """Teacher log-probs on S_t ∪ {y_t} [B, T, K+1] and the support mask (the extra slot iff y_t ∉ S_t)."""
    if sampled_ids is None or teacher_topk_ids is None or teacher_sampled_logprobs is None:
        raise ValueError("student_logits_at_topk has K+1 columns (tail bucket): pass sampled_ids, "
                         "teacher_topk_ids and teacher_sampled_logprobs (log q of the sampled token)")
    check_like("teacher_topk_ids", teacher_topk_ids, "teacher_topk_logprobs", teacher_topk_logprobs)
    check_like("sampled_ids", sampled_ids, "teacher_topk_logprobs [B, T]", teacher_topk_logprobs,
               shape=teacher_topk_logprobs.shape[:2])
    check_like("teacher_sampled_logprobs", teacher_sampled_logprobs, "sampled_ids", sampled_ids)
    check_finite("teacher_sampled_logprobs", teacher_sampled_logprobs, mask)
    outside = sampled_outside_topk(sampled_ids, teacher_topk_ids)
    support = torch.cat([torch.ones_like(teacher_topk_ids, dtype=torch.bool), outside[..., None]], dim=-1)
    teacher = torch.cat([teacher_topk_logprobs, teacher_sampled_logprobs[..., None].to(teacher_topk_logprobs.dtype)],
                        dim=-1)
    return teacher, support


def topk_lsm_loss(student_logits_at_topk: torch.Tensor, teacher_topk_logprobs: torch.Tensor, *,
                  mask: torch.Tensor | None = None, sampled_ids: torch.Tensor | None = None,
                  teacher_topk_ids: torch.Tensor | None = None, teacher_sampled_logprobs: torch.Tensor | None = None,
                  student_log_normalizer: torch.Tensor | None = None, return_metrics: bool = False):
    """Per-position LSM loss ℓ_t [B, T] (differentiable w.r.t. the student logits).

    student_logits_at_topk: [B, T, K] student logits at the teacher's top-K ids (from
    ``ops.vocab_parallel_gather``), or [B, T, K+1] with the sampled id last for the tail bucket;
    teacher_topk_logprobs: [B, T, K] teacher log-probs at those ids; mask: optional bool [B, T]
    (invalid positions give 0 and may hold anything); tail bucket: sampled_ids [B, T],
    teacher_topk_ids [B, T, K], teacher_sampled_logprobs [B, T]; student_log_normalizer [B, T]
    (log Z of the student, ``ops.vocab_parallel_stats(...).log_normalizer``) enables the
    "student_topk_mass" metric. Metrics (detached [B, T]): teacher_topk_mass, and when computable
    student_topk_mass and sampled_outside_topk.
    """
    check_float("student_logits_at_topk", student_logits_at_topk)
    check_float("teacher_topk_logprobs", teacher_topk_logprobs)
    if student_logits_at_topk.dim() != 3 or teacher_topk_logprobs.dim() != 3:
        raise ValueError("student_logits_at_topk and teacher_topk_logprobs must be [B, T, K], got "
                         f"{tuple(student_logits_at_topk.shape)} and {tuple(teacher_topk_logprobs.shape)}")
    num_k = teacher_topk_logprobs.shape[-1]
    tail = student_logits_at_topk.shape[-1] == num_k + 1
    if not tail:
        check_like("student_logits_at_topk", student_logits_at_topk, "teacher_topk_logprobs", teacher_topk_logprobs)
    mask = check_mask(mask, "teacher_topk_logprobs", teacher_topk_logprobs)
    check_finite("teacher_topk_logprobs", teacher_topk_logprobs, mask)
    teacher, support = teacher_topk_logprobs, None
    if tail:
        check_like("student_logits_at_topk", student_logits_at_topk, "teacher_topk_logprobs with the tail slot",
                   teacher_topk_logprobs, shape=(*teacher_topk_logprobs.shape[:2], num_k + 1))
        teacher, support = _tail_support(teacher_topk_logprobs, sampled_ids, teacher_topk_ids,
                                         teacher_sampled_logprobs, mask)
    if mask is not None:  # invalid positions may hold NaN: make them harmless before the math
        teacher = torch.where(mask[..., None], teacher, 0.0)
        student_logits_at_topk = torch.where(mask[..., None], student_logits_at_topk, 0.0)
    loss = renormalized_reverse_kl(student_logits_at_topk, teacher, support)
    if mask is not None:
        loss = torch.where(mask, loss, 0.0)
    if not return_metrics:
        return loss
    return loss, _lsm_metrics(student_logits_at_topk[..., :num_k], teacher_topk_logprobs, sampled_ids,
                              teacher_topk_ids, student_log_normalizer, mask)


def _lsm_metrics(student_logits, teacher_logprobs, sampled_ids, teacher_topk_ids, log_normalizer, mask):
    """Detached per-position diagnostics of the LSM support."""
    zero = torch.zeros(teacher_logprobs.shape[:2], device=teacher_logprobs.device)
    valid = mask if mask is not None else torch.ones_like(zero, dtype=torch.bool)
    metrics = {"teacher_topk_mass": torch.where(valid, teacher_logprobs.detach().float().exp().sum(-1), zero)}
    if log_normalizer is not None:
        mass = student_topk_mass(student_logits.detach(), log_normalizer.detach())
        metrics["student_topk_mass"] = torch.where(valid, mass, zero)
    if sampled_ids is not None and teacher_topk_ids is not None:
        metrics["sampled_outside_topk"] = (sampled_outside_topk(sampled_ids, teacher_topk_ids) & valid).float()
    return metrics
