"""benchmarks/bench_long_context.py: its two paths do the same work (equal loss and gradients), its padding
arithmetic is exact, and ``--tiny`` runs every section end to end."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_long_context.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_long_context", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_old_and_new_paths_do_the_same_work():
    bench = _bench()
    results = []
    for impl in ("old", "new"):
        hidden, weight, mb, loss = bench.build_case(80, 16, 256, 4)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        value = bench.head_loss_step(impl, hidden, weight, mb, loss, chunk_tokens=24)
        results.append((value, hidden.grad, weight.grad))
    (old_loss, old_h, old_w), (new_loss, new_h, new_w) = results
    assert abs(old_loss - new_loss) <= 1e-5 * abs(old_loss)
    torch.testing.assert_close(new_h, old_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(new_w, old_w, rtol=1e-4, atol=1e-6)


def test_fixed_microbatch_padding_is_exact():
    bench = _bench()
    # rows [100, 300] -> 600 computed, 400 real; [200] -> 200 computed: padding 1 - 600/800
    assert bench.fixed_microbatch_padding([100, 300, 200], 2) == 1 - 600 / 800
    lengths = bench.long_tailed_lengths(200)
    assert min(lengths) >= 200 and max(lengths) <= 16384


def test_tiny_run_prints_every_section():
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4 and all("skipped" not in row for row in rows), proc.stdout
    assert "fixed micro-batches of 4 rows" in proc.stdout


def test_old_path_extrapolation_scales_all_but_the_weight_gradient():
    bench = _bench()
    args = bench.parse_args(["--hidden", "4", "--vocab", "200"])  # TP 2: 256 / 2 = 128 rows, gradient 2 KiB
    assert bench.local_vocab(151_936, 1) == 151_936 and bench.local_vocab(151_936, 2) == 76_032
    measured = {"tokens": 100, "peak": 3048.0, "time": 3.0}
    est = bench.extrapolate_old(measured, 400, 2, args)
    assert est == {"peak": 1000.0 * 4 + 2048, "time": 12.0, "estimated": True}
    assert bench.extrapolate_old(None, 400, 2, args) is None
