"""Global top-K of vocab-sharded logits, for a teacher that runs inside Megatron (DESIGN §3).

Each rank takes the top-K of its valid columns, one all-gather brings the K·TP candidates to
every rank, and a top-K over them is the global top-K (every global top-K member is in its own
shard's top-K). Ties between equal values may pick either id. No gradient: the teacher is
frozen; a student that needs gradients at these ids uses ``vocab_parallel_gather``.
"""

from __future__ import annotations

import torch

from megatron_opd.ops._checks import check_logits
from megatron_opd.ops.normalizer import chunk_log_normalizer
from megatron_opd.ops.shard import (
    VocabShard,
    all_gather_stack,
    build_vocab_shard,
    compute_dtype,
    default_chunk_size,
    row_chunks,
)


def local_topk(chunk: torch.Tensor, k: int, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of one shard's valid columns as ([n, k] values, [n, k] global ids), padded with −inf / −1."""
    n = chunk.shape[0]
    values = torch.full((n, k), float("-inf"), dtype=compute_dtype(chunk.dtype), device=chunk.device)
    ids = torch.full((n, k), -1, dtype=torch.long, device=chunk.device)
    take = min(k, shard.num_valid)
    if take > 0:
        top_values, top_columns = chunk.topk(take, dim=-1)
        values[:, :take] = top_values.to(values.dtype)
        ids[:, :take] = top_columns + shard.start
    return values, ids


def merge_topk(values, ids, k, shard: VocabShard):
    """Global top-k from every rank's candidates: values/ids [n, k] -> [n, k] each, sorted descending."""
    all_values = all_gather_stack(values, shard)  # collective: TP all-gather of [n, k] values
    all_ids = all_gather_stack(ids, shard)  # collective: TP all-gather of [n, k] ids
    n = values.shape[0]
    all_values = all_values.permute(1, 0, 2).reshape(n, -1)  # [n, TP*k]
    all_ids = all_ids.permute(1, 0, 2).reshape(n, -1)
    top_values, position = all_values.topk(k, dim=-1)
    return top_values, all_ids.gather(1, position)


@torch.no_grad()
def vocab_parallel_topk(logits: torch.Tensor, k: int, group=None, *, vocab_size: int | None = None,
                        chunk_size: int | None = None, return_logprobs: bool = False):
    """Global top-``k`` (values [..., k], ids [..., k] int64, sorted descending) of sharded logits.

    logits: [..., V/TP] shard of the TP ``group`` (or full logits); padding columns at or beyond
    ``vocab_size`` are never chosen. With ``return_logprobs`` the values are log-softmax
    log-probs over the real vocab (the teacher's log q at its top-K) instead of raw logits.
    Values are fp32 (fp64 for fp64 input) and identical on every TP rank.
    """
    check_logits(logits)
    shard = build_vocab_shard(logits, group, vocab_size)
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > shard.vocab_size:
        raise ValueError(f"k={k} is larger than the vocab size {shard.vocab_size}")
    logits2d = logits.reshape(-1, logits.shape[-1])
    out_values, out_ids = [], []
    for rows in row_chunks(logits2d.shape[0], default_chunk_size(shard, chunk_size)):
        chunk = logits2d[rows, : shard.num_valid]
        values, ids = merge_topk(*local_topk(chunk, k, shard), k, shard)
        if return_logprobs:
            values = values - chunk_log_normalizer(chunk, shard, with_entropy=False)[0][:, None]
        out_values.append(values)
        out_ids.append(ids)
    lead = tuple(logits.shape[:-1])
    if not out_values:
        empty = torch.empty(*lead, k, device=logits.device)
        return empty.to(compute_dtype(logits.dtype)), empty.long()
    return torch.cat(out_values).view(*lead, k), torch.cat(out_ids).view(*lead, k)
