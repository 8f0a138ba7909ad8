"""The output layer and the per-token statistics in one chunked pass: no [T, V/TP] logits (issue 17).

Today's path is ``logits = hidden @ W_shardᵀ`` (Megatron's ``ColumnParallelLinear`` output layer)
followed by ``vocab_parallel_stats`` / ``vocab_parallel_topk`` on the logits. This op takes the hidden
states and the weight shard instead and, ``chunk_size`` tokens at a time, forms the chunk's logits
z_c = h_c W_shardᵀ / τ, reduces them over the TP group (max, Σexp, Σexp·z in one all-gather; the
logits at the sampled / teacher ids in one all-reduce; the top-K candidates in one all-gather) and
drops them. Per token it returns log π(y_t), the entropy, log Z, the logits at given ids (LSM reads
the student's raw logits at the teacher's top-K ids, any shift) and the student/teacher top-K overlap.

The backward recomputes each chunk's logits, turns the upstream per-token gradients into dL/dz_c
(the same formulas as ``vocab_parallel_stats``) and returns grad h_c = dz_c W / τ and
grad W = Σ_c dz_cᵀ h_c / τ, accumulated over chunks in fp32 (fp64 for fp64 weights). So at most one
chunk's logits (and their gradient, computed in the same buffer) exist at any time.

TP/SP, as ``ColumnParallelLinear(sequence_parallel=...)`` does: with sequence parallelism the hidden
states arrive sharded on dim 0 (the sequence): they are all-gathered first (again in the backward,
as Megatron does, rather than kept) and their gradient is reduce-scattered; without it the hidden
states are replicated over TP and their gradient, a partial sum per vocab shard, is all-reduced.
Matmuls run in the weight's dtype, as in Megatron's layer (bf16 logits are rounded to bf16 before
the fp32 statistics, exactly like today's path); all statistics are in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_opd.ops.gather import gather_owned, scatter_owned_
from megatron_opd.ops.logprobs import _chunk_grad, _picked_grads
from megatron_opd.ops.normalizer import chunk_log_normalizer
from megatron_opd.ops.shard import VocabShard, compute_dtype, row_chunks, vocab_shard_of_width
from megatron_opd.ops.topk import local_topk, merge_topk

# Default work size of one chunk: 2**26 logits (256 MiB in fp32). Larger than the logits ops'
# chunks: every chunk reads the whole weight shard, so small chunks make the matmuls memory-bound.
HEAD_CHUNK_ELEMENTS = 1 << 26
# Vocab rows per half-precision weight-gradient product before it is added to the fp32 accumulator.
WGRAD_VOCAB_BLOCK = 16384


class HeadStats(NamedTuple):
    """Outputs of :func:`vocab_parallel_head_stats`, leading shape ``[...]`` of the (gathered) tokens.

    logprobs: log π(token_ids) or None; entropy: or None; gathered_logits: [..., J] logits / τ at
    ``gather_ids`` or None; log_normalizer: log Z (detached); topk_overlap: |student top-K ∩
    ``overlap_ids``| / K (detached) or None.
    """

    logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    gathered_logits: torch.Tensor | None
    log_normalizer: torch.Tensor
    topk_overlap: torch.Tensor | None


@dataclass(frozen=True)
class _HeadPlan:
    """Everything the autograd function needs besides tensors (same on every TP rank)."""

    shard: VocabShard
    chunk_size: int
    temperature: float
    has_target: bool
    with_entropy: bool
    sequence_parallel: bool
    masked_columns: torch.Tensor | None  # [num_valid] bool, True = logit forced to −inf


def _gather_sequence(hidden2d: torch.Tensor, plan: _HeadPlan) -> torch.Tensor:
    """The full-sequence hidden states [N, H]: SP shards all-gathered along dim 0 (rank order)."""
    if not (plan.sequence_parallel and plan.shard.distributed):
        return hidden2d
    parts = [torch.empty_like(hidden2d) for _ in range(plan.shard.world)]
    dist.all_gather(parts, hidden2d.contiguous(), group=plan.shard.group)  # collective: SP all-gather
    return torch.cat(parts)


def _reduce_hidden_grad(grad_total: torch.Tensor, plan: _HeadPlan) -> torch.Tensor:
    """Sum the per-vocab-shard partial hidden gradients over TP (reduce-scatter back to the SP shard)."""
    shard = plan.shard
    if not shard.distributed:
        return grad_total
    if plan.sequence_parallel:
        out = grad_total.new_empty(grad_total.shape[0] // shard.world, *grad_total.shape[1:])
        dist.reduce_scatter_tensor(out, grad_total, group=shard.group)  # collective: SP reduce-scatter
        return out
    dist.all_reduce(grad_total, group=shard.group)  # collective: Megatron's allreduce_dgrad
    return grad_total


def _chunk_logits(hidden_rows: torch.Tensor, weight: torch.Tensor, plan: _HeadPlan) -> torch.Tensor:
    """Logits / τ of one chunk [n, num_valid] in the compute dtype (a fresh buffer the caller owns)."""
    valid_weight = weight[: plan.shard.num_valid]
    logits = hidden_rows.to(weight.dtype) @ valid_weight.t()  # the matmul in the weight's dtype, like Megatron
    logits = logits.to(compute_dtype(weight.dtype))  # no copy for fp32/fp64
    if plan.temperature != 1.0:
        logits.div_(plan.temperature)
    if plan.masked_columns is not None:
        logits.masked_fill_(plan.masked_columns, float("-inf"))
    return logits


def _chunk_overlap(logits: torch.Tensor, overlap_ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """|student top-K ∩ teacher top-K| / K per row [n] from one chunk's logits (no gradient)."""
    k = overlap_ids.shape[-1]
    _, student_ids = merge_topk(*local_topk(logits, k, shard), k, shard)  # collective: TP all-gather
    hits = (student_ids[:, :, None] == overlap_ids[:, None, :]).any(-1)
    return hits.to(logits.dtype).mean(-1)


