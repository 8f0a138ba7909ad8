"""Router load of a MoE student over one optimizer step: tokens per expert of every MoE layer, and the
load-balancing aux loss when it is on.

Counts come from a forward hook on each Megatron router (its ``routing_map`` [tokens, E] output) during
training forwards only (the log-prob recompute runs under ``no_grad`` and is not counted). Summing the
counts over all ranks is exact: each layer lives on one pipeline stage, data-parallel ranks see different
sequences, and a MoE student with TP > 1 runs sequence-parallel, so TP ranks see different tokens too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.models.weights import unwrap

AUX_LOSS_NAME = "load_balancing_loss"  # Megatron's tracker key for the aux loss (stored unscaled)


def _routers(model_chunks: list) -> list:
    from megatron.core.transformer.moe.router import Router

    return [m for chunk in model_chunks for m in unwrap(chunk).modules() if isinstance(m, Router)]


class RouterLoadTracker:
    """Accumulates tokens per expert per layer between ``reset`` and ``reduce``."""

    def __init__(self, model_chunks: list, num_layers: int, num_experts: int, aux_loss: bool):
        self.aux_loss = aux_loss  # Megatron's tracker is process-wide: read it only when this model feeds it
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.layers_seen = torch.zeros(num_layers, dtype=torch.float64)
        for router in _routers(model_chunks):
            router.register_forward_hook(self._count)

    def _count(self, router, inputs, output) -> None:
        if not (torch.is_grad_enabled() and router.training):
            return
        routing_map = output[1]  # (tokens, E) bool: expert e chosen for token t
        layer = router.layer_number - 1  # global, 1-based in Megatron
        self.counts[layer] += routing_map.sum(dim=0).to("cpu", torch.float64)  # host sync (small)
        self.layers_seen[layer] = 1.0

    def reset(self) -> None:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self.counts.zero_()
        self.layers_seen.zero_()
        clear_aux_losses_tracker()

    def reduce(self, state, num_microbatches: int) -> dict[str, float]:
        """Collective over all ranks: the step's router metrics (empty when no router ran a training
        forward). ``moe_load_max_over_mean`` is the worst layer's max/mean tokens per expert (1 = perfectly
        balanced; E/k = every token of a layer on the same k experts)."""
        device = state.device
        counts, seen = self.counts.to(device), self.layers_seen.to(device)
        dist.all_reduce(counts)  # collective over the world: every layer's counts from every rank
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)  # collective over the world
        counts, layers = counts.cpu(), seen.cpu() > 0
        if not layers.any():
            return {}
        per_layer = counts[layers]  # (L, E)
        mean = per_layer.mean(dim=1).clamp_min(1e-12)
        metrics = {"moe_tokens_per_expert_mean": per_layer.mean().item(),
                   "moe_tokens_per_expert_max": per_layer.max().item(),
                   "moe_load_max_over_mean": (per_layer.max(dim=1).values / mean).max().item(),
                   "moe_load_min_over_mean": (per_layer.min(dim=1).values / mean).min().item(),
                   "moe_load_cv": (per_layer.std(dim=1, unbiased=False) / mean).mean().item()}
        metrics.update(self._aux_loss(state, num_microbatches))
        return metrics

    def _aux_loss(self, state, num_microbatches: int) -> dict[str, float]:
        """Mean over layers, micro-batches and data-parallel ranks of the unscaled aux loss."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        if not self.aux_loss or AUX_LOSS_NAME not in tracker:
            return {}
        values = tracker[AUX_LOSS_NAME]["values"].detach().to(state.device, torch.float64)
        for group in (state.pp_group, state.dp_cp_group):
            if dist.get_world_size(group) > 1:
                dist.all_reduce(values, group=group)  # collective: layers over PP, sum over DP
        per_layer = values / (num_microbatches * state.dp_size * state.cp_size)
        return {"moe_aux_loss": per_layer.mean().item()}


def build_router_load_tracker(model_chunks: list) -> RouterLoadTracker | None:
    """A tracker for a MoE student, None for a dense one."""
    config = unwrap(model_chunks[0]).config
    if not config.num_moe_experts:
        return None
    return RouterLoadTracker(model_chunks, config.num_layers, config.num_moe_experts,
                             aux_loss=config.moe_aux_loss_coeff > 0)
