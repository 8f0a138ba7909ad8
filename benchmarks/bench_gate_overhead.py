"""Train-step overhead of the Block64 drift gate against no gate, side by side in one process.

Builds the embedded demo's student (or ``--layers/--hidden``) at world size 1, makes one real
rollout batch, then alternates optimizer steps with the gate off and on over the same batch and
prints median step times and the overhead ratio. Target: ≤ 1 % of step time.

    .venv/bin/python benchmarks/bench_gate_overhead.py [--reps 20] [--objective lsm]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--objective", default="lsm", choices=("sampled", "lsm"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()

    import torch

    from megatron_opd.gating import DriftGateConfig
    from megatron_opd.platform import initialize_distributed
    from megatron_opd.recipes.common import DemoRecipe, ModelShape, write_initial_model, write_toy_data
    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.components import build_components, sync_weights
    from megatron_opd.training.loop import REPORT_KEYS
    from megatron_opd.training.loss import MicrobatchLoss
    from megatron_opd.training.step import recompute_logprobs, train_step

    work = Path(tempfile.mkdtemp(prefix="bench_gate_"))
    recipe = DemoRecipe()
    shape = ModelShape(layers=args.layers, hidden=args.hidden, heads=4, kv_heads=2, head_dim=args.hidden // 4,
                       intermediate=3 * args.hidden)
    student = write_initial_model(work / "student", shape, seed=1)
    teacher = write_initial_model(work / "teacher", shape, seed=2)
    data = write_toy_data(work, recipe)
    batch = args.prompts * args.samples
    cfg = parse_config(["--student-hf", str(student), "--teacher-hf", str(teacher), "--data-path", str(data),
                        "--objective", args.objective, "--topk", "16", "--gate", "block", "--prompts-per-rollout",
                        str(args.prompts), "--samples-per-prompt", str(args.samples), "--micro-batch-size",
                        str(batch), "--max-new-tokens", "96", "--lr", "1e-5", "--run-dir", str(work / "run"),
                        "--no-progress"])
    state = initialize_distributed(cfg.parallel)
    run = build_components(cfg, state)
    sync_weights(run)
    exp, _ = run.maker.make(0)
    exp.old_logprobs = recompute_logprobs(run.student, exp, [torch.arange(batch)], state, batch, loss=run.loss)
    gated = run.loss
    plain = MicrobatchLoss(dataclasses.replace(gated.settings, gate=DriftGateConfig(granularity="none")),
                           state.tp_group, state.dp_cp_group)
    times = {"none": [], "block64": []}
    for rep in range(args.reps + 2):
        for name, loss in (("none", plain), ("block64", gated)):
            run.loss = loss  # the finalize hook reads the step's normaliser from here
            start = time.perf_counter()
            train_step(run.student, loss, exp, state, batch, REPORT_KEYS)
            if rep >= 2:  # the first steps warm up allocators and caches
                times[name].append(time.perf_counter() - start)
    base, gate = statistics.median(times["none"]), statistics.median(times["block64"])
    tokens = int(exp.loss_mask.sum())
    print(f"objective {args.objective}, {batch} sequences, {tokens} response tokens, {args.reps} reps each")
    print("| gate | median train step (s) | ratio to no gate |")
    print("|---|---|---|")
    print(f"| none | {base:.4f} | 1.000 |")
    print(f"| block64 | {gate:.4f} | {gate / base:.3f} |")
    print(f"Block64 overhead: {100 * (gate / base - 1):+.2f} % of step time (noise of the step time included)")
    # The gate's own cost, timed alone on the same tensors: the part of the difference that is not noise.
    from megatron_opd.gating import drift_gates

    cur = exp.old_logprobs + 0.01 * torch.randn_like(exp.old_logprobs)
    start = time.perf_counter()
    for _ in range(100):
        drift_gates(cur, exp.old_logprobs, exp.loss_mask, dataclasses.replace(cfg.gate, normalization="none"))
    gate_alone = (time.perf_counter() - start) / 100
    print(f"drift_gates alone: {1000 * gate_alone:.3f} ms per step = {100 * gate_alone / base:.3f} % of step time")


if __name__ == "__main__":
    main()