def _forward_chunks(total, weight, picked_ids, overlap_ids, plan: _HeadPlan):
    """(log Z [N], H [N] or None, picked logits [N, J] or None, overlap [N] or None), chunk by chunk."""
    num_rows = total.shape[0]
    cdtype = compute_dtype(weight.dtype)
    log_z = total.new_empty(num_rows, dtype=cdtype)
    entropy = torch.empty_like(log_z) if plan.with_entropy else None
    picked = None if picked_ids is None else total.new_empty(picked_ids.shape, dtype=cdtype)
    overlap = None if overlap_ids is None else torch.empty_like(log_z)
    for rows in row_chunks(num_rows, plan.chunk_size):
        logits = _chunk_logits(total[rows], weight, plan)  # [n, V_valid]: the only logits alive
        if picked is not None:
            picked[rows] = gather_owned(logits, picked_ids[rows], plan.shard)  # collective: TP sum
        if overlap is not None:
            overlap[rows] = _chunk_overlap(logits, overlap_ids[rows], plan.shard)
        chunk_z, chunk_h = chunk_log_normalizer(logits, plan.shard, plan.with_entropy, overwrite=True)
        log_z[rows] = chunk_z
        if entropy is not None:
            entropy[rows] = chunk_h
    return log_z, entropy, picked, overlap


def _selected_rows(hidden2d, rows, plan: _HeadPlan) -> torch.Tensor:
    """The token rows the op computes: the (SP-gathered) hidden states [N, H], or only ``rows`` of them [R, H]."""
    total = _gather_sequence(hidden2d, plan)
    return total if rows is None else total.index_select(0, rows)


