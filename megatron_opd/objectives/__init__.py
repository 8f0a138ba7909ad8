"""Per-position OPD objectives on response-aligned [B, T] tensors (no Megatron import).

``sampled_token_opd_loss`` (DESIGN §2.1), ``topk_lsm_loss`` (Teacher-TopK/LSM, §2.2), special-token
masking, token-mean aggregation with a fixed denominator, and metric helpers (§2.6).
"""

from megatron_opd.objectives.aggregation import TokenMean, aggregate_token_mean
from megatron_opd.objectives.masking import (
    build_special_token_mask,
    default_special_token_ids,
    default_special_token_sequences,
)
from megatron_opd.objectives.metrics import (
    masked_mean,
    ppo_clipped,
    reverse_kl_estimate,
    sampled_outside_topk,
    student_topk_mass,
    topk_overlap,
)
from megatron_opd.objectives.sampled_token import sampled_token_opd_loss
from megatron_opd.objectives.topk_lsm import renormalized_reverse_kl, topk_lsm_loss

__all__ = [
    "TokenMean",
    "aggregate_token_mean",
    "build_special_token_mask",
    "default_special_token_ids",
    "default_special_token_sequences",
    "masked_mean",
    "ppo_clipped",
    "renormalized_reverse_kl",
    "reverse_kl_estimate",
    "sampled_outside_topk",
    "sampled_token_opd_loss",
    "student_topk_mass",
    "topk_lsm_loss",
    "topk_overlap",
]
