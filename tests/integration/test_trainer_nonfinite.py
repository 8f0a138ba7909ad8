"""A non-finite loss skips its step (counted, logged) and the run aborts after --max-bad-steps in a row.

The NaN is produced for real: an absurd learning rate sends the weights to inf after one update.
"""

import os
import subprocess
import sys

from conftest import read_metrics


def test_nonfinite_losses_skip_then_abort(toy_models, tmp_path):
    data, student, _ = toy_models
    cmd = [sys.executable, "-m", "megatron_opd.cli", "train", "--objective", "sft", "--gate", "none",
           "--student-hf", str(student), "--data-path", str(data), "--prompts-per-rollout", "4",
           "--micro-batch-size", "4", "--epochs-per-rollout", "1", "--train-iters", "10", "--lr", "1e30",
           "--clip-grad", "0", "--max-bad-steps", "2", "--run-dir", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "2 non-finite losses in a row" in proc.stderr and "--max-bad-steps 2" in proc.stderr
    rows = [r for r in read_metrics(tmp_path) if "skipped" in r]
    assert rows[0]["skipped"] == 0.0
    assert [r["skipped"] for r in rows[-1:]] == [1.0]
    assert len(rows) < 10