class _HeadStatsFn(torch.autograd.Function):
    """hidden2d [N_local, H], weight [V_local, H], picked_ids [R, J] (sampled id first when has_target),
    overlap_ids [R, K], rows [R] (None: R = N, every row) -> (logprobs, entropy, gathered, log Z, overlap)."""

    @staticmethod
    def forward(ctx, hidden2d, weight, picked_ids, overlap_ids, rows, plan: _HeadPlan):
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            total = _selected_rows(hidden2d, rows, plan)
            log_z, entropy, picked, overlap = _forward_chunks(total, weight, picked_ids, overlap_ids, plan)
        del total  # the SP-gathered copy is rebuilt in the backward (Megatron does the same)
        empty = log_z.new_empty(0)
        logprobs = picked[:, 0] - log_z if plan.has_target else empty
        gathered = picked[:, int(plan.has_target):] if picked is not None else empty
        ctx.save_for_backward(hidden2d, weight, picked_ids, rows, log_z, entropy)
        ctx.plan = plan
        overlap = overlap if overlap is not None else empty
        ctx.mark_non_differentiable(log_z, overlap)
        return logprobs, (entropy if entropy is not None else empty), gathered, log_z, overlap

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, grad_gathered, _grad_log_z, _grad_overlap):
        hidden2d, weight, picked_ids, rows, log_z, entropy = ctx.saved_tensors
        plan: _HeadPlan = ctx.plan
        grad_picked = _picked_grads(grad_logprobs, grad_gathered, plan.has_target, picked_ids, log_z.dtype)
        if grad_logprobs is None and grad_entropy is None and grad_picked is None:
            return None, None, None, None, None, None
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        total = _selected_rows(hidden2d, rows, plan)
        num_valid = plan.shard.num_valid
        grad_total = torch.zeros(total.shape, dtype=weight.dtype, device=total.device) if need_hidden else None
        # fp32 (fp64) accumulation of the weight gradient over the chunks; padding rows stay 0.
        grad_weight = torch.zeros(weight.shape, dtype=log_z.dtype, device=weight.device) if need_weight else None
        for part in row_chunks(total.shape[0], plan.chunk_size):
            logits = _chunk_logits(total[part], weight, plan)  # recompute
            grad_z = _chunk_grad(logits, log_z[part], entropy[part] if entropy is not None else None,
                                 grad_logprobs[part] if grad_logprobs is not None else None,
                                 grad_entropy[part] if grad_entropy is not None else None, out=logits)
            if grad_picked is not None and num_valid > 0:  # the 1[j = id] terms, owning shard only
                scatter_owned_(grad_z, picked_ids[part], grad_picked[part], plan.shard)
            if plan.masked_columns is not None:  # masked_fill's backward: no gradient to −inf columns
                grad_z.masked_fill_(plan.masked_columns, 0.0)
            if plan.temperature != 1.0:  # z = h Wᵀ / τ
                grad_z.div_(plan.temperature)
            grad_z = grad_z.to(weight.dtype)
            hidden_rows = total[part].to(weight.dtype)
            if grad_total is not None:
                torch.mm(grad_z, weight[:num_valid], out=grad_total[part])
            if grad_weight is not None:
                if grad_z.dtype == grad_weight.dtype:
                    grad_weight[:num_valid].addmm_(grad_z.t(), hidden_rows)
                else:  # half weights: half matmuls (as Megatron's) summed in fp32, in vocab blocks so the
                    # half-precision product is never a whole [V/TP, H] temporary
                    for cols in row_chunks(num_valid, WGRAD_VOCAB_BLOCK):
                        grad_weight[cols] += (grad_z[:, cols].t() @ hidden_rows).to(grad_weight.dtype)
        grad_hidden = None
        if grad_total is not None:
            if rows is not None:  # rows not computed get no gradient; repeated rows add up
                num_rows = hidden2d.shape[0] * (plan.shard.world if plan.sequence_parallel else 1)
                grad_total = grad_total.new_zeros(num_rows, grad_total.shape[1]).index_add_(0, rows, grad_total)
            grad_hidden = _reduce_hidden_grad(grad_total, plan).to(hidden2d.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _check_inputs(hidden, weight, temperature) -> None:
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(tensor, 'dtype', type(tensor))}")
    if weight.dim() != 2 or hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [..., H] and weight [V_local, H] with the same H, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}: move them to one device")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


def _check_ids(ids, name: str, lead: tuple[int, ...], shard: VocabShard, device, trailing: bool) -> torch.Tensor:
    """ids as int64 [N] (or [N, K] when ``trailing``), after checking shape, dtype, device and range."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer torch.Tensor, got {getattr(ids, 'dtype', type(ids))}")
    shape = tuple(ids.shape[:-1]) if trailing else tuple(ids.shape)
    if shape != lead or (trailing and ids.dim() == 0):
        want = f"{lead} + (K,)" if trailing else f"{lead}"
        raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected {want} (the tokens' leading shape; "
                         "with sequence parallelism the gathered sequence)")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but hidden is on {device}: move them to one device")
    if ids.numel() and not ids.is_meta:
        low, high = int(ids.min()), int(ids.max())  # host-device sync: the range check
        if low < 0 or high >= shard.vocab_size:
            raise ValueError(f"{name} contains id {low if low < 0 else high} outside the vocab [0, {shard.vocab_size})")
    return ids.reshape(-1, ids.shape[-1]).long() if trailing else ids.reshape(-1, 1).long()


def _check_rows(token_rows, lead: tuple[int, ...], device) -> torch.Tensor | None:
    """token_rows as int64 [R] within the N = prod(lead) token rows, or None."""
    if token_rows is None:
        return None
    if not isinstance(token_rows, torch.Tensor) or token_rows.dim() != 1 or token_rows.dtype.is_floating_point:
        raise ValueError("token_rows must be a 1-D integer tensor of row indices into the flattened tokens")
    if token_rows.device != device:
        raise ValueError(f"token_rows is on {token_rows.device} but hidden is on {device}: move them to one device")
    num_rows = 1
    for size in lead:
        num_rows *= size
    if token_rows.numel() and not token_rows.is_meta:
        low, high = int(token_rows.min()), int(token_rows.max())  # host-device sync: the range check
        if low < 0 or high >= num_rows:
            raise ValueError(f"token_rows holds row {low if low < 0 else high} outside the {num_rows} token rows")
    return token_rows.long()


def _masked_columns(masked_ids, shard: VocabShard, device) -> torch.Tensor | None:
    """[num_valid] bool of this shard's columns whose global id is in ``masked_ids``."""
    if masked_ids is None:
        return None
    ids = torch.as_tensor(masked_ids, dtype=torch.long, device=device).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= shard.vocab_size):  # host sync
        raise ValueError(f"masked_ids must lie in the vocab [0, {shard.vocab_size})")
    columns = torch.zeros(shard.num_valid, dtype=torch.bool, device=device)
    local = ids - shard.start
    columns[local[(local >= 0) & (local < shard.num_valid)]] = True
    return columns


