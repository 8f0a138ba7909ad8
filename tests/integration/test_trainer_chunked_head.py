"""The trainer's default chunked head equals the logits path (--no-chunked-head) for one step at TP=2 with
sequence parallelism and at PP=2 (tied embeddings across the stages), sampled-token OPD and LSM
(tail bucket, top-K overlap): recomputed log π_old, finalised gradients and the weights after one
optimizer step (``chunked_head_check.py``).

Tolerances (fp32, tiny Qwen3, logits of order 1): log-probs 1e-5 abs; gradients 1e-5 × their largest
entry; weights after one step (lr 1e-2, Adam eps 1 so the step is ≈ lr·g) 1e-6 abs.
"""

import re
from pathlib import Path

import pytest
from conftest import torchrun


def _report(stdout: str) -> dict[str, tuple[float, float]]:
    return {m[0]: (float(m[1]), float(m[2])) for m in re.findall(r"MAXDIFF (\w+) (\S+) (\S+)", stdout)}


@pytest.mark.parametrize("objective,parallel", [
    ("lsm", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    ("sampled", ["--pipeline-model-parallel-size", "2"]),
])
def test_chunked_head_step_equals_logits_path(toy_models, objective, parallel):
    data, student, teacher = toy_models
    script = str(Path(__file__).with_name("chunked_head_check.py"))
    proc = torchrun([script, str(student), str(teacher), str(data), objective, *parallel], nproc=2, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = _report(proc.stdout)
    assert set(report) == {"recompute", "grad", "weights"}, proc.stdout[-2000:]
    assert report["recompute"][0] <= 1e-5
    diff, scale = report["grad"]
    assert scale > 0 and diff <= 1e-5 * scale
    assert report["weights"][0] <= 1e-6
    chunked, logits = map(float, re.search(r"LOSS (\S+) (\S+)", proc.stdout).groups())
    assert chunked == pytest.approx(logits, rel=1e-5, abs=1e-6)
