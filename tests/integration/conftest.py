"""Shared fixtures of the integration tests: tiny toy-task models and a torchrun launcher."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd.recipes.common import ModelShape, quick_recipe, write_initial_model, write_toy_data

TINY = ModelShape(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=64)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, log: Path | None = None, **kwargs):
    """Run ``torchrun --nproc-per-node nproc args`` on loopback; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory):
    """(data path, student HF dir, teacher HF dir): random tiny Qwen3 models with the toy tokenizer."""
    root = tmp_path_factory.mktemp("toy_models")
    recipe = quick_recipe()
    data_path = write_toy_data(root, recipe)
    student = write_initial_model(root / "student", TINY, seed=1)
    teacher = write_initial_model(root / "teacher", TINY, seed=2)
    return data_path, student, teacher


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One cache of the quick demo's SFT teacher/student, shared by the demo and variants tests."""
    return tmp_path_factory.mktemp("demo_cache")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