def vocab_parallel_head_stats(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor | None = None,
                              gather_ids: torch.Tensor | None = None, group=None, *,
                              overlap_ids: torch.Tensor | None = None, temperature: float = 1.0,
                              vocab_size: int | None = None, masked_ids=None, with_entropy: bool = True,
                              sequence_parallel: bool = False, token_rows: torch.Tensor | None = None,
                              chunk_size: int | None = None) -> HeadStats:
    """Per-token statistics of softmax(hidden @ weightᵀ / τ) without materialising the logits.

    hidden: [..., H] (Megatron's [S, B, H], or [T, H]); with ``sequence_parallel`` this rank's shard of
    dim 0 (the sequence), gathered over the TP ``group`` like Megatron's output layer does. weight:
    [V/TP, H] the output layer's shard (rows at or beyond ``vocab_size`` globally are padding).
    token_ids: [...] global ids (log π of them); gather_ids: [..., J] global ids (e.g. the teacher's
    top-K, plus the sampled id for the LSM tail bucket); overlap_ids: [..., K] (the teacher's top-K)
    for the overlap metric; masked_ids: global ids whose logits are −inf (never predicted; they must not
    be targets). ``[...]`` is the full (gathered) leading shape. token_rows: int [R], the rows of the
    flattened (gathered) tokens to compute, e.g. only response positions (the others cost nothing and get
    no gradient); ids and outputs are then [R] / [R, J]. Statistics in fp32 (fp64 for fp64 weights),
    identical on every TP rank; the upstream gradients must be too. ``chunk_size``: tokens per chunk
    (default: HEAD_CHUNK_ELEMENTS logits). Differentiable w.r.t. hidden and weight.
    """
    _check_inputs(hidden, weight, temperature)
    shard = vocab_shard_of_width(weight.shape[0], group, vocab_size)
    sequence_parallel = bool(sequence_parallel and shard.distributed)
    lead = tuple(hidden.shape[:-1])
    if sequence_parallel:
        lead = (lead[0] * shard.world, *lead[1:])
    rows = _check_rows(token_rows, lead, hidden.device)
    if rows is not None:
        lead = tuple(rows.shape)
    if chunk_size is None:  # from the padded width, the same on every TP rank (collectives per chunk)
        chunk_size = max(1, HEAD_CHUNK_ELEMENTS // max(1, shard.local_size))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    picked = []
    if token_ids is not None:
        picked.append(_check_ids(token_ids, "token_ids", lead, shard, hidden.device, trailing=False))
    if gather_ids is not None:
        picked.append(_check_ids(gather_ids, "gather_ids", lead, shard, hidden.device, trailing=True))
    picked_ids = torch.cat(picked, dim=1) if picked else None
    overlap2d = None
    if overlap_ids is not None:
        overlap2d = _check_ids(overlap_ids, "overlap_ids", lead, shard, hidden.device, trailing=True)
        if overlap2d.shape[1] > shard.vocab_size:
            raise ValueError(f"overlap_ids has K={overlap2d.shape[1]} > vocab size {shard.vocab_size}")
    plan = _HeadPlan(shard, chunk_size, float(temperature), token_ids is not None, with_entropy, sequence_parallel,
                     _masked_columns(masked_ids, shard, hidden.device))
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy, gathered, log_z, overlap = _HeadStatsFn.apply(hidden2d, weight, picked_ids, overlap2d, rows,
                                                                     plan)
    return HeadStats(
        logprobs.view(lead) if token_ids is not None else None,
        entropy.view(lead) if with_entropy else None,
        gathered.reshape(*lead, gather_ids.shape[-1]) if gather_ids is not None else None,
        log_z.view(lead),
        overlap.view(lead) if overlap_ids is not None else None,
    )
