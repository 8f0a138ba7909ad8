"""Run under torchrun: one SFT micro-batch through the trainer vs HF autograd on the same batch.

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
    from megatron_opd.platform import initialize_distributed
    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.components import build_components
    from megatron_opd.training.step import _run_schedule, rank_rows, split_microbatches

    student, data, tp = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = parse_config(["--data-path", data, "--objective", "sft", "--gate", "none", "--epochs-per-rollout", "1",
                        "--micro-batch-size", "4", "--prompts-per-rollout", "8", "--train-iters", "1",
                        "--student-hf", student, "--tensor-model-parallel-size", tp, "--run-dir",
                        str(Path(student).parent / f"gradcheck_tp{tp}"), "--no-progress"])
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
    hf = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64)
    logp = torch.log_softmax(hf(exp.input_ids).logits, -1)
    positions = exp.response_positions()
    picked = torch.stack([logp[b, positions[b], exp.response_ids[b]] for b in range(exp.num_sequences)])
    loss = -torch.where(exp.loss_mask, picked, 0.0).sum() / exp.loss_mask.sum()
    loss.backward()
    if state.rank == 0:
        for name, param in hf.named_parameters():
            diff = (param.grad.float() - grads[name].float()).abs().max().item()
            print(f"MAXDIFF {name} {diff:.3e} {param.grad.abs().max().item():.3e}", flush=True)


if __name__ == "__main__":
    main()
