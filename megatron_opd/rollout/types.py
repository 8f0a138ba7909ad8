"""Data types shared by every rollout engine (SGLang client, in-process sampler)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(kw_only=True)
class SamplingParams:
    """Sampling settings sent with every request. All of them are always sent explicitly."""

    temperature: float = 1.0
    """0 means greedy (argmax); behaviour log-probs are then those of the untempered softmax."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 (or 0) disables top-k."""
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    """generation stops after any of these ids; the stop id is kept in ``response_ids``."""
    n: int = 1
    """samples per prompt."""
    seed: int | None = None
    """base seed of the per-sample seeds; None uses the engine's own seed."""
    ignore_eos: bool = False
    """when False the model's EOS ids (from its config) also stop generation, as in SGLang."""
    suppress_token_ids: tuple[int, ...] = ()
    """ids that are never sampled and get no probability mass (PAD/BOS-like ids)."""
    renormalize_logprobs: bool = False
    """return log-probs renormalised over the top-p/top-k nucleus instead of the full tempered softmax."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.suppress_token_ids = tuple(int(t) for t in self.suppress_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def effective_top_k(self) -> int:
        """top-k with the "disabled" spellings (-1, 0) mapped to 0."""
        return max(int(self.top_k), 0)


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

    @property
    def response_length(self) -> int:
        return len(self.response_ids)


def derive_sample_seed(base_seed: int, global_prompt_index: int, sample_index: int) -> int:
    """Seed of one sample, a pure function of (base seed, global prompt counter, sample index).

    Every engine uses this, so the in-process sampler and an SGLang server given the same
    ``sampling_seed`` draw the same noise whatever the batching, and a resumed run that restores
    the prompt counter replays the same stream. Returns an int in [0, 2**63).
    """
    key = f"{int(base_seed)}:{int(global_prompt_index)}:{int(sample_index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def weight_version_number(version) -> int | None:
    """The trainer's integer weight version from a sample's ``meta["weight_version"]``: an int (in-process
    engine) or the trainer-named SGLang version ``"v<N>"``; None when the engine did not say (or named it
    otherwise, e.g. a server started on a checkpoint)."""
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return version
    if isinstance(version, str) and version.startswith("v") and version[1:].isdigit():
        return int(version[1:])
    return None
