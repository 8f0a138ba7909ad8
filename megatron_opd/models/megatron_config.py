"""HF Qwen3 ``config.json`` → Megatron-Core ``TransformerConfig``: the one place doing this translation.

Mapping (DESIGN.md §5, verified against transformers' Qwen3ForCausalLM): kv_channels = head_dim (Qwen3
decouples it from hidden/heads), num_query_groups = num_key_value_heads, qk_layernorm (RMSNorm on each
head's q and k), RMSNorm eps, SwiGLU (gated_linear_unit + silu), no linear biases, rotary base from
``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta`` (transformers 4).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_opd.platform import ParallelConfig

SUPPORTED_ARCHITECTURES = {"qwen3": ("Qwen3ForCausalLM",), "qwen3_moe": ("Qwen3MoeForCausalLM",)}
"""model_type → the HF architectures megatron-opd builds (Qwen3 dense and Qwen3-MoE)."""
VOCAB_PAD_MULTIPLE = 128
"""The padded vocab is a multiple of 128 (and of TP), so it does not change with TP = 1, 2, 4, 8 and a
checkpoint reshards across those; Qwen3's 151,936 needs no padding at all."""


def load_hf_config(path_or_dir):
    """Read a HF Qwen3 / Qwen3-MoE ``config.json`` (a file or the directory holding it) →
    ``transformers.Qwen3Config`` / ``Qwen3MoeConfig``.

    Raises:
        FileNotFoundError / ValueError naming the file and the field when it is missing, not JSON,
        or not a Qwen3 (dense or MoE) causal LM.
    """
    from transformers import Qwen3Config, Qwen3MoeConfig

    path = Path(path_or_dir)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"HF config not found: {path} (pass a HF model directory or its config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    check_architecture(raw, source=str(path))
    config_cls = Qwen3MoeConfig if raw["model_type"] == "qwen3_moe" else Qwen3Config
    return config_cls.from_dict(raw)


def check_architecture(raw: dict, source: str) -> None:
    """Raise if a config dict is not a Qwen3 dense or Qwen3-MoE causal LM (``model_type``, ``architectures``)."""
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    supported = SUPPORTED_ARCHITECTURES.get(model_type)
    if supported is None or (archs and not set(archs) & set(supported)):
        raise ValueError(
            f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
            f"megatron-opd supports {SUPPORTED_ARCHITECTURES}")


def is_moe(hf_config) -> bool:
    """True for a Qwen3-MoE config (sparse expert MLPs)."""
    return getattr(hf_config, "model_type", None) == "qwen3_moe"


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


ROUTER_DTYPES = ("fp32", "fp64")
TOKEN_DISPATCHERS = ("alltoall", "allgather")


@dataclass(kw_only=True)
class MoEOptions:
    """Training settings of a Qwen3-MoE student that the HF config does not fix."""

    aux_loss_coeff: float = 0.0
    """Load-balancing aux loss coefficient (0: no aux loss, as RL/OPD anchors run; HF pretraining used 1e-3)."""
    router_dtype: str = "fp32"
    """Precision of the router's logits, softmax and top-k ("fp32" or "fp64"), whatever the model dtype."""
    token_dispatcher_type: str = "alltoall"
    """How tokens reach their experts' EP ranks: "alltoall" or "allgather" (both run on gloo)."""

    def __post_init__(self):
        if self.aux_loss_coeff < 0:
            raise ValueError(f"MoE aux_loss_coeff must be >= 0, got {self.aux_loss_coeff}")
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"MoE router_dtype must be one of {ROUTER_DTYPES}, got {self.router_dtype!r}")
        if self.token_dispatcher_type not in TOKEN_DISPATCHERS:
            raise ValueError(f"MoE token_dispatcher_type must be one of {TOKEN_DISPATCHERS}, "
                             f"got {self.token_dispatcher_type!r}")


def validate_moe(hf_config, parallel: ParallelConfig) -> None:
    """Raise ValueError naming the values when a Qwen3-MoE config cannot be built or split as asked."""
    ep, etp = parallel.expert_model_parallel_size, parallel.resolved_expert_tensor_parallel_size
    if not is_moe(hf_config):
        if ep > 1:
            raise ValueError(f"expert_model_parallel_size={ep} needs a MoE student (model_type 'qwen3_moe')")
        return
    if parallel.tensor_model_parallel_size > 1 and not parallel.sequence_parallel:
        raise ValueError(f"a MoE student at tensor_model_parallel_size={parallel.tensor_model_parallel_size} needs "
                         "sequence_parallel=True (--sequence-parallel): Megatron's MoE layer refuses to train "
                         "with TP and without SP")
    sparse_step = getattr(hf_config, "decoder_sparse_step", 1)
    if getattr(hf_config, "mlp_only_layers", None) or sparse_step != 1:
        raise ValueError(f"HF config mlp_only_layers={hf_config.mlp_only_layers} / decoder_sparse_step={sparse_step}"
                         " is not supported: every layer must be a MoE layer (as in Qwen3-30B-A3B / 235B-A22B)")
    checks = [
        (hf_config.num_experts % ep, f"num_experts={hf_config.num_experts} is not divisible by "
         f"expert_model_parallel_size={ep}"),
        (hf_config.moe_intermediate_size % etp, f"moe_intermediate_size={hf_config.moe_intermediate_size} is not "
         f"divisible by expert_tensor_parallel_size={etp}"),
        (hf_config.num_experts_per_tok > hf_config.num_experts, f"num_experts_per_tok="
         f"{hf_config.num_experts_per_tok} exceeds num_experts={hf_config.num_experts}"),
    ]
    for failed, message in checks:
        if failed:
            raise ValueError(message)


def moe_fields(hf_config, moe: MoEOptions | None) -> dict:
    """Megatron MoE settings of a Qwen3-MoE config (empty for a dense one).

    Routing: HF takes softmax over all experts, then top-k, and renormalises the k weights when
    ``norm_topk_prob`` (Qwen3-30B-A3B: true). Renormalised softmax over the top-k of the probabilities
    equals a softmax over the top-k logits, which is Megatron's ``moe_router_pre_softmax=False``;
    without renormalisation it is Megatron's pre-softmax (softmax over all, then top-k, no rescale).
    """
    if not is_moe(hf_config):
        return {}
    moe = moe or MoEOptions()
    return dict(
        num_moe_experts=hf_config.num_experts,
        moe_router_topk=hf_config.num_experts_per_tok,
        moe_ffn_hidden_size=hf_config.moe_intermediate_size,
        moe_router_pre_softmax=not hf_config.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_router_dtype=moe.router_dtype,
        moe_token_dispatcher_type=moe.token_dispatcher_type,
        moe_grouped_gemm=False,  # SequentialMLP: the expert layout every device can run
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )


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
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.resolved_expert_tensor_parallel_size,
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
                          on_gpu: bool | None = None, use_te: bool | None = None, moe: MoEOptions | None = None):
    """Translate a HF Qwen3 config + ``ParallelConfig`` + dtype into a Megatron ``TransformerConfig``.

    ``on_gpu`` is the target device (default: CUDA is available) and ``use_te`` whether Transformer
    Engine brings the fused kernels (default: it imports); together they decide the fusions
    (``device_fields``). ``moe`` holds the MoE training settings of a Qwen3-MoE student (defaults:
    ``MoEOptions()``); it is ignored for a dense one.

    Raises:
        ValueError naming the values for every split the model does not allow.
    """
    from megatron.core.transformer import TransformerConfig

    validate_parallel(hf_config, parallel)
    validate_moe(hf_config, parallel)
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
        **moe_fields(hf_config, moe),
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
