"""The chunked output-layer op at TP=2 (two gloo processes), with and without sequence parallelism,
against today's path on the whole vocabulary computed in each process: the full logits
(hidden @ W_fullᵀ / τ, masked columns −inf) fed to ``vocab_parallel_stats`` / ``vocab_parallel_topk``.

Each rank holds rows [r·24, (r+1)·24) of a 48-row weight whose vocabulary has 41 real ids (padding on
rank 1; and 20 real ids: rank 1 holds padding only, as with a tiny vocabulary padded to 128·TP), masked ids, temperature 0.7 and chunks of 5 tokens over [S=6, B=2]. With SP
each rank gets its 3-position slice of the sequence and must return that slice of the hidden gradient
(Megatron's reduce-scatter); without SP the full hidden gradient (Megatron's all-reduce). With SP and
``token_rows`` (rows from both ranks' shards, one repeated) only those rows are computed.
Tolerances: fp64 1e-12; fp32 2e-5 values, 1e-4 rel / 1e-5 abs gradients (as tests/unit/ops/test_chunked_head.py).
"""

import torch
import torch.distributed as dist

from megatron_opd import objectives
from megatron_opd.ops import vocab_parallel_head_stats, vocab_parallel_stats, vocab_parallel_topk
from megatron_opd.platform.spawn import run_spawned

TP, V_LOCAL, S, B, H, K = 2, 24, 6, 2, 5, 4
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}
GRAD_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _inputs(dtype, vocab, masked):
    gen = torch.Generator().manual_seed(3)  # identical on both ranks
    hidden = (2 * torch.randn(S, B, H, generator=gen)).to(dtype)
    weight = torch.randn(TP * V_LOCAL, H, generator=gen).to(dtype)
    allowed = torch.tensor([i for i in range(vocab) if i not in masked])
    token_ids = allowed[torch.randint(0, len(allowed), (S, B), generator=gen)]
    topk_ids = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:K]] for _ in range(S * B)])
    topk_ids = topk_ids.view(S, B, K)
    if vocab > V_LOCAL:
        assert bool((topk_ids < V_LOCAL).any()) and bool((topk_ids >= V_LOCAL).any())  # ids in both shards
    upstream = [torch.randn(S, B, generator=gen, dtype=dtype), torch.randn(S, B, generator=gen, dtype=dtype),
                torch.randn(S, B, K, generator=gen, dtype=dtype)]
    return hidden, weight, token_ids, topk_ids, upstream


def _today(hidden, weight, token_ids, topk_ids, upstream, vocab, masked):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = (h @ w.t()) / 0.7
    columns = torch.zeros(w.shape[0], dtype=torch.bool)
    columns[list(masked)] = True
    logits = logits.masked_fill(columns, float("-inf"))
    out = vocab_parallel_stats(logits, token_ids, topk_ids, vocab_size=vocab)
    _, student_top = vocab_parallel_topk(logits.detach(), K, vocab_size=vocab)
    grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(out[:3], upstream)), (h, w))
    overlap = objectives.topk_overlap(student_top, topk_ids).to(hidden.dtype)
    return (out.logprobs, out.entropy, out.gathered_logits, out.log_normalizer, overlap), grads


def _check(rank, dtype, sequence_parallel, group, vocab, masked):
    hidden, weight, token_ids, topk_ids, upstream = _inputs(dtype, vocab, masked)
    ref_out, (ref_grad_h, ref_grad_w) = _today(hidden, weight, token_ids, topk_ids, upstream, vocab, masked)
    rows = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    positions = slice(rank * S // TP, (rank + 1) * S // TP) if sequence_parallel else slice(None)
    h = hidden[positions].clone().requires_grad_(True)
    w = weight[rows].clone().requires_grad_(True)
    out = vocab_parallel_head_stats(h, w, token_ids, topk_ids, group, overlap_ids=topk_ids, temperature=0.7,
                                    vocab_size=vocab, masked_ids=masked, sequence_parallel=sequence_parallel,
                                    chunk_size=5)
    grad_h, grad_w = torch.autograd.grad(sum((o * u).sum() for o, u in zip(out[:3], upstream)), (h, w))
    mine = (out.logprobs, out.entropy, out.gathered_logits, out.log_normalizer, out.topk_overlap)
    for name, got, want in zip(("logprobs", "entropy", "gathered", "log_z", "overlap"), mine, ref_out):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, n=name: f"rank {rank} {n}: {m}")
    torch.testing.assert_close(grad_h, ref_grad_h[positions], **GRAD_TOL[dtype])
    torch.testing.assert_close(grad_w, ref_grad_w[rows], **GRAD_TOL[dtype])


def _check_rows(rank, group):
    """SP + token_rows: rows of the gathered sequence (both ranks' shards, one repeated) = the full path there."""
    hidden, weight, token_ids, topk_ids, upstream = _inputs(torch.float64, 41, (3, 30))
    rows = torch.tensor([1, 2, 2, 7, 11])  # flattened [S, B] rows: positions 0, 1, 1, 3, 5
    sel = [u.reshape(S * B, *u.shape[2:])[rows] for u in upstream]
    zero_elsewhere = [torch.zeros_like(u).reshape(S * B, *u.shape[2:]).index_add_(0, rows, v).view_as(u)
                      for u, v in zip(upstream, sel)]
    ref_out, (ref_grad_h, ref_grad_w) = _today(hidden, weight, token_ids, topk_ids, zero_elsewhere, 41, (3, 30))
    h = hidden[rank * S // TP:(rank + 1) * S // TP].clone().requires_grad_(True)
    w = weight[rank * V_LOCAL:(rank + 1) * V_LOCAL].clone().requires_grad_(True)
    flat_ids, flat_top = token_ids.reshape(-1)[rows], topk_ids.reshape(-1, K)[rows]
    out = vocab_parallel_head_stats(h, w, flat_ids, flat_top, group, overlap_ids=flat_top, temperature=0.7,
                                    vocab_size=41, masked_ids=(3, 30), sequence_parallel=True, token_rows=rows,
                                    chunk_size=2)
    grad_h, grad_w = torch.autograd.grad(sum((o * u).sum() for o, u in zip(out[:3], sel)), (h, w))
    for got, want in zip(out[:5], ref_out):
        torch.testing.assert_close(got, want.reshape(S * B, *want.shape[2:])[rows], **TOL[torch.float64])
    torch.testing.assert_close(grad_h, ref_grad_h[rank * S // TP:(rank + 1) * S // TP], **GRAD_TOL[torch.float64])
    torch.testing.assert_close(grad_w, ref_grad_w[rank * V_LOCAL:(rank + 1) * V_LOCAL], **GRAD_TOL[torch.float64])


def _worker(rank):
    dist.init_process_group("gloo")
    try:
        group = dist.new_group([0, 1])
        for dtype in (torch.float64, torch.float32):
            for sequence_parallel in (False, True):
                _check(rank, dtype, sequence_parallel, group, 41, (3, 30))
        _check(rank, torch.float64, True, group, 20, (3,))  # rank 1: padding only
        _check_rows(rank, group)
    finally:
        dist.destroy_process_group()


def test_chunked_head_tp2_equals_full_vocab_path():
    run_spawned(_worker, TP)
