"""Data types shared by every teacher engine (SGLang scorer, in-process forward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class TeacherScore:
    """Teacher scores of one response, aligned with the response tokens (index 0 = first response token).

    token_logprobs: (R,) float32, log q(y_t | c_t) of the sampled token.
    topk_ids:       (R, K) int64 global vocab ids of the teacher's top-K at each position, or None.
    topk_logprobs:  (R, K) float32 teacher log-probs at those ids (full-vocab normalised), or None.
    """

    token_logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
