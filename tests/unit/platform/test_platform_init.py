"""Platform layer: ParallelConfig validation, device mapping of the CPU shim, and a single-process
``initialize_distributed`` (no torchrun env) that runs a TP=1 model against HF, one Megatron DDP + optimizer
step (grad clipping through the shim) and an optimizer/scheduler checkpoint round trip — in a child process,
so the shim's process-wide patches never leak into the pytest process."""

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

# Megatron DDP + optimizer (grad clipping goes through the shim) + scheduler, saved and loaded.
import tempfile
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron_opd.models import causal_attention_mask, save_checkpoint, load_checkpoint
def trainer():
    chunks = build_qwen3_model(hf.config, state.config)
    load_hf_weights(chunks, hf.state_dict(), hf.config)
    ddp = [DistributedDataParallel(c.config, DistributedDataParallelConfig(), c) for c in chunks]
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1e-3), ddp)
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=2,
        lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=10,
        wd_incr_style="constant")
    return ddp, opt, sched
ddp, opt, sched = trainer()
loss = ddp[0](input_ids=ids, position_ids=torch.arange(7).expand(3, 7), attention_mask=causal_attention_mask(7))
loss.float().pow(2).mean().backward()
_, grad_norm, _ = opt.step()
sched.step(1)
out["grad_norm"] = grad_norm
ckpt = tempfile.mkdtemp() + "/ckpt"
save_checkpoint(ckpt, ddp, opt, sched, extra_state={"iteration": 1})
ddp2, opt2, sched2 = trainer()
out["extra"] = load_checkpoint(ckpt, ddp2, opt2, sched2)
pairs = list(zip(opt.optimizer.param_groups[0]["params"], opt2.optimizer.param_groups[0]["params"]))
out["params_equal"] = all(torch.equal(a, b) for a, b in pairs)
out["adam_equal"] = all(torch.equal(opt.optimizer.state[a][k], opt2.optimizer.state[b][k])
                        for a, b in pairs for k in ("exp_avg", "exp_avg_sq"))
out["moved"] = not torch.equal(pairs[0][0], hf.state_dict()["model.embed_tokens.weight"])
out["sched_steps"] = sched2.num_steps
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
    assert out["grad_norm"] > 1e-3 and out["moved"]  # clipping was active
    assert out["extra"] == {"iteration": 1} and out["params_equal"] and out["adam_equal"]
    assert out["sched_steps"] == 1


def test_cpu_grad_clipping_scales_only_above_max_norm():
    from megatron_opd.platform.cpu_shim import _clip_grad_by_total_norm_cpu

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    _clip_grad_by_total_norm_cpu(params, max_norm=1.0, total_norm=4.0)
    assert all(torch.allclose(p.grad, torch.full_like(p, 2.0 / (4.0 + 1e-6))) for p in params)
    _clip_grad_by_total_norm_cpu(params, max_norm=10.0, total_norm=4.0)
    assert all(torch.allclose(p.grad, torch.full_like(p, 2.0 / (4.0 + 1e-6))) for p in params)
