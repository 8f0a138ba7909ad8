"""Checkpoint/resume of a Qwen3-MoE student (EP=2 on 2 ranks): a kill -9 in the middle of the step-4 save
resumes from the step-2 checkpoint bit-exactly (final weights equal an uninterrupted run's), and the same
step-2 checkpoint resumes at EP=1 (experts resharded from 2 ranks to every rank, Adam's state with them:
``models/optimizer_state.py``): the step-3 loss (restored weights, same batch) and the step-4 loss (after
an Adam step from the restored moments) equal the straight run's to float rounding. Without the resharded
optimizer state (checkpoint format 1: Megatron chains a separate expert optimizer at EP > 1) the resume
starts a fresh optimizer, with a warning (step 4 was 0.00663 instead of 0.00783 when an earlier session measured it)."""

import pytest
from conftest import read_metrics
from test_trainer_resume import assert_identical, hf_tensors, run


@pytest.fixture(scope="module")
def moe_flags(toy_models, toy_moe_student):
    data, _, teacher = toy_models
    return {"--student-hf": str(toy_moe_student), "--teacher-hf": str(teacher), "--data-path": str(data),
            "--expert-model-parallel-size": 2, "--objective": "lsm", "--topk": 8, "--gate": "block",
            "--train-iters": 4, "--epochs-per-rollout": 2, "--minibatches-per-rollout": 1,
            "--prompts-per-rollout": 2, "--samples-per-prompt": 2, "--micro-batch-size": 2,
            "--max-new-tokens": 16, "--lr": 1e-2, "--lr-warmup-iters": 1, "--no-progress": True}


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_moe_kill9_resume_is_bit_exact_and_reshards_to_ep1(moe_flags, tmp_path):
    straight = run({**moe_flags, "--run-dir": str(tmp_path / "straight"), "--save-hf": str(tmp_path / "hf0")})
    assert straight.returncode == 0, straight.stderr[-4000:]
    save = tmp_path / "save"
    flags = {**moe_flags, "--run-dir": str(tmp_path / "run"), "--save": str(save), "--save-interval": 2}
    crashed = run(flags, env_extra={"MEGATRON_OPD_FAULT": "save@4"})  # SIGKILL of every rank mid-save
    assert crashed.returncode != 0 and (save / "latest").read_text().strip() == "iter_0000002"
    # EP=1 first (it writes into its own --save), then the same-layout resume
    ep1 = run({**flags, "--expert-model-parallel-size": 1, "--run-dir": str(tmp_path / "ep1"),
               "--save": str(tmp_path / "save_ep1"), "--load": str(save)})
    assert ep1.returncode == 0, ep1.stderr[-4000:]
    resumed = run({**flags, "--save-hf": str(tmp_path / "hf1")})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_identical(hf_tensors(tmp_path / "hf0"), hf_tensors(tmp_path / "hf1"))
    reference, resharded = _losses(tmp_path / "straight"), _losses(tmp_path / "ep1")
    assert sorted(resharded) == [3, 4] and "optimizer state is not" not in ep1.stderr
    for step in (3, 4):
        assert resharded[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-7), (step, resharded, reference)
        print(f"step-{step} loss straight {reference[step]!r} vs resumed at EP=1 {resharded[step]!r}")
