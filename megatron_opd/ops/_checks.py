"""Input validation shared by the vocab-parallel ops: every error names the tensor and the fix."""

from __future__ import annotations

import torch

from megatron_opd.ops.shard import VocabShard

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_logits(logits) -> None:
    """logits must be a floating tensor [..., V_local] with at least one vocab column."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be fp16/bf16/fp32/fp64, got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V_local] with V_local > 0, got {tuple(logits.shape)}")


def check_ids(ids, logits: torch.Tensor, shard: VocabShard, name: str, trailing: tuple[int, ...] = ()) -> None:
    """ids must be integer, on the logits' device, shaped logits.shape[:-1] + trailing, in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64/int32), got dtype {ids.dtype}")
    if ids.device != logits.device:
        raise ValueError(f"{name} is on {ids.device} but logits are on {logits.device}: move them to one device")
    expected = tuple(logits.shape[:-1]) + trailing
    if tuple(ids.shape) != expected and not (trailing and tuple(ids.shape[:-1]) == expected[:-1]):
        raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected {expected} to match logits {tuple(logits.shape)}")
    if ids.numel() == 0 or ids.is_meta:  # meta tensors (shape/device dry runs) hold no values to check
        return
    # host-device sync: the range check reads two scalars back.
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= shard.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} contains id {bad} outside the vocab [0, {shard.vocab_size})")
