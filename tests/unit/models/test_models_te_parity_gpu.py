"""GPU only: runs tools/check_te_parity.py (TE layer spec vs HF in bf16/fp32). Skipped without CUDA + TE."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd.models import transformer_engine_available

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.gpu
@pytest.mark.skipif(not transformer_engine_available(), reason="needs CUDA and Transformer Engine")
def test_te_spec_matches_hf_on_gpu():
    proc = subprocess.run([sys.executable, str(REPO / "tools/check_te_parity.py")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
