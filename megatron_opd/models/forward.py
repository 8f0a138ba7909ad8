"""Forward helper: token ids → vocab-parallel logits at any TP/PP/VPP (forward only).

Megatron's RoPE in GPTModel takes positions 0..S-1 from the sequence length and ignores
``position_ids``; sequences must therefore be right-padded (the causal mask keeps the padding from
affecting real tokens).
"""

from __future__ import annotations

import torch

from megatron_opd.models.weights import unwrap


def causal_attention_mask(seq_len: int, device=None) -> torch.Tensor:
    """Boolean causal mask [1, 1, S, S], True = masked out (Megatron's convention).

    Passed explicitly because the local (non-TE) attention path on CPU does not build one itself.
    """
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Set logit columns at or beyond the real ``vocab_size`` to -inf (out of place).

    Args:
        logits: [..., V_pad/TP] this TP rank's vocab shard.
        tp_rank: rank within the TP group (the shard starts at tp_rank · V_pad/TP).
    """
    shard = logits.shape[-1]
    global_ids = torch.arange(shard, device=logits.device) + tp_rank * shard
    return logits.masked_fill(global_ids >= vocab_size, float("-inf"))


def _check_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
    if position_ids is not None:
        expected = torch.arange(input_ids.shape[1], device=position_ids.device).expand_as(position_ids)
        if position_ids.shape != input_ids.shape or not torch.equal(position_ids, expected):  # host sync
            raise ValueError("position_ids must be None or arange(seq) per row: Megatron's RoPE ignores "
                             "custom positions; right-pad sequences instead of left-padding them")


def _run_single_stage(model, input_ids, position_ids, mask) -> torch.Tensor:
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)


def _num_microbatches(batch: int, pp_size: int, num_chunks: int) -> int:
    if num_chunks == 1:
        return 1
    # Megatron's interleaved schedule needs at least PP microbatches, in groups of PP.
    if batch % pp_size:
        raise ValueError(f"forward_logits with virtual pipeline stages needs batch size {batch} divisible by "
                         f"pipeline_model_parallel_size={pp_size}")
    return pp_size


def _run_pipeline(model_chunks, input_ids, position_ids, mask) -> torch.Tensor | None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    first = unwrap(model_chunks[0])
    num_mb = _num_microbatches(input_ids.shape[0], first.pp_group.size(), len(model_chunks))
    batches = list(zip(input_ids.chunk(num_mb), position_ids.chunk(num_mb)))

    def forward_step(data_iterator, model):
        ids, pos = next(data_iterator)
        return model(input_ids=ids, position_ids=pos, attention_mask=mask), None  # no loss: keep outputs

    iterators = [iter(batches) for _ in model_chunks] if len(model_chunks) > 1 else iter(batches)
    # Collective over the PP group (P2P of activations between stages).
    schedule = get_forward_backward_func(pp_size=first.pp_group.size(),
                                         vp_size=len(model_chunks) if len(model_chunks) > 1 else None)
    outputs = schedule(
        forward_step_func=forward_step, data_iterator=iterators,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0], num_microbatches=num_mb,
        seq_length=input_ids.shape[1], micro_batch_size=input_ids.shape[0] // num_mb, forward_only=True)
    if not unwrap(model_chunks[-1]).post_process:
        return None
    return torch.cat(outputs, dim=0)


@torch.no_grad()
def forward_logits(model_chunks: list, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                   parallel_state=None, mask_padding: bool = False) -> torch.Tensor | None:
    """Logits of a (TP/PP/VPP-sharded) Qwen3 model, forward only.

    Args:
        model_chunks: this rank's chunks from ``build_qwen3_model`` (optionally DDP-wrapped).
        input_ids: [B, S] token ids (right-padded), on every rank of the pipeline.
        position_ids: None or arange(S) per row (see module docstring).
        parallel_state: unused; the chunks carry their process groups (kept for the public signature).
        mask_padding: set columns of padded vocab entries to -inf.

    Returns:
        [B, S, V_pad/TP] logits (this TP rank's vocab shard) on the last pipeline stage, None elsewhere.
    """
    del parallel_state
    _check_inputs(input_ids, position_ids)
    first = unwrap(model_chunks[0])
    device = next(first.parameters()).device
    input_ids = input_ids.to(device)
    position_ids = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids).contiguous()
    mask = causal_attention_mask(input_ids.shape[1], device=device)
    if first.pp_group.size() == 1 and len(model_chunks) == 1:
        logits = _run_single_stage(model_chunks[0], input_ids, position_ids, mask)
    else:
        logits = _run_pipeline(model_chunks, input_ids, position_ids, mask)
    if logits is not None and mask_padding:
        logits = mask_vocab_padding(logits, first.real_vocab_size, first.tp_group.rank())
    return logits
