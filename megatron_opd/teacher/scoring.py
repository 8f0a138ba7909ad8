"""Teacher scores from logits at the response positions (plain tensors, no model).

Scoring temperature: the teacher distribution is ``log_softmax(z / T)`` over the real vocab, with
T the temperature the objective uses (default 1, the only value SGLang scores reliably: whether
prompt log-probs are temperature-scaled differs between SGLang versions). Top-K log-probs are the
full-vocab normalised values at the top-K ids (DESIGN §2.2), never renormalised here.
"""

from __future__ import annotations

import torch

from megatron_opd.teacher.types import TeacherScore


def compute_response_scores(logits: torch.Tensor, response_ids: torch.Tensor, top_k: int,
                            temperature: float = 1.0, vocab_size: int | None = None) -> TeacherScore:
    """Teacher log-probs of one response.

    logits: (R, V_model) logits at the positions predicting each response token (position P-1+t
    predicts response token t). response_ids: (R,) int64. Columns >= vocab_size are excluded.
    Returns token_logprobs (R,), and topk ids/log-probs (R, K) sorted descending when top_k > 0.
    """
    if temperature <= 0:
        raise ValueError(f"teacher scoring temperature must be > 0, got {temperature}")
    z = logits[:, : (vocab_size or logits.shape[-1])].float()
    logp = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)  # (R, V)
    token_lp = logp.gather(1, response_ids[:, None].long()).squeeze(1)
    if top_k <= 0:
        return TeacherScore(token_logprobs=token_lp)
    k = min(top_k, logp.shape[-1])
    top_lp, top_ids = torch.topk(logp, k, dim=-1, sorted=True)
    return TeacherScore(token_logprobs=token_lp, topk_ids=top_ids.long(), topk_logprobs=top_lp)


def empty_score(top_k: int) -> TeacherScore:
    """Score of an empty response: (0,) and (0, K) tensors."""
    if top_k <= 0:
        return TeacherScore(token_logprobs=torch.zeros(0))
    return TeacherScore(token_logprobs=torch.zeros(0), topk_ids=torch.zeros(0, top_k, dtype=torch.long),
                        topk_logprobs=torch.zeros(0, top_k))


def validate_score_inputs(prompts: list[list[int]], responses: list[list[int]], where: str,
                          vocab_size: int | None = None) -> None:
    """Raises ValueError naming the row when prompts/responses cannot be scored."""
    if len(prompts) != len(responses):
        raise ValueError(f"{where}: {len(prompts)} prompts but {len(responses)} responses; pass one each")
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(prompt) == 0:
            raise ValueError(f"{where}: prompt {row} is empty; the first response token needs a context")
        bad = [t for t in list(prompt) + list(response) if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise ValueError(f"{where}: row {row} has token ids outside [0, {vocab_size}): {bad[:5]}")
