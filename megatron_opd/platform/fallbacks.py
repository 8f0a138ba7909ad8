"""One line instead of a wall of warnings: which of Megatron's optional kernels are missing.

Without Transformer Engine and Apex (every CPU machine), megatron-core warns once per module that
falls back (norms, optimizers, multi-tensor ops, FSDP mixed precision...), in every rank. The
fallbacks are expected and harmless there; what a user needs to know is *which* are in use, so the
trainer prints ``fallback_summary()`` once and these warnings are filtered out.
"""

from __future__ import annotations

import importlib.util
import warnings

FALLBACK_MESSAGES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"Transformer Engine is not installed",
    # megatron-core 0.16.1's own default cuda_graph_scope="full" triggers its own deprecation warning
    # in every TransformerConfig; we never set the field (no CUDA graphs here).
    r"full scope is deprecated",
)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def fallback_summary() -> str:
    """e.g. 'megatron-core fallbacks in use: no Transformer Engine (local layers), no Apex (torch norms...)'."""
    missing = []
    if not has_module("transformer_engine"):
        missing.append("no Transformer Engine (local attention and linear layers)")
    if not has_module("apex"):
        missing.append("no Apex (torch norms and optimizers, local multi-tensor ops)")
    return "megatron-core fallbacks in use: " + ("; ".join(missing) if missing else "none")


CUDA_ONLY_ADVICE = (r"When using async grad allreduce it is recommended to set the environment variable "
                    r"CUDA_DEVICE_MAX_CONNECTIONS",)
"""Advice about CUDA streams, printed by every TP rank; meaningless without CUDA."""


def quiet_megatron_fallbacks(on_cuda: bool | None = None) -> None:
    """Filter megatron-core's per-module fallback warnings (call before importing megatron), and
    its CUDA-only advice when running without CUDA."""
    if on_cuda is None:
        import torch

        on_cuda = torch.cuda.is_available()
    for message in FALLBACK_MESSAGES + (() if on_cuda else CUDA_ONLY_ADVICE):
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=r"megatron\.")


def patch_moe_without_te() -> bool:
    """Megatron-Core 0.16.1's MoE router tests ``te_general_gemm is not None`` but defines that name only
    when Transformer Engine imports, so without TE the router's forward raises NameError. Define it as
    None (the router then takes its plain torch.mm path). Returns True when the name was missing."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True
