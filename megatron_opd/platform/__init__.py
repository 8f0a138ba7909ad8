"""Platform layer: torch.distributed, Megatron parallel state and seeds from one ``ParallelConfig``;
the CPU shim of DESIGN.md §5 (applied only without CUDA)."""

from megatron_opd.platform.cpu_shim import apply_cpu_shim, cpu_shim_active
from megatron_opd.platform.parallel import (
    ParallelConfig,
    ParallelState,
    default_pg_collection,
    destroy_distributed,
    initialize_distributed,
)

__all__ = ["ParallelConfig", "ParallelState", "apply_cpu_shim", "cpu_shim_active", "default_pg_collection", "destroy_distributed",
           "initialize_distributed"]
