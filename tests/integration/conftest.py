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


def write_moe_model(out_dir: Path, seed: int, **moe) -> Path:
    """An HF dir with the toy tokenizer and a tiny random Qwen3-MoE (decisive router, see models.tiny)."""
    from megatron_opd.data.toy_task import build_toy_tokenizer
    from megatron_opd.models.tiny import tiny_qwen3_moe_config, tiny_qwen3_moe_model

    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = build_toy_tokenizer()
    config = tiny_qwen3_moe_config(
        vocab_size=len(tokenizer), hidden_size=TINY.hidden, num_hidden_layers=TINY.layers,
        num_attention_heads=TINY.heads, num_key_value_heads=TINY.kv_heads, head_dim=TINY.head_dim,
        max_position_embeddings=TINY.max_positions, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **moe)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tiny_qwen3_moe_model(config, seed=seed).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


@pytest.fixture(scope="session")
def toy_moe_student(tmp_path_factory):
    """HF dir of a tiny Qwen3-MoE student (8 experts, top-2, norm_topk_prob) with the toy tokenizer."""
    return write_moe_model(tmp_path_factory.mktemp("toy_moe") / "student", seed=3)


@pytest.fixture(scope="session")
def toy_moe_teacher(tmp_path_factory):
    """HF dir of another tiny Qwen3-MoE (16 experts, top-8) with the toy tokenizer."""
    return write_moe_model(tmp_path_factory.mktemp("toy_moe_teacher") / "teacher", seed=4, num_experts=16,
                           num_experts_per_tok=8)
