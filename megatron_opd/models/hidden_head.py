"""Let the last pipeline stage hand the loss its final hidden states instead of logits (issue 17).

``GPTModel._postprocess`` ends with ``logits, _ = self.output_layer(hidden, weight=output_weight)`` and
returns ``logits.transpose(0, 1)``. Inside :func:`emit_hidden_states` the output layer is the identity,
so the model returns the final-norm hidden states ``[b, s, H]`` (with sequence parallelism this rank's
sequence shard ``[b, s/tp, H]``: the gather the output layer would do is left to the chunked head), and
the loss computes the head itself with :func:`output_weight` (``ops.vocab_parallel_head_stats``). The
parameter is the same tensor Megatron's layer would use, so its gradient reaches ``.main_grad`` through
Megatron DDP's usual hook, and tied embeddings keep their first/last-stage all-reduce.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_opd.models.weights import unwrap


def output_weight(model) -> torch.Tensor | None:
    """The output layer's weight shard [V_pad/tp, H] of a last-stage chunk (None elsewhere): the embedding
    when ``share_embeddings_and_output_weights`` and this chunk holds it, as ``GPTModel._postprocess`` picks."""
    gpt = unwrap(model)
    if not getattr(gpt, "post_process", False):
        return None
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def _identity_output_layer(hidden_states, weight=None, runtime_gather_output=None):
    return hidden_states, None


@contextmanager
def emit_hidden_states(model):
    """Within the block, ``model`` (a GPTModel chunk, wrapped or not) returns hidden states where it would
    return logits; yields the output weight (None on chunks without the output layer)."""
    gpt = unwrap(model)
    weight = output_weight(gpt)
    if weight is None:
        yield None
        return
    layer = gpt.output_layer
    if getattr(layer, "bias", None) is not None or getattr(gpt, "mtp_process", False):
        raise ValueError("emit_hidden_states: an output-layer bias or multi-token prediction (which reuses the output "
                         "layer for its own logits) is not supported by the chunked head: use --no-chunked-head")
    layer.forward = _identity_output_layer  # instance attribute: shadows the class's forward
    try:
        yield weight
    finally:
        del layer.forward
