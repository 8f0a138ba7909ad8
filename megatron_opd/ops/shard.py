"""Where a rank's vocab shard sits in the global vocab, and the few collectives the ops need.

Megatron splits the (padded) vocab into TP equal contiguous shards: rank r holds columns
[r·V_local, (r+1)·V_local) of the global vocab. The real vocab may be smaller than TP·V_local
(Megatron pads it to a TP multiple); the padding columns are excluded from every op by slicing
the local logits to their first ``num_valid`` columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Default work size of one chunk: 2**24 fp32 elements (64 MiB) per temporary.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class VocabShard:
    """The local vocab shard of one TP rank.

    group: the TP process group (None = unsharded); rank/world: position in it;
    start: global id of local column 0; local_size: V_local (padded);
    num_valid: local columns with a global id < vocab_size; vocab_size: real global vocab.
    """

    group: dist.ProcessGroup | None
    rank: int
    world: int
    start: int
    local_size: int
    num_valid: int
    vocab_size: int

    @property
    def distributed(self) -> bool:
        return self.world > 1


def build_vocab_shard(logits: torch.Tensor, group=None, vocab_size: int | None = None) -> VocabShard:
    """Locate the local shard of ``logits`` [..., V_local] in the global vocab of the TP ``group``."""
    return vocab_shard_of_width(logits.shape[-1], group, vocab_size)


def vocab_shard_of_width(local_size: int, group=None, vocab_size: int | None = None) -> VocabShard:
    """The shard of ``local_size`` columns (V_local) this rank of the TP ``group`` holds."""
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    if world == 1:
        group = None
    padded = local_size * world
    if vocab_size is None:
        vocab_size = padded
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if vocab_size > padded:
        raise ValueError(
            f"vocab_size={vocab_size} is larger than the sharded vocab "
            f"({local_size} columns x TP {world} = {padded}): pass the real vocab size or the right group"
        )
    start = rank * local_size
    num_valid = max(0, min(local_size, vocab_size - start))
    return VocabShard(group, rank, world, start, local_size, num_valid, vocab_size)


def default_chunk_size(shard: VocabShard, chunk_size: int | None) -> int:
    """Tokens per chunk: the given value, or as many rows as fit in CHUNK_ELEMENTS.

    Derived from the padded shard width ``local_size``, which is the same on every TP rank, never
    from ``num_valid``: with a padded vocab the last rank has fewer real columns, would pick a
    larger chunk, and the ranks would issue different numbers/sizes of collectives (gloo aborts
    with a collective mismatch, NCCL hangs).
    """
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(1, shard.local_size))
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def row_chunks(num_rows: int, chunk_size: int):
    """Slices [start, start + chunk_size) covering range(num_rows)."""
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


def all_reduce_sum(tensor: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Sum ``tensor`` over the TP group in place (no-op when unsharded)."""
    if shard.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=shard.group)  # collective: TP sum
    return tensor


def all_gather_stack(tensor: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Stack ``tensor`` from every TP rank: [TP, *tensor.shape] (rank order)."""
    if not shard.distributed:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(shard.world)]
    dist.all_gather(parts, tensor.contiguous(), group=shard.group)  # collective: TP all-gather
    return torch.stack(parts)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 kept (so gradcheck can run in double precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
