"""One optimizer step, and the forward-only log-prob recompute, through Megatron's pipeline schedule.

Both split the (already chosen) minibatch over the data-parallel ranks, then into micro-batches
of equal sequence length (pipeline P2P needs fixed shapes), and call Megatron's
``get_forward_backward_func`` so TP/PP/VPP/SP work the same as in any Megatron job.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist

from megatron_opd.platform import ParallelState
from megatron_opd.training.experience import Experience
from megatron_opd.training.loss import MicrobatchLoss, student_view


def causal_mask(seq_len: int, device) -> torch.Tensor:
    """Megatron's boolean attention mask [1, 1, S, S]; True = masked (the future)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def rank_rows(num_rows: int, state: ParallelState) -> torch.Tensor:
    """Contiguous rows of a minibatch owned by this data-parallel rank."""
    if num_rows % state.dp_size:
        raise ValueError(f"minibatch of {num_rows} sequences does not split over {state.dp_size} data-parallel "
                         "ranks: change --prompts-per-rollout/--samples-per-prompt/--minibatches-per-rollout")
    per_rank = num_rows // state.dp_size
    return torch.arange(state.dp_rank * per_rank, (state.dp_rank + 1) * per_rank)


def local_rows(exp: Experience, rows: torch.Tensor, uniform_shapes: bool) -> Experience:
    """This rank's ``rows`` of ``exp``: trimmed to their own longest sequence, or kept at ``exp``'s length
    when every data-parallel rank must feed the same shape (``Student.uniform_dp_shapes``)."""
    return exp.rows(rows) if uniform_shapes else exp.select(rows)


def split_microbatches(exp: Experience, micro_batch_size: int) -> list[Experience]:
    """Row blocks of ``exp`` keeping its (already trimmed) sequence length for every block."""
    num = exp.num_sequences
    if num % micro_batch_size:
        raise ValueError(f"{num} sequences per data-parallel rank is not a multiple of --micro-batch-size "
                         f"{micro_batch_size}")
    return [exp.rows(torch.arange(start, start + micro_batch_size)) for start in range(0, num, micro_batch_size)]


def _forward_step(loss_func, device, data_iterator, model):
    # The whole micro-batch goes to the model's device once: the loss reads labels, masks,
    # positions, old/teacher log-probs and the teacher's top-K next to the logits.
    mb = next(data_iterator).to(device)
    ids = mb.input_ids
    seq_len = ids.shape[1]
    positions = torch.arange(seq_len, device=device).expand_as(ids)
    output = model(ids, positions, causal_mask(seq_len, device))
    return output, partial(loss_func, mb)


def _run_schedule(model: list, microbatches: list[Experience], loss_func, micro_batch_size: int, device,
                  forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(microbatches) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_func, device),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model, num_microbatches=len(microbatches),
        seq_length=microbatches[0].input_ids.shape[1], micro_batch_size=micro_batch_size,
        forward_only=forward_only)


def _sum_reports(reports: list[dict]) -> dict[str, float]:
    """Sum micro-batch reports (max/min keys by max/min); plain floats."""
    total: dict[str, float] = {}
    for report in reports:
        for key, value in report.items():
            value = float(value)
            if key.endswith("_max"):
                total[key] = max(total.get(key, -math.inf), value)
            elif key.endswith("_min"):
                total[key] = min(total.get(key, math.inf), value)
            else:
                total[key] = total.get(key, 0.0) + value
    return total


