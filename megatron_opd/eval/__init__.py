"""Evaluation: benchmarks, generation, grading (``grade``), ``pass_at_k``, reports and plots.

Imports are light (no torch, no Megatron): the grading workers import this package.
"""

from megatron_opd.eval.grading import GradingPool, extract_last_boxed, grade
from megatron_opd.eval.metrics import pass_at_k

__all__ = ["GradingPool", "extract_last_boxed", "grade", "pass_at_k"]
