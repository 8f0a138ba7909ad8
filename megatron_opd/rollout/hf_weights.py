"""Loading HF-named weights into an in-memory HF model (weight sync of the in-process engines)."""

from __future__ import annotations

from pathlib import Path

import torch

# Buffers HF rebuilds itself; a gathered trainer state dict never carries them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in an HF checkpoint directory."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"weight sync: no *.safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _expected_names(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(required names, optional names): the tied lm_head is optional."""
    names = {n for n in model.state_dict() if not n.endswith(_IGNORED_SUFFIXES)}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    optional = {"lm_head.weight"} if tied else set()
    return names - optional, optional


def _match_expert_layout(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints (and the trainer's gather) hold one tensor per MoE expert; transformers 5 holds each
    layer's experts fused (``mlp.experts.gate_up_proj``): fuse when the model wants that layout."""
    from megatron_opd.models.weight_mapping import fuse_experts

    if any(name.endswith("mlp.experts.gate_up_proj") for name in model.state_dict()):
        return fuse_experts(state)
    return state


@torch.no_grad()
def load_hf_state_dict(model: torch.nn.Module, source: dict[str, torch.Tensor] | str | Path,
                       where: str = "weight sync") -> int:
    """Copies HF-named tensors into ``model`` in place; returns the number of tensors copied.

    Raises KeyError naming missing/unexpected tensors and ValueError naming a tensor whose shape
    differs, so a half-applied sync cannot pass silently (all checks run before any copy).
    """
    state = read_safetensors_dir(source) if isinstance(source, (str, Path)) else source
    state = _match_expert_layout(model, state)
    required, optional = _expected_names(model)
    given = {n for n in state if not n.endswith(_IGNORED_SUFFIXES)}
    missing, unexpected = sorted(required - given), sorted(given - required - optional)
    if missing or unexpected:
        raise KeyError(f"{where}: state dict does not match the model: missing {missing[:5]} "
                       f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    own = model.state_dict()
    for name in sorted(given):
        if tuple(state[name].shape) != tuple(own[name].shape):
            raise ValueError(f"{where}: tensor {name} has shape {tuple(state[name].shape)}, "
                             f"the model expects {tuple(own[name].shape)}")
    for name in sorted(given):
        own[name].copy_(state[name].to(own[name].dtype))
    return len(given)
