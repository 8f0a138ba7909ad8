"""Tiny random Qwen3 models for tests and demos (no hub access needed).

The default shape exercises everything the Qwen3 mapping must get right: GQA (4 query heads, 2 KV
heads), head_dim (24) ≠ hidden / heads (16), a vocab (99) that needs padding, tied or untied embeddings.
"""

from __future__ import annotations

import torch


def tiny_qwen3_config(tie_word_embeddings: bool = False, **overrides):
    """A ``transformers.Qwen3Config`` of a ~50k-parameter model; ``overrides`` replace any field."""
    from transformers import Qwen3Config

    fields = dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie_word_embeddings, architectures=["Qwen3ForCausalLM"])
    fields.update(overrides)
    return Qwen3Config(**fields)


def tiny_qwen3_model(config, seed: int = 0):
    """``Qwen3ForCausalLM`` with reproducible random weights (norm weights randomised too, so a
    mis-mapped norm cannot hide behind all-ones), in eval mode."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def tiny_qwen3_moe_config(num_experts: int = 8, num_experts_per_tok: int = 2, norm_topk_prob: bool = True,
                          tie_word_embeddings: bool = False, **overrides):
    """A ``transformers.Qwen3MoeConfig`` of the tiny dense shape with every MLP a MoE layer of
    ``num_experts`` experts (moe_intermediate_size 32), top-``num_experts_per_tok`` routing."""
    from transformers import Qwen3MoeConfig

    fields = dict(vocab_size=99, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, norm_topk_prob=norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, max_position_embeddings=128, rms_norm_eps=1e-6,
                  router_aux_loss_coef=0.0, tie_word_embeddings=tie_word_embeddings,
                  architectures=["Qwen3MoeForCausalLM"])
    fields.update(overrides)
    return Qwen3MoeConfig(**fields)


def tiny_qwen3_moe_model(config, seed: int = 0, router_std: float = 0.5):
    """``Qwen3MoeForCausalLM`` with reproducible random weights, in eval mode. Router weights get a wide
    spread (``router_std``) so that top-k choices are decisive: a near-tie could flip an expert choice
    between two correct implementations on rounding noise alone."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, router_std)
    return model
