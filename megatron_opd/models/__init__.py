"""Qwen3 on Megatron-Core: config translation, model provider, HF⇄Megatron weights, forward helper,
HF safetensors I/O and distributed checkpoints."""

from megatron_opd.models.checkpoint import load_checkpoint, read_checkpoint_marker, save_checkpoint
from megatron_opd.models.forward import causal_attention_mask, forward_logits, mask_vocab_padding
from megatron_opd.models.hf_io import read_hf_checkpoint, write_hf_checkpoint
from megatron_opd.models.megatron_config import (
    load_hf_config,
    padded_vocab_size,
    to_transformer_config,
)
from megatron_opd.models.provider import build_layer_spec, build_qwen3_model, transformer_engine_available
from megatron_opd.models.weight_mapping import hf_to_megatron_state_dict, megatron_to_hf_state_dict
from megatron_opd.models.weights import gather_hf_state_dict, load_hf_weights, unwrap

__all__ = [
    "build_layer_spec", "build_qwen3_model", "causal_attention_mask", "forward_logits",
    "gather_hf_state_dict", "hf_to_megatron_state_dict", "load_hf_config", "load_hf_weights",
    "mask_vocab_padding", "megatron_to_hf_state_dict", "padded_vocab_size", "to_transformer_config",
    "transformer_engine_available", "unwrap", "read_hf_checkpoint", "write_hf_checkpoint", "save_checkpoint",
    "load_checkpoint", "read_checkpoint_marker",
]
