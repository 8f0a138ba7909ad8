"""torch.distributed + Megatron parallel state + seeds, from one ``ParallelConfig``.

This is the only module of megatron-opd that touches ``megatron.core.parallel_state``; it hands the
process groups on in a ``ParallelState`` (and a Megatron ``ProcessGroupCollection``) so the rest
of the code takes groups as arguments.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.platform.cpu_shim import apply_cpu_shim


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model and the batch are split over ranks (world = TP × CP × PP × DP)."""

    tensor_model_parallel_size: int = 1
    """TP: ranks that split each weight matrix (and the vocab)."""
    pipeline_model_parallel_size: int = 1
    """PP: ranks that split the layers into pipeline stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """VPP: model chunks per pipeline rank (interleaved schedule); None = no interleaving."""
    context_parallel_size: int = 1
    """CP: ranks that split each sequence (needs Transformer Engine attention, i.e. a GPU)."""
    sequence_parallel: bool = False
    """Split activations outside attention/MLP along the sequence over the TP ranks (needs TP > 1)."""
    expert_model_parallel_size: int = 1
    """EP: ranks that split the experts of each MoE layer (MoE students only)."""
    expert_tensor_parallel_size: int | None = None
    """ETP: ranks that split each expert's weights; None = the TP size (Megatron's default)."""
    seed: int = 1234
    """Base seed for Python, NumPy, torch and Megatron's model-parallel RNG tracker."""
    backend: str = "auto"
    """torch.distributed backend: "auto" (nccl with CUDA, gloo without), "nccl" or "gloo"."""
    distributed_timeout_minutes: int = 60
    """Timeout of every process group (the world group and Megatron's). torch's NCCL default is 10
    minutes, shorter than rank 0's periodic evaluation or HF export while the other ranks wait in a
    barrier; a collective that waits longer than this aborts the job instead of hanging forever."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelConfig.{name} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp < 1:
            raise ValueError(f"ParallelConfig.virtual_pipeline_model_parallel_size must be None or >= 1, got {vpp}")
        if vpp is not None and vpp > 1 and self.pipeline_model_parallel_size < 2:
            raise ValueError(
                f"ParallelConfig.virtual_pipeline_model_parallel_size={vpp} needs "
                f"pipeline_model_parallel_size >= 2, got {self.pipeline_model_parallel_size}")
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ValueError("ParallelConfig.sequence_parallel=True needs tensor_model_parallel_size >= 2, "
                             f"got {self.tensor_model_parallel_size}")
        if self.expert_tensor_parallel_size is not None and self.expert_tensor_parallel_size < 1:
            raise ValueError("ParallelConfig.expert_tensor_parallel_size must be None or >= 1, "
                             f"got {self.expert_tensor_parallel_size}")
        if self.distributed_timeout_minutes < 1:
            raise ValueError("ParallelConfig.distributed_timeout_minutes must be >= 1, "
                             f"got {self.distributed_timeout_minutes}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"ParallelConfig.backend must be 'auto', 'nccl' or 'gloo', got {self.backend!r}")

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one model replica: TP × CP × PP."""
        return self.tensor_model_parallel_size * self.context_parallel_size * self.pipeline_model_parallel_size

    @property
    def resolved_expert_tensor_parallel_size(self) -> int:
        """ETP, with None resolved to the TP size."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def num_model_chunks(self) -> int:
        """Model chunks per pipeline rank (VPP, or 1)."""
        return self.virtual_pipeline_model_parallel_size or 1

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass(kw_only=True)
class ParallelState:
    """Process groups, ranks and sizes of this process (built by ``initialize_distributed``)."""

    config: ParallelConfig
    world_size: int
    rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    dp_cp_group: dist.ProcessGroup
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    cp_size: int
    device: torch.device
    pg_collection: object = dataclasses.field(repr=False, default=None)
    """Megatron ``ProcessGroupCollection`` for Megatron APIs that take one."""

    def is_pipeline_first_stage(self, vp_stage: int | None = None) -> bool:
        """True on the rank (and virtual chunk, if given) that holds the embedding."""
        from megatron.core import parallel_state as mpu

        return mpu.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)

    def is_pipeline_last_stage(self, vp_stage: int | None = None) -> bool:
        """True on the rank (and virtual chunk, if given) that holds the output layer."""
        from megatron.core import parallel_state as mpu

        return mpu.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(backend: str, timeout: timedelta) -> None:
    """Join torchrun's group (env vars) or make a 1-process group on a free 127.0.0.1 port."""
    if dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)  # reads MASTER_ADDR/PORT, RANK, WORLD_SIZE
        return
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                            world_size=1, rank=0, timeout=timeout)


