"""The trainer's gradients (Megatron forward/backward through the schedule, vocab-parallel ops,
per-token scaling in finalize_model_grads) equal HF autograd on the same SFT batch, at TP=1 and TP=2; for a
Qwen3-MoE student (router, experts, all-to-all dispatch over gloo) at EP=2, TP=2 (+SP) and PP=2 against
HF's fp64 autograd."""

from pathlib import Path

import pytest
from conftest import torchrun


def _check_grads(student, data, tp: int, extra: list[str], nproc: int) -> list:
    script = str(Path(__file__).with_name("trainer_grad_check.py"))
    proc = torchrun([script, str(student), str(data), str(tp), *extra], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("MAXDIFF")]
    assert len(rows) >= 10  # every HF parameter is compared
    for _, name, diff, scale in rows:
        assert float(diff) <= 1e-5 * max(float(scale), 1.0), f"{name}: grad differs by {diff} (scale {scale})"
    assert max(float(scale) for *_, scale in rows) > 1e-3  # the gradients are not trivially zero
    return rows


@pytest.mark.parametrize("tp", [1, 2])
def test_sft_gradients_match_hf_autograd(toy_models, tp):
    data, student, _ = toy_models
    _check_grads(student, data, tp, [], nproc=tp)


@pytest.mark.parametrize("layout", ["ep2", "tp2", "pp2"])
def test_moe_sft_gradients_match_hf_fp64_autograd(toy_models, toy_moe_student, layout):
    data = toy_models[0]
    tp, extra = {"ep2": (1, ["--expert-model-parallel-size", "2"]), "tp2": (2, ["--sequence-parallel"]),
                 "pp2": (1, ["--pipeline-model-parallel-size", "2"])}[layout]
    rows = _check_grads(toy_moe_student, data, tp, extra, nproc=2)
    experts = [row for row in rows if ".mlp.experts." in row[1]]
    routers = [row for row in rows if row[1].endswith("mlp.gate.weight")]
    assert len(experts) == 2 * 8 * 3 and len(routers) == 2  # 2 layers × 8 experts × gate/up/down
    assert max(float(scale) for *_, scale in routers) > 1e-4  # the router is trained (its grads are not 0)
    print(f"{layout}: worst |grad diff| {max(float(d) for _, _, d, _ in rows):.2e}")
