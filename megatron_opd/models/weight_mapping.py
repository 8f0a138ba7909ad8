"""Full (unsharded) HF Qwen3 ⇄ Megatron state-dict mapping, and the TP split rules of each tensor.

Megatron names here are the *canonical* ones: local-spec layout with global layer numbers
(``decoder.layers.{global}.…``). ``canonical_name`` maps the TE-spec layout (norms fused into
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``) onto it.

Layouts (DESIGN.md §5):
  linear_qkv.weight  [(nq + 2·nkv)·d, H]: per query group g, [q heads of g; k_g; v_g]
  linear_fc1.weight  [2·I, H]: [gate; up]; TP rank r holds [gate_r; up_r]
  word_embeddings / output_layer [V_pad, H]: rows ≥ vocab_size are zero padding

Qwen3-MoE (every layer sparse): HF ``mlp.gate.weight`` [E, H] ↔ ``mlp.router.weight`` (replicated), and
expert e's ``mlp.experts.{e}.{gate,up,down}_proj.weight`` ↔ SequentialMLP
``mlp.experts.local_experts.{e}.linear_fc1.weight`` (= [gate; up], split over expert-TP like the dense
fc1) and ``…linear_fc2.weight``. Canonical names carry the *global* expert index; EP rank r holds experts
r·E/EP … (r+1)·E/EP − 1 as local experts 0 … E/EP − 1. HF state dicts are in the checkpoint (on-disk)
layout, one tensor per expert; transformers 5 fuses the experts in memory (``mlp.experts.gate_up_proj``
[E, 2·I, H] = [gate; up] per expert, ``mlp.experts.down_proj`` [E, H, I]): ``split_fused_experts`` and
``fuse_experts`` convert.
"""

from __future__ import annotations

import re

import torch

from megatron_opd.models.megatron_config import head_dim

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_FUSED_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_HF_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Per-layer tensors copied 1:1 (HF suffix -> Megatron suffix).
_DIRECT_LAYER_KEYS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}
_QKV_PARTS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_FC1_PARTS = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
# TE spec fuses the pre-norms into the following linear layer.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_TP_DIM0 = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_fc1.weight")
_TP_DIM1 = ("linear_proj.weight", "linear_fc2.weight")


