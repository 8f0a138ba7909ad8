"""Sampled-token log-probs, entropy and logits at given ids in one chunked vocab-parallel pass.

log π(y_t) = z_{y_t} − log Z_t and H_t = −Σ_v π(v) log π(v) over the real vocab (padding
columns at or beyond ``vocab_size`` excluded), with logits sharded on the vocab dimension
over a TP group (DESIGN §3). The forward keeps only per-row statistics (log Z, H); the backward
recomputes the softmax chunk by chunk and writes one gradient buffer shaped like the logits,
so no fp32 [tokens, V/TP] tensor for the whole batch is ever materialised besides that
gradient (which the logits need anyway). Fusing the three outputs into one autograd node
keeps it at a single gradient buffer even when all of them feed the loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_opd.ops._checks import check_ids, check_logits
from megatron_opd.ops.gather import gather_owned, scatter_owned_
from megatron_opd.ops.normalizer import chunk_log_normalizer, softmax_grad_chunk
from megatron_opd.ops.shard import VocabShard, build_vocab_shard, default_chunk_size, row_chunks


class VocabParallelStats(NamedTuple):
    """Outputs of :func:`vocab_parallel_stats`, leading shape ``[...]`` of the logits.

    logprobs: [...] log π(token_ids) or None; entropy: [...] or None;
    gathered_logits: [..., K] raw logits at ``gather_ids`` or None;
    log_normalizer: [...] log Z (detached, for metrics such as the student mass on S_t).
    """

    logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    gathered_logits: torch.Tensor | None
    log_normalizer: torch.Tensor


def _forward_normalizer(logits2d, shard: VocabShard, chunk_size: int, with_entropy: bool):
    """(log Z [N], H [N] or None) of every row, chunk by chunk."""
    num_rows = logits2d.shape[0]
    parts = [chunk_log_normalizer(logits2d[rows, : shard.num_valid], shard, with_entropy)
             for rows in row_chunks(num_rows, chunk_size)]
    if not parts:
        empty = logits2d.new_empty(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    log_z = torch.cat([p[0] for p in parts])
    return log_z, (torch.cat([p[1] for p in parts]) if with_entropy else None)


class _VocabParallelStatsFn(torch.autograd.Function):
    """logits2d [N, V_local], picked_ids [N, J] (sampled id first when has_target) -> stats."""

    @staticmethod
    def forward(ctx, logits2d, picked_ids, has_target, with_entropy, shard, chunk_size):
        ctx.set_materialize_grads(False)
        log_z, entropy = _forward_normalizer(logits2d, shard, chunk_size, with_entropy)
        picked = gather_owned(logits2d, picked_ids, shard) if picked_ids is not None else None
        logprobs = picked[:, 0] - log_z if has_target else log_z.new_empty(0)
        gathered = picked[:, int(has_target):] if picked is not None else log_z.new_empty(0)
        ctx.save_for_backward(logits2d, picked_ids, log_z, entropy)
        ctx.config = (has_target, shard, chunk_size)
        ctx.mark_non_differentiable(log_z)
        return logprobs, (entropy if with_entropy else log_z.new_empty(0)), gathered, log_z

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, grad_gathered, _grad_log_z):
        logits2d, picked_ids, log_z, entropy = ctx.saved_tensors
        has_target, shard, chunk_size = ctx.config
        grad_picked = _picked_grads(grad_logprobs, grad_gathered, has_target, picked_ids, log_z.dtype)
        grad = torch.empty_like(logits2d)
        grad[:, shard.num_valid:].zero_()  # vocab padding gets no gradient
        in_place = grad.dtype == log_z.dtype  # fp32/fp64 logits: compute straight into the gradient
        for rows in row_chunks(logits2d.shape[0], chunk_size):
            target = grad[rows, : shard.num_valid]
            work = _chunk_grad(logits2d[rows, : shard.num_valid], log_z[rows],
                               entropy[rows] if entropy is not None else None,
                               grad_logprobs[rows] if grad_logprobs is not None else None,
                               grad_entropy[rows] if grad_entropy is not None else None,
                               out=target if in_place else None)
            if grad_picked is not None and shard.num_valid > 0:  # 1[j = id] terms, owning shard only
                scatter_owned_(work, picked_ids[rows], grad_picked[rows], shard)
            if work is not target:
                target.copy_(work)
        return grad, None, None, None, None, None


def _picked_grads(grad_logprobs, grad_gathered, has_target, picked_ids, dtype):
    """[N, J] upstream gradient of each gathered logit (sampled id first), or None."""
    if picked_ids is None or (grad_logprobs is None and grad_gathered is None):
        return None
    grad = torch.zeros(picked_ids.shape, dtype=dtype, device=picked_ids.device)
    if has_target and grad_logprobs is not None:
        grad[:, 0] = grad_logprobs
    if grad_gathered is not None:
        grad[:, int(has_target):] = grad_gathered
    return grad


def _chunk_grad(chunk, log_z, entropy, grad_logprob, grad_entropy, out=None) -> torch.Tensor:
    """[n, V_valid] compute-dtype gradient of one chunk before the one-hot terms (into ``out`` if given)."""
    if grad_logprob is None and grad_entropy is None:
        return out.zero_() if out is not None else torch.zeros(chunk.shape, dtype=log_z.dtype, device=chunk.device)
    return softmax_grad_chunk(chunk, log_z, entropy, grad_logprob, grad_entropy, out=out)


def vocab_parallel_stats(logits: torch.Tensor, token_ids: torch.Tensor | None = None,
                         gather_ids: torch.Tensor | None = None, group=None, *, with_entropy: bool = True,
                         vocab_size: int | None = None, chunk_size: int | None = None) -> VocabParallelStats:
    """Log-probs of ``token_ids``, entropy and logits at ``gather_ids`` in one pass over the logits.

    logits: [..., V/TP] (fp16/bf16/fp32/fp64) shard of the TP ``group`` or full logits;
    token_ids: [...] global ids; gather_ids: [..., K] global ids (e.g. the teacher's top-K, plus the
    sampled id for the LSM tail bucket). Computation is in fp32 (fp64 for fp64 input), ``chunk_size``
    rows at a time. Outputs are identical on every TP rank; the upstream gradients must be too.
    """
    check_logits(logits)
    shard = build_vocab_shard(logits, group, vocab_size)
    chunk_size = default_chunk_size(shard, chunk_size)
    lead = tuple(logits.shape[:-1])
    picked = []
    if token_ids is not None:
        check_ids(token_ids, logits, shard, "token_ids")
        picked.append(token_ids.reshape(-1, 1))
    if gather_ids is not None:
        if not isinstance(gather_ids, torch.Tensor) or gather_ids.dim() != logits.dim():
            raise ValueError(f"gather_ids must have shape [..., K] with the leading dims of logits {tuple(logits.shape)}")
        check_ids(gather_ids, logits, shard, "gather_ids", trailing=(gather_ids.shape[-1],))
        picked.append(gather_ids.reshape(-1, gather_ids.shape[-1]))
    picked_ids = torch.cat([p.long() for p in picked], dim=1) if picked else None
    logprobs, entropy, gathered, log_z = _VocabParallelStatsFn.apply(
        logits.reshape(-1, logits.shape[-1]), picked_ids, token_ids is not None, with_entropy, shard, chunk_size)
    return VocabParallelStats(
        logprobs.view(lead) if token_ids is not None else None,
        entropy.view(lead) if with_entropy else None,
        gathered.reshape(*lead, gather_ids.shape[-1]) if gather_ids is not None else None,
        log_z.view(lead),
    )


def vocab_parallel_logprobs(logits, token_ids, group=None, *, vocab_size=None, chunk_size=None) -> torch.Tensor:
    """log π(token_ids) [...] from logits [..., V/TP] sharded over the TP ``group``; differentiable."""
    return vocab_parallel_stats(logits, token_ids, None, group, with_entropy=False,
                                vocab_size=vocab_size, chunk_size=chunk_size).logprobs


def vocab_parallel_entropy(logits, group=None, *, vocab_size=None, chunk_size=None) -> torch.Tensor:
    """Entropy H [...] of softmax(logits) over the real vocab; differentiable."""
    return vocab_parallel_stats(logits, None, None, group, with_entropy=True,
                                vocab_size=vocab_size, chunk_size=chunk_size).entropy


def vocab_parallel_logprobs_and_entropy(logits, token_ids, group=None, *, vocab_size=None, chunk_size=None):
    """(log π(token_ids) [...], H [...]) in one pass over the logits; both differentiable."""
    stats = vocab_parallel_stats(logits, token_ids, None, group, with_entropy=True,
                                 vocab_size=vocab_size, chunk_size=chunk_size)
    return stats.logprobs, stats.entropy
