"""`megatron-opd train --bf16` on CPU at TP=2: Megatron's Float16OptimizerWithFloat16Params (fp32 main
params) through the platform shim, started with --load from a checkpoint of tools/convert_hf_to_megatron.py,
then checkpoint, kill -9 and resume.

- The first step runs at lr 0 (warm-up): the weights after it must equal the converted checkpoint bit for
  bit. The mixed-precision optimizer clones its fp32 main params when it is built; a --load applied after
  that would be overwritten by the first step with the random initial weights.
- A run SIGKILLed in the middle of its step-4 save resumes from step 2 and ends bit-identical to a straight
  run (bf16 model weights, fp32 main params and Adam moments are all in the checkpoint), and every step
  appears once in metrics.jsonl.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, torchrun

from megatron_opd.models.hf_io import read_hf_checkpoint

REPO = Path(__file__).resolve().parents[2]


def argv(flags: dict) -> list[str]:
    out = ["-m", "megatron_opd.cli", "train"]
    for key, value in flags.items():
        out += [key] if value is True else [key, str(value)]
    return out


def train(flags: dict, monkeypatch=None, fault: str | None = None) -> subprocess.CompletedProcess:
    if fault:
        monkeypatch.setenv("MEGATRON_OPD_FAULT", fault)
    try:
        # A session of its own: the fault hook SIGKILLs its whole process group, never pytest.
        return torchrun(argv(flags), start_new_session=True)
    finally:
        if fault:
            monkeypatch.delenv("MEGATRON_OPD_FAULT")


def assert_bit_identical(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.bfloat16, name
        assert torch.equal(a[name], b[name]), f"{name} differs: {what}"


@pytest.fixture(scope="module")
def converted(toy_models, tmp_path_factory):
    """(bf16 Megatron checkpoint of the toy student, its tensors as HF names)."""
    _, student, _ = toy_models
    out = tmp_path_factory.mktemp("bf16_ckpt") / "mcore"
    proc = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(student),
                           "--save", str(out), "--dtype", "bfloat16"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = {name: t.to(torch.bfloat16) for name, t in read_hf_checkpoint(student).items()}
    return out, weights


@pytest.fixture(scope="module")
def flags(toy_models, converted):
    data, student, teacher = toy_models
    return {"--student-hf": str(student), "--teacher-hf": str(teacher), "--data-path": str(data),
            "--load": str(converted[0]), "--bf16": True, "--tensor-model-parallel-size": 2,
            "--objective": "lsm", "--topk": 8, "--gate": "block", "--train-iters": 6, "--epochs-per-rollout": 1,
            "--minibatches-per-rollout": 1, "--prompts-per-rollout": 4, "--samples-per-prompt": 2,
            "--micro-batch-size": 4, "--max-new-tokens": 24, "--lr": 1e-2, "--lr-warmup-iters": 2,
            "--no-progress": True}


@pytest.fixture(scope="module")
def straight(flags, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16_straight")
    proc = train({**flags, "--run-dir": str(root / "run"), "--export-hf-at": 1, "--save-hf": str(root / "hf")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root


def test_bf16_load_then_lr0_step_keeps_the_checkpoint_weights(straight, converted):
    rows = [r for r in read_metrics(straight / "run") if "loss" in r]
    assert rows[0]["step"] == 1 and rows[0]["grad_norm"] > 0  # a real step: non-zero gradients, lr 0
    config = json.loads((straight / "run" / "config.json").read_text())
    assert config["model"]["bf16"] is True
    assert_bit_identical(converted[1], read_hf_checkpoint(straight / "run" / "hf_step1"),
                         "one lr-0 step after --load changed the weights (stale fp32 main params?)")
    final = read_hf_checkpoint(straight / "hf")
    assert any(not torch.equal(final[n], converted[1][n]) for n in final), "later steps (lr > 0) must train"


def test_bf16_resume_after_kill_is_bit_exact(flags, straight, tmp_path, monkeypatch):
    run_flags = {**flags, "--run-dir": str(tmp_path / "run"), "--save": str(tmp_path / "save"), "--save-interval": 2}
    crashed = train(run_flags, monkeypatch, fault="save@4")  # SIGKILL of all ranks in the middle of the save
    assert crashed.returncode != 0
    assert (tmp_path / "save" / "latest").read_text().strip() == "iter_0000002"
    resumed = train({**run_flags, "--save-hf": str(tmp_path / "hf")})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert_bit_identical(read_hf_checkpoint(straight / "hf"), read_hf_checkpoint(tmp_path / "hf"),
                         "bf16 resume after kill -9 differs from the straight run")
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps
