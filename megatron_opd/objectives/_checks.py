"""Input validation for the objectives: errors name the tensor and the fix."""

from __future__ import annotations

import torch


def check_float(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got dtype {tensor.dtype}")


def check_like(name: str, tensor, ref_name: str, ref: torch.Tensor, shape: tuple | None = None) -> None:
    """``tensor`` must be on ``ref``'s device with ``shape`` (default: ref's shape)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    expected = tuple(ref.shape) if shape is None else tuple(shape)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected} (to match {ref_name})")
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}: move them to one device")


def check_mask(mask, ref_name: str, ref: torch.Tensor) -> torch.Tensor | None:
    """A bool [B, T] mask shaped like ``ref`` (or None)."""
    if mask is None:
        return None
    check_like("mask", mask, ref_name, ref, shape=ref.shape[:2] if ref.dim() > 2 else None)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    return mask


def check_finite(name: str, tensor: torch.Tensor, mask: torch.Tensor | None) -> None:
    """NaN/inf in ``tensor`` at valid positions is an error (invalid positions may hold anything)."""
    if tensor.is_meta:  # meta tensors (shape/device dry runs) hold no values to check
        return
    bad = ~torch.isfinite(tensor)
    if mask is not None:
        bad &= mask.view(*mask.shape, *([1] * (tensor.dim() - mask.dim())))
    # host-device sync: one boolean read back to fail early instead of training on NaN.
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has a non-finite value {tensor[index].item()} at index {index} "
                         "(a valid position): check the teacher/rollout scores")