def process_group_timeout(group: dist.ProcessGroup | None = None) -> timedelta:
    """The timeout a process group's backend enforces (default: the world group)."""
    group = group or dist.group.WORLD
    device = torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
    return group._get_backend(device).options._timeout  # no public getter in torch.distributed


def _check_world_size(cfg: ParallelConfig, world_size: int) -> None:
    if world_size % cfg.model_parallel_size:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"({cfg.tensor_model_parallel_size}) x context_parallel_size ({cfg.context_parallel_size}) x "
            f"pipeline_model_parallel_size ({cfg.pipeline_model_parallel_size}) = {cfg.model_parallel_size}")
    expert_ranks = cfg.expert_model_parallel_size * cfg.resolved_expert_tensor_parallel_size
    if world_size % (expert_ranks * cfg.pipeline_model_parallel_size):
        raise ValueError(
            f"world size {world_size} is not divisible by expert_model_parallel_size "
            f"({cfg.expert_model_parallel_size}) x expert_tensor_parallel_size "
            f"({cfg.resolved_expert_tensor_parallel_size}) x pipeline_model_parallel_size "
            f"({cfg.pipeline_model_parallel_size})")
    if cfg.context_parallel_size > 1 and not torch.cuda.is_available():
        raise ValueError(f"context_parallel_size={cfg.context_parallel_size} needs Transformer Engine "
                         "attention on CUDA; without a GPU set context_parallel_size=1")


def _set_seeds(cfg: ParallelConfig) -> None:
    """Seed every RNG; Megatron's tracker gives each TP rank its own dropout stream."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    # Same seed on all TP ranks of a stage (CPU init of sharded weights must agree), offset per PP stage.
    seed = cfg.seed + 100 * mpu.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)  # the CPU shim routes the tracker's seeding through the CPU generator


def _build_state(cfg: ParallelConfig) -> ParallelState:
    from megatron.core import parallel_state as mpu

    groups = dict(tp_group=mpu.get_tensor_model_parallel_group(), pp_group=mpu.get_pipeline_model_parallel_group(),
                  dp_group=mpu.get_data_parallel_group(), cp_group=mpu.get_context_parallel_group(),
                  dp_cp_group=mpu.get_data_parallel_group(with_context_parallel=True))
    return ParallelState(
        config=cfg, world_size=dist.get_world_size(), rank=dist.get_rank(), **groups,
        tp_rank=mpu.get_tensor_model_parallel_rank(), pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(), cp_rank=mpu.get_context_parallel_rank(),
        tp_size=mpu.get_tensor_model_parallel_world_size(), pp_size=mpu.get_pipeline_model_parallel_world_size(),
        dp_size=mpu.get_data_parallel_world_size(), cp_size=mpu.get_context_parallel_world_size(),
        device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"),
        pg_collection=default_pg_collection(),
    )


def default_pg_collection():
    """Megatron ``ProcessGroupCollection`` of the groups made by ``initialize_distributed``."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def initialize_distributed(cfg: ParallelConfig) -> ParallelState:
    """Initialise torch.distributed, Megatron's parallel state and all seeds from ``cfg``.

    Works under torchrun (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the environment) and in a plain
    single process (a 1-rank group on a free 127.0.0.1 port). Without CUDA it first applies the CPU
    shim and uses gloo.
    """
    apply_cpu_shim()  # no-op with CUDA
    _init_process_group(cfg.resolved_backend(), timedelta(minutes=cfg.distributed_timeout_minutes))
    _check_world_size(cfg, dist.get_world_size())
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.resolved_expert_tensor_parallel_size,
        distributed_timeout_minutes=cfg.distributed_timeout_minutes,
    )
    _set_seeds(cfg)
    return _build_state(cfg)


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the default process group (safe to call twice)."""
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()  # collective: let every rank finish before the group disappears
        dist.destroy_process_group()
