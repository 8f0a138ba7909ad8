"""Runs for test_trainer_async.py in one torchrun job (DP = 2, so the producer's own process group and the
experience maker's all-gather are exercised): a straight-line reference of the synchronous loop (built
from the trainer's pieces, as the loop was before --max-staleness), then the loop itself at K = 0, 1, 2.

usage: torchrun --nproc-per-node 2 async_runs.py WORKDIR FLAGS_JSON
Writes WORKDIR/<name>/metrics.jsonl and WORKDIR/<name>/final.safetensors (rank 0) for name in
reference, k0, k1, k2, k1_current (K = 1 recomputing π_old with the current weights: the wrong behaviour
policy, which the test shows as an engine/trainer gap), k1_proximal_tis (decoupled PPO + token TIS), and
k1_first / k1_resumed_a / k1_resumed_b (a K = 1 run checkpointed after one rollout, resumed twice).
"""

import json
import sys
from pathlib import Path


def reference(cfg, state, out: Path) -> dict:
    """The synchronous loop as it was: make, recompute, train E × M steps, sync."""
    from megatron_opd.training.components import build_components, gather_engine_weights, sync_weights
    from megatron_opd.training.loop import REPORT_KEYS, minibatch_plan
    from megatron_opd.training.metrics import derive_step_metrics
    from megatron_opd.training.step import recompute_logprobs, train_step

    run = build_components(cfg, state)
    sync_weights(run)
    obj, rows, step, batch_index = cfg.objective, [], 0, 0
    while step < cfg.optim.train_iters:
        exp, _ = run.maker.make(batch_index)
        plans = [minibatch_plan(exp.num_sequences, obj.minibatches_per_rollout, e, batch_index, cfg.optim.seed)
                 for e in range(obj.epochs_per_rollout)]
        exp.old_logprobs = recompute_logprobs(run.student, exp, plans[0], state, cfg.optim.micro_batch_size,
                                              max_tokens=cfg.optim.max_tokens_per_micro_batch, loss=run.loss)
        for plan in plans:
            for indices in plan:
                sums = train_step(run.student, run.loss, exp.select(indices), state, cfg.optim.micro_batch_size,
                                  REPORT_KEYS)
                step += 1
                rows.append({"step": step, **derive_step_metrics(sums, run.loss.step_gate_scale)})
        sync_weights(run)
        batch_index += 1
    return rows, gather_engine_weights(run)


def run_loop(cfg, state, no_snapshots: bool):
    """``loop.run_training``; returns its components (for the final weights). ``no_snapshots``: recompute
    π_old with the current weights (the wrong behaviour policy under staleness)."""
    from megatron_opd.training import loop

    built, real_build, real_snapshots = [], loop.build_components, loop.WeightSnapshots

    def build(c, s):
        built.append(real_build(c, s))
        return built[-1]

    loop.build_components = build
    if no_snapshots:
        loop.WeightSnapshots = lambda *args, **kwargs: None
    try:
        loop.run_training(cfg, state)
    finally:
        loop.build_components, loop.WeightSnapshots = real_build, real_snapshots
    return built[-1]


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_opd.platform import destroy_distributed, initialize_distributed
    from megatron_opd.recipes.common import flags_to_argv
    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.components import gather_engine_weights

    workdir, flags = Path(sys.argv[1]), json.loads(sys.argv[2])
    runs = {"reference": {}, "k0": {"--max-staleness": 0}, "k1": {"--max-staleness": 1},
            "k2": {"--max-staleness": 2}, "k1_current": {"--max-staleness": 1},
            "k1_proximal_tis": {"--max-staleness": 1, "--logprob-source": "proximal", "--gate": "tis"},
            # Resume at K = 1: a 1-rollout run saves; two runs resume from that checkpoint.
            "k1_first": {"--max-staleness": 1, "--train-iters": 2, "--save": str(workdir / "ckpt")},
            "k1_resumed_a": {"--max-staleness": 1, "--load": str(workdir / "ckpt"), "--save": str(workdir / "save_a")},
            "k1_resumed_b": {"--max-staleness": 1, "--load": str(workdir / "ckpt"), "--save": str(workdir / "save_b")}}
    configs = {name: parse_config(flags_to_argv({**flags, **extra}) + ["--run-dir", str(workdir / name),
                                                                        "--no-progress"])
               for name, extra in runs.items()}
    state = initialize_distributed(configs["k0"].parallel)
    try:
        for name, cfg in configs.items():
            (workdir / name).mkdir(parents=True, exist_ok=True)
            if name == "reference":
                rows, weights = reference(cfg, state, workdir / name)
                if state.rank == 0:
                    (workdir / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            else:
                weights = gather_engine_weights(run_loop(cfg, state, no_snapshots=name == "k1_current"))
            if state.rank == 0:
                save_file({k: v.contiguous() for k, v in weights.items()}, str(workdir / name / "final.safetensors"))
            dist.barrier()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
