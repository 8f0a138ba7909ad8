"""Blockwise policy-drift gating on plain tensors (no Megatron import); see ``gates`` for the method."""

from megatron_opd.gating.config import DriftGateConfig
from megatron_opd.gating.corrections import (
    CORRECTIONS,
    importance_weights,
    masked_is_weights,
    sequence_is_weights,
    truncated_is_weights,
)
from megatron_opd.gating.drift import drift_gates, gate_stats
from megatron_opd.gating.gates import gate_values, normalize_gates
from megatron_opd.gating.spans import newline_span_ends, newline_token_ids

__all__ = ["CORRECTIONS", "DriftGateConfig", "importance_weights", "masked_is_weights", "sequence_is_weights",
           "truncated_is_weights", "drift_gates", "gate_stats", "gate_values", "newline_span_ends",
           "newline_token_ids", "normalize_gates"]
