"""The trainer's gradients (Megatron forward/backward through the schedule, vocab-parallel ops,
per-token scaling in finalize_model_grads) equal HF autograd on the same SFT batch, at TP=1 and TP=2."""

from pathlib import Path

import pytest
from conftest import torchrun


@pytest.mark.parametrize("tp", [1, 2])
def test_sft_gradients_match_hf_autograd(toy_models, tp):
    data, student, _ = toy_models
    script = str(Path(__file__).with_name("trainer_grad_check.py"))
    proc = torchrun([script, str(student), str(data), str(tp)], nproc=tp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("MAXDIFF")]
    assert len(rows) >= 10  # every HF parameter is compared
    for _, name, diff, scale in rows:
        assert float(diff) <= 1e-5 * max(float(scale), 1.0), f"{name}: grad differs by {diff} (scale {scale})"
    assert max(float(scale) for *_, scale in rows) > 1e-3  # the gradients are not trivially zero
