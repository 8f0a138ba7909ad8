"""Vocab-parallel primitives on plain tensors (no Megatron import): logits sharded on the vocab
dimension over a TP process group passed in as ``group`` (None or size 1 = full logits).

``vocab_parallel_head_stats`` starts one step earlier, from the hidden states and the output layer's
weight shard, and never materialises the logits. All ops take ``vocab_size`` (the real global vocab; columns at or beyond it are Megatron's padding
and are excluded everywhere) and work ``chunk_size`` tokens at a time in fp32.
"""

from megatron_opd.ops.chunked_head import HeadStats, vocab_parallel_head_stats
from megatron_opd.ops.gather import vocab_parallel_gather
from megatron_opd.ops.logprobs import (
    VocabParallelStats,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
    vocab_parallel_stats,
)
from megatron_opd.ops.shard import VocabShard, build_vocab_shard
from megatron_opd.ops.topk import vocab_parallel_topk

__all__ = [
    "HeadStats",
    "VocabParallelStats",
    "VocabShard",
    "build_vocab_shard",
    "vocab_parallel_entropy",
    "vocab_parallel_gather",
    "vocab_parallel_head_stats",
    "vocab_parallel_logprobs",
    "vocab_parallel_logprobs_and_entropy",
    "vocab_parallel_stats",
    "vocab_parallel_topk",
]
