"""Run under torchrun: one SFT micro-batch through the trainer vs HF autograd on the same batch.

    trainer_grad_check.py STUDENT_HF DATA TP [more trainer flags, e.g. --expert-model-parallel-size 2]

Prints MAXDIFF <name> <abs diff> <scale> for a few parameters (rank 0), after Megatron's gradient
finalisation (DP/TP reductions and the per-token scaling). Gathers TP-sharded grads with the same
helper that gathers weights, by swapping grads into the parameters.
"""

import sys
from pathlib import Path

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM

    from megatron_opd.models import gather_hf_state_dict
    from megatron_opd.models.weight_mapping import split_fused_experts
    from megatron_opd.platform import initialize_distributed
    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.components import build_components
    from megatron_opd.training.step import _run_schedule, rank_rows, split_microbatches

    student, data, tp, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    cfg = parse_config(["--data-path", data, "--objective", "sft", "--gate", "none", "--epochs-per-rollout", "1",
                        "--micro-batch-size", "4", "--prompts-per-rollout", "8", "--train-iters", "1",
                        "--student-hf", student, "--tensor-model-parallel-size", tp, "--run-dir",
                        str(Path(student).parent / f"gradcheck_tp{tp}_{'_'.join(extra)}"), "--no-progress", *extra])
    state = initialize_distributed(cfg.parallel)
    run = build_components(cfg, state)
    exp, _ = run.maker.make(0)
    local = exp.select(rank_rows(exp.num_sequences, state))
    for chunk in run.student.model:
        chunk.zero_grad_buffer()
    _run_schedule(run.student.model, split_microbatches(local, 4), run.loss, state.device, forward_only=False,
                  chunked_head=run.loss.settings.chunked_head)
    modules = run.student.unwrapped()
    with torch.no_grad():  # put the finalised grads where the weights were, then gather them by HF name
        saved = {p: p.detach().clone() for m in modules for p in m.parameters()}
        for p in saved:
            p.copy_(p.main_grad)
        grads = gather_hf_state_dict(modules, run.student.hf_config)
        for p, value in saved.items():
            p.copy_(value)
    # MoE: transformers' default grouped_mm experts refuse fp64; the eager loop is the reference
    moe = {"experts_implementation": "eager"} if "Moe" in str(run.student.hf_config.architectures) else {}
    hf = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64, **moe)
    logp = torch.log_softmax(hf(exp.input_ids).logits, -1)
    positions = exp.response_positions()
    picked = torch.stack([logp[b, positions[b], exp.response_ids[b]] for b in range(exp.num_sequences)])
    loss = -torch.where(exp.loss_mask, picked, 0.0).sum() / exp.loss_mask.sum()
    loss.backward()
    if state.rank == 0:  # MoE: transformers 5 fuses the experts in memory; compare per expert
        for name, grad in split_fused_experts({n: p.grad for n, p in hf.named_parameters()}).items():
            diff = (grad.float() - grads[name].float()).abs().max().item()
            print(f"MAXDIFF {name} {diff:.3e} {grad.abs().max().item():.3e}", flush=True)


if __name__ == "__main__":
    main()
