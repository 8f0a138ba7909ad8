"""HF config loading and the TransformerConfig translation, including every invalid combination."""

import json

import pytest
import torch

from megatron_opd.models.megatron_config import load_hf_config, rope_theta, to_transformer_config
from megatron_opd.models.tiny import tiny_qwen3_config
from megatron_opd.platform import ParallelConfig


def test_translation_matches_qwen3_fields():
    cfg = tiny_qwen3_config(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    tc = to_transformer_config(cfg, ParallelConfig(tensor_model_parallel_size=2), torch.bfloat16)
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (4, 64, 96)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (4, 2, 24)
    assert tc.qk_layernorm and tc.gated_linear_unit and not tc.add_bias_linear
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-6
    assert tc.params_dtype == torch.bfloat16 and tc.bf16 and tc.tensor_model_parallel_size == 2
    assert rope_theta(cfg) == 5e5


@pytest.mark.parametrize("overrides, parallel, message", [
    (dict(num_key_value_heads=2), dict(tensor_model_parallel_size=4),
     r"num_key_value_heads=2 is not divisible by tensor_model_parallel_size=4"),
    (dict(num_attention_heads=6, num_key_value_heads=6), dict(tensor_model_parallel_size=4),
     r"num_attention_heads=6 is not divisible by tensor_model_parallel_size=4"),
    (dict(num_hidden_layers=6), dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
     r"num_hidden_layers=6 is not divisible by pipeline_model_parallel_size=2 x virtual_pipeline_model_parallel_size=2"),
    (dict(intermediate_size=91), dict(tensor_model_parallel_size=2),
     r"intermediate_size=91 is not divisible by tensor_model_parallel_size=2"),
    (dict(use_sliding_window=True), {}, r"use_sliding_window=True is not supported"),
])
def test_invalid_combinations_name_the_values(overrides, parallel, message):
    with pytest.raises(ValueError, match=message):
        to_transformer_config(tiny_qwen3_config(**overrides), ParallelConfig(**parallel))


def test_bad_dtype_and_rope_scaling_are_refused():
    with pytest.raises(ValueError, match=r"dtype must be"):
        to_transformer_config(tiny_qwen3_config(), ParallelConfig(), torch.int8)
    yarn = tiny_qwen3_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                              "original_max_position_embeddings": 32})
    with pytest.raises(ValueError, match=r"rope_type='yarn' is not supported"):
        rope_theta(yarn)


def test_load_hf_config_reads_dir_and_file(tmp_path):
    tiny_qwen3_config(True).save_pretrained(tmp_path)
    assert load_hf_config(tmp_path).tie_word_embeddings is True
    assert load_hf_config(tmp_path / "config.json").head_dim == 24


def test_load_hf_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"HF config not found: .*nowhere"):
        load_hf_config(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture \(model_type='llama'"):
        load_hf_config(tmp_path)


FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
           "gradient_accumulation_fusion", "persist_layer_norm")


def test_gpu_target_turns_the_fusions_on_and_cpu_keeps_them_off():
    """The fusions were off only because of the CPU: a GPU-targeted config (no CUDA needed here) enables them."""
    from megatron_opd.models.megatron_config import device_fields

    gpu = device_fields(on_gpu=True, use_te=True)
    assert all(gpu[name] for name in FUSIONS), gpu
    assert gpu["batch_p2p_comm"] and not gpu["use_cpu_initialization"]
    cpu = device_fields(on_gpu=False, use_te=False)
    assert not any(cpu[name] for name in FUSIONS), cpu
    assert cpu["use_cpu_initialization"] and not cpu["batch_p2p_comm"]
    # GPU without TE: the jit fusions still on; the kernel fusions need TE's kernels
    no_te = device_fields(on_gpu=True, use_te=False)
    assert no_te["bias_activation_fusion"] and no_te["bias_dropout_fusion"] and not no_te["apply_rope_fusion"]


def test_transformer_config_for_a_gpu_target_carries_the_jit_fusions():
    """Through Megatron's own TransformerConfig validation (the TE kernels are absent on this CPU)."""
    tc = to_transformer_config(tiny_qwen3_config(), ParallelConfig(), torch.bfloat16, on_gpu=True, use_te=False)
    assert tc.bias_activation_fusion and tc.bias_dropout_fusion and not tc.use_cpu_initialization
    cpu = to_transformer_config(tiny_qwen3_config(), ParallelConfig(), on_gpu=False)
    assert not any(getattr(cpu, name) for name in FUSIONS) and cpu.use_cpu_initialization
