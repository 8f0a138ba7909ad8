"""TP=2 (two gloo processes on 127.0.0.1) checks of the vocab-parallel ops against the full-vocab
PyTorch reference computed in each process on the unsharded logits.

Tolerances as in tests/unit/ops: fp32 1e-5; bf16 outputs 1e-5, bf16 gradients 1e-2 rel + 1e-3 abs.
Cases cover vocab padding (41 real ids in 2 x 24 columns), a rank holding only padding
(vocab_size 20 < 24) and ids falling in every shard.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_opd.ops import vocab_parallel_gather, vocab_parallel_stats, vocab_parallel_topk

TP, V_LOCAL = 2, 24


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reference(full, token_ids, gather_ids, vocab_size):
    log_p = torch.log_softmax(full[..., :vocab_size].float(), dim=-1)
    return (log_p.gather(-1, token_ids[..., None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1),
            full.float().gather(-1, gather_ids))


def _check_case(rank, dtype, vocab_size, group):
    gen = torch.Generator().manual_seed(7)
    full = (3 * torch.randn(2, 6, TP * V_LOCAL, generator=gen)).to(dtype)
    token_ids = torch.randint(0, vocab_size, (2, 6), generator=gen)
    gather_ids = torch.randint(0, vocab_size, (2, 6, 5), generator=gen)
    if vocab_size > V_LOCAL:  # ids in every shard
        assert bool((token_ids < V_LOCAL).any()) and bool((token_ids >= V_LOCAL).any())
        assert bool((gather_ids < V_LOCAL).any()) and bool((gather_ids >= V_LOCAL).any())
    weights = [torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen), torch.randn(2, 6, 5, generator=gen)]
    shard = full[..., rank * V_LOCAL:(rank + 1) * V_LOCAL].clone().requires_grad_(True)
    ours = vocab_parallel_stats(shard, token_ids, gather_ids, group, vocab_size=vocab_size, chunk_size=5)
    loss = sum((o * w).sum() for o, w in zip(ours[:3], weights))
    (grad,) = torch.autograd.grad(loss, shard)
    ref_full = full.float().requires_grad_(True)
    ref = _reference(ref_full, token_ids, gather_ids, vocab_size)
    (ref_grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref, weights)), ref_full)
    for mine, theirs in zip(ours[:3], ref):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(grad.float(), ref_grad[..., rank * V_LOCAL:(rank + 1) * V_LOCAL], **tol)
    _check_gather_and_topk(rank, full, shard.detach(), gather_ids, weights[2], vocab_size, group)


def _check_gather_and_topk(rank, full, shard, gather_ids, weight, vocab_size, group):
    shard = shard.clone().requires_grad_(True)
    values = vocab_parallel_gather(shard, gather_ids, group, vocab_size=vocab_size)
    torch.testing.assert_close(values, full.float().gather(-1, gather_ids))
    (grad,) = torch.autograd.grad((values * weight).sum(), shard)
    expected = torch.zeros(full.shape).scatter_add_(-1, gather_ids, weight)[..., rank * V_LOCAL:(rank + 1) * V_LOCAL]
    torch.testing.assert_close(grad.float(), expected, rtol=1e-2, atol=1e-3)
    k = min(6, vocab_size)
    for as_logprobs in (False, True):
        top_values, top_ids = vocab_parallel_topk(shard.detach(), k, group, vocab_size=vocab_size,
                                                  chunk_size=4, return_logprobs=as_logprobs)
        dense = full[..., :vocab_size].float()
        dense = torch.log_softmax(dense, -1) if as_logprobs else dense
        ref_values, ref_ids = dense.topk(k, dim=-1)
        torch.testing.assert_close(top_values, ref_values, rtol=1e-5, atol=1e-5)
        assert torch.equal(top_ids, ref_ids) or torch.equal(dense.gather(-1, top_ids), ref_values)


def _worker(rank, port):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    try:
        group = dist.new_group([0, 1])
        for dtype in (torch.float32, torch.bfloat16):
            for vocab_size in (41, 20, 48):
                _check_case(rank, dtype, vocab_size, group)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_ops_tp2_match_full_vocab():
    mp.spawn(_worker, args=(_free_port(),), nprocs=TP, join=True)


# ---- chunk size with a padded vocab --------------------------------------------------------------
# With 41 real ids in 2 x 24 columns, rank 0 holds 24 real columns and rank 1 holds 17. A default
# chunk of CHUNK_ELEMENTS // (real columns) rows would be 3 rows on rank 0 and 4 on rank 1: the
# ranks would issue 8 vs 6 all-gathers of different sizes. The chunk must come from the padded
# width (24 on both). 24 rows span 8 chunks.
SMALL_CHUNK_ELEMENTS = 72


def _chunk_worker(rank, port):
    import datetime

    import megatron_opd.ops.shard as shard_module

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # A mismatch must fail fast rather than hang until the default 30-minute gloo timeout.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP,
                            timeout=datetime.timedelta(seconds=60))
    shard_module.CHUNK_ELEMENTS = SMALL_CHUNK_ELEMENTS
    try:
        vocab_size = 41
        gen = torch.Generator().manual_seed(11)
        full = 3 * torch.randn(4, 6, TP * V_LOCAL, generator=gen)
        token_ids = torch.randint(0, vocab_size, (4, 6), generator=gen)
        gather_ids = torch.randint(0, vocab_size, (4, 6, 3), generator=gen)
        weights = [torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen),
                   torch.randn(4, 6, 3, generator=gen)]
        shard = full[..., rank * V_LOCAL:(rank + 1) * V_LOCAL].clone().requires_grad_(True)
        group = dist.group.WORLD
        ours = vocab_parallel_stats(shard, token_ids, gather_ids, group, vocab_size=vocab_size)  # default chunk
        (grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ours[:3], weights)), shard)
        ref_full = full.clone().requires_grad_(True)
        ref = _reference(ref_full, token_ids, gather_ids, vocab_size)
        (ref_grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref, weights)), ref_full)
        for mine, theirs in zip(ours[:3], ref):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad[..., rank * V_LOCAL:(rank + 1) * V_LOCAL], rtol=1e-5, atol=1e-5)
        top_values, _ = vocab_parallel_topk(shard.detach(), 5, group, vocab_size=vocab_size, return_logprobs=True)
        ref_top = torch.log_softmax(full[..., :vocab_size], -1).topk(5, dim=-1).values
        torch.testing.assert_close(top_values, ref_top, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_default_chunks_agree_across_ranks_with_padded_vocab():
    mp.spawn(_chunk_worker, args=(_free_port(),), nprocs=TP, join=True)
