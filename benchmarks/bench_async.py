"""Rollout/training overlap (``--max-staleness K``): tokens/s synchronous against asynchronous, side by side
in one process, and a model of a GPU cluster predicting the speed-up for K = 1, 2, 4.

1. Measured on this CPU (in-process engines, tiny random Qwen3, world size 1): the same run at K = 0 and at
   K = 1, 2; tokens/s = response tokens trained / wall time. Core split: the synchronous run gives the
   trainer and the engine all ``--threads`` cores, one phase after the other; the asynchronous runs give the
   trainer (main thread) ``--threads − --rollout-threads`` and the producer thread ``--rollout-threads``
   (torch's intra-op thread count is per thread).
   Every run builds its components inside the timed span (same cost for each); a first K = 0 run warms up.
2. Modelled GPU cluster: per rollout batch, generation time g (decode, gated by its longest response) and
   training time t (recompute + E train passes); ``pipeline_seconds`` runs the fixed-lag schedule of
   ``training/async_rollout.py`` (batch b waits for the sync of version b − K and for the engine; training of
   b waits for batch b) over many batches with long-tailed g. Synchronous = colocated (all GPUs generate,
   then all train); asynchronous = the GPUs split between trainer and engines (best split printed).
   Trainer time from tools/gpu_check on one H200 (docs/results/gpu/README.md): Qwen3-1.7B shape, 8,192 tokens
   per OPD train step in 0.389 s, scaled linearly with GPUs. Engine: a batch takes the longer of its
   throughput-bound time (tokens / (GPUs × decode tokens/s)) and its latency-bound time (the longest response
   decoded token by token): more engine GPUs do not shorten the latter, which is why overlap pays.
   Engine throughput, decode latency, longest response and weight-sync time are *stated assumptions* (flags).

Run it alone (numbers from a loaded machine mean nothing):
    .venv/bin/python benchmarks/bench_async.py [--batches 6] [--threads 2 --rollout-threads 1]
    .venv/bin/python benchmarks/bench_async.py --tiny      # pipeline check (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

H200_TRAIN_S_PER_8192 = 0.389  # docs/results/gpu/README.md, throughput_mfu section
ANCHORS = {"verl one-step off-policy": "+23–40%", "verl fully async": "2–2.7×", "AReaL": "2.77×",
           "AsyncOPD": "1.6–3.8×"}


def pipeline_seconds(gen_times: list[float], train_times: list[float], sync_s: float, k: int) -> float:
    """Wall time of the fixed-lag schedule: batch b is generated from version max(0, b − K), which exists
    once batch b − K − 1 is trained and synced. K = 0 is the synchronous loop (g + t + sync per batch).
    The engine generates one batch at a time, in order; the trainer trains one batch at a time."""
    version_ready = [0.0]  # version v is published at version_ready[v]
    gen_free = train_free = 0.0
    for b, (g, t) in enumerate(zip(gen_times, train_times)):
        start = max(gen_free, version_ready[max(0, b - k)])
        gen_free = start + g
        train_free = max(gen_free, train_free) + t
        version_ready.append(train_free + sync_s)
    return version_ready[-1]


def long_tail_factors(batches: int, sigma: float, seed: int) -> list[float]:
    """Per-batch generation time multipliers (lognormal, mean 1): a batch lasts as long as its longest
    response, which varies from batch to batch."""
    rng = random.Random(seed)
    shift = math.exp(sigma * sigma / 2)
    return [rng.lognormvariate(0.0, sigma) / shift for _ in range(batches)]


def generation_seconds(args, engine_gpus: int, factor: float) -> float:
    """One batch on ``engine_gpus``: throughput-bound (all tokens at full-batch decode speed) or, when longer,
    latency-bound (the longest response decoded token by token while the batch thins out)."""
    throughput = args.batch_tokens / (engine_gpus * args.engine_tokens_per_s)
    latency = args.longest_response * args.decode_latency_ms / 1000.0 * factor
    return max(throughput, latency)


def cluster_prediction(args) -> list[dict]:
    """Predicted tokens/s of K = 0 (colocated) and K = 1, 2, 4 (disaggregated, best GPU split)."""
    tokens = args.batch_tokens
    train_gpu_s = (args.epochs + 1 / 3) * tokens / 8192 * args.train_s_per_8192  # E passes + forward recompute
    factors = long_tail_factors(args.model_batches, args.sigma, seed=0)
    rows = []
    sync_time = pipeline_seconds([generation_seconds(args, args.gpus, f) for f in factors],
                                 [train_gpu_s / args.gpus] * args.model_batches, args.sync_s, 0)
    rows.append({"K": 0, "layout": f"colocated on {args.gpus} GPUs", "tokens_per_s": tokens * args.model_batches /
                 sync_time, "speedup": 1.0})
    for k in (1, 2, 4):
        best = None
        for trainer_gpus in range(1, args.gpus):
            engine_gpus = args.gpus - trainer_gpus
            wall = pipeline_seconds([generation_seconds(args, engine_gpus, f) for f in factors],
                                    [train_gpu_s / trainer_gpus] * args.model_batches, args.sync_s, k)
            if best is None or wall < best[0]:
                best = (wall, trainer_gpus, engine_gpus)
        wall, trainer_gpus, engine_gpus = best
        rows.append({"K": k, "layout": f"{trainer_gpus} trainer + {engine_gpus} engine GPUs",
                     "tokens_per_s": tokens * args.model_batches / wall, "speedup": sync_time / wall})
    return rows


def measure_cpu(args) -> list[dict]:
    """The trainer at K = 0 and K ≥ 1 on the same tiny run, one after the other in this process."""
    import torch

    from megatron_opd.platform import destroy_distributed, initialize_distributed
    from megatron_opd.recipes.common import (
        ModelShape,
        flags_to_argv,
        quick_recipe,
        write_initial_model,
        write_toy_data,
    )
    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.loop import run_training

    work = Path(tempfile.mkdtemp(prefix="bench_async_"))
    shape = ModelShape(layers=args.layers, hidden=args.hidden, heads=4, kv_heads=2, head_dim=args.hidden // 4,
                       intermediate=2 * args.hidden)
    student, teacher = (write_initial_model(work / n, shape, seed=s) for n, s in (("student", 1), ("teacher", 2)))
    data = write_toy_data(work, quick_recipe())
    base = {"--student-hf": str(student), "--teacher-hf": str(teacher), "--data-path": str(data),
            "--objective": "sampled", "--gate": "block", "--train-iters": 2 * args.batches,
            "--epochs-per-rollout": 2, "--minibatches-per-rollout": 1, "--prompts-per-rollout": args.prompts,
            "--samples-per-prompt": args.samples, "--micro-batch-size": args.prompts * args.samples,
            "--max-new-tokens": args.max_new_tokens, "--lr": 1e-3, "--no-progress": True}
    # A first K = 0 run warms up (imports, first model build, allocator) and is not reported.
    runs = [(0, args.threads, 0), (0, args.threads, 0)] + [(k, args.threads - args.rollout_threads,
                                                            args.rollout_threads) for k in args.staleness]
    state, rows = None, []
    try:
        for index, (k, trainer_threads, rollout_threads) in enumerate(runs):
            run_dir = work / f"run{index}_k{k}"
            cfg = parse_config(flags_to_argv({**base, "--max-staleness": k, "--rollout-threads": rollout_threads})
                               + ["--run-dir", str(run_dir)])
            state = state or initialize_distributed(cfg.parallel)
            torch.set_num_threads(trainer_threads)
            start = time.perf_counter()
            run_training(cfg, state)
            wall = time.perf_counter() - start
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            tokens = sum(r.get("rollout_tokens", 0.0) for r in metrics)
            rows.append({"K": k, "threads": f"trainer {trainer_threads}" + (f" + producer {rollout_threads}"
                                                                            if k else " (both phases)"),
                         "wall_s": wall, "tokens_per_s": tokens / wall})
    finally:
        if state is not None:
            destroy_distributed()
    rows = rows[1:]  # the warm-up
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--tiny", action="store_true", help="smallest settings: checks the pipeline, not the speed")
    add("--threads", type=int, default=2, help="CPU cores for the measured runs")
    add("--rollout-threads", type=int, default=1, help="of --threads, the producer thread's share (K >= 1)")
    add("--staleness", default="1,2", help="K values measured on CPU besides 0")
    add("--batches", type=int, default=6)
    add("--prompts", type=int, default=16)
    add("--samples", type=int, default=4)
    add("--max-new-tokens", type=int, default=48)
    add("--layers", type=int, default=4)
    add("--hidden", type=int, default=128)
    # GPU cluster model
    add("--gpus", type=int, default=8)
    add("--batch-tokens", type=int, default=256 * 2048, help="response tokens per rollout batch")
    add("--epochs", type=int, default=1, help="train passes over each rollout batch")
    add("--train-s-per-8192", type=float, default=H200_TRAIN_S_PER_8192)
    add("--engine-tokens-per-s", type=float, default=20000.0,
        help="ASSUMED SGLang decode throughput of one H200 on Qwen3-1.7B at full batch")
    add("--longest-response", type=int, default=4096, help="ASSUMED longest response of a batch (tokens)")
    add("--decode-latency-ms", type=float, default=6.0,
        help="ASSUMED per-token decode latency of a thin batch (Qwen3-1.7B, one H200)")
    add("--sigma", type=float, default=0.3, help="batch-to-batch spread (lognormal sigma) of the longest response")
    add("--sync-s", type=float, default=1.0, help="ASSUMED weight-sync time per version (3.4 GB of bf16)")
    add("--model-batches", type=int, default=200)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.staleness = [int(k) for k in args.staleness.split(",") if k]
    if args.tiny:
        args.batches, args.prompts, args.samples, args.max_new_tokens = 2, 2, 2, 8
        args.layers, args.hidden, args.staleness, args.model_batches = 1, 32, [1], 20
    args.rollout_threads = min(args.rollout_threads, args.threads - 1) if args.threads > 1 else 1
    rows = measure_cpu(args)
    print_table(f"Measured on this CPU ({args.threads} threads; tiny model, in-process engines):", rows)
    model = cluster_prediction(args)
    g = generation_seconds(args, args.gpus, 1.0)
    t = (args.epochs + 1 / 3) * args.batch_tokens / 8192 * args.train_s_per_8192 / args.gpus
    print_table(f"Modelled cluster ({args.gpus} H200, Qwen3-1.7B, {args.batch_tokens} tokens per rollout batch; "
                f"colocated generation {g:.1f} s + training {t:.1f} s per batch):", model)
    print("\nAnchors (reported): " + "; ".join(f"{k} {v}" for k, v in ANCHORS.items()))
    print("A fixed-lag overlap of whole batches cannot beat (g + t) / max(g, t) <= 2x (+ the long tail it hides);"
          " reports above 2x also stream partial rollouts or give the engines more/cheaper GPUs.")


if __name__ == "__main__":
    main()
