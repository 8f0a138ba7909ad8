"""Chunked, vocab-parallel softmax statistics: the log-normaliser log Z and the entropy H.

For one row of logits z split over TP shards r (DESIGN §3):
    log Z = log Σ_j exp(z_j),   H = −Σ_j p_j log p_j = log S − A / S,
with S = Σ_j exp(z_j − m), A = Σ_j exp(z_j − m)(z_j − m) and m the row max. Each rank computes
(m_r, S_r, A_r) on its shard; one all-gather of these three numbers per row lets every rank
combine them exactly (rescaling by exp(m_r − m)), so a chunk costs one collective, not three.
Only a [chunk, V_local] fp32 temporary ever exists.
"""

from __future__ import annotations

import torch

from megatron_opd.ops.shard import VocabShard, all_gather_stack, compute_dtype

# A shifted logit (or log-prob) below this has exp() == 0 exactly in fp32 and fp64 (exp underflows
# below about −745). Clamping −inf up to it changes no value and keeps 0·(−inf) = NaN out of the
# Σ p·z sums and the entropy gradient (masked or −inf logit columns).
LOG_ZERO = -1.0e4


def local_softmax_stats(chunk: torch.Tensor, with_entropy: bool, overwrite: bool = False) -> torch.Tensor:
    """(m_r, S_r, A_r) of one shard. chunk: [n, V_valid] any float dtype -> [n, 3] compute dtype.

    −inf logits are allowed (they get probability 0); a row whose shard is all −inf contributes
    like a padding-only shard (m_r = −inf, S_r = A_r = 0). ``overwrite``: a compute-dtype ``chunk``
    that is a temporary of the caller is used as the work buffer (its values are destroyed).
    """
    cdtype = compute_dtype(chunk.dtype)
    n = chunk.shape[0]
    if chunk.shape[1] == 0:  # a shard made only of vocab padding contributes nothing
        stats = torch.zeros(n, 3, dtype=cdtype, device=chunk.device)
        stats[:, 0] = float("-inf")
        return stats
    row_max = chunk.amax(dim=-1).to(cdtype)  # [n]
    safe_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # an all −inf row must not give −inf − −inf
    in_place = overwrite and chunk.dtype == cdtype
    shifted = (chunk if in_place else chunk.to(cdtype, copy=True))  # [n, V_valid], the one copy (if any)
    shifted.sub_(safe_max[:, None]).clamp_min_(LOG_ZERO)
    if with_entropy:
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        # Σ exp·shifted in place in ``shifted`` (no third [n, V] temporary). A summation, not a
        # bmm/dot: torch's reductions sum pairwise, a GEMM accumulates ~V terms in a row (and may
        # use TF32 on GPUs), which cost ~1e-3 of entropy at V = 151,936.
        weighted = shifted.mul_(exp).sum(dim=-1)
    else:
        sum_exp = shifted.exp_().sum(dim=-1)
        weighted = torch.zeros_like(sum_exp)
    return torch.stack([row_max, sum_exp, weighted], dim=-1)


def combine_softmax_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-shard stats [TP, n, 3] into (log Z [n], H [n]) of the full row."""
    shard_max, shard_sum, shard_weighted = stats.unbind(-1)  # each [TP, n]
    row_max = shard_max.amax(dim=0)
    has_mass = shard_sum > 0  # padding-only shards have max -inf: keep them out of exp/mul
    scale = torch.where(has_mass, torch.exp(shard_max - row_max), 0.0)
    shift = torch.where(has_mass, (shard_max - row_max) * shard_sum, 0.0)
    total_sum = (scale * shard_sum).sum(dim=0)
    total_weighted = (scale * (shard_weighted + shift)).sum(dim=0)
    log_sum = total_sum.log()
    return row_max + log_sum, log_sum - total_weighted / total_sum


def chunk_log_normalizer(chunk: torch.Tensor, shard: VocabShard, with_entropy: bool, overwrite: bool = False):
    """(log Z [n], H [n]) of the rows of ``chunk`` [n, V_valid] over the whole TP vocab
    (``overwrite``: see ``local_softmax_stats``)."""
    stats = local_softmax_stats(chunk, with_entropy, overwrite)
    return combine_softmax_stats(all_gather_stack(stats, shard))  # collective: TP all-gather of [n, 3]


def softmax_grad_chunk(chunk, log_z, entropy, grad_logprob, grad_entropy, out=None) -> torch.Tensor:
    """Gradient of the normaliser-dependent outputs w.r.t. the logits of one chunk.

    chunk [n, V_valid]; log_z, entropy, grad_logprob, grad_entropy [n] (grads may be None);
    out: optional compute-dtype [n, V_valid] buffer (e.g. the slice of the final gradient) to
    write into, saving a temporary and a copy. d(z_y − log Z)/dz_j = 1[j=y] − p_j and
    dH/dz_j = −p_j (log p_j + H); this returns the −p_j (g_lp + g_H (log p_j + H)) part, the
    1[j=y] part is scattered by the caller.
    """
    cdtype = compute_dtype(chunk.dtype)
    if out is None:
        log_p = chunk.to(cdtype, copy=True).sub_(log_z[:, None])  # [n, V_valid]
    else:
        log_p = torch.sub(chunk.to(cdtype), log_z[:, None], out=out)
    log_p.clamp_min_(LOG_ZERO)  # −inf columns: p = 0 exactly and a finite (log p + H) factor, not 0·inf
    prob = log_p.exp()
    if grad_entropy is None:
        return torch.mul(prob, -grad_logprob[:, None], out=log_p)
    coef = log_p.add_(entropy[:, None]).mul_(grad_entropy[:, None])
    if grad_logprob is not None:
        coef.add_(grad_logprob[:, None])
    return coef.mul_(prob).neg_()
