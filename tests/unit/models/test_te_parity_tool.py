"""tools/check_te_parity.py on CPU (local spec instead of TE): the comparison runs, passes its fp32 tolerance,
and every device the tool itself names is the rank's own (``ParallelState.device``), never a hard-coded CUDA
device (``--tp 2`` used to put every rank's HF model on cuda:0). Runs in a child process (CPU shim)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import check_te_parity as tool
from megatron_opd.platform import apply_cpu_shim

apply_cpu_shim()  # first, so the recorders below wrap the shim's device mapping (outermost, see the caller)
named = []
def _record(original):
    def wrapper(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if caller.endswith("check_te_parity.py"):
            device = kwargs.get("device", args[0] if args else "cuda")
            named.append(str(device))
        return original(self, *args, **kwargs)
    return wrapper

from transformers import PreTrainedModel
for cls in (torch.nn.Module, PreTrainedModel):  # transformers overrides Module.to / .cuda
    cls.to = _record(cls.to)
    cls.cuda = _record(cls.cuda)
torch.Tensor.to = _record(torch.Tensor.to)
torch.Tensor.cuda = _record(torch.Tensor.cuda)
results = tool.run_checks(["float32"], tp=1, use_te=False)
print(json.dumps({"results": results, "named": named, "tf32": torch.backends.cuda.matmul.allow_tf32}))
"""


def test_parity_tool_runs_on_the_ranks_device_and_passes_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "tools")], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["results"]) == 2 and all(r["passed"] for r in out["results"]), out["results"]
    assert out["named"], "the tool placed nothing: the recorder did not see its calls"
    assert all(device == "cpu" for device in out["named"]), out["named"]
    assert out["tf32"] is False  # the HF reference is true fp32
