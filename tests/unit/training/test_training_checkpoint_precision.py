"""A --bf16 run checkpoint resumed without --bf16 is refused before any load, naming the directory and the
flag (the fp32 optimizer would otherwise fail inside Megatron with ``KeyError: 'pre_wd_mult'``). The run
checkpoint here is its files only (trainer state and the completion marker ``models.save_checkpoint``
writes); the fp32 -> --bf16 direction runs the real trainer in
tests/integration/test_trainer_precision_resume.py."""

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_opd.models.checkpoint import MARKER_NAME
from megatron_opd.training.checkpoint import CheckpointError, load_run_checkpoint


def run_checkpoint(path, dtype: str):
    (path / "model").mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": 1, "batch_index": 1, "bad_in_a_row": 0}))
    layout = {"tp": 1, "pp": 1, "vpp": 1, "padded_vocab_size": 128, "real_vocab_size": 100, "dtype": dtype}
    (path / "model" / MARKER_NAME).write_text(json.dumps({"format_version": 1, "layout": layout, "rng_state": True}))
    return path


def test_bf16_run_checkpoint_resumed_without_bf16_names_checkpoint_and_flag(tmp_path):
    path = run_checkpoint(tmp_path / "iter_0000001", "bfloat16")
    chunk = torch.nn.Linear(2, 2)  # an fp32 student, as built without --bf16
    student = SimpleNamespace(unwrapped=lambda: [chunk], optimizer=None, scheduler=None)
    with pytest.raises(CheckpointError) as err:
        load_run_checkpoint(path, student)
    message = str(err.value)
    assert message.startswith(f"{path}: run checkpoint saved with --bf16 (bfloat16 weights")
    assert "this run is without --bf16 (float32)" in message
    assert "--bf16 must match the run checkpoint being resumed: add --bf16 to resume it" in message
