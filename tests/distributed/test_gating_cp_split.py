"""Drift gates with a sequence split over 2 gloo CP ranks (contiguous and Megatron's load-balanced
2·CP-chunk layout) and with the batch split over 2 DP ranks equal the single-process gates.

Tolerance 1e-6 absolute on the float32 gates (sums are accumulated in float64 in a different order).
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_opd.gating import DriftGateConfig, drift_gates

WORLD, T = 2, 16

CONFIGS = [DriftGateConfig(granularity="block", block_size=5), DriftGateConfig(granularity="block", block_size=64),
           DriftGateConfig(granularity="span", aggregation="mean_abs"), DriftGateConfig(granularity="token"),
           DriftGateConfig(granularity="sequence", aggregation="k3", normalization="residual", residual_alpha=0.4),
           DriftGateConfig(granularity="block", block_size=3, gate_fn="clip", clip_eps=0.3, normalization="clipped")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch():
    gen = torch.Generator().manual_seed(11)
    old = -torch.rand(3, T, generator=gen) * 4
    cur = old + 0.4 * torch.randn(3, T, generator=gen)
    mask = torch.arange(T)[None, :] < torch.tensor([[16], [9], [3]])
    return cur, old, mask, torch.rand(3, T, generator=gen) < 0.3


def _layout_positions(rank: int, layout: str) -> torch.Tensor:
    """Global positions held by ``rank``: contiguous halves, or chunks rank and 2·CP−1−rank of 2·CP."""
    if layout == "contiguous":
        return torch.arange(rank * T // WORLD, (rank + 1) * T // WORLD)
    chunk = T // (2 * WORLD)
    first, second = rank, 2 * WORLD - 1 - rank
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk), torch.arange(second * chunk, (second + 1) * chunk)])


def _check_cp(rank, group):
    cur, old, mask, ends = _batch()
    for layout in ("contiguous", "load_balanced"):
        pos = _layout_positions(rank, layout)
        for cfg in CONFIGS:
            full, full_stats = drift_gates(cur, old, mask, cfg, span_ends=ends)
            local, stats = drift_gates(cur[:, pos], old[:, pos], mask[:, pos], cfg, span_ends=ends[:, pos],
                                       positions=pos.expand(3, -1), cp_group=group, dp_group=group)
            torch.testing.assert_close(local, full[:, pos], rtol=0, atol=1e-6, msg=f"{layout} {cfg}")
            for key, value in full_stats.items():
                torch.testing.assert_close(stats[key], value, rtol=1e-6, atol=1e-6, msg=f"{layout} {key}")


def _check_dp(rank, group):
    cur, old, mask, ends = _batch()
    rows = [0, 2] if rank == 0 else [1]
    for cfg in CONFIGS:
        full, full_stats = drift_gates(cur, old, mask, cfg, span_ends=ends)
        local, stats = drift_gates(cur[rows], old[rows], mask[rows], cfg, span_ends=ends[rows], dp_group=group)
        torch.testing.assert_close(local, full[rows], rtol=0, atol=1e-6)
        for key, value in full_stats.items():
            torch.testing.assert_close(stats[key], value, rtol=1e-6, atol=1e-6, msg=key)


def _worker(rank, port):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        group = dist.new_group([0, 1])
        _check_cp(rank, group)
        _check_dp(rank, group)
    finally:
        dist.destroy_process_group()


def test_gates_split_over_cp_and_dp_ranks_equal_single_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
