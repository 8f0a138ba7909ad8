"""Checkpoint/resume of the OPD trainer at TP=2: bit-exact resume after kill -9, and a crash in
the middle of a save leaves the previous checkpoint as the one that loads; after either, metrics.jsonl
holds each step once (the killed run's lines past the checkpoint are dropped)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import free_port, read_metrics
from safetensors.torch import load_file


def train_cmd(flags: dict) -> list[str]:
    from megatron_opd.recipes.common import flags_to_argv

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "megatron_opd.cli", "train", *flags_to_argv(flags)]


def run(flags: dict, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    # A session of its own: the crash hook kills its whole process group, never pytest.
    return subprocess.run(train_cmd(flags), capture_output=True, text=True, timeout=timeout, env=env,
                          start_new_session=True)


def hf_tensors(path) -> dict:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def assert_each_step_logged_once(run_dir):
    """The resumed run drops the killed run's lines past the checkpoint: one line per step and one sync line
    (time_sync) per rollout of 2 steps, in order."""
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "time_sync" in r] == [2, 4, 6]


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


@pytest.fixture(scope="module")
def base_flags(toy_models):
    data, student, teacher = toy_models
    return {"--student-hf": str(student), "--teacher-hf": str(teacher), "--data-path": str(data),
            "--tensor-model-parallel-size": 2, "--objective": "lsm", "--topk": 8, "--gate": "block",
            "--train-iters": 6, "--epochs-per-rollout": 2, "--minibatches-per-rollout": 1,
            "--prompts-per-rollout": 4, "--samples-per-prompt": 2, "--micro-batch-size": 4,
            "--max-new-tokens": 24, "--lr": 1e-2, "--lr-warmup-iters": 2, "--lr-decay-style": "cosine",
            "--no-progress": True}


@pytest.fixture(scope="module")
def straight_run(base_flags, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    proc = run({**base_flags, "--run-dir": str(root / "run"), "--save-hf": str(root / "hf")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return hf_tensors(root / "hf")


def test_resume_after_kill_is_bit_exact(base_flags, straight_run, tmp_path):
    save = tmp_path / "save"
    flags = {**base_flags, "--run-dir": str(tmp_path / "run"), "--save": str(save), "--save-interval": 2}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(train_cmd(flags), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        latest = save / "latest"
        if latest.exists() and latest.read_text().strip() == "iter_0000002":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the test could kill it"
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the launcher and both ranks
    proc.wait()
    assert (save / "latest").read_text().strip() in ("iter_0000002", "iter_0000004")
    resumed = run({**flags, "--load": str(save), "--save-hf": str(tmp_path / "hf")})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_identical(straight_run, hf_tensors(tmp_path / "hf"))
    assert_each_step_logged_once(tmp_path / "run")


def test_crash_during_save_keeps_previous_checkpoint(base_flags, straight_run, tmp_path):
    save = tmp_path / "save"
    flags = {**base_flags, "--run-dir": str(tmp_path / "run"), "--save": str(save), "--save-interval": 2}
    crashed = run(flags, env_extra={"MEGATRON_OPD_FAULT": "save@4"})
    assert crashed.returncode != 0
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 4  # logged past the step-2 checkpoint
    assert (save / "latest").read_text().strip() == "iter_0000002"
    assert (save / "iter_0000004.tmp").is_dir() and not (save / "iter_0000004.tmp" / "COMPLETE").exists()
    assert not (save / "iter_0000004").exists()
    # No --load: a restarted job resumes from its own --save directory.
    resumed = run({**flags, "--save-hf": str(tmp_path / "hf")})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_identical(straight_run, hf_tensors(tmp_path / "hf"))
    assert (save / "latest").read_text().strip() == "iter_0000006"
    assert_each_step_logged_once(tmp_path / "run")
