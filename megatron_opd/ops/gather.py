"""Logits at given global vocab ids from vocab-sharded logits (DESIGN §3).

Each rank reads the ids that fall in its shard (zero elsewhere) and one all-reduce sum over
the TP group completes the [..., K] result; the backward sends each gradient only to the
shard that owns the id (ids are never in the padding, so exactly one rank owns each).
"""

from __future__ import annotations

import torch

from megatron_opd.ops._checks import check_ids, check_logits
from megatron_opd.ops.shard import VocabShard, all_reduce_sum, build_vocab_shard, compute_dtype


def local_ids(ids: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(column in the local shard clamped into [0, num_valid), bool: this rank owns the id).

    The clamp keeps non-owned ids at a harmless in-range column (their values are masked out).
    """
    local = ids - shard.start
    owned = (local >= 0) & (local < shard.num_valid)
    return local.clamp(0, max(shard.num_valid, 1) - 1), owned


def gather_owned(logits2d: torch.Tensor, ids2d: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """logits2d [N, V_local], ids2d [N, J] global ids -> [N, J] compute dtype, complete on every rank."""
    if logits2d.shape[1] == 0:  # a shard of padding only (e.g. logits sliced to num_valid = 0) owns no id
        values = torch.zeros(ids2d.shape, dtype=compute_dtype(logits2d.dtype), device=logits2d.device)
    else:
        columns, owned = local_ids(ids2d, shard)
        values = torch.where(owned, torch.gather(logits2d, 1, columns).to(compute_dtype(logits2d.dtype)), 0.0)
    return all_reduce_sum(values, shard)  # collective: TP sum, each id is owned by exactly one rank


def scatter_owned_(grad2d: torch.Tensor, ids2d: torch.Tensor, grad_values: torch.Tensor, shard: VocabShard):
    """grad2d[i, id - start] += grad_values[i, j] for the ids this rank owns (in place)."""
    columns, owned = local_ids(ids2d, shard)
    grad2d.scatter_add_(1, columns, torch.where(owned, grad_values, 0.0).to(grad2d.dtype))
    return grad2d


class _VocabParallelGather(torch.autograd.Function):
    """[N, V_local] logits, [N, K] global ids -> [N, K] logits at those ids."""

    @staticmethod
    def forward(ctx, logits2d, ids2d, shard):
        ctx.save_for_backward(ids2d)
        ctx.shard = shard
        ctx.logits_meta = (logits2d.shape, logits2d.dtype, logits2d.device)
        return gather_owned(logits2d, ids2d, shard)

    @staticmethod
    def backward(ctx, grad_values):
        (ids2d,) = ctx.saved_tensors
        shape, dtype, device = ctx.logits_meta
        grad = torch.zeros(shape, dtype=dtype, device=device)
        if ctx.shard.num_valid > 0:
            scatter_owned_(grad, ids2d, grad_values, ctx.shard)
        return grad, None, None


def vocab_parallel_gather(logits: torch.Tensor, ids: torch.Tensor, group=None, *,
                          vocab_size: int | None = None) -> torch.Tensor:
    """Logits at global vocab ``ids``.

    logits: [..., V/TP] shard of the TP ``group`` (or full logits when group is None / size 1);
    ids: [..., K] int global ids in [0, vocab_size). Returns [..., K] in fp32 (fp64 for fp64
    input), identical on every TP rank; the gradient reaches only the shard owning each id.
    """
    check_logits(logits)
    shard = build_vocab_shard(logits, group, vocab_size)
    if not isinstance(ids, torch.Tensor) or ids.dim() != logits.dim():
        raise ValueError(f"ids must have shape [..., K] with the leading dims of logits {tuple(logits.shape)}, "
                         f"got {tuple(getattr(ids, 'shape', ()))}")
    check_ids(ids, logits, shard, "ids", trailing=(ids.shape[-1],))
    logits2d = logits.reshape(-1, logits.shape[-1])
    ids2d = ids.reshape(-1, ids.shape[-1]).long()
    values = _VocabParallelGather.apply(logits2d, ids2d, shard)
    return values.view(ids.shape)
