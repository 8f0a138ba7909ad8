"""Platform layer: ParallelConfig validation, device mapping of the CPU shim, and a single-process
``initialize_distributed`` (no torchrun env) that runs a TP=1 model against HF — in a child process, so the
shim's process-wide patches never leak into the pytest process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_opd.platform import ParallelConfig
from megatron_opd.platform.cpu_shim import _to_cpu_device
from megatron_opd.platform.parallel import _check_world_size


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_model_parallel_size=0), r"ParallelConfig\.tensor_model_parallel_size must be >= 1, got 0"),
    (dict(virtual_pipeline_model_parallel_size=2), r"virtual_pipeline_model_parallel_size=2 needs "
                                                   r"pipeline_model_parallel_size >= 2, got 1"),
    (dict(sequence_parallel=True), r"sequence_parallel=True needs tensor_model_parallel_size >= 2, got 1"),
    (dict(backend="mpi"), r"ParallelConfig\.backend must be 'auto', 'nccl' or 'gloo', got 'mpi'"),
])
def test_parallel_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_world_size_must_fit_the_layout():
    cfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert cfg.model_parallel_size == 4
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by .* = 4"):
        _check_world_size(cfg, 6)
    _check_world_size(cfg, 8)


def test_shim_device_mapping():
    assert _to_cpu_device("cuda") == "cpu" and _to_cpu_device("cuda:1") == "cpu"
    assert _to_cpu_device(torch.device("cuda", 0)) == torch.device("cpu")
    assert _to_cpu_device(0) == "cpu" and _to_cpu_device("cpu") == "cpu" and _to_cpu_device(None) is None


CHILD = r"""
import json, torch
from megatron_opd.platform import ParallelConfig, initialize_distributed, destroy_distributed, apply_cpu_shim
from megatron_opd.models import build_qwen3_model, load_hf_weights, forward_logits
from megatron_opd.models.tiny import tiny_qwen3_config, tiny_qwen3_model
state = initialize_distributed(ParallelConfig(seed=11))
out = {"world": state.world_size, "tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size,
       "first": state.is_pipeline_first_stage(), "last": state.is_pipeline_last_stage(),
       "shim_again": apply_cpu_shim(), "device": str(torch.empty(2, device="cuda").device),
       "current_device": str(torch.cuda.current_device())}
hf = tiny_qwen3_model(tiny_qwen3_config(True), seed=3)
chunks = build_qwen3_model(hf.config, state.config)
load_hf_weights(chunks, hf.state_dict(), hf.config)
ids = torch.randint(0, 99, (3, 7))
logits = forward_logits(chunks, ids, mask_padding=True)
out["err"] = (logits[..., :99] - hf(ids).logits).abs().max().item()
out["pad_is_neg_inf"] = bool(torch.isneginf(logits[..., 99:]).all())
out["real_vocab"], out["padded_vocab"] = chunks[0].real_vocab_size, chunks[0].padded_vocab_size
try:
    forward_logits(chunks, ids, position_ids=torch.arange(7).flip(0).expand(3, 7))
except ValueError as err:
    out["pos_error"] = str(err)
destroy_distributed()
destroy_distributed()
print("RESULT" + json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU shim; GPU runs are unpatched")
def test_single_process_initialisation_runs_a_model():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                          env=dict(env, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT")[-1])
    assert (out["world"], out["tp"], out["pp"], out["dp"]) == (1, 1, 1, 1)
    assert out["first"] and out["last"] and out["shim_again"]
    assert out["device"] == "cpu" and out["current_device"] == "cpu"
    assert out["err"] < 1e-4 and out["pad_is_neg_inf"]
    assert (out["real_vocab"], out["padded_vocab"]) == (99, 128)
    assert "position_ids must be None or arange(seq)" in out["pos_error"]
