"""Core attention of the local (non-TE) layer spec through ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` materialises the [b·np, s, s] scores (baddbmm), masks them in
place with the explicit boolean mask, runs an unfused softmax and a bmm; its backward keeps and copies
several s × s tensors per layer. On CPU that was ~70 % of a train step at 600-token sequences
(benchmarks/bench_train_speed.py). ``SDPADotProductAttention`` sends the causal case to PyTorch's
fused SDPA (a flash-attention kernel on CPU, ``is_causal=True``, grouped-query heads without
repeating K/V) and keeps Megatron's own path for everything the fast path does not cover
(a non-causal mask, sliding windows, softmax offsets, query-key layer scaling, attention bias).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def is_causal_mask(mask: torch.Tensor | None, sq: int, sk: int) -> bool:
    """True when ``mask`` (Megatron convention: True = masked out, [1 or b, 1, sq, sk]) is exactly the
    causal mask of a square ``sq`` × ``sk`` attention (the future of each query masked, nothing else)."""
    if mask is None or sq != sk or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return False
    if tuple(mask.shape[-2:]) != (sq, sk):
        return False
    causal = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu_(diagonal=1)
    return bool(torch.equal(mask, causal.expand_as(mask)))  # host sync (a bool per layer): cheap next to attention


class SDPADotProductAttention(DotProductAttention):
    """``DotProductAttention`` whose causal case runs as one fused SDPA call (same inputs, same output).

    Inputs ``query`` [sq, b, np, hn], ``key``/``value`` [sk, b, ng, hn]; output [sq, b, np·hn].
    """

    def _fast_path_ok(self, query, key, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        if attention_bias is not None or packed_seq_params is not None or self.softmax_offset is not None:
            return False
        if self.config.apply_query_key_layer_scaling or self.scale_mask_softmax.window_size is not None:
            return False
        if attention_mask is None:
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            return mask_type == AttnMaskType.causal and query.shape[0] == key.shape[0]
        return is_causal_mask(attention_mask, query.shape[0], key.shape[0])

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._fast_path_ok(query, key, attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        sq, batch = query.shape[0], query.shape[1]
        # [s, b, heads, hn] -> [b, heads, s, hn] (views; SDPA takes strided inputs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.attention_dropout.p if self.training else 0.0
        # Dropout draws from Megatron's model-parallel RNG stream, as the base class does.
        forked = dropout_p > 0 and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if forked else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1])  # (b, np, sq, hn)
        # [b, np, sq, hn] -> [sq, b, np·hn]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)