def canonical_name(local_name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """Megatron parameter name of one chunk → canonical full-model name (global layer, global expert,
    local-spec keys). ``expert_offset`` = this EP rank's first global expert (ep_rank · E/EP)."""
    match = _LAYER_RE.match(local_name)
    if not match:
        return local_name
    suffix = _TE_ALIASES.get(match.group(2), match.group(2))
    expert = _LOCAL_EXPERT_RE.match(suffix)
    if expert:
        suffix = f"mlp.experts.local_experts.{int(expert.group(1)) + expert_offset}.{expert.group(2)}"
    return f"decoder.layers.{int(match.group(1)) + layer_offset}.{suffix}"


def is_expert_param(name: str) -> bool:
    """True for a MoE expert weight (split over EP and expert-TP, not over the dense TP group)."""
    return ".mlp.experts." in name


def tp_partition_dim(name: str) -> int | None:
    """Dim along which Megatron splits this tensor over TP ranks (None: replicated)."""
    if name.endswith(_TP_DIM0):
        return 0
    if name.endswith(_TP_DIM1):
        return 1
    return None


def is_gated_fc1(name: str) -> bool:
    """linear_fc1 holds [gate; up]; each half is split over TP separately."""
    return name.endswith("linear_fc1.weight")


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf_config) -> torch.Tensor:
    """HF q [nq·d, H], k/v [nkv·d, H] → Megatron linear_qkv [(nq+2·nkv)·d, H], grouped per query group."""
    d, nkv = head_dim(hf_config), hf_config.num_key_value_heads
    per_group = hf_config.num_attention_heads // nkv
    hidden = q.shape[-1]
    grouped = torch.cat([q.reshape(nkv, per_group * d, hidden), k.reshape(nkv, d, hidden),
                         v.reshape(nkv, d, hidden)], dim=1)  # (nkv, (per_group + 2)·d, H)
    return grouped.reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, hf_config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``merge_qkv``."""
    d, nkv = head_dim(hf_config), hf_config.num_key_value_heads
    per_group = hf_config.num_attention_heads // nkv
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(nkv, (per_group + 2) * d, hidden)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """[V, H] → [V_pad, H] with zero rows (padded logits are then exactly 0, and excluded by callers)."""
    extra = padded_vocab - weight.shape[0]
    if extra < 0:
        raise ValueError(f"vocab of {weight.shape[0]} rows exceeds padded vocab {padded_vocab}")
    return torch.cat([weight, weight.new_zeros(extra, weight.shape[1])]) if extra else weight


def _is_moe(hf_config) -> bool:
    return getattr(hf_config, "model_type", None) == "qwen3_moe"


def _hf_mlp_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    hidden = hf_config.hidden_size
    if not _is_moe(hf_config):
        inter = hf_config.intermediate_size
        return {"mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
                "mlp.down_proj.weight": (hidden, inter)}
    inter, shapes = hf_config.moe_intermediate_size, {"mlp.gate.weight": (hf_config.num_experts, hidden)}
    for e in range(hf_config.num_experts):
        shapes.update({f"mlp.experts.{e}.gate_proj.weight": (inter, hidden),
                       f"mlp.experts.{e}.up_proj.weight": (inter, hidden),
                       f"mlp.experts.{e}.down_proj.weight": (hidden, inter)})
    return shapes


def expected_hf_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF Qwen3 / Qwen3-MoE checkpoint must hold (on-disk layout), with its shape."""
    hidden, d = hf_config.hidden_size, head_dim(hf_config)
    nq, nkv, vocab = hf_config.num_attention_heads, hf_config.num_key_value_heads, hf_config.vocab_size
    layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
             "self_attn.q_proj.weight": (nq * d, hidden), "self_attn.k_proj.weight": (nkv * d, hidden),
             "self_attn.v_proj.weight": (nkv * d, hidden), "self_attn.o_proj.weight": (hidden, nq * d),
             "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,), **_hf_mlp_shapes(hf_config)}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(hf_config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{key}": shape for key, shape in layer.items()})
    if not hf_config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def split_fused_experts(hf_state_dict: dict) -> dict:
    """transformers-5 in-memory expert tensors (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
    [E, H, I]) → one tensor per expert, as checkpoints store them; other tensors pass unchanged (views)."""
    out = {}
    for name, tensor in hf_state_dict.items():
        match = _FUSED_EXPERT_RE.match(name)
        if not match:
            out[name] = tensor
            continue
        prefix, kind = match.groups()
        for e, per_expert in enumerate(tensor.unbind(0)):
            if kind == "gate_up_proj":
                gate, up = torch.chunk(per_expert, 2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = per_expert
    return out


def fuse_experts(hf_state_dict: dict) -> dict:
    """Inverse of ``split_fused_experts``: per-expert tensors → transformers-5 fused expert tensors."""
    out, experts = {}, {}
    for name, tensor in hf_state_dict.items():
        match = _HF_EXPERT_RE.match(name)
        if match:
            prefix, e, kind = match.groups()
            experts.setdefault(prefix, {}).setdefault(int(e), {})[kind] = tensor
        else:
            out[name] = tensor
    for prefix, by_expert in experts.items():
        order = [by_expert[e] for e in sorted(by_expert)]
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([x["gate_proj"], x["up_proj"]]) for x in order])
        out[f"{prefix}.down_proj"] = torch.stack([x["down_proj"] for x in order])
    return out


def check_hf_state_dict(hf_state_dict: dict, hf_config, source: str = "HF state dict") -> None:
    """Raise naming the tensor when one is missing, has the wrong shape, or is not a Qwen3 tensor
    (``hf_state_dict`` in the on-disk layout; see ``split_fused_experts``)."""
    expected = expected_hf_shapes(hf_config)
    missing = [name for name in expected if name not in hf_state_dict]
    if missing:
        raise KeyError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for name, shape in expected.items():
        got = tuple(hf_state_dict[name].shape)
        if got != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {list(got)}, expected {list(shape)} "
                             "from the HF config")
    allowed_extra = {"lm_head.weight"}  # tied checkpoints may still carry a copy of the embedding
    unexpected = [n for n in hf_state_dict if n not in expected and n not in allowed_extra]
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all); "
                         "is this a Qwen3 checkpoint matching the config?")


def _hf_to_megatron_mlp(hf_state_dict: dict, hf: str, mg: str, hf_config) -> dict:
    """One layer's MLP (dense or MoE) HF → canonical Megatron tensors."""
    if not _is_moe(hf_config):
        return {mg + "mlp.linear_fc2.weight": hf_state_dict[hf + "mlp.down_proj.weight"],
                mg + "mlp.linear_fc1.weight": torch.cat([hf_state_dict[hf + part] for part in _FC1_PARTS])}
    out = {mg + "mlp.router.weight": hf_state_dict[hf + "mlp.gate.weight"]}
    for e in range(hf_config.num_experts):
        src, dst = f"{hf}mlp.experts.{e}.", f"{mg}mlp.experts.local_experts.{e}."
        out[dst + "linear_fc1.weight"] = torch.cat([hf_state_dict[src + "gate_proj.weight"],
                                                   hf_state_dict[src + "up_proj.weight"]])
        out[dst + "linear_fc2.weight"] = hf_state_dict[src + "down_proj.weight"]
    return out


