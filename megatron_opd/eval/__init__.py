"""Evaluation: benchmarks, generation, grading (``grade``), ``pass_at_k``, reports and plots.

Imports stay light (no torch, no Megatron) because the grading worker processes import this
package; the generation side (``evaluate``, ``EvalConfig``, ``load_benchmark``) loads on first use.
"""

from megatron_opd.eval.grading import GradingPool, extract_last_boxed, grade
from megatron_opd.eval.metrics import pass_at_k

_LAZY = {
    "evaluate": "megatron_opd.eval.harness",
    "EvalConfig": "megatron_opd.eval.config",
    "load_benchmark": "megatron_opd.eval.benchmarks",
    "available_benchmarks": "megatron_opd.eval.benchmarks",
    "write_comparison": "megatron_opd.eval.report",
    "format_comparison_table": "megatron_opd.eval.report",
    "plot_comparison": "megatron_opd.eval.report",
    "load_results": "megatron_opd.eval.report",
}

__all__ = ["GradingPool", "extract_last_boxed", "grade", "pass_at_k", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_opd.eval' has no attribute {name!r}")
