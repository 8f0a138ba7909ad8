"""A Qwen3-MoE student trained at EP=2 against real SGLang 0.5.23 servers on CPU, with the real Qwen3 vocabulary.

The student server serves a tiny random Qwen3-MoE (8 experts, top-2, norm_topk_prob) with *tied* embeddings
through SGLang's CPU MoE path. SGLang's Qwen3-MoE ignores ``tie_word_embeddings`` (it serves its own lm_head),
so the trainer's export carries the embedding as lm_head (``models.weight_mapping``); without that copy the
server keeps a wrong lm_head across every weight sync. The teacher of the run is a tiny dense Qwen3,
in-process (the dense real-SGLang test covers an SGLang teacher; one server fewer keeps the suite short);
the MoE server is then scored *as a teacher* after the run. ``megatron-opd train`` (2 ranks, EP=2) runs
LSM + Block64 with rollout reuse for 4 steps, syncing weights to the student server through disk before the
first rollout and after it. Checked:

- the rollout log-probs the server returned equal the trainer's recompute at the rollout's first update
  (the MoE train-inference mismatch; fp32 server, tolerance ``LOGPROB_ATOL``);
- after the last sync the server's log-probs of fixed sequences equal an HF forward of the trainer's
  exported weights, and differ from the initial ones; the weight version advanced once per sync;
- teacher scoring of the MoE server (sampled-token and top-K log-probs through ``build_teacher_engine``)
  equals an HF fp32 forward of the exported weights.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import sglang_server
import torch
from test_trainer_real_sglang import (
    LOGPROB_ATOL,
    MATH_TRAIN,
    SERVER_ARGS,
    TOPK,
    TRAIN_FLAGS,
    VersionWatcher,
    hf_logprobs,
    math_prompts,
    server_logprobs,
)

from megatron_opd.models.qwen3_vocab import (
    QWEN3_VOCAB_SIZE,
    build_qwen3_tokenizer,
    write_tiny_qwen3_checkpoint,
)
from megatron_opd.platform.spawn import free_port

MOE = {"num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "moe_intermediate_size": 32}


@pytest.fixture(scope="module")
def moe_run(sglang_python, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_moe_real_vocab")
    tokenizer = build_qwen3_tokenizer()
    student = write_tiny_qwen3_checkpoint(root / "student", tokenizer=tokenizer, seed=21, moe=MOE,
                                          tie_word_embeddings=True)
    teacher = write_tiny_qwen3_checkpoint(root / "teacher", tokenizer=tokenizer, seed=22)
    data = root / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n"
                            for r in math_prompts(MATH_TRAIN, 4)))
    servers = [sglang_server.launch(student, root, extra_args=SERVER_ARGS, python=sglang_python)]
    try:
        for server in servers:
            sglang_server.wait_healthy(server)
        run_dir = root / "run"
        flags = {**TRAIN_FLAGS, "--train-iters": 4, "--micro-batch-size": 1, "--student-hf": student, "--data-path": data,
                 "--rollout-url": servers[0].url, "--teacher-url": "local", "--teacher-hf": teacher, "--run-dir": run_dir,
                 "--save-hf": run_dir / "final_hf", "--expert-model-parallel-size": 2}
        args = []
        for flag, value in flags.items():
            args += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "megatron_opd.cli", "train", *args]
        start = time.perf_counter()
        with VersionWatcher(servers[0].url) as watcher:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        print(f"\nreal-SGLang MoE OPD run: {time.perf_counter() - start:.1f} s; versions {watcher.seen}")
        yield {"rows": rows, "versions": watcher.seen, "url": servers[0].url, "tokenizer": tokenizer,
               "student": student, "run_dir": run_dir}
    finally:
        for server in servers:
            sglang_server.stop(server)


def test_moe_student_trains_against_real_sglang(moe_run):
    rows = [r for r in moe_run["rows"] if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0.0 and "moe_load_max_over_mean" in r for r in rows)
    first = rows[0]
    assert first["abs_drift_max"] == 0.0 and first["gate_min"] == first["gate_max"] == 1.0
    print(f"MoE rollout log-prob gap (real SGLang vs trainer recompute): max {first['engine_logprob_gap_max']:.3g}"
          f" mean {first['engine_logprob_gap_mean']:.3g}")
    assert first["engine_logprob_gap_max"] <= LOGPROB_ATOL, first
    versions = moe_run["versions"]
    assert len(versions) == 3 and len(set(versions)) == 3, versions  # initial, first sync, after the rollout


def test_moe_server_holds_the_trainers_weights_after_sync(moe_run):
    tokenizer = moe_run["tokenizer"]
    prompt = tokenizer("What is 1+2?")["input_ids"]
    fixed = [(prompt, tokenizer("The answer is \\boxed{3}.")["input_ids"] + [tokenizer.eos_token_id])]
    final = hf_logprobs(moe_run["run_dir"] / "final_hf", fixed)
    initial = hf_logprobs(moe_run["student"], fixed)
    for (p, r), want, before in zip(fixed, final, initial):
        got = torch.tensor(server_logprobs(moe_run["url"], p, r))
        idx = torch.arange(len(r))
        gap = (got - want[idx, r]).abs().max().item()
        moved = (got - before[idx, r]).abs().max().item()
        print(f"MoE server vs exported weights: {gap:.3g}; moved {moved:.3g}")
        assert gap <= LOGPROB_ATOL and moved > 100 * LOGPROB_ATOL


def test_moe_server_scores_as_a_teacher_like_hf(moe_run):
    from megatron_opd.teacher import build_teacher_engine

    tokenizer = moe_run["tokenizer"]
    prompt = tokenizer("Compute 7*6.")["input_ids"]
    response = tokenizer("7*6 = 42, so \\boxed{42}")["input_ids"] + [tokenizer.eos_token_id]
    score = build_teacher_engine(moe_run["url"], vocab_size=QWEN3_VOCAB_SIZE).score([prompt], [response], top_k=TOPK)[0]
    # fp32: transformers' grouped expert matmul has no fp64 kernel
    reference = hf_logprobs(moe_run["run_dir"] / "final_hf", [(prompt, response)])[0]
    sampled_gap = (score.token_logprobs - reference[torch.arange(len(response)), response]).abs().max()
    topk_gap = max((score.topk_logprobs[t] - reference[t, score.topk_ids[t]]).abs().max() for t in range(len(response)))
    ref_kth = reference.topk(TOPK, dim=-1).values[:, -1]
    print(f"MoE teacher scoring vs HF fp32: sampled {sampled_gap:.3g}, top-{TOPK} {topk_gap:.3g}")
    assert sampled_gap <= LOGPROB_ATOL and topk_gap <= LOGPROB_ATOL
    for t in range(len(response)):  # the server's ids are a top-K of HF's (ties within tolerance aside)
        assert score.topk_logprobs[t].min() >= ref_kth[t] - LOGPROB_ATOL, t
