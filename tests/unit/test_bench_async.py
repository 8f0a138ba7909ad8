"""bench_async: the fixed-lag schedule model against hand-computed timelines, and the --tiny run end to end."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_async.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_async", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_pipeline_model_matches_hand_timelines():
    pipeline = load_bench().pipeline_seconds
    # K = 0: g + t + sync per batch.
    assert pipeline([2.0] * 3, [1.0] * 3, 0.5, 0) == 3 * 3.5
    # K = 1, g = 2, t = 1, sync 0.5: gen 0 [0,2] (v0), gen 1 [2,4] (v0), train 0 [2,3] -> v1 at 3.5,
    # gen 2 [4,6] (v1), train 1 [4,5] -> v2 at 5.5, train 2 [6,7] -> v3 at 7.5.
    assert pipeline([2.0] * 3, [1.0] * 3, 0.5, 1) == 7.5
    # The trainer is the bottleneck (t = 2 > g = 1): K = 1 hides the generation, K = 2 adds nothing.
    assert pipeline([1.0] * 4, [2.0] * 4, 0.0, 1) == pipeline([1.0] * 4, [2.0] * 4, 0.0, 2) == 1 + 4 * 2
    # A slow batch is absorbed by a deeper lag: K = 2 waits less than K = 1.
    gens = [1.0, 1.0, 4.0, 1.0, 1.0, 1.0]
    assert pipeline(gens, [2.0] * 6, 0.0, 2) < pipeline(gens, [2.0] * 6, 0.0, 1) < pipeline(gens, [2.0] * 6, 0.0, 0)


def test_cluster_prediction_is_bounded_by_the_overlap_limit():
    bench = load_bench()
    rows = bench.cluster_prediction(bench.build_parser().parse_args([]))
    assert [r["K"] for r in rows] == [0, 1, 2, 4]
    assert all(1.0 <= r["speedup"] <= 2.0 for r in rows)
    assert rows[1]["speedup"] > 1.05


def test_tiny_run_prints_both_tables():
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Measured on this CPU" in out and "Modelled cluster" in out and "AReaL 2.77×" in out
    measured = out.split("Measured on this CPU")[1].split("Modelled")[0].strip().splitlines()
    assert measured[2].startswith("0 | trainer 2 (both phases)") and measured[3].startswith("1 | trainer 1 + producer 1")
