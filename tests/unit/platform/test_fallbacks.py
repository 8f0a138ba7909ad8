"""Megatron's per-module TE/Apex fallback warnings are filtered; one summary line names the fallbacks."""

import subprocess
import sys

from megatron_opd.platform.fallbacks import fallback_summary, has_module

# Importing these megatron-core modules on a machine without TE/Apex warns about a fallback in each.
IMPORTS = ("import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs; "
           "from megatron.core.transformer import TransformerConfig; "
           "TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)")


def _stderr_of(code: str) -> str:
    """stderr of ``code`` under the default warning filters (those the trainer runs with)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_fallback_warnings_are_filtered_and_summarised():
    quiet = _stderr_of("from megatron_opd.platform.fallbacks import quiet_megatron_fallbacks; "
                       f"quiet_megatron_fallbacks(); {IMPORTS}")
    assert "Falling back" not in quiet and "not installed" not in quiet and "deprecated" not in quiet, quiet
    if not (has_module("transformer_engine") and has_module("apex")):
        # The reference: the same imports without the filter do warn (so the check above can fail).
        loud = _stderr_of(IMPORTS)
        assert "Falling back" in loud, loud
    summary = fallback_summary()
    assert summary.startswith("megatron-core fallbacks in use: ") and "\n" not in summary
    assert ("no Transformer Engine" in summary) == (not has_module("transformer_engine"))
    assert ("no Apex" in summary) == (not has_module("apex"))
