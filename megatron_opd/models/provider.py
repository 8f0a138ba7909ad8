"""Qwen3 model provider: HF config + ``ParallelConfig`` → Megatron ``GPTModel`` chunks.

Uses the Transformer Engine layer spec when TE imports (GPU images), Megatron's local spec otherwise.
The vocab is padded (``megatron_config.padded_vocab_size``); each chunk records ``real_vocab_size`` and
``padded_vocab_size`` so callers can exclude the padded logit columns.
"""

from __future__ import annotations

import logging

import torch

from megatron_opd.models.megatron_config import (
    MoEOptions,
    head_dim,
    padded_vocab_size,
    rope_theta,
    to_transformer_config,
)
from megatron_opd.platform import ParallelConfig
from megatron_opd.platform.fallbacks import patch_moe_without_te


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and CUDA is present (TE kernels need a GPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


class TorchRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm usable under sequence parallelism.

    Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel``; the norm itself is per token, so it is
    exact on a sequence shard. Its weight is tagged ``sequence_parallel`` so ``finalize_model_grads``
    sums the weight's grads over the TP ranks (each rank saw a different slice of the sequence).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


class _DropSubclassMLPNote(logging.Filter):
    """Megatron's TransformerLayer warns "Unknown MLP type ... Using default kwargs" once per layer for
    any MLP subclass. For ``SwiGLUMLP`` the default kwargs are right (its TP group defaults to the
    model's), so that note is noise in every trainer log; other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


_SUBCLASS_MLP_NOTE = _DropSubclassMLPNote()


def _local_layer_spec(num_experts: int | None = None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_opd.models.sdpa_attention import SDPADotProductAttention
    from megatron_opd.models.swiglu_mlp import SwiGLUMLP

    # MoE: Megatron's MoELayer with SequentialMLP experts (each a local MLP; no grouped GEMM on CPU).
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True,
                                    normalization="RMSNorm")
    # Fused SDPA for the causal case: the unfused local attention was most of a CPU train step.
    spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    if num_experts is None:
        spec.submodules.mlp.module = SwiGLUMLP  # SwiGLU as one autograd node (no strided add/cat)
    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if _SUBCLASS_MLP_NOTE not in layer_logger.filters:
        layer_logger.addFilter(_SUBCLASS_MLP_NOTE)
    spec.submodules.input_layernorm = TorchRMSNorm
    spec.submodules.pre_mlp_layernorm = TorchRMSNorm
    # q/k norms act on head_dim after the (sequence-gathering) qkv projection: never SP-sharded.
    spec.submodules.self_attention.submodules.q_layernorm = TorchRMSNorm
    spec.submodules.self_attention.submodules.k_layernorm = TorchRMSNorm
    return spec


def build_layer_spec(use_te: bool | None = None, num_experts: int | None = None):
    """The transformer-layer ``ModuleSpec``: TE when available (or forced with ``use_te``), else local.
    ``num_experts`` (Qwen3-MoE) gives MoE layers with SequentialMLP experts."""
    use_te = transformer_engine_available() if use_te is None else use_te
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                          qk_layernorm=True)
    return _local_layer_spec(num_experts)


def _stage_flags(pp_group, vp_stage: int | None, num_chunks: int) -> tuple[bool, bool]:
    """(holds the embedding, holds the output layer) for this PP rank's chunk ``vp_stage``."""
    first_chunk = vp_stage is None or vp_stage == 0
    last_chunk = vp_stage is None or vp_stage == num_chunks - 1
    return (pp_group.rank() == 0 and first_chunk, pp_group.rank() == pp_group.size() - 1 and last_chunk)


def _block_spec(config, layer_spec, use_te: bool, vp_stage: int | None, pp_rank: int):
    """Block spec for this chunk's layers; the local final norm is the SP-aware torch RMSNorm."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if use_te:
        return layer_spec  # TE: Megatron picks TENorm for the final norm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=TorchRMSNorm)


def build_qwen3_model(hf_config, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                      use_te: bool | None = None, pg_collection=None, moe: MoEOptions | None = None) -> list:
    """Build this rank's Qwen3 / Qwen3-MoE ``GPTModel`` chunks (one per virtual pipeline stage).

    ``moe``: router/aux-loss/dispatcher settings of a MoE student (``MoEOptions()`` by default).

    Needs ``platform.initialize_distributed(parallel)`` first; ``pg_collection`` defaults to that call's
    groups (``ParallelState.pg_collection``). Weights are randomly initialised; load
    HF weights with ``load_hf_weights`` or a checkpoint with ``load_checkpoint``.

    Returns:
        list of GPTModel, length VPP (1 without interleaving); each has ``real_vocab_size``,
        ``padded_vocab_size`` and ``hf_config`` attributes.
    """
    from megatron.core.models.gpt import GPTModel

    from megatron_opd.platform import default_pg_collection

    pg_collection = pg_collection or default_pg_collection()
    config = to_transformer_config(hf_config, parallel, dtype, moe=moe)
    if config.num_moe_experts:
        patch_moe_without_te()
    use_te = transformer_engine_available() if use_te is None else use_te
    spec = build_layer_spec(use_te, config.num_moe_experts)
    vocab = padded_vocab_size(hf_config.vocab_size, parallel.tensor_model_parallel_size)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        pre, post = _stage_flags(pg_collection.pp, vp_stage if vpp else None, vpp or 1)
        model = GPTModel(
            config=config, transformer_layer_spec=_block_spec(
                config, spec, use_te, vp_stage if vpp else None, pg_collection.pp.rank()),
            vocab_size=vocab,
            max_sequence_length=hf_config.max_position_embeddings, pre_process=pre, post_process=post,
            parallel_output=True, share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type="rope", rotary_base=rope_theta(hf_config), vp_stage=vp_stage if vpp else None,
            pg_collection=pg_collection)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        model.real_vocab_size = hf_config.vocab_size
        model.padded_vocab_size = vocab
        model.hf_config = hf_config
        chunks.append(model)
    assert head_dim(hf_config) == config.kv_channels
    return chunks
