"""Adam's state in a checkpoint, keyed like the model's parameters, so it reshards with them.

Megatron-Core 0.16.1 gives a MoE student at EP > 1 a ``ChainedOptimizer`` (dense and expert parameters in
two optimizers) and one optimizer at EP = 1. Its own ``sharded_state_dict`` nests the state by optimizer and
param-group position, so that state does not load across a change of EP. Here each parameter's Adam moments
(and, under bf16, its fp32 main copy) are stored as a ShardedTensor under
``optimizer.state.<name>.<model key>`` with the model parameter's own sharding. The step count, the same for
every parameter, is stored once. Any TP/PP/EP/ETP layout then loads the state that any other saved.
Hyper-parameters (lr, weight decay) are not stored: the scheduler's state sets them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
MAIN_PARAM = "fp32_param"  # Megatron's own prefix for the fp32 copy of a bf16 parameter


def _param_pairs(optimizer) -> Iterator[tuple[torch.nn.Parameter, torch.nn.Parameter, object]]:
    """(model parameter, the parameter the inner torch optimizer steps, that optimizer) for every parameter."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        if hasattr(opt, "float16_groups"):  # mixed precision: the torch optimizer steps fp32 main copies
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for model_param, main_param in zip(model_group, main_group):
                    yield model_param, main_param, opt
            for group in opt.fp32_from_fp32_groups:
                for param in group:
                    yield param, param, opt
        else:
            for group in opt.optimizer.param_groups:
                for param in group["params"]:
                    yield param, param, opt


def _model_tensors_by_param(model_sharded: dict) -> dict[int, object]:
    """id(parameter) → the model's ShardedTensor (or factory) of that parameter."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {id(item.data): item for item in nested_values(model_sharded)
            if isinstance(item, (ShardedTensor, ShardedTensorFactory))}


def _common_step(optimizer) -> int:
    steps = set()
    for _, main_param, opt in _param_pairs(optimizer):
        step = opt.optimizer.state.get(main_param, {}).get("step")
        steps.add(int(step.item() if torch.is_tensor(step) else step or 0))
    if len(steps) > 1:
        raise ValueError(f"optimizer parameters were stepped different numbers of times {sorted(steps)}; "
                         "the checkpoint stores one step count")
    return steps.pop() if steps else 0


def sharded_optimizer_state(model_sharded: dict, optimizer) -> dict:
    """The optimizer's checkpoint state for ``dist_checkpointing`` (save and load template alike).

    ``model_sharded`` is the model's sharded state dict (its tensors are the live parameters). Parameters
    without Adam state yet get zero moments, so saving and loading build the same keys on every layout.
    """
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    by_param = _model_tensors_by_param(model_sharded)
    per_param = []  # in _param_pairs order (a list: local experts share one key, told apart by offset)
    for model_param, main_param, opt in _param_pairs(optimizer):
        if id(model_param) not in by_param:
            raise KeyError(f"optimizer parameter of shape {list(model_param.shape)} is not in the model's "
                           "sharded state dict")
        sharded = by_param[id(model_param)]
        state = opt.optimizer.state[main_param]
        for name in MOMENTS:
            if name not in state:
                state[name] = torch.zeros_like(main_param.data)
        entries = {name: state[name] for name in MOMENTS}
        if main_param is not model_param:
            entries[MAIN_PARAM] = main_param.data
        per_param.append({name: make_sharded_optimizer_tensor(sharded, tensor, prefix=f"optimizer.state.{name}")
                          for name, tensor in entries.items()})
    return {"tensors": per_param, "step": _common_step(optimizer)}


def load_optimizer_state(optimizer, loaded: dict) -> None:
    """Copy a loaded ``sharded_optimizer_state`` (built for this optimizer) into it: moments, fp32 main
    copies, step."""
    pairs = list(_param_pairs(optimizer))
    if len(pairs) != len(loaded["tensors"]):
        raise ValueError(f"optimizer state for {len(loaded['tensors'])} parameters, the optimizer has {len(pairs)}")
    step = loaded["step"]
    for (model_param, main_param, opt), tensors in zip(pairs, loaded["tensors"]):
        state = opt.optimizer.state[main_param]
        for name in MOMENTS:
            state[name].copy_(tensors[name])
        if main_param is not model_param:
            main_param.data.copy_(tensors[MAIN_PARAM])
        old = state.get("step")
        # torch's Adam keeps the step as a float32 scalar tensor (fused/capturable variants: their dtype kept)
        state["step"] = (torch.full_like(old, float(step)) if torch.is_tensor(old)
                         else torch.tensor(float(step), dtype=torch.float32))
