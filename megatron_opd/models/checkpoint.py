"""Distributed checkpoints with Megatron ``dist_checkpointing`` (torch_dist): model, optimizer, scheduler,
RNG and free-form trainer state.

Model tensors are stored with global shapes, so a checkpoint saved at one TP/PP/VPP layout loads at
another (resharding on load). Saves are atomic: every rank writes into ``<dir>.tmp``; rank 0 then writes
``megatron_opd_checkpoint.json`` (the completion marker) and renames the directory onto ``<dir>``.
A directory without the marker is refused on load.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.models.optimizer_state import load_optimizer_state, sharded_optimizer_state
from megatron_opd.models.weights import unwrap

logger = logging.getLogger(__name__)

MARKER_NAME = "megatron_opd_checkpoint.json"
FORMAT_VERSION = 2  # 2: optimizer state keyed like the model's parameters (models/optimizer_state.py)


def _chunk_key(i: int) -> str:
    return f"model{i}"


def _model_sharded_state_dict(model_chunks: list) -> dict:
    """{"model0": …, "model1": …}; tensor keys carry global layer numbers, so chunks reshard freely."""
    return {_chunk_key(i): unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _layout(model_chunks: list) -> dict:
    first = unwrap(model_chunks[0])
    return {"tp": first.tp_group.size(), "pp": first.pp_group.size(), "vpp": len(model_chunks),
            "ep": first.pg_collection.ep.size() if first.config.num_moe_experts else 1,
            "padded_vocab_size": first.padded_vocab_size, "real_vocab_size": first.real_vocab_size,
            "dtype": str(next(first.parameters()).dtype).removeprefix("torch.")}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(model_chunks: list, data):
    """Per-rank RNG state as a ShardedObject over (PP, TP), replicated over DP (Megatron-LM's layout)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    first = unwrap(model_chunks[0])
    return ShardedObject("rng_state", data, (first.pp_group.size(), first.tp_group.size()),
                         (first.pp_group.rank(), first.tp_group.rank()),
                         replica_id=first.pg_collection.dp_cp.rank())


def _build_state(model_chunks, optimizer, opt_param_scheduler, extra_state, rng: bool, loading: bool,
                 format_version: int = FORMAT_VERSION) -> dict:
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None and format_version >= 2:
        state["optimizer"] = sharded_optimizer_state(state, optimizer)
    elif optimizer is not None:  # format 1: Megatron's own layout, tied to the optimizer structure (EP)
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=loading)
    if opt_param_scheduler is not None:
        state["opt_param_scheduler"] = opt_param_scheduler.state_dict()
    if rng:
        state["rng_state"] = _rng_sharded_object(model_chunks, None if loading else _rng_state())
    state["extra_state"] = extra_state if extra_state is not None else {}
    return state


def _prepare_tmp_dir(tmp: Path) -> None:
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()  # collective: the directory exists before anyone writes


