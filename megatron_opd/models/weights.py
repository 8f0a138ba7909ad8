"""Move full HF weights into a TP/PP-sharded Megatron model, and gather them back out.

``load_hf_weights``: every rank converts the full HF dict and copies its own TP/PP shard.
``gather_hf_state_dict``: all-gather over TP (experts: over expert-TP, then over EP), broadcast over PP →
the full HF dict on every rank (used for weight sync to rollout engines and for HF export).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from megatron_opd.models.weight_mapping import (
    canonical_name,
    hf_to_megatron_state_dict,
    is_expert_param,
    is_gated_fc1,
    megatron_to_hf_state_dict,
    tp_partition_dim,
)


def unwrap(model):
    """Strip DDP / Float16Module wrappers (anything exposing ``.module``) down to the GPTModel."""
    while hasattr(model, "module"):
        model = model.module
    return model


def layer_offset(model) -> int:
    """Global index of this chunk's first transformer layer (``layer_number`` is 1-based and global)."""
    layers = unwrap(model).decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def expert_offset(model) -> int:
    """Global index of this EP rank's first expert (ep_rank · E/EP); 0 for a dense model."""
    gpt = unwrap(model)
    num_experts = gpt.config.num_moe_experts
    if not num_experts:
        return 0
    ep = gpt.pg_collection.ep
    return ep.rank() * (num_experts // ep.size())


def iter_canonical_params(model):
    """Yield (canonical full-model name, parameter) for one chunk; the tied output copy is named as such."""
    gpt = unwrap(model)
    offset, first_expert = layer_offset(gpt), expert_offset(gpt)
    for name, param in gpt.named_parameters():
        yield canonical_name(name, offset, first_expert), param


def tp_group_of(model, name: str):
    """The group splitting this tensor's matrix: expert-TP for expert weights, TP otherwise."""
    gpt = unwrap(model)
    return gpt.pg_collection.expt_tp if is_expert_param(name) else gpt.tp_group


def shard_tensor(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full canonical tensor (fc1: [gate_r; up_r])."""
    dim = tp_partition_dim(name)
    if dim is None or tp_size == 1:
        return full
    if is_gated_fc1(name):
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size, dim=0)[tp_rank], torch.chunk(up, tp_size, dim=0)[tp_rank]])
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


def _source_name(name: str, full_state: dict, tied: bool) -> str:
    # With tied embeddings the last PP stage holds its own copy of the embedding as output_layer.
    if tied and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    return name


@torch.no_grad()
def load_hf_weights(model_chunks: list, hf_state_dict: dict, hf_config) -> None:
    """Copy this rank's TP/PP shard of a full HF Qwen3 state dict into ``model_chunks``.

    Raises:
        KeyError / ValueError naming the tensor on a missing tensor or a shape mismatch.
    """
    first = unwrap(model_chunks[0])
    full = hf_to_megatron_state_dict(hf_state_dict, hf_config, padded_vocab=first.padded_vocab_size)
    for chunk in model_chunks:
        for name, param in iter_canonical_params(chunk):
            source = _source_name(name, full, bool(hf_config.tie_word_embeddings))
            if source not in full:
                raise KeyError(f"no HF tensor maps to Megatron parameter {name!r}")
            group = tp_group_of(chunk, name)
            shard = shard_tensor(source, full[source], group.rank(), group.size())
            if shard.shape != param.shape:
                raise ValueError(f"Megatron parameter {name!r}: shard shape {list(shard.shape)} from HF "
                                 f"does not match the model's {list(param.shape)}")
            param.copy_(shard)


def _gather_tp(name: str, local: torch.Tensor, tp_group) -> torch.Tensor:
    """All-gather one TP-sharded tensor into its full canonical layout."""
    dim = tp_partition_dim(name)
    if dim is None or tp_group.size() == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(tp_group.size())]
    dist.all_gather(parts, local.detach().contiguous(), group=tp_group)  # collective over TP
    if is_gated_fc1(name):
        halves = [torch.chunk(p, 2, dim=0) for p in parts]  # each rank: [gate_r; up_r]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(parts, dim=dim)


_LOCAL_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def _gather_ep(name: str, full_local: torch.Tensor, ep_group, experts_per_rank: int) -> dict:
    """All-gather one expert tensor over EP: {canonical name of every EP rank's copy: tensor}.
    ``name`` carries this rank's global expert index; rank r's copy is expert r·E/EP + local."""
    if ep_group.size() == 1:
        return {name: full_local}
    parts = [torch.empty_like(full_local) for _ in range(ep_group.size())]
    dist.all_gather(parts, full_local.contiguous(), group=ep_group)  # collective over EP
    prefix, global_index, suffix = _LOCAL_EXPERT.match(name).groups()
    local = int(global_index) % experts_per_rank
    return {f"{prefix}{rank * experts_per_rank + local}{suffix}": part for rank, part in enumerate(parts)}


def _local_full_tensors(model_chunks: list, tied: bool) -> dict:
    """This PP rank's tensors, full over TP and EP, keyed by canonical name (tied output copy skipped)."""
    out = {}
    for chunk in model_chunks:
        gpt = unwrap(chunk)
        for name, param in iter_canonical_params(chunk):
            if tied and name == "output_layer.weight" and not gpt.pre_process:
                continue  # the last stage's copy of the embedding; the first stage owns it
            full = _gather_tp(name, param, tp_group_of(gpt, name))
            if is_expert_param(name):
                ep = gpt.pg_collection.ep
                out.update(_gather_ep(name, full, ep, gpt.config.num_moe_experts // ep.size()))
            else:
                out[name] = full
    return out


def _broadcast_over_pp(local: dict, pp_group) -> dict:
    """Every PP rank ends with every stage's tensors (object all-gather of names, then broadcasts)."""
    if pp_group.size() == 1:
        return local
    meta = [(name, tuple(t.shape), t.dtype) for name, t in local.items()]
    all_meta = [None] * pp_group.size()
    dist.all_gather_object(all_meta, meta, group=pp_group)  # collective over PP: names/shapes per stage
    device = next(iter(local.values())).device if local else torch.device("cpu")
    out = {}
    for src, stage_meta in enumerate(all_meta):
        for name, shape, dtype in stage_meta:
            tensor = local[name] if src == pp_group.rank() else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(tensor, group=pp_group, group_src=src)  # collective over PP: one tensor
            out[name] = tensor
    return out


@torch.no_grad()
def gather_hf_state_dict(model_chunks: list, hf_config) -> dict:
    """Full HF-named tensors of a TP/PP-sharded model, identical on every rank, vocab padding removed.

    Collective: every rank of the TP and PP groups of the model must call it.
    """
    first = unwrap(model_chunks[0])
    tied = bool(hf_config.tie_word_embeddings)
    full = _broadcast_over_pp(_local_full_tensors(model_chunks, tied), first.pp_group)
    return megatron_to_hf_state_dict(full, hf_config)