def _megatron_to_hf_mlp(mg_state_dict: dict, hf: str, mg: str, hf_config) -> dict:
    """Inverse of ``_hf_to_megatron_mlp``."""
    if not _is_moe(hf_config):
        gate, up = torch.chunk(_require(mg_state_dict, mg + "mlp.linear_fc1.weight"), 2, dim=0)
        return {hf + _FC1_PARTS[0]: gate, hf + _FC1_PARTS[1]: up,
                hf + "mlp.down_proj.weight": _require(mg_state_dict, mg + "mlp.linear_fc2.weight")}
    out = {hf + "mlp.gate.weight": _require(mg_state_dict, mg + "mlp.router.weight")}
    for e in range(hf_config.num_experts):
        src, dst = f"{mg}mlp.experts.local_experts.{e}.", f"{hf}mlp.experts.{e}."
        gate, up = torch.chunk(_require(mg_state_dict, src + "linear_fc1.weight"), 2, dim=0)
        out[dst + "gate_proj.weight"], out[dst + "up_proj.weight"] = gate, up
        out[dst + "down_proj.weight"] = _require(mg_state_dict, src + "linear_fc2.weight")
    return out


def hf_to_megatron_state_dict(hf_state_dict: dict, hf_config, padded_vocab: int | None = None) -> dict:
    """Full HF Qwen3 / Qwen3-MoE state dict (on-disk or transformers-5 fused expert layout) → full
    canonical Megatron state dict (vocab padded to ``padded_vocab``)."""
    hf_state_dict = split_fused_experts(hf_state_dict)
    check_hf_state_dict(hf_state_dict, hf_config)
    padded_vocab = padded_vocab or hf_config.vocab_size
    out = {"embedding.word_embeddings.weight": pad_vocab(hf_state_dict["model.embed_tokens.weight"], padded_vocab),
           "decoder.final_layernorm.weight": hf_state_dict["model.norm.weight"]}
    if not hf_config.tie_word_embeddings:
        out["output_layer.weight"] = pad_vocab(hf_state_dict["lm_head.weight"], padded_vocab)
    for i in range(hf_config.num_hidden_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_key, mg_key in _DIRECT_LAYER_KEYS.items():
            out[mg + mg_key] = hf_state_dict[hf + hf_key]
        out[mg + "self_attention.linear_qkv.weight"] = merge_qkv(
            *(hf_state_dict[hf + part] for part in _QKV_PARTS), hf_config)
        out.update(_hf_to_megatron_mlp(hf_state_dict, hf, mg, hf_config))
    return out


def megatron_to_hf_state_dict(mg_state_dict: dict, hf_config) -> dict:
    """Full canonical Megatron state dict → HF Qwen3 / Qwen3-MoE state dict in the on-disk layout (vocab
    padding removed). A tied dense model gets no lm_head; a tied MoE model gets a copy of the embedding as
    lm_head, because SGLang 0.5.23's Qwen3-MoE ignores ``tie_word_embeddings`` and would otherwise serve (or
    keep, across a weight sync) an lm_head that is not the embedding."""
    vocab = hf_config.vocab_size
    _require(mg_state_dict, "embedding.word_embeddings.weight")
    out = {"model.embed_tokens.weight": mg_state_dict["embedding.word_embeddings.weight"][:vocab],
           "model.norm.weight": _require(mg_state_dict, "decoder.final_layernorm.weight")}
    if not hf_config.tie_word_embeddings:
        out["lm_head.weight"] = _require(mg_state_dict, "output_layer.weight")[:vocab]
    elif getattr(hf_config, "num_experts", None):
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    for i in range(hf_config.num_hidden_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_key, mg_key in _DIRECT_LAYER_KEYS.items():
            out[hf + hf_key] = _require(mg_state_dict, mg + mg_key)
        qkv = split_qkv(_require(mg_state_dict, mg + "self_attention.linear_qkv.weight"), hf_config)
        out.update({hf + part: t for part, t in zip(_QKV_PARTS, qkv)})
        out.update(_megatron_to_hf_mlp(mg_state_dict, hf, mg, hf_config))
    return out


def _require(state_dict: dict, name: str) -> torch.Tensor:
    if name not in state_dict:
        raise KeyError(f"Megatron state dict: missing tensor {name!r}")
    return state_dict[name]
