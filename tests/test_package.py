"""The method packages must stay usable without Megatron: importing them must not import megatron."""

import subprocess
import sys

import pytest

METHOD_PACKAGES = ["megatron_opd.objectives", "megatron_opd.gating", "megatron_opd.ops",
                   "megatron_opd.rollout", "megatron_opd.teacher", "megatron_opd.data"]


@pytest.mark.parametrize("package", METHOD_PACKAGES)
def test_method_package_does_not_import_megatron(package):
    code = f"import sys, {package}; bad = [m for m in sys.modules if m.split('.')[0] == 'megatron']; print(bad); sys.exit(1 if bad else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"{package} imports megatron: {result.stdout} {result.stderr}"
