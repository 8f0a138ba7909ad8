"""Import-only stand-in for ``sgl_kernel`` in the CPU test environment (installed by
``scripts/setup_sglang_env.sh``; never part of the project's own ``.venv``).

The registry has no CPU build of sgl-kernel. SGLang's CPU path imports a few of its names at module
level, but calls none of them when ``torch.ops.sgl_kernel`` is empty: it then takes the torch-native
paths. So every top-level name resolves to a stub that raises when it is called: a server that ever
reaches a real kernel fails loudly instead of computing something wrong. Submodules
(``sgl_kernel.scalar_type`` …) are deliberately absent: SGLang imports those inside
``try/except ImportError`` and falls back to its own code.
"""

from __future__ import annotations

__version__ = "0.0.0+megatron-opd-cpu-stand-in"


class StandInKernelError(RuntimeError):
    """A kernel of the stand-in was called: this code path needs the real sgl-kernel (a GPU build)."""


def _stub(qualname: str):
    def kernel(*args, **kwargs):
        raise StandInKernelError(f"{qualname} was called, but sgl_kernel here is megatron-opd's import-only "
                                 "CPU stand-in: this SGLang code path needs the real sgl-kernel")
    kernel.__name__ = kernel.__qualname__ = qualname.rsplit(".", 1)[-1]
    return kernel


def _module_getattr(module_name: str):
    def __getattr__(name: str):
        # Dunder look-ups (``__path__``, ``__spec__`` …) must fail normally, or importlib and
        # ``hasattr`` checks would be fooled.
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(f"{module_name}.{name}")
    return __getattr__


__getattr__ = _module_getattr(__name__)
