"""megatron_opd.eval never imports Megatron; its package import (done by grading workers) stays torch-free."""

import subprocess
import sys

import pytest


def _imported(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("module", ["megatron_opd.eval.harness", "megatron_opd.eval.cli", "megatron_opd.data.toy_task"])
def test_no_megatron(module):
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'megatron'}}))"
    assert _imported(code) == "[]"


def test_package_import_is_light():
    code = "import sys, megatron_opd.eval; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron', 'transformers'}))"
    assert _imported(code) == "[]"