def _finalize(tmp: Path, ckpt_dir: Path, layout: dict, rng: bool) -> None:
    """Rank 0 writes the completion marker and renames ``tmp`` onto ``ckpt_dir``."""
    if dist.get_rank() == 0:
        marker = {"format_version": FORMAT_VERSION, "layout": layout, "rng_state": rng}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        if ckpt_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(ckpt_dir, old)
        os.rename(tmp, ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # collective: nobody returns before the checkpoint is in place


def save_checkpoint(ckpt_dir, model_chunks: list, optimizer=None, opt_param_scheduler=None,
                    extra_state: dict | None = None, save_rng: bool = True) -> Path:
    """Save model chunks (+ optimizer, scheduler, RNG, ``extra_state``) as a torch_dist checkpoint.

    Collective: every rank calls it with the same ``ckpt_dir`` (on a shared file system).
    ``extra_state`` is a picklable dict stored once (from rank 0), e.g. the trainer's step counters.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    _prepare_tmp_dir(tmp)
    state = _build_state(model_chunks, optimizer, opt_param_scheduler, extra_state, save_rng, loading=False)
    dist_checkpointing.save(state, str(tmp))  # collective over all ranks
    _finalize(tmp, ckpt_dir, _layout(model_chunks), save_rng)
    return ckpt_dir


def read_checkpoint_marker(ckpt_dir) -> dict:
    """The completion marker of a checkpoint; raises when the directory is missing or incomplete."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    marker = ckpt_dir / MARKER_NAME
    if not marker.is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no {MARKER_NAME}: incomplete or not a megatron-opd checkpoint")
    return json.loads(marker.read_text())


def _check_layout(saved: dict, current: dict, ckpt_dir: Path) -> bool:
    """Raise on a vocab mismatch; return whether the (PP, TP, EP) layout matches (RNG state is per rank)."""
    for key in ("real_vocab_size", "padded_vocab_size"):
        if saved[key] != current[key]:
            raise ValueError(f"{ckpt_dir}: checkpoint {key}={saved[key]} but the model has {current[key]}")
    return saved["tp"] == current["tp"] and saved["pp"] == current["pp"] and saved.get("ep", 1) == current["ep"]


def _optimizer_reshardable(format_version: int, saved: dict, current: dict, ckpt_dir: Path, optimizer) -> bool:
    """A format-1 checkpoint holds Megatron's own optimizer layout: a MoE student at EP > 1 has a
    ChainedOptimizer (dense and expert parameters apart) and one optimizer at EP = 1, so that state does
    not survive a change of EP. The weights do (they reshard); the optimizer then starts fresh. Format 2
    stores the state per parameter key and loads at any layout."""
    if optimizer is None or format_version >= 2 or saved.get("ep", 1) == current["ep"]:
        return True
    if dist.get_rank() == 0:
        logger.warning("%s: saved at expert_model_parallel_size=%d, loading at %d: weights and scheduler are "
                       "restored, the optimizer state is not (it starts fresh)", ckpt_dir, saved.get("ep", 1),
                       current["ep"])
    return False


def _check_model_tensors(template: dict, num_chunks: int, ckpt_dir: Path) -> None:
    """Raise naming the tensor when the checkpoint lacks a model tensor or holds it with another shape."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    for i in range(num_chunks):
        for item in nested_values(template[_chunk_key(i)]):
            if not isinstance(item, ShardedTensor):
                continue
            if item.key not in saved:
                raise KeyError(f"{ckpt_dir}: checkpoint has no tensor {item.key!r} (does --hf-config / the model "
                               "config match the checkpoint?)")
            if tuple(saved[item.key].global_shape) != tuple(item.global_shape):
                raise ValueError(f"{ckpt_dir}: tensor {item.key!r} has shape {list(saved[item.key].global_shape)} in the "
                                 f"checkpoint but the model expects {list(item.global_shape)}")


EXTRA_STATE_SUFFIX = "_extra_state"


def _keep_absent_extra_states(template: dict, num_chunks: int, ckpt_dir: Path) -> list[str]:
    """Let a model load a checkpoint that lacks some of its modules' ``_extra_state`` objects.

    Transformer Engine modules carry an ``_extra_state`` (FP8 scaling metadata; an empty tensor without FP8):
    TE's RMSNorm (q/k and final norms of the TE spec) has one where the local spec's torch RMSNorm has none,
    so a checkpoint written on CPU (tools/convert_hf_to_megatron.py, or CPU training) lacks those keys and
    dist-checkpointing refuses the TE model's load. Each such object requested but absent from the checkpoint
    keeps the module's own current value (a ``LocalNonpersistentObject`` is handed back as is, not loaded).
    Only ``_extra_state`` objects are treated so: a missing tensor still raises (``_check_model_tensors``).
    The other direction needs nothing: keys the checkpoint has but the model does not request are not loaded.

    Returns:
        the keys kept at their current values (sorted).
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    saved = {item.key for item in load_sharded_metadata(str(ckpt_dir)).values() if isinstance(item, ShardedObject)}
    kept = set()
    for i in range(num_chunks):
        chunk = template[_chunk_key(i)]
        for name, item in chunk.items():
            if isinstance(item, ShardedObject) and item.key.endswith(EXTRA_STATE_SUFFIX) and item.key not in saved:
                chunk[name] = LocalNonpersistentObject(item.data)
                kept.add(item.key)
    return sorted(kept)


def load_checkpoint(ckpt_dir, model_chunks: list, optimizer=None, opt_param_scheduler=None,
                    load_rng: bool = True) -> dict:
    """Load a ``save_checkpoint`` directory into ``model_chunks`` (any TP/PP/VPP layout); return extra_state.

    RNG state is restored only when the checkpoint's TP, PP and EP sizes match the current ones. The
    optimizer state reshards like the weights (format 2; a format-1 checkpoint's only when EP matches).
    Collective: every rank calls it.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    marker = read_checkpoint_marker(ckpt_dir)
    same_layout = _check_layout(marker["layout"], _layout(model_chunks), ckpt_dir)
    format_version = marker.get("format_version", 1)
    if not _optimizer_reshardable(format_version, marker["layout"], _layout(model_chunks), ckpt_dir, optimizer):
        optimizer = None
    rng = load_rng and marker.get("rng_state", False) and same_layout
    if load_rng and marker.get("rng_state") and not same_layout and dist.get_rank() == 0:
        logger.warning("%s: RNG state saved at another TP/PP layout; not restored", ckpt_dir)
    template = _build_state(model_chunks, optimizer, opt_param_scheduler, None, rng, loading=True,
                            format_version=format_version)
    template.pop("extra_state")
    _check_model_tensors(template, len(model_chunks), ckpt_dir)
    kept = _keep_absent_extra_states(template, len(model_chunks), ckpt_dir)
    if kept and dist.get_rank() == 0:
        logger.info("%s: no %s for %s (written by another layer spec); kept the modules' own", ckpt_dir,
                    EXTRA_STATE_SUFFIX, ", ".join(kept))
    loaded = dist_checkpointing.load(template, str(ckpt_dir))  # collective over all ranks
    for i, chunk in enumerate(model_chunks):
        unwrap(chunk).load_state_dict(loaded[_chunk_key(i)], strict=True)
    if optimizer is not None and format_version >= 2:
        load_optimizer_state(optimizer, loaded["optimizer"])
    elif optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if opt_param_scheduler is not None:
        opt_param_scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if rng:
        _set_rng_state(loaded["rng_state"])
    return dist_checkpointing.load_common_state_dict(str(ckpt_dir)).get("extra_state", {})
