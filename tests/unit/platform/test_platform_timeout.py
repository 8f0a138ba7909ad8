"""Process-group timeouts: ``ParallelConfig.distributed_timeout_minutes`` (``--distributed-timeout-minutes``)
reaches the world group and every Megatron group. torch's NCCL default (10 min) is shorter than rank 0's
evaluation / HF export while the other ranks wait in a barrier. Runs in a child process so the CPU shim's
process-wide patches stay out of pytest."""

import json
import os
import subprocess
import sys

import pytest

from megatron_opd.platform import ParallelConfig
from megatron_opd.training.cli import parse_config

CHILD = r"""
import json, sys
from megatron.core import parallel_state as mpu
from megatron_opd.platform import ParallelConfig, initialize_distributed, destroy_distributed
from megatron_opd.platform.parallel import process_group_timeout
state = initialize_distributed(ParallelConfig(distributed_timeout_minutes=int(sys.argv[1])))
groups = {"world": None, "tp": state.tp_group, "pp": state.pp_group, "dp": state.dp_group, "cp": state.cp_group,
          "dp_cp": state.dp_cp_group, "embedding": mpu.get_embedding_group(),
          "model_parallel": mpu.get_model_parallel_group()}
print(json.dumps({name: process_group_timeout(g).total_seconds() / 60 for name, g in groups.items()}))
destroy_distributed()
"""


def _group_timeouts(minutes: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    result = subprocess.run([sys.executable, "-c", CHILD, str(minutes)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_timeout_reaches_the_world_group_and_megatrons_groups():
    timeouts = _group_timeouts(77)
    assert timeouts == {name: 77.0 for name in timeouts}, timeouts
    assert len(timeouts) == 8


def test_default_outlasts_torchs_ten_minutes_and_the_flag_sets_it():
    assert ParallelConfig().distributed_timeout_minutes >= 30
    cfg = parse_config(["--student-hf", "/m/s", "--teacher-hf", "/m/t", "--data-path", "toy",
                        "--distributed-timeout-minutes", "90"])
    assert cfg.parallel.distributed_timeout_minutes == 90


def test_bad_timeout_names_the_field():
    with pytest.raises(ValueError, match=r"ParallelConfig\.distributed_timeout_minutes must be >= 1, got 0"):
        ParallelConfig(distributed_timeout_minutes=0)
