"""Run under torchrun: the trainer with the chunked head (default) against --no-chunked-head, one step.

usage: torchrun --nproc-per-node 2 chunked_head_check.py STUDENT TEACHER DATA OBJECTIVE [FLAG ...]

Builds both trainers from the same weights, makes one rollout batch, and compares (rank 0 prints):
  MAXDIFF recompute <abs diff> <scale>   the recomputed log π_old of every response token;
  MAXDIFF grad <abs diff> <scale>        every parameter's finalised gradient (.main_grad after Megatron's
                                         DP/TP/tied-embedding reductions and the gate rescale);
  MAXDIFF weights <abs diff> <scale>     every weight after one full ``train_step`` (optimizer included);
  LOSS <chunked> <logits>                the step's loss sums.
Adam runs with eps = 1 here so its first step is ≈ lr·g, smooth in g: the weights then differ by about
lr × the gradient difference (with eps = 1e-8 the first step is lr·sign(g) and a ~1e-9 gradient could flip).
"""

import dataclasses
import sys
from pathlib import Path

import torch


def _max_diff(pairs) -> tuple[float, float]:
    """(max |a − b|, max |b|) over this rank's pairs, then over all ranks (PP stages hold different layers)."""
    import torch.distributed as dist

    local = torch.tensor([max((a.double() - b.double()).abs().max().item() for a, b in pairs),
                          max(b.double().abs().max().item() for _, b in pairs)], dtype=torch.float64)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return tuple(local.tolist())


def _grads(run, exp, state, mbs):
    from megatron_opd.training.step import _run_schedule, rank_rows, split_microbatches

    local = exp.select(rank_rows(exp.num_sequences, state))
    for chunk in run.student.model:
        chunk.zero_grad_buffer()
    run.loss.normalizer.reset()
    _run_schedule(run.student.model, split_microbatches(local, mbs), run.loss, state.device,
                  forward_only=False, chunked_head=run.loss.settings.chunked_head)
    # the schedule's finalize (DP/TP/embedding all-reduces, gate rescale) has run: read .main_grad
    return [p.main_grad.detach().clone() for m in run.student.unwrapped() for p in m.parameters()]


def main() -> None:
    from megatron_opd.platform import initialize_distributed
    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.components import build_components
    from megatron_opd.training.step import recompute_logprobs, train_step

    student, teacher, data, objective, *extra = sys.argv[1:]
    mbs = 2
    flags = ["--data-path", data, "--student-hf", student, "--teacher-hf", teacher, "--objective", objective,
             "--topk", "4", "--lsm-tail", "--ppo-clip", "0.2", "--gate", "block", "--gate-block-size", "4",
             "--prompts-per-rollout", "2", "--samples-per-prompt", "2", "--micro-batch-size", str(mbs),
             "--max-new-tokens", "12", "--lr", "1e-2", "--train-iters", "1", "--no-chat-template",
             "--run-dir", str(Path(student).parent / "chunked_head_check"), "--no-progress", *extra]
    configs = [parse_config(flags), parse_config(flags + ["--no-chunked-head"])]
    configs = [dataclasses.replace(c, optim=dataclasses.replace(c.optim, adam_eps=1.0)) for c in configs]
    assert configs[0].model.chunked_head and not configs[1].model.chunked_head
    state = initialize_distributed(configs[0].parallel)
    runs = [build_components(cfg, state) for cfg in configs]
    exp, _ = runs[0].maker.make(0)
    plan = [torch.arange(exp.num_sequences)]
    recomputed = [recompute_logprobs(run.student, exp, plan, state, mbs, loss=run.loss) for run in runs]
    valid = exp.loss_mask
    report = {"recompute": _max_diff([(recomputed[0][valid], recomputed[1][valid])])}
    exp.old_logprobs = recomputed[1] - 0.05 * torch.rand(recomputed[1].shape)  # drift: gates and ratios act
    report["grad"] = _max_diff(list(zip(*[_grads(run, exp, state, mbs) for run in runs])))
    sums = [train_step(run.student, run.loss, exp, state, mbs, ["loss_sum", "tokens"]) for run in runs]
    weights = [[p.detach().clone() for m in run.student.unwrapped() for p in m.parameters()] for run in runs]
    report["weights"] = _max_diff(list(zip(*weights)))
    if state.rank == 0:
        for name, (diff, scale) in report.items():
            print(f"MAXDIFF {name} {diff:.3e} {scale:.3e}", flush=True)
        print(f"LOSS {sums[0]['loss_sum']:.8e} {sums[1]['loss_sum']:.8e}", flush=True)


if __name__ == "__main__":
    main()
