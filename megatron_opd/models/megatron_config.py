"""HF Qwen3 ``config.json`` → Megatron-Core ``TransformerConfig``: the one place doing this translation.

Mapping (DESIGN.md §5, verified against transformers' Qwen3ForCausalLM): kv_channels = head_dim (Qwen3
decouples it from hidden/heads), num_query_groups = num_key_value_heads, qk_layernorm (RMSNorm on each
head's q and k), RMSNorm eps, SwiGLU (gated_linear_unit + silu), no linear biases, rotary base from
``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta`` (transformers 4).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_opd.platform import ParallelConfig

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)
VOCAB_PAD_MULTIPLE = 128
"""The padded vocab is a multiple of 128 (and of TP), so it does not change with TP = 1, 2, 4, 8 and a
checkpoint reshards across those; Qwen3's 151,936 needs no padding at all."""


def load_hf_config(path_or_dir):
    """Read a HF Qwen3 ``config.json`` (a file or the directory holding it) → ``transformers.Qwen3Config``.

    Raises:
        FileNotFoundError / ValueError naming the file and the field when it is missing, not JSON,
        or not a Qwen3 dense causal LM.
    """
    from transformers import Qwen3Config

    path = Path(path_or_dir)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"HF config not found: {path} (pass a HF model directory or its config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    check_architecture(raw, source=str(path))
    return Qwen3Config.from_dict(raw)


def check_architecture(raw: dict, source: str) -> None:
    """Raise if a config dict is not a Qwen3 dense causal LM (``model_type`` and ``architectures``)."""
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if model_type != "qwen3" or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise ValueError(
            f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
            f"megatron-opd supports model_type 'qwen3' with {list(SUPPORTED_ARCHITECTURES)}")


def rope_theta(hf_config) -> float:
    """RoPE base: ``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta`` (transformers 4)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"HF config rope_parameters.rope_type={params['rope_type']!r} is not supported "
                         "(only plain RoPE, rope_type 'default')")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("HF config has neither rope_parameters['rope_theta'] nor rope_theta")
    return float(theta)


def head_dim(hf_config) -> int:
    """Per-head width: ``head_dim`` when set (Qwen3), else hidden_size / num_attention_heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Smallest multiple of lcm(``multiple``, TP) ≥ ``vocab_size`` (Megatron splits the vocab evenly over TP)."""
    step = math.lcm(multiple, tp_size)
    return -(-vocab_size // step) * step


def validate_parallel(hf_config, parallel: ParallelConfig) -> None:
    """Raise ValueError naming the values when the model cannot be split as ``parallel`` asks."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.num_model_chunks
    checks = [
        (hf_config.num_attention_heads % tp, f"num_attention_heads={hf_config.num_attention_heads} is not "
         f"divisible by tensor_model_parallel_size={tp}"),
        (hf_config.num_key_value_heads % tp, f"num_key_value_heads={hf_config.num_key_value_heads} is not "
         f"divisible by tensor_model_parallel_size={tp}"),
        (hf_config.num_attention_heads % hf_config.num_key_value_heads, f"num_attention_heads="
         f"{hf_config.num_attention_heads} is not divisible by num_key_value_heads={hf_config.num_key_value_heads}"),
        (hf_config.intermediate_size % tp, f"intermediate_size={hf_config.intermediate_size} is not divisible "
         f"by tensor_model_parallel_size={tp}"),
        (hf_config.num_hidden_layers % (pp * vpp), f"num_hidden_layers={hf_config.num_hidden_layers} is not "
         f"divisible by pipeline_model_parallel_size={pp} x virtual_pipeline_model_parallel_size={vpp}"),
    ]
    for failed, message in checks:
        if failed:
            raise ValueError(message)
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("HF config use_sliding_window=True is not supported (Qwen3 dense checkpoints set False)")
    if getattr(hf_config, "attention_bias", False):
        raise ValueError("HF config attention_bias=True is not supported (Qwen3 has no attention biases)")


def _dtype_flags(dtype: torch.dtype) -> dict:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return dict(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)


def _parallel_fields(parallel: ParallelConfig) -> dict:
    vpp = parallel.virtual_pipeline_model_parallel_size
    return dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
    )


def device_fields(on_gpu: bool, use_te: bool) -> dict:
    """Settings that depend on the target device (DESIGN §5).

    CPU: CPU initialisation, every fusion off (they are CUDA kernels or CUDA-only jit paths) and no
    batched P2P (gloo: batched isend/irecv gives silently wrong pipeline grads at PP=2, measured).
    GPU: the jit-fused bias+SwiGLU and bias+dropout are on; the kernel fusions (RoPE, weight-gradient
    accumulation into ``main_grad``, masked softmax, persistent LayerNorm) are on with the Transformer
    Engine spec, whose layers bring those kernels (the local spec would need Apex's instead).
    """
    kernels = on_gpu and use_te
    return dict(
        use_cpu_initialization=not on_gpu,
        batch_p2p_comm=on_gpu,
        bias_activation_fusion=on_gpu, bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=kernels, apply_rope_fusion=kernels,
        gradient_accumulation_fusion=kernels, persist_layer_norm=kernels,
    )


def to_transformer_config(hf_config, parallel: ParallelConfig, dtype: torch.dtype = torch.float32, *,
                          on_gpu: bool | None = None, use_te: bool | None = None):
    """Translate a HF Qwen3 config + ``ParallelConfig`` + dtype into a Megatron ``TransformerConfig``.

    ``on_gpu`` is the target device (default: CUDA is available) and ``use_te`` whether Transformer
    Engine brings the fused kernels (default: it imports); together they decide the fusions
    (``device_fields``).

    Raises:
        ValueError naming the values for every split the model does not allow.
    """
    from megatron.core.transformer import TransformerConfig

    validate_parallel(hf_config, parallel)
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        **_parallel_fields(parallel),
        **_dtype_flags(dtype),
        **_available_device_fields(torch.cuda.is_available() if on_gpu is None else on_gpu,
                                   _te_importable() if use_te is None else use_te),
    )


def _available_device_fields(on_gpu: bool, use_te: bool) -> dict:
    """``device_fields`` minus the weight-gradient fusion when its kernel is missing: Megatron's own
    output layer (not a TE layer) needs Apex's ``fused_weight_gradient_mlp_cuda`` for it and refuses
    to build without it."""
    from megatron.core.tensor_parallel import layers

    fields = device_fields(on_gpu, use_te)
    fields["gradient_accumulation_fusion"] &= layers._grad_accum_fusion_available
    return fields


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True
