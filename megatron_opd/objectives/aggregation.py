"""Token-mean loss aggregation with a fixed denominator (DESIGN §2.4).

L = Σ_t m_t w_t ℓ_t / N, with N = Σ m over the global batch when the caller supplies it (Megatron's
``loss_func`` contract ``(loss_sum, num_tokens, report)``: the denominator must not depend on how
the batch is split into micro-batches), else the local Σ m. w_t are optional detached weights
(the normalised drift gates ĝ_t).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_opd.objectives._checks import check_float, check_like


class TokenMean(NamedTuple):
    """loss: 0-dim; num_tokens: 0-dim int64 denominator used. ``empty`` flags a batch with no valid position."""

    loss: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def empty(self) -> torch.Tensor:
        return self.num_tokens == 0


def aggregate_token_mean(per_position_loss: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None,
                         num_tokens: int | torch.Tensor | None = None) -> TokenMean:
    """(Σ m w ℓ / num_tokens, num_tokens); with no valid position the loss is 0 (still differentiable).

    per_position_loss: [B, T]; mask: bool [B, T]; weights: [B, T] (used detached) or None;
    num_tokens: the fixed global denominator Σ m, or None for the local Σ m.
    """
    check_float("per_position_loss", per_position_loss)
    check_like("mask", mask, "per_position_loss", per_position_loss)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    weighted = per_position_loss
    if weights is not None:
        check_like("weights", weights, "per_position_loss", per_position_loss)
        weighted = per_position_loss * weights.detach()
    # where, not multiplication: ℓ may be inf/NaN at invalid positions.
    loss_sum = torch.where(mask, weighted, 0.0).sum()
    if num_tokens is None:
        num_tokens = mask.sum()
    num_tokens = torch.as_tensor(num_tokens, device=per_position_loss.device).to(torch.int64)
    if num_tokens.dim() != 0 or bool(num_tokens < 0):  # host-device sync on a scalar
        raise ValueError(f"num_tokens must be a non-negative scalar, got {num_tokens!r}")
    return TokenMean(loss_sum / num_tokens.clamp_min(1), num_tokens)
