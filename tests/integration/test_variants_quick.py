"""The variant runner on the toy task with small settings: it trains (in one long-lived worker),
evaluates, and writes the study table, the paired difference, the drift/gate statistics by update
index within a rollout, the learning curve and the PNGs."""

import json
import os
import subprocess
import sys


def test_variants_produce_the_study_report(tmp_path, demo_cache):
    cmd = [sys.executable, "-m", "megatron_opd.cli", "variants", "--quick", "--only",
           "base (no training),LSM,LSM + Block64", "--seeds", "1", "--workdir", str(tmp_path), "--cache-dir",
           str(demo_cache), "--eval-n", "4", "--nproc", "1", "--reuse", "2x2", "--curve-every", "2",
           "--curve-limit", "4", "--curve-benchmarks", "toy"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "variants.md").read_text()
    for row in ("| base (no training) |", "| LSM |", "| LSM + Block64 |", "| LSM + Block64 − LSM |"):
        assert row in table, table
    assert "2 epochs × 2 minibatches = 4 optimizer steps" in table
    data = json.loads((tmp_path / "variants.json").read_text())
    gated = data["results"]["LSM + Block64"]["1"]
    assert set(gated["test"]) == {"pass@1", "pass@4"}
    stats = gated["update_stats"]
    # Update 0 of every rollout trains on the behaviour policy itself: no drift, every gate exactly 1.
    assert stats["abs_drift_mean"]["0"] == 0.0 and stats["gate_min"]["0"] == stats["gate_max"]["0"] == 1.0
    assert stats["abs_drift_mean"]["3"] > 0 and stats["gate_min"]["3"] < 1.0 < stats["gate_max"]["3"]
    assert [step for step, _ in gated["curve"]] == [0, 2, 4]
    assert "gate_std" not in data["results"]["LSM"]["1"]["update_stats"]  # no gate, no gate statistics
    for png in ("variants_curves.png", "variants_gates.png", "variants_test.png"):
        assert (tmp_path / png).stat().st_size > 0
