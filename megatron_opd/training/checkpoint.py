"""Checkpoint and resume of a whole run: model, optimizer, scheduler and RNG states (Megatron
dist_checkpointing via ``models.save_checkpoint``) and the trainer's own state (step, batch index).

Layout under ``--save``::

    latest                 -> name of the newest complete checkpoint (replaced atomically)
    iter_0000012/          model/ (dist checkpoint), trainer_state.json, COMPLETE
    iter_0000016.tmp/      a save in progress (ignored by loaders; removed by the next save)

A checkpoint directory only gets its final name after every rank has written its part and the
``COMPLETE`` marker exists, so a crash mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the directory and what is missing."""


def _barrier():
    if dist.is_initialized():
        dist.barrier()  # collective: every rank finished its part of the save/load


def _fault_point(name: str, step: int) -> None:
    """Test hook: ``MEGATRON_OPD_FAULT=name@step`` SIGKILLs this process group here, as a node crash would."""
    if os.environ.get("MEGATRON_OPD_FAULT") == f"{name}@{step}":
        os.killpg(os.getpgid(0), 9)


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def save_run_checkpoint(save_dir: str, step: int, student, trainer_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    from megatron_opd.models import save_checkpoint

    root = Path(save_dir)
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    save_checkpoint(str(tmp / "model"), student.unwrapped(), optimizer=student.optimizer,
                    opt_param_scheduler=student.scheduler, extra_state=trainer_state)
    _fault_point("save", step)
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    _barrier()
    if rank == 0:
        _publish(root, tmp, final)
        _prune(root, keep_last)
    _barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    marker = tmp / COMPLETE
    with marker.open("w") as handle:
        handle.write("ok\n")
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    latest_tmp = root / (LATEST + ".tmp")
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / LATEST)  # atomic on POSIX


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / COMPLETE).exists())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resumable(load_dir: str) -> Path | None:
    """The newest complete checkpoint under a --save directory, or None if it holds none."""
    root = Path(load_dir)
    if not root.is_dir():
        raise CheckpointError(f"--load {load_dir}: no such directory")
    latest = root / LATEST
    if latest.exists():
        candidate = root / latest.read_text().strip()
        if (candidate / COMPLETE).exists():
            return candidate
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / COMPLETE).exists())
    return complete[-1] if complete else None


def find_run_to_resume(save_dir: str | None, load_dir: str | None) -> Path | None:
    """The run checkpoint a (re)started job resumes from: its own --save directory first (Megatron's
    convention), then --load; None when neither holds one (a --load of a converted checkpoint gives
    the starting weights only)."""
    for source in (save_dir, load_dir):
        path = find_resumable(source) if source and Path(source).is_dir() else None
        if path is not None:
            return path
    return None


def _check_same_precision(path: Path, student) -> None:
    """Refuse a run checkpoint saved with the other --bf16 setting, before any collective (every rank raises).

    The optimizer state differs between the two: with --bf16 Megatron's mixed-precision optimizer keeps fp32
    main params next to the bf16 weights, the fp32 optimizer has none, so the load would fail deep inside
    Megatron with an unclear error (dist-checkpointing's list of missing optimizer keys for fp32 -> --bf16,
    ``KeyError: 'pre_wd_mult'`` for --bf16 -> fp32). A converted checkpoint under --load holds weights only
    and is never resumed, so it loads in either dtype.
    """
    from megatron_opd.models import read_checkpoint_marker

    saved = read_checkpoint_marker(path / "model")["layout"].get("dtype")
    current = str(next(student.unwrapped()[0].parameters()).dtype).removeprefix("torch.")
    if saved is None or saved == current:
        return
    saved_with = "with" if saved == "bfloat16" else "without"
    running_with = "with" if current == "bfloat16" else "without"
    change = "drop --bf16" if current == "bfloat16" else "add --bf16"
    raise CheckpointError(
        f"{path}: run checkpoint saved {saved_with} --bf16 ({saved} weights and optimizer state), but this run is "
        f"{running_with} --bf16 ({current}). --bf16 must match the run checkpoint being resumed: {change} to resume "
        "it, or give --save/--load a directory without run checkpoints to start a new run (a converted checkpoint "
        "under --load loads in either dtype).")


def load_run_checkpoint(path: Path, student) -> dict:
    """Collective. Restores model, optimizer, scheduler and RNG; returns the trainer state."""
    from megatron_opd.models import load_checkpoint

    state_file = path / "trainer_state.json"
    if not state_file.exists():
        raise CheckpointError(f"{path}: missing trainer_state.json (not a megatron-opd run checkpoint)")
    _check_same_precision(path, student)
    load_checkpoint(str(path / "model"), student.unwrapped(), optimizer=student.optimizer,
                    opt_param_scheduler=student.scheduler)
    _barrier()
    return json.loads(state_file.read_text())
