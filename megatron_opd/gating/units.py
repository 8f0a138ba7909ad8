"""Which gating unit each response position belongs to (DESIGN §2.4).

Units are indexed per sequence in [0, U): token = position, block = position // N, span = number
of span ends strictly before the position, sequence = 0. Everything is keyed by the *global*
response position, so under context parallelism (a rank holding any part of a sequence, e.g.
Megatron's load-balanced chunks i and 2·CP−1−i) every rank agrees on the unit of each token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def global_length(positions: torch.Tensor | None, local_length: int, cp_group) -> int:
    """T_global: one past the largest global response position held by any CP rank."""
    if positions is None and _group_size(cp_group) == 1:
        return local_length
    longest = torch.tensor([local_length if positions is None or positions.numel() == 0
                            else int(positions.max()) + 1])  # host-device sync: the table size is a Python int
    if _group_size(cp_group) > 1:
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=cp_group)  # collective: CP max length
    return int(longest)


def _span_index(span_ends: torch.Tensor, positions: torch.Tensor, length: int, cp_group) -> torch.Tensor:
    """Span of each local position: ends at global positions < p, with the end map shared over CP."""
    ends = torch.zeros(span_ends.shape[0], length, dtype=torch.int32, device=span_ends.device)
    ends.scatter_(1, positions, span_ends.to(torch.int32))
    if _group_size(cp_group) > 1:
        dist.all_reduce(ends, op=dist.ReduceOp.MAX, group=cp_group)  # collective: CP union of span ends
    before = torch.cumsum(ends, dim=1) - ends  # exclusive prefix count
    return before.gather(1, positions).long()


def unit_index(granularity: str, positions: torch.Tensor, length: int, block_size: int,
               span_ends: torch.Tensor | None, cp_group) -> tuple[torch.Tensor, int]:
    """(unit id [B, T_local] in [0, U), U) for the given granularity; positions [B, T_local] global."""
    if granularity == "token":
        return positions, length
    if granularity == "block":
        return torch.div(positions, block_size, rounding_mode="floor"), max(1, -(-length // block_size))
    if granularity == "sequence":
        return torch.zeros_like(positions), 1
    if granularity == "span":
        return _span_index(span_ends, positions, length, cp_group), length
    raise ValueError(f"no unit index for granularity {granularity!r}")
