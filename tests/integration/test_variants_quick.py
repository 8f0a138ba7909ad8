"""The variant runner on the toy task with small settings and two variants: it trains, evaluates
and writes the paper-style table plus the gate statistics."""

import json
import os
import subprocess
import sys


def test_two_variants_produce_the_table(tmp_path, demo_cache):
    cmd = [sys.executable, "-m", "megatron_opd.cli", "variants", "--quick", "--only",
           "base (no training),LSM + Block64", "--seeds", "1", "--workdir", str(tmp_path), "--cache-dir",
           str(demo_cache), "--eval-n", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "variants.md").read_text()
    assert "| base (no training) |" in table and "| LSM + Block64 |" in table and "toy" in table
    data = json.loads((tmp_path / "variants.json").read_text())
    assert set(data["aggregated"]) == {"base (no training)", "LSM + Block64"}
    gates = data["gates"]["LSM + Block64"][0]
    assert gates["gate_max"] >= 1.0 >= gates["gate_min"] > 0.0
    assert (tmp_path / "comparison.png").exists() and (tmp_path / "comparison.md").exists()
