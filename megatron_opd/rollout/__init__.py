"""Rollout engines: SGLang client and in-process sampler behind one interface."""

from megatron_opd.rollout.base import RolloutEngine
from megatron_opd.rollout.config import RolloutConfig, build_rollout_engine
from megatron_opd.rollout.local import LocalRolloutEngine
from megatron_opd.rollout.types import FINISH_REASONS, Sample, SamplingParams, derive_sample_seed

__all__ = ["FINISH_REASONS", "LocalRolloutEngine", "RolloutConfig", "RolloutEngine", "Sample", "SamplingParams",
           "build_rollout_engine", "derive_sample_seed"]
