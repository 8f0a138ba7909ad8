"""The benchmark compares equal work: its naive and chunked steps give the same logits gradient."""

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_vocab_parallel.py"


def test_bench_naive_and_ours_steps_agree():
    spec = importlib.util.spec_from_file_location("bench_vocab_parallel", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    grads = []
    for impl in ("naive", "ours"):
        logits, token_ids, topk_ids, teacher, weights = bench._inputs(torch, 9, 50, 50, 4, torch.float32, 0)
        if impl == "naive":
            bench._naive_step(logits, token_ids, topk_ids, teacher, weights)
        else:
            bench._ours_step(logits, token_ids, topk_ids, teacher, weights, None, 50, 4)
        grads.append(logits.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
