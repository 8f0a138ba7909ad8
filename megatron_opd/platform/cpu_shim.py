"""Patches that let Megatron-Core 0.16 run on a CPU-only PyTorch build (DESIGN.md §5).

Megatron assumes CUDA in a few dozen places (``torch.cuda.current_device()`` as a device,
CUDA RNG state in its RNG tracker, ``torch.cuda.synchronize`` / ``Event`` in timers and the
pipeline schedule, ``device="cuda"`` literals). Each patch below replaces exactly one of these
with its CPU meaning, and carries a one-line reason. ``apply_cpu_shim()`` does nothing when
CUDA is available: on a GPU Megatron runs unpatched.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_APPLIED = False
_DEVICE_MODE: TorchFunctionMode | None = None


def _to_cpu_device(device):
    """Map a CUDA device spec ("cuda", "cuda:0", torch.device("cuda"), int index) to "cpu"."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # a bare int device is a CUDA ordinal in torch's factory functions
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda`` kwargs and ``.cuda()`` / ``.to("cuda")`` calls to the CPU.

    While ``report_cuda_type_names`` is set (only inside the Megatron optimizer constructors, see
    ``_patch_megatron_mixed_precision``), ``tensor.type()`` answers with the CUDA type name
    ("torch.cuda.BFloat16Tensor" for a CPU bf16 tensor).
    """

    report_cuda_type_names = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and self.report_cuda_type_names and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not args[0].is_cuda else name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]  # the tensor is already where it can live
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], torch.Tensor | torch.dtype):
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is synchronous, so events are already done."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: one in-order CPU "stream", so waits and events are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _patch(obj, name: str, value, reason: str) -> None:
    """Replace ``obj.name`` with ``value`` and log the one-line ``reason``."""
    setattr(obj, name, value)
    logger.debug("cpu shim: %s.%s -> CPU (%s)", getattr(obj, "__name__", obj), name, reason)


def _patch_torch_cuda() -> None:
    _patch(torch.cuda, "current_device", lambda: "cpu",
           "Megatron passes torch.cuda.current_device() as the device of new tensors")
    _patch(torch.cuda, "synchronize", lambda device=None: None,
           "timers and the pipeline schedule synchronise the GPU; CPU ops are synchronous")
    _patch(torch.cuda, "Event", _CpuEvent, "timers record CUDA events")
    _patch(torch.cuda, "Stream", _CpuStream,
           "the MoE all-to-all dispatcher makes a side stream for its device-to-host copies of split sizes")
    _patch(torch.cuda, "current_stream", lambda device=None: _CPU_STREAM,
           "the MoE dispatcher compares and synchronises its side stream with the current stream")
    _patch(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext(),
           "the MoE dispatcher runs its split-size copies under `with torch.cuda.stream(side)`")
    _patch(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state(),
           "the model-parallel RNG tracker saves CUDA RNG state; the CPU generator plays its role")
    _patch(torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state),
           "the RNG tracker restores CUDA RNG state")
    _patch(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed),
           "the RNG tracker seeds a CUDA generator per parallel rank; seed the CPU one instead")


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mpu_random

    _patch(mpu_random, "_get_cuda_rng_state",
           lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state(),
           "Megatron's own CUDA RNG getter reads torch.cuda.default_generators")
    _patch(mpu_random, "_set_cuda_rng_state",
           lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state),
           "Megatron's own CUDA RNG setter writes through torch._C CUDA calls")


def _move_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """CPU meaning of Megatron's ``maybe_move_tensor_to_cpu``: the tensor is already on the host, but
    ``as_numpy`` must still give a NumPy array (the original converts only CUDA tensors)."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _patch_megatron_moe() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    _patch(token_dispatcher, "maybe_move_tensor_to_cpu", _move_to_host,
           "the all-to-all dispatcher's split sizes reach gloo's all_to_all_single as tensors, which it "
           "refuses; on CUDA they are NumPy arrays after the device-to-host copy")


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's ``clip_grad_by_total_norm_fp32`` minus its ``torch.cuda.FloatTensor`` assert: scale every
    gradient in place by max_norm / (total_norm + 1e-6) when that is < 1."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_megatron_optimizer() -> None:
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    for module in (clip_grads, mcore_optimizer):
        _patch(module, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_cpu,
               "gradient clipping asserts grads are torch.cuda.FloatTensor")


def _with_cuda_type_names(init):
    """Wrap an optimizer ``__init__`` so that its ``param.type()`` checks see CUDA type names."""

    @functools.wraps(init)
    def wrapped(*args, **kwargs):
        mode = _DEVICE_MODE
        previous, mode.report_cuda_type_names = mode.report_cuda_type_names, True
        try:
            return init(*args, **kwargs)
        finally:
            mode.report_cuda_type_names = previous

    return wrapped


def _patch_megatron_mixed_precision() -> None:
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer

    # Megatron sorts parameters into fp16/bf16 (get an fp32 main copy) and fp32 groups by comparing
    # param.type() with 'torch.cuda.BFloat16Tensor' etc., and raises TypeError for anything else.
    for cls in (mcore_optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        _patch(cls, "__init__", _with_cuda_type_names(cls.__init__),
               "the mixed-precision optimizers accept only tensors whose type() names CUDA")


def apply_cpu_shim() -> bool:
    """Apply every CPU patch once. Idempotent; a no-op when CUDA is available.

    Returns:
        True when the shim is (now or already) active, False on a CUDA machine.
    """
    global _APPLIED, _DEVICE_MODE
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_optimizer()
    _patch_megatron_mixed_precision()
    _patch_megatron_moe()
    # ~30 places in Megatron hard-code device="cuda"; one process-wide mode maps them to the CPU
    # (measured overhead ~2%).
    _DEVICE_MODE = _CudaToCpuMode()
    _DEVICE_MODE.__enter__()
    _APPLIED = True
    return True


def cpu_shim_active() -> bool:
    """True once ``apply_cpu_shim`` has patched this process."""
    return _APPLIED
