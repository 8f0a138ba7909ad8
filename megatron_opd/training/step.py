"""One optimizer step, and the forward-only log-prob recompute, through Megatron's pipeline schedule.

Both split the (already chosen) minibatch over the data-parallel ranks and into micro-batches, and
call Megatron's ``get_forward_backward_func`` so TP/PP/VPP/SP work the same as in any Megatron job.

Micro-batches (``local_microbatches``): by default blocks of ``--micro-batch-size`` rows of one
sequence length per rank; with ``--max-tokens-per-micro-batch`` the token-budget plan of
``training/packing.py``, each micro-batch trimmed to its own longest row. Micro-batches of different
shapes make the pipeline exchange shapes before each P2P transfer (``variable_seq_lengths``).
Ranks may hold different numbers of rows and tokens: the gradients are still exact, because the
loss returns sums and Megatron's ``finalize_model_grads`` (once per step, after the last micro-batch)
all-reduces the gradients and the valid-token count over DP, and the gate rescale all-reduces Σm
and Σmg (``training/loss.py``).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist

from megatron_opd.platform import ParallelState
from megatron_opd.platform.p2p_shapes import apply_p2p_shape_fix
from megatron_opd.training.experience import Experience
from megatron_opd.training.loss import MicrobatchLoss, student_view
from megatron_opd.training.packing import fixed_microbatch_plan, pack_microbatches


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


def _forward_step(loss_func, device, data_iterator, model, chunked_head: bool = False):
    # The whole micro-batch goes to the model's device once: the loss reads labels, masks,
    # positions, old/teacher log-probs and the teacher's top-K next to the logits.
    mb = next(data_iterator).to(device)
    ids = mb.input_ids
    seq_len = ids.shape[1]
    positions = torch.arange(seq_len, device=device).expand_as(ids)
    if not chunked_head:
        return model(ids, positions, causal_mask(seq_len, device)), partial(loss_func, mb)
    from megatron_opd.models.hidden_head import emit_hidden_states

    # The last stage returns hidden states; the loss runs the output layer in token chunks.
    with emit_hidden_states(model) as head_weight:
        output = model(ids, positions, causal_mask(seq_len, device))
    return output, partial(loss_func, mb, head_weight=head_weight)


def local_microbatches(minibatch: Experience, state: ParallelState, micro_batch_size: int,
                       max_tokens: int | None, microbatch_multiple: int = 1, uniform_shapes: bool = False):
    """This data-parallel rank's micro-batches, their row indices into ``minibatch``, and the padding
    fraction of the whole minibatch's layout (every rank computes the same plan from the lengths).
    ``uniform_shapes``: every data-parallel rank feeds the minibatch's shape (``Student.uniform_dp_shapes``)."""
    lengths = (minibatch.prompt_lens + minibatch.response_lens).tolist()
    if not max_tokens:  # today's layout, unchanged
        rows = rank_rows(minibatch.num_sequences, state)
        microbatches = split_microbatches(local_rows(minibatch, rows, uniform_shapes), micro_batch_size)
        padding = fixed_microbatch_plan(lengths, state.dp_size, micro_batch_size,
                                        minibatch.pad_to_multiple).padding_fraction
        return microbatches, list(rows.split(micro_batch_size)), padding
    if uniform_shapes:
        raise ValueError("--max-tokens-per-micro-batch gives every data-parallel rank micro-batches of its own shape, "
                         "but the MoE all-gather dispatcher needs one shape on every rank: use "
                         "--moe-token-dispatcher-type alltoall or drop --max-tokens-per-micro-batch")
    plan = pack_microbatches(lengths, state.dp_size, max_tokens, pad_to_multiple=minibatch.pad_to_multiple,
                             microbatch_multiple=microbatch_multiple)
    rows = [torch.tensor(mb.rows) for mb in plan.ranks[state.dp_rank]]
    return [minibatch.select(r) for r in rows], rows, plan.padding_fraction


def _microbatch_multiple(model: list, state: ParallelState) -> int:
    # Megatron's interleaved (VPP) schedule runs micro-batches in groups of the pipeline size.
    return state.pp_size if len(model) > 1 else 1


