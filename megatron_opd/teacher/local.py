"""In-process teacher: one forward pass per micro-batch of right-padded (prompt + response) rows.

The LM head runs only on response positions, so memory is (response tokens x vocab), not
(all tokens x vocab).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_opd.rollout.hf_weights import load_hf_state_dict
from megatron_opd.rollout.local import load_hf_causal_lm
from megatron_opd.teacher.base import TeacherEngine
from megatron_opd.teacher.scoring import compute_response_scores, empty_score, validate_score_inputs
from megatron_opd.teacher.types import TeacherScore


def right_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, L_max) int64, rows aligned to the left."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Groups row indices so that rows x longest row <= max_tokens (at least one row per group)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and max(longest, n) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    return batches + ([current] if current else [])


class LocalTeacher(TeacherEngine):
    """Teacher scores from an in-memory HF causal LM or a local HF dir.

    vocab_size: real vocab (model columns beyond it are excluded from softmax and top-K).
    temperature: scoring temperature, the one the objective uses (default 1).
    max_tokens_per_batch: padded tokens per forward micro-batch.
    """

    def __init__(self, model, *, vocab_size: int | None = None, temperature: float = 1.0,
                 max_tokens_per_batch: int = 32768, dtype: torch.dtype = torch.float32) -> None:
        self.model = load_hf_causal_lm(model, dtype)
        self.vocab_size = int(vocab_size or self.model.config.vocab_size)
        if temperature <= 0:
            raise ValueError(f"LocalTeacher: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.max_tokens_per_batch = int(max_tokens_per_batch)

    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int = 0) -> list[TeacherScore]:
        validate_score_inputs(prompts, responses, "LocalTeacher.score", self.vocab_size)
        rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
        out: list[TeacherScore | None] = [None] * len(rows)
        for batch in token_budget_batches([len(r) for r in rows], self.max_tokens_per_batch):
            scores = self._score_batch([prompts[i] for i in batch], [responses[i] for i in batch], top_k)
            for i, s in zip(batch, scores):
                out[i] = s
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(self, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[TeacherScore]:
        device = next(self.model.parameters()).device  # the inputs go where the model is (CPU or CUDA)
        ids, mask = (t.to(device) for t in right_pad([list(p) + list(r) for p, r in zip(prompts, responses)]))
        hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
        head = self.model.get_output_embeddings()
        scores = []
        for row, (p, r) in enumerate(zip(prompts, responses)):
            if not r:
                scores.append(empty_score(top_k))
                continue
            logits = head(hidden[row, len(p) - 1: len(p) + len(r) - 1])  # (R, V): position P-1+t predicts y_t
            score = compute_response_scores(logits, torch.tensor(r, device=device), top_k, self.temperature,
                                            self.vocab_size)
            scores.append(_to_cpu(score))  # host copy: callers get CPU scores, as from the SGLang teacher
        return scores

    def update_weights(self, source: dict[str, torch.Tensor] | str | Path) -> None:
        load_hf_state_dict(self.model, source, where="LocalTeacher.update_weights")


def _to_cpu(score: TeacherScore) -> TeacherScore:
    def cpu(t):
        return t.cpu() if t is not None else None

    return TeacherScore(token_logprobs=cpu(score.token_logprobs), topk_ids=cpu(score.topk_ids),
                        topk_logprobs=cpu(score.topk_logprobs))
