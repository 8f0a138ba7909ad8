"""Run a function on N local processes joined in one gloo/nccl group (tests, tools, small CPU runs).

Each process gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1,
a free MASTER_PORT) and OMP_NUM_THREADS=1, so ``initialize_distributed`` inside it joins the group.
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(local_rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)  # many ranks share few cores
    fn(local_rank, *args)


def run_spawned(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned processes; raises if any of them fails.

    ``fn`` must be importable by name (a module-level function).
    """
    import torch.multiprocessing as mp

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # children read it at interpreter start
    try:
        mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True,
                           start_method="spawn")
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