def _run_schedule(model: list, microbatches: list[Experience], loss_func, device, forward_only: bool,
                  chunked_head: bool = False):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    variable = len({tuple(mb.input_ids.shape) for mb in microbatches}) > 1
    # Read by the pipeline's P2P on every transfer: exchange shapes first only when they vary.
    get_model_config(model[0]).variable_seq_lengths = variable
    if variable:
        apply_p2p_shape_fix()  # Megatron crosses the two directions' shapes in a pipeline of 2 ranks
    rows, seq_len = microbatches[0].input_ids.shape  # the shape P2P uses when it does not vary
    iterators = [iter(microbatches) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_func, device, chunked_head=chunked_head),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model, num_microbatches=len(microbatches),
        seq_length=seq_len, micro_batch_size=rows,
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


def forward_backward(student, loss: MicrobatchLoss, minibatch: Experience, state: ParallelState,
                     micro_batch_size: int, max_tokens: int | None = None) -> tuple[list[dict], float, int]:
    """Zero the gradients and run forward/backward over this rank's micro-batches; the gradients are
    then finalised (DP all-reduce, per-token scaling, gate rescale). Returns the micro-batch reports
    (last pipeline stage), the minibatch's padding fraction and this rank's number of micro-batches."""
    microbatches, _, padding = local_microbatches(minibatch, state, micro_batch_size, max_tokens,
                                                  _microbatch_multiple(student.model, state),
                                                  getattr(student, "uniform_dp_shapes", False))
    for chunk in student.model:
        chunk.zero_grad_buffer()
    student.optimizer.zero_grad()
    loss.normalizer.reset()
    router_load = getattr(student, "router_load", None)  # MoE students: tokens per expert, aux loss
    if router_load is not None:
        router_load.reset()
    reports = _run_schedule(student.model, microbatches, loss, state.device, forward_only=False,
                            chunked_head=loss.settings.chunked_head)
    return reports, padding, len(microbatches)


def train_step(student, loss: MicrobatchLoss, minibatch: Experience, state: ParallelState,
               micro_batch_size: int, report_keys: list[str], max_tokens: int | None = None) -> dict[str, float]:
    """Forward/backward over the minibatch, gate normalisation, clip, optimizer and LR step.

    ``max_tokens``: token budget per micro-batch (None/0: fixed micro-batches of ``micro_batch_size``).
    A non-finite loss skips the optimizer step (``skipped`` = 1 in the result).
    """
    reports, padding, num_microbatches = forward_backward(student, loss, minibatch, state, micro_batch_size,
                                                          max_tokens)
    result = reduce_reports(_sum_reports(reports), state, report_keys)
    result["padding_fraction"] = padding
    router_load = getattr(student, "router_load", None)
    if router_load is not None:
        result.update(router_load.reduce(state, num_microbatches))  # collective over all ranks
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
                       micro_batch_size: int, *, max_tokens: int | None = None,
                       loss: MicrobatchLoss | None = None) -> torch.Tensor:
    """log π_θ(y_t) for every sequence of ``exp`` [N, T], computed with the same minibatch and
    micro-batch layout as the first epoch's training steps, so the first update of a rollout sees
    exactly zero drift. ``loss``: the training loss, whose head settings (chunked or logits) are used
    so the recompute runs the same arithmetic as the training steps (logits head when None)."""
    out = torch.zeros(exp.response_ids.shape, dtype=torch.float32)
    chunked = loss is not None and loss.settings.chunked_head

    def logprob_only(mb, output_tensor, head_weight=None):
        head = loss.head(head_weight) if chunked else None
        cur = student_view(output_tensor, mb, state.tp_group, student.vocab_size, with_support=False,
                           head=head).logprobs
        return output_tensor.new_zeros(()), mb.loss_mask.sum().to(torch.int), {"logprobs": cur.detach().float()}

    with torch.no_grad():
        for indices in minibatches:
            microbatches, row_blocks, _ = local_microbatches(exp.select(indices), state, micro_batch_size,
                                                             max_tokens, _microbatch_multiple(student.model, state),
                                                             getattr(student, "uniform_dp_shapes", False))
            reports = _run_schedule(student.model, microbatches, logprob_only, state.device, forward_only=True,
                                    chunked_head=chunked)
            for rows, report in zip(row_blocks, reports):  # reports: last pipeline stage only, in order
                logprobs = report["logprobs"].cpu()
                out[indices[rows], : logprobs.shape[1]] = logprobs
    out = out.to(state.device)  # NCCL reduces CUDA tensors only
    for group in (state.pp_group, state.dp_cp_group):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(out, group=group)  # collective: each row is filled on exactly one rank
    return out.cpu()