def reduce_reports(local: dict[str, float], state: ParallelState, keys: list[str]) -> dict[str, float]:
    """Combine report fields over the pipeline (only the last stage has them) and data-parallel ranks.

    Fields ending in ``_max``/``_min`` reduce by max/min, the others by sum; fields no rank
    reported are left out.
    """
    def signed(key: str, value: float) -> float:  # min(x) = -max(-x)
        return -value if key.endswith("_min") else value

    is_extreme = [k.endswith(("_max", "_min")) for k in keys]
    sums = torch.tensor([0.0 if ext else local.get(k, 0.0) for k, ext in zip(keys, is_extreme)], dtype=torch.float64)
    extremes = torch.tensor([signed(k, local[k]) if ext and k in local else -math.inf
                             for k, ext in zip(keys, is_extreme)], dtype=torch.float64)
    present = torch.tensor([float(k in local) for k in keys], dtype=torch.float64)
    # NCCL reduces CUDA tensors only; gloo (CPU) takes them where they are.
    sums, extremes, present = (t.to(state.device) for t in (sums, extremes, present))
    for group in (state.pp_group, state.dp_cp_group):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)  # collective: sums of report fields
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)  # collective: max/min fields
            dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)  # collective: which fields exist
    return {k: (signed(k, extremes[i].item()) if is_extreme[i] else sums[i].item())
            for i, k in enumerate(keys) if present[i] > 0}


def train_step(student, loss: MicrobatchLoss, minibatch: Experience, state: ParallelState,
               micro_batch_size: int, report_keys: list[str]) -> dict[str, float]:
    """Forward/backward over the minibatch, gate normalisation, clip, optimizer and LR step.

    A non-finite loss skips the optimizer step (``skipped`` = 1 in the result).
    """
    uniform = getattr(student, "uniform_dp_shapes", False)
    local = local_rows(minibatch, rank_rows(minibatch.num_sequences, state), uniform)
    microbatches = split_microbatches(local, micro_batch_size)
    for chunk in student.model:
        chunk.zero_grad_buffer()
    student.optimizer.zero_grad()
    loss.normalizer.reset()
    router_load = getattr(student, "router_load", None)  # MoE students: tokens per expert, aux loss
    if router_load is not None:
        router_load.reset()
    reports = _run_schedule(student.model, microbatches, loss, micro_batch_size, state.device, forward_only=False)
    result = reduce_reports(_sum_reports(reports), state, report_keys)
    if router_load is not None:
        result.update(router_load.reduce(state, len(microbatches)))  # collective over all ranks
    if not math.isfinite(result.get("loss_sum", 0.0)):
        result["skipped"] = 1.0
        return result
    # The rate this step runs at: the scheduler sets the next step's rate as it moves on.
    lr = student.optimizer.param_groups[0]["lr"]
    update_ok, grad_norm, _ = student.optimizer.step()
    student.scheduler.step(increment=1)
    result.update(skipped=0.0 if update_ok else 1.0, grad_norm=float(grad_norm or 0.0), lr=lr)
    return result


def recompute_logprobs(student, exp: Experience, minibatches: list[torch.Tensor], state: ParallelState,
                       micro_batch_size: int) -> torch.Tensor:
    """log π_θ(y_t) for every sequence of ``exp`` [N, T], computed with the same minibatch and
    micro-batch layout as the first epoch's training steps, so the first update of a rollout sees
    exactly zero drift."""
    out = torch.zeros(exp.response_ids.shape, dtype=torch.float32)

    def logprob_only(mb, output_tensor):
        cur = student_view(output_tensor, mb, state.tp_group, student.vocab_size, with_support=False).logprobs
        return output_tensor.new_zeros(()), mb.loss_mask.sum().to(torch.int), {"logprobs": cur.detach().float()}

    with torch.no_grad():
        for indices in minibatches:
            rows = indices[rank_rows(len(indices), state)]
            # the rows and shapes train_step sees for this minibatch
            local = local_rows(exp.select(indices), rank_rows(len(indices), state),
                               getattr(student, "uniform_dp_shapes", False))
            reports = _run_schedule(student.model, split_microbatches(local, micro_batch_size), logprob_only,
                                    micro_batch_size, state.device, forward_only=True)
            if reports:  # last pipeline stage only
                logprobs = torch.cat([r["logprobs"].cpu() for r in reports])
                out[rows, : logprobs.shape[1]] = logprobs
    out = out.to(state.device)  # NCCL reduces CUDA tensors only
    for group in (state.pp_group, state.dp_cp_group):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(out, group=group)  # collective: each row is filled on exactly one rank
    return out.cpu()
