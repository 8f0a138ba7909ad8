"""The trainer's view of one rollout batch: padded tensors built once, sliced per minibatch.

Layout: ``input_ids`` [N, S] holds prompt + response, right-padded. Response-aligned tensors are
[N, T] with index 0 = the first response token; the logit that predicts response token t of
sequence i sits at sequence position ``prompt_lens[i] - 1 + t`` (see ``response_positions``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_opd.rollout.types import Sample, weight_version_number
from megatron_opd.teacher.types import TeacherScore


@dataclass(kw_only=True)
class Experience:
    input_ids: torch.Tensor  # (N, S) int64, prompt + response, right-padded with pad_id
    prompt_lens: torch.Tensor  # (N,) int64
    response_lens: torch.Tensor  # (N,) int64
    response_ids: torch.Tensor  # (N, T) int64, pad_id beyond each response
    loss_mask: torch.Tensor  # (N, T) bool: valid response positions minus masked special tokens
    truncated: torch.Tensor  # (N,) bool: finished by length, not by a stop token
    engine_logprobs: torch.Tensor | None = None  # (N, T) behaviour log-probs reported by the rollout engine
    old_logprobs: torch.Tensor | None = None  # (N, T) log π_old (recomputed or the engine's)
    teacher_logprobs: torch.Tensor | None = None  # (N, T) log q(y_t)
    teacher_topk_ids: torch.Tensor | None = None  # (N, T, K) int64
    teacher_topk_logprobs: torch.Tensor | None = None  # (N, T, K)
    weight_versions: torch.Tensor | None = None  # (N,) int64 trainer weight version that sampled each row (-1: unknown)
    behaviour_logprobs: torch.Tensor | None = None  # (N, T) log μ for --logprob-source proximal (the engine's)
    pad_to_multiple: int = 1
    """Sequence lengths stay multiples of this after any ``select`` (TP size under sequence parallelism)."""

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def response_positions(self) -> torch.Tensor:
        """(N, T) int64 sequence position of the logit predicting each response token (clamped in range)."""
        steps = torch.arange(self.response_ids.shape[1], device=self.prompt_lens.device)
        positions = self.prompt_lens[:, None] - 1 + steps[None, :]
        return positions.clamp(max=self.input_ids.shape[1] - 1)

    def to(self, device) -> Experience:
        """Every tensor on ``device`` (one copy per tensor; the trainer moves each micro-batch once)."""
        return dataclasses.replace(self, **{name: None if value is None else value.to(device, non_blocking=True)
                                            for name, value in self._tensors().items()})

    def rows(self, indices: torch.Tensor) -> Experience:
        """Rows ``indices``, keeping the current sequence and response lengths."""
        return dataclasses.replace(self, **{name: None if value is None else value[indices]
                                            for name, value in self._tensors().items()})

    def select(self, indices: torch.Tensor) -> Experience:
        """Rows ``indices`` with padding trimmed to the longest selected sequence (kept a multiple of
        ``pad_to_multiple``)."""
        picked = self.rows(indices)
        multiple = self.pad_to_multiple
        seq_len = int((picked.prompt_lens + picked.response_lens).max())
        seq_len = min(-(-seq_len // multiple) * multiple, self.input_ids.shape[1])
        resp_len = max(int(picked.response_lens.max()), 1)
        return dataclasses.replace(picked, **{name: _trim(name, value, seq_len, resp_len)
                                              for name, value in picked._tensors().items()})

    def _tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pad_to_multiple"}


def _trim(name: str, value, seq_len: int, resp_len: int):
    if value is None or value.dim() < 2:
        return value
    return value[:, :seq_len] if name == "input_ids" else value[:, :resp_len]


def build_experience(samples: list[Sample], scores: list[TeacherScore] | None, *, pad_id: int,
                     special_token_ids: frozenset[int] = frozenset(), pad_to_multiple: int = 1) -> Experience:
    """Pad samples (and their teacher scores) into response-aligned tensors.

    The loss mask is built by position (every response token up to and including the stop token),
    never from ``token != pad`` (a student could otherwise learn to emit pad strings unpenalised),
    and then drops positions whose token is in ``special_token_ids``.
    """
    if not samples:
        raise ValueError("build_experience: no samples")
    num = len(samples)
    resp_len = max(max(len(s.response_ids) for s in samples), 1)
    seq_len = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    seq_len = -(-seq_len // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((num, seq_len), pad_id, dtype=torch.long)
    response_ids = torch.full((num, resp_len), pad_id, dtype=torch.long)
    valid = torch.zeros((num, resp_len), dtype=torch.bool)
    engine_lp = torch.zeros((num, resp_len))
    for i, s in enumerate(samples):
        full = s.prompt_ids + s.response_ids
        input_ids[i, : len(full)] = torch.tensor(full)
        response_ids[i, : len(s.response_ids)] = torch.tensor(s.response_ids, dtype=torch.long)
        valid[i, : len(s.response_ids)] = True
        engine_lp[i, : len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
    special = torch.tensor(sorted(special_token_ids), dtype=torch.long)
    loss_mask = valid & ~torch.isin(response_ids, special)
    exp = Experience(
        input_ids=input_ids,
        prompt_lens=torch.tensor([len(s.prompt_ids) for s in samples]),
        response_lens=torch.tensor([len(s.response_ids) for s in samples]),
        response_ids=response_ids,
        loss_mask=loss_mask,
        truncated=torch.tensor([s.finish_reason != "stop" for s in samples]),
        engine_logprobs=engine_lp,
        weight_versions=torch.tensor([_version_or_unknown(s) for s in samples], dtype=torch.long),
        pad_to_multiple=pad_to_multiple,
    )
    if scores is not None:
        _attach_teacher(exp, samples, scores, resp_len)
    return exp


def _version_or_unknown(sample: Sample) -> int:
    number = weight_version_number(sample.meta.get("weight_version"))
    return -1 if number is None else number


def _attach_teacher(exp: Experience, samples: list[Sample], scores: list[TeacherScore], resp_len: int) -> None:
    if len(scores) != len(samples):
        raise ValueError(f"teacher returned {len(scores)} scores for {len(samples)} samples")
    num = len(samples)
    exp.teacher_logprobs = torch.zeros((num, resp_len))
    k = scores[0].topk_ids.shape[-1] if scores[0].topk_ids is not None else 0
    if k:
        exp.teacher_topk_ids = torch.zeros((num, resp_len, k), dtype=torch.long)
        exp.teacher_topk_logprobs = torch.zeros((num, resp_len, k))
    for i, (sample, score) in enumerate(zip(samples, scores)):
        length = len(sample.response_ids)
        if score.token_logprobs.shape[0] != length:
            raise ValueError(f"teacher score {i} has {score.token_logprobs.shape[0]} positions, "
                             f"the response has {length}")
        exp.teacher_logprobs[i, :length] = score.token_logprobs
        if k:
            exp.teacher_topk_ids[i, :length] = score.topk_ids
            exp.teacher_topk_logprobs[i, :length] = score.topk_logprobs
    # Positions past each response keep a valid distribution so no NaN can appear under the mask.
    if k:
        exp.teacher_topk_logprobs.masked_fill_(~_valid_positions(samples, resp_len)[..., None], -torch.log(
            torch.tensor(float(k))).item())


def _valid_positions(samples: list[Sample], resp_len: int) -> torch.Tensor:
    lengths = torch.tensor([len(s.response_ids) for s in samples])
    return torch.arange(resp_len)[None, :] < lengths[:, None]


def build_sft_experience(prompts: list[list[int]], solutions: list[list[int]], *, pad_id: int,
                         pad_to_multiple: int = 1) -> Experience:
    """Reference solutions as 'responses' (for --objective sft); they end with EOS."""
    samples = [Sample(prompt_ids=p, response_ids=r, logprobs=[0.0] * len(r), finish_reason="stop",
                      prompt_index=i, sample_index=0) for i, (p, r) in enumerate(zip(prompts, solutions))]
    exp = build_experience(samples, None, pad_id=pad_id, pad_to_multiple=pad_to_multiple)
    exp.weight_versions = None  # reference solutions: no policy sampled them
    return exp
