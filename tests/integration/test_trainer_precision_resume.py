"""Resuming an fp32 run checkpoint with --bf16 is refused with an error naming the checkpoint directory and
the flag, before any load: the mixed-precision optimizer state (fp32 main params) differs from the fp32
optimizer's, and dist-checkpointing would otherwise fail deep in the load with a list of missing keys.
(The other direction is tests/unit/training/test_training_checkpoint_precision.py.)

Cheap on purpose: one process (TP=1), one step.
"""

import pytest
from conftest import torchrun

from megatron_opd.recipes.common import flags_to_argv


def train(flags: dict):
    return torchrun(["-m", "megatron_opd.cli", "train", *flags_to_argv(flags)], nproc=1)


@pytest.fixture(scope="module")
def flags(toy_models):
    data, student, teacher = toy_models
    return {"--student-hf": str(student), "--teacher-hf": str(teacher), "--data-path": str(data),
            "--objective": "sampled", "--train-iters": 1, "--epochs-per-rollout": 1, "--minibatches-per-rollout": 1,
            "--prompts-per-rollout": 2, "--samples-per-prompt": 1, "--micro-batch-size": 2, "--max-new-tokens": 8,
            "--no-progress": True}


def test_fp32_run_checkpoint_resumed_with_bf16_names_checkpoint_and_flag(flags, tmp_path):
    save = tmp_path / "save"
    first = {**flags, "--run-dir": str(tmp_path / "run1"), "--save": str(save)}
    saved = train(first)
    assert saved.returncode == 0, saved.stderr[-4000:]
    assert (save / "latest").read_text().strip() == "iter_0000001"
    resumed = train({**first, "--run-dir": str(tmp_path / "run2"), "--train-iters": 2, "--bf16": True})
    assert resumed.returncode != 0
    expected = (f"{save / 'iter_0000001'}: run checkpoint saved without --bf16 (float32 weights",
                "this run is with --bf16 (bfloat16)", "--bf16 must match the run checkpoint being resumed",
                "drop --bf16 to resume it")
    for part in expected:
        assert part in resumed.stderr, f"{part!r} not in:\n{resumed.stderr[-4000:]}"
