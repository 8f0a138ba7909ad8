"""End-to-end OPD at TP=2 on CPU (gloo): sampled and LSM, each without a gate and with Block64.

Checks the method's defining property on the real trainer: on the first update of every rollout
π_θ = π_old (log π_old is recomputed by the trainer), so the drift is exactly 0 and every gate is
exactly 1; on the later update of the same rollout the student has moved and the gates are not
all 1. Also: finite losses, metrics written, the effective config saved.
"""

import json
import math
from pathlib import Path

import pytest
from conftest import read_metrics, torchrun

MATRIX = {
    "sampled_nogate": {"--objective": "sampled", "--gate": "none"},
    "sampled_block64": {"--objective": "sampled", "--gate": "block", "--gate-block-size": 64},
    "lsm_nogate": {"--objective": "lsm", "--gate": "none", "--topk": 8},
    "lsm_block64": {"--objective": "lsm", "--gate": "block", "--gate-block-size": 64, "--topk": 8},
    "lsm_spans": {"--objective": "lsm", "--gate": "span", "--gate-span-delimiter": ";", "--topk": 8},
    # Token-budget micro-batches: the recompute and the first update share the packed layout.
    "sampled_block64_packed": {"--objective": "sampled", "--gate": "block", "--gate-block-size": 64,
                               "--max-tokens-per-micro-batch": 96},
}


@pytest.fixture(scope="module")
def matrix_runs(toy_models, tmp_path_factory):
    data, student, teacher = toy_models
    workdir = tmp_path_factory.mktemp("matrix")
    common = {"--student-hf": str(student), "--teacher-hf": str(teacher), "--data-path": str(data),
              "--tensor-model-parallel-size": 2, "--train-iters": 4, "--epochs-per-rollout": 2,
              "--minibatches-per-rollout": 1, "--prompts-per-rollout": 4, "--samples-per-prompt": 2,
              "--micro-batch-size": 4, "--max-new-tokens": 24, "--lr": 1e-2, "--gate-tau": 5.0}
    args = [f"{name}={json.dumps({**common, **flags})}" for name, flags in MATRIX.items()]
    script = str(Path(__file__).with_name("trainer_matrix.py"))
    proc = torchrun([script, str(workdir), *args], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return workdir


def step_rows(rows):
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_runs_and_writes_metrics(matrix_runs, name):
    rows = step_rows(read_metrics(matrix_runs / name))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert math.isfinite(row["loss"]) and row["skipped"] == 0.0
        assert row["tokens"] > 0 and math.isfinite(row["grad_norm"])
    config = json.loads((matrix_runs / name / "config.json").read_text())
    assert config["objective"]["objective"] == MATRIX[name]["--objective"]
    first = [r for r in rows if r["update_in_rollout"] == 0]
    assert len(first) == 2 and all("time_rollout" in r and "response_length" in r for r in first)
    if name.startswith("lsm"):
        assert all(0 < r["teacher_topk_mass"] <= 1 and 0 <= r["topk_overlap"] <= 1 for r in rows)
    assert all(0 <= r["padding_fraction"] < 1 for r in rows)


@pytest.mark.parametrize("name", ["sampled_block64", "lsm_block64", "lsm_spans", "sampled_block64_packed"])
def test_gates_are_one_on_first_update_and_act_on_reuse(matrix_runs, name):
    rows = step_rows(read_metrics(matrix_runs / name))
    for row in rows:
        if row["update_in_rollout"] == 0:
            assert row["abs_drift_max"] == 0.0, row
            assert row["gate_min"] == 1.0 and row["gate_max"] == 1.0, row
        else:
            assert row["abs_drift_max"] > 0.0, row
            assert row["gate_min"] < 1.0 < row["gate_max"], row
        assert row["gate_mean"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", ["sampled_nogate", "lsm_nogate"])
def test_no_gate_reports_drift_but_no_gates(matrix_runs, name):
    rows = step_rows(read_metrics(matrix_runs / name))
    assert all("gate_min" not in r for r in rows)
    assert any(r["abs_drift_max"] > 0 for r in rows if r["update_in_rollout"] == 1)


def test_token_budget_micro_batches_pad_less_and_train_the_same_first_step(matrix_runs):
    """Same first rollout (same weights and seeds): the packed layout pads less, and the first step's loss
    (zero drift, so unit gates) is the fixed layout's."""
    fixed = step_rows(read_metrics(matrix_runs / "sampled_block64"))[0]
    packed = step_rows(read_metrics(matrix_runs / "sampled_block64_packed"))[0]
    assert packed["tokens"] == fixed["tokens"] and packed["response_length"] == fixed["response_length"]
    assert packed["padding_fraction"] < fixed["padding_fraction"], (packed["padding_fraction"],
                                                                    fixed["padding_fraction"])
    assert packed["loss"] == pytest.approx(fixed["loss"], rel=1e-5, abs=1e-7)
