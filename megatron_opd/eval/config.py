"""``EvalConfig``: the ``eval`` section of ``OPDConfig`` and what ``python -m megatron_opd.eval`` fills."""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field

from megatron_opd.eval.benchmarks import SYNTHETIC_BENCHMARKS, available_benchmarks
from megatron_opd.rollout.types import SamplingParams

MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
"""Appended to every problem of the math benchmarks (the usual Qwen2.5-Math/Qwen3 eval prompt)."""
TOY_INSTRUCTION = ""
"""The toy task is trained on bare problems (its solutions already end in \\boxed{})."""


@dataclass(kw_only=True)
class EvalConfig:
    """What to evaluate and how: benchmarks, samples, sampling, prompt, grading, output."""

    benchmarks: tuple[str, ...] = ("aime24", "aime25", "math500", "amc23")
    n: int = 8
    """samples per problem (n >= max(ks))."""
    ks: tuple[int, ...] = (1, 8)
    data_dir: str | None = None
    """local JSONL copies ({name}.jsonl); None reads the hub datasets."""
    out_dir: str = "outputs/eval"
    limit: int | None = None
    """evaluate only the first ``limit`` problems of each benchmark (smoke runs)."""
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = -1
    max_new_tokens: int = 4096
    seed: int = 0
    """base sampling seed: sample j of problem i always gets the same seed (resume/batching invariant)."""
    instruction: str | None = None
    """text appended to every problem; None: MATH_INSTRUCTION, or TOY_INSTRUCTION for ``toy``."""
    chat_template: bool = True
    enable_thinking: bool = False
    batch_problems: int = 16
    """problems per engine call; generations are saved after each call (the resume granularity)."""
    grader_workers: int = 2
    grade_timeout_s: float = 10.0
    """hard per-answer grading limit (the worker is killed past it; verdict "timeout")."""
    bootstrap_seed: int = 0
    run_name: str | None = None
    extra: dict = field(default_factory=dict)
    """free-form metadata stored with the results (model path, training step, variant...)."""

    def __post_init__(self) -> None:
        unknown = [b for b in self.benchmarks if b not in available_benchmarks()]
        if unknown or not self.benchmarks:
            raise ValueError(f"--benchmarks: unknown {unknown or 'empty list'}; choose from {available_benchmarks()}")
        self.ks = tuple(sorted(set(int(k) for k in self.ks)))
        if self.ks[0] < 1 or self.n < self.ks[-1]:
            raise ValueError(f"--n {self.n} must be >= every k in --k {list(self.ks)} (and k >= 1)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_problems < 1 or self.grader_workers < 1 or self.grade_timeout_s <= 0:
            raise ValueError("--batch-problems, --grader-workers and --grade-timeout must be positive")
        self.sampling_params([])  # validates the sampling fields

    def sampling_params(self, stop_token_ids, benchmark: str = "") -> SamplingParams:
        """Sampling of one benchmark; its base seed mixes in the name so benchmarks draw independent noise."""
        seed = zlib.crc32(f"{self.seed}:{benchmark}".encode()) if benchmark else self.seed
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, n=self.n, seed=seed,
                              stop_token_ids=tuple(stop_token_ids))

    def instruction_for(self, benchmark: str) -> str:
        if self.instruction is not None:
            return self.instruction
        return TOY_INSTRUCTION if benchmark in SYNTHETIC_BENCHMARKS else MATH_INSTRUCTION

    def generation_settings(self, benchmark: str) -> dict:
        """Everything that changes what gets generated; a resumed run must match it exactly."""
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "instruction": self.instruction_for(benchmark), "chat_template": self.chat_template,
                "enable_thinking": self.enable_thinking}

    def to_dict(self) -> dict:
        return asdict(self)
