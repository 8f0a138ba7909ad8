"""The embedded CPU default, small: ``megatron-opd demo --quick`` runs every phase (teacher SFT,
student SFT, Block64 OPD at TP=2, held-out evaluation) and prints the table; a second run reuses
the cached teacher and student."""

import json
import os
import subprocess
import sys


def run_demo(workdir, cache):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_opd.cli", "demo", "--quick", "--workdir", str(workdir),
                           "--cache-dir", str(cache)], capture_output=True, text=True, timeout=600, env=env)


def test_quick_demo_end_to_end(tmp_path, demo_cache):
    proc = run_demo(tmp_path / "run", demo_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| student after OPD |" in proc.stdout and "| teacher |" in proc.stdout
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(summary["results"]) == {"teacher", "student before OPD", "student after OPD"}
    for row in summary["results"].values():
        assert 0.0 <= row["pass@1"] <= row["pass@4"] <= 1.0
    assert {"rollout", "teacher", "train", "sync", "recompute"} <= set(summary["phase_times"])
    opd_steps = [json.loads(line) for line in (tmp_path / "run" / "run_opd" / "metrics.jsonl").read_text().splitlines()]
    assert any("gate_mean" in row for row in opd_steps)
    assert (tmp_path / "run" / "student_after_opd" / "config.json").exists()
    assert (tmp_path / "run" / "demo.png").stat().st_size > 0
    for row in summary["results"].values():  # 95% CIs around both metrics
        for key in ("pass@1", "pass@4"):
            assert row["ci"][key][0] <= row[key] <= row["ci"][key][1]
    # Clean trainer output: one line names Megatron's TE/Apex fallbacks instead of a wall of warnings.
    log = (tmp_path / "run" / "run_opd" / "train.log").read_text()
    assert log.count("megatron-core fallbacks in use:") == 1 and "Falling back" not in log, log[:3000]
    assert "deprecated" not in log and "Unknown MLP type" not in log, log[:3000]
    # Second run: teacher and student SFT come from the cache.
    again = run_demo(tmp_path / "run2", demo_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sft: cached teacher" in again.stderr + again.stdout
