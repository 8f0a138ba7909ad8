"""Data types shared by every rollout engine (SGLang client, in-process sampler)."""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(kw_only=True)
class SamplingParams:
    """Sampling settings sent with every request. All of them are always sent explicitly."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 (or 0) disables top-k."""
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    """samples per prompt."""
    seed: int | None = None


@dataclass(kw_only=True)
class Sample:
    """One sampled response. ``logprobs[i]`` is the behaviour log-prob of ``response_ids[i]``."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_index: int
    sample_index: int
    meta: dict = field(default_factory=dict)
