"""OPD with a Qwen3-MoE student at EP=2 on CPU (gloo): sampled + Block64 (aux loss on, fp64 router, all-gather
dispatcher) and LSM + newline spans (no aux loss, fp32 router, all-to-all dispatcher), with the in-process
HF engines (the rollout engine is the MoE student itself, synced from the trainer every rollout; the LSM
run's teacher is a 16-expert top-8 Qwen3-MoE in the in-process teacher engine).

Checks: finite losses; the gate is exactly 1 on a rollout's first update and acts on its reuse (so the
trainer's recompute of log π_old equals its own forward bit for bit with MoE routing in the loop); the router
load metrics are in metrics.jsonl (tokens per expert: an integer number of top-k assignments; max/mean ≥ 1)
and the aux loss only where it is on; the rollout engine's behaviour log-probs are near the trainer's
recompute (not equal: the engine suppresses PAD when sampling and renormalises over the rest, a shift of
-log(1 - p(PAD)) ≈ 0.017 on this random toy model, the same for a dense student); ``megatron-opd plot``
draws the router panel.
"""

import json
import math
from pathlib import Path

import pytest
from conftest import read_metrics, torchrun

RUNS = {
    "sampled_block64_aux": {"--objective": "sampled", "--gate": "block", "--gate-block-size": 64,
                            "--moe-aux-loss-coeff": 1e-2, "--moe-router-dtype": "fp64",
                            "--moe-token-dispatcher-type": "allgather"},
    "lsm_spans": {"--objective": "lsm", "--gate": "span", "--gate-span-delimiter": ";", "--topk": 8},
}
MOE_TEACHER = {"lsm_spans"}
EXPERTS, TOPK = 8, 2


@pytest.fixture(scope="module")
def moe_runs(toy_models, toy_moe_student, toy_moe_teacher, tmp_path_factory):
    data, _, teacher = toy_models
    workdir = tmp_path_factory.mktemp("moe_runs")
    common = {"--student-hf": str(toy_moe_student), "--teacher-hf": str(teacher), "--data-path": str(data),
              "--expert-model-parallel-size": 2, "--train-iters": 2, "--epochs-per-rollout": 2,
              "--minibatches-per-rollout": 1, "--prompts-per-rollout": 4, "--samples-per-prompt": 2,
              "--micro-batch-size": 2, "--max-new-tokens": 24, "--lr": 1e-2, "--gate-tau": 5.0}
    args = [f"{name}={json.dumps({**common, **flags})}" for name, flags in RUNS.items()]
    args = [arg.replace(str(teacher), str(toy_moe_teacher)) if arg.split("=")[0] in MOE_TEACHER else arg
            for arg in args]
    proc = torchrun([str(Path(__file__).with_name("trainer_matrix.py")), str(workdir), *args], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return workdir


@pytest.mark.parametrize("name", sorted(RUNS))
def test_moe_student_trains_with_gates_and_router_metrics(moe_runs, name):
    rows = [r for r in read_metrics(moe_runs / name) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    first, reuse = rows
    for row in rows:
        assert math.isfinite(row["loss"]) and row["skipped"] == 0.0 and math.isfinite(row["grad_norm"])
        routed = row["moe_tokens_per_expert_mean"] * EXPERTS / TOPK  # tokens through each layer
        assert routed > row["tokens"] and routed == pytest.approx(round(routed), abs=1e-6)
        assert 1.0 <= row["moe_load_max_over_mean"] <= EXPERTS / TOPK and row["moe_load_min_over_mean"] <= 1.0
        assert ("moe_aux_loss" in row) == ("--moe-aux-loss-coeff" in RUNS[name])
        if "moe_aux_loss" in row:
            assert 0 < row["moe_aux_loss"] < 10
    assert first["abs_drift_max"] == 0.0 and first["gate_min"] == first["gate_max"] == 1.0
    assert reuse["abs_drift_max"] > 0.0 and reuse["gate_min"] < 1.0 < reuse["gate_max"]
    if name in MOE_TEACHER:
        assert 0 < first["teacher_topk_mass"] <= 1 and first["reverse_kl"] > 0
    print(f"{name}: engine-vs-trainer log-prob gap max {first['engine_logprob_gap_max']:.2e} "
          f"mean {first['engine_logprob_gap_mean']:.2e}; load max/mean {first['moe_load_max_over_mean']:.2f}")
    assert first["engine_logprob_gap_max"] < 0.05


def test_plot_draws_the_router_panel(moe_runs):
    from megatron_opd.training.plot import PANELS, plot_run

    out = plot_run(moe_runs / "sampled_block64_aux")
    assert out.stat().st_size > 10_000 and "moe_load_max_over_mean" in PANELS["MoE router load"]
