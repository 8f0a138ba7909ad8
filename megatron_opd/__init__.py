"""megatron-opd: on-policy distillation on Megatron-Core with blockwise policy-drift gating.

The method (``ops``, ``objectives``, ``gating``) works on plain tensors and imports no Megatron;
``platform``, ``models`` and ``training`` are the Megatron-Core side.
"""

__version__ = "0.1.0"
