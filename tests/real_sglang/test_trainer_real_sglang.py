"""The trainer end to end against real SGLang servers, with the real Qwen3 vocabulary.

A real student server and a real teacher server serve tiny random Qwen3 checkpoints that carry the
real Qwen3 tokenizer (151,936-row vocabulary, the 151,643 BPE ranks, the 26 added tokens, a
Qwen3-style chat template). ``megatron-opd train`` runs LSM (top-K) + Block64 on MATH train
prompts with rollout reuse (2 epochs x 2 minibatches per rollout), 8 optimizer steps, and a disk
weight sync before the first rollout and after every rollout. Checked against the servers and
against HF forwards:

- the student server's weight version advances once per sync, in order;
- after the last sync the server's log-probs of fixed sequences equal the trainer's exported
  weights under an HF forward (fp32; tolerance ``LOGPROB_ATOL``), and differ from the initial ones;
- the rollout log-probs the server returned agree with the trainer's recompute at the first
  update of each rollout (the trainer logs the gap);
- the teacher server's top-K equals an HF forward of the teacher.
"""

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sglang_server
import torch

from megatron_opd.models.qwen3_vocab import (
    QWEN3_VOCAB_SIZE,
    build_qwen3_tokenizer,
    write_tiny_qwen3_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
MATH_TRAIN = Path(os.environ.get("MEGATRON_OPD_SHARED_DATA", REPO.parent / "shared" / "data")) / "train" / \
    "math_train.jsonl"
TOPK = 8
MAX_NEW_TOKENS = 72  # > 64: Block64 sees a full block and a partial one
LOGPROB_ATOL = 2e-4
"""fp32 server (torch-native attention, KV cache) vs fp32 full-sequence forward: measured gaps ~1e-6."""
SERVER_ARGS = ("--dtype", "float32")
TRAIN_FLAGS = {"--objective": "lsm", "--topk": TOPK, "--gate": "block", "--gate-block-size": 64,
               "--gate-tau": 5.0, "--epochs-per-rollout": 2, "--minibatches-per-rollout": 2, "--train-iters": 8,
               "--prompts-per-rollout": 2, "--samples-per-prompt": 2, "--micro-batch-size": 2,
               "--max-new-tokens": MAX_NEW_TOKENS, "--temperature": 1.0, "--top-p": 1.0, "--top-k": -1,
               "--lr": 3e-3, "--max-prompt-length": 160, "--enable-thinking": False, "--seed": 5}


def math_prompts(path: Path, count: int) -> list[dict]:
    """The ``count`` shortest MATH train problems (short prompts keep the test cheap); read at test time."""
    if not path.is_file():
        pytest.fail(f"{path} missing: the MATH train prompts live in ../shared/data (set MEGATRON_OPD_SHARED_DATA)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: (len(r["problem"]), r["id"]))[:count]


@pytest.fixture(scope="module")
def qwen3_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_real_vocab")
    tokenizer = build_qwen3_tokenizer()
    student = write_tiny_qwen3_checkpoint(root / "student", tokenizer=tokenizer, seed=11)
    teacher = write_tiny_qwen3_checkpoint(root / "teacher", tokenizer=tokenizer, seed=12)
    data = root / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n"
                            for r in math_prompts(MATH_TRAIN, 8)))
    return tokenizer, student, teacher, data


class VersionWatcher:
    """Polls a server's ``/model_info`` weight version while the trainer runs; keeps each change."""

    def __init__(self, url: str, period_s: float = 0.1) -> None:
        self.url, self.period_s, self.seen = url, period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stop.is_set():
                try:
                    version = client.get(self.url + "/model_info").json().get("weight_version")
                except (httpx.HTTPError, ValueError):
                    version = None
                if version is not None and (not self.seen or self.seen[-1] != version):
                    self.seen.append(version)
                self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def server_logprobs(url: str, prompt: list[int], response: list[int]) -> list[float]:
    body = httpx.post(url + "/generate", timeout=60.0, json={
        "input_ids": prompt + response, "return_logprob": True, "logprob_start_len": len(prompt) - 1,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}}).json()
    body = body[0] if isinstance(body, list) else body
    return [entry[0] for entry in body["meta_info"]["input_token_logprobs"][1:]]


def hf_logprobs(model_dir: Path, sequences: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """Full-vocabulary log-softmax of an fp32 HF forward, at the response positions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt, response in sequences:
            logits = model(torch.tensor([prompt + response])).logits[0].float()
            out.append(torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(response) - 1], dim=-1))
    return out


@pytest.fixture(scope="module")
def qwen3_servers(qwen3_pair, sglang_python, tmp_path_factory):
    """A student and a teacher server, started together (each start is 20-50 s, far more on a busy box)."""
    _, student, teacher, _ = qwen3_pair
    log_dir = tmp_path_factory.mktemp("qwen3_server_logs")
    # --dtype float32: SGLang serves a float32 checkpoint in float16 by default (gap ~3e-4 vs HF fp32)
    servers = [sglang_server.launch(path, log_dir, extra_args=SERVER_ARGS, python=sglang_python)
               for path in (student, teacher)]
    try:
        for server in servers:
            sglang_server.wait_healthy(server)
        yield servers
    finally:
        for server in servers:
            sglang_server.stop(server)


@pytest.fixture(scope="module")
def trained(qwen3_pair, qwen3_servers, tmp_path_factory):
    """One ``megatron-opd train`` run against a student and a teacher server; returns what it left."""
    tokenizer, student, teacher, data = qwen3_pair
    student_url, teacher_url = (server.url for server in qwen3_servers)
    run_dir = tmp_path_factory.mktemp("opd_real_sglang")
    flags = {**TRAIN_FLAGS, "--student-hf": student, "--data-path": data, "--rollout-url": student_url,
             "--teacher-url": teacher_url, "--run-dir": run_dir, "--save-hf": run_dir / "final_hf"}
    args = []
    for flag, value in flags.items():
        args += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    start = time.perf_counter()
    with VersionWatcher(student_url) as watcher:
        proc = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "train", *args], capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    print(f"\nreal-SGLang OPD run: {seconds:.1f} s for 8 steps; versions seen {watcher.seen}")
    return {"rows": rows, "versions": watcher.seen, "student_url": student_url, "teacher_url": teacher_url,
            "run_dir": run_dir, "tokenizer": tokenizer, "student": student, "teacher": teacher, "data": data}


def steps(rows):
    return [r for r in rows if "loss" in r]


def test_eight_lsm_block64_steps_with_reuse(trained):
    rows = steps(trained["rows"])
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["update_in_rollout"] for r in rows] == [0, 1, 2, 3] * 2  # 2 epochs x 2 minibatches per rollout
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0.0 for r in rows)
    assert all(0 < r["teacher_topk_mass"] <= 1 for r in rows)
    for row in rows:  # the drift gate: exactly 1 on a rollout's first update, acting on its reuse
        if row["update_in_rollout"] == 0:
            assert row["abs_drift_max"] == 0.0 and row["gate_min"] == row["gate_max"] == 1.0, row
        elif row["update_in_rollout"] >= 2:  # the second epoch sees every sequence again, moved
            assert row["abs_drift_max"] > 0.0, row


def test_weight_version_advances_once_per_sync(trained):
    versions = trained["versions"]
    # before the run, then one sync at start and one after each of the 2 rollouts
    assert len(versions) == 4 and len(set(versions)) == 4, versions


def test_server_logprobs_equal_trainer_weights_after_sync(trained):
    tokenizer, url = trained["tokenizer"], trained["student_url"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is $1+2$?"}], tokenize=True,
                                           add_generation_prompt=True, enable_thinking=False)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    fixed = [(prompt, tokenizer("The answer is \\boxed{3}.")["input_ids"] + [tokenizer.eos_token_id]),
             (prompt, [151667, 271, 151668, 271, 16, 10, 17, 28, 18])]
    final = hf_logprobs(trained["run_dir"] / "final_hf", fixed)
    initial = hf_logprobs(trained["student"], fixed)
    moved = 0.0
    for (p, r), want, before in zip(fixed, final, initial):
        got = torch.tensor(server_logprobs(url, p, r))
        idx = torch.arange(len(r))
        gap = (got - want[idx, r]).abs().max().item()
        assert gap <= LOGPROB_ATOL, f"server vs trainer's exported weights: {gap:.3g}"
        moved = max(moved, (got - before[idx, r]).abs().max().item())
    assert moved > 100 * LOGPROB_ATOL, f"the synced weights look like the initial ones (max change {moved:.3g})"


def test_rollout_logprobs_match_recompute_at_first_update(trained):
    first = [r for r in steps(trained["rows"]) if r["update_in_rollout"] == 0]
    assert len(first) == 2
    for row in first:
        assert row["engine_logprob_gap_max"] <= LOGPROB_ATOL, row
        assert row["engine_logprob_gap_mean"] <= row["engine_logprob_gap_max"]


def test_teacher_topk_equals_hf_forward(trained):
    from megatron_opd.teacher import build_teacher_engine

    tokenizer = trained["tokenizer"]
    problem = json.loads(trained["data"].read_text().splitlines()[0])["problem"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=True,
                                           add_generation_prompt=True, enable_thinking=False)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    response = tokenizer("Let me think. 2+2=4, so \\boxed{4}")["input_ids"] + [tokenizer.eos_token_id]
    engine = build_teacher_engine(trained["teacher_url"], vocab_size=QWEN3_VOCAB_SIZE)
    score = engine.score([prompt], [response], top_k=TOPK)[0]
    reference = hf_logprobs(trained["teacher"], [(prompt, response)])[0]
    ref_top, ref_ids = reference.topk(TOPK + 1, dim=-1)
    for t in range(len(response)):
        ids, lps = score.topk_ids[t], score.topk_logprobs[t]
        # the server's values at its ids are the HF log-probs at those ids ...
        assert (lps - reference[t, ids]).abs().max() <= LOGPROB_ATOL, t
        # ... and its ids are a top-K of HF: none below HF's K-th value (ties within tolerance aside)
        assert lps.min() >= ref_top[t, TOPK - 1] - LOGPROB_ATOL, t
        close_ties = (ref_top[t, TOPK - 1] - ref_top[t, TOPK]).item() <= 2 * LOGPROB_ATOL
        assert close_ties or set(ids.tolist()) == set(ref_ids[t, :TOPK].tolist()), t
    assert (score.token_logprobs - reference[torch.arange(len(response)), response]).abs().max() <= LOGPROB_ATOL


# --- Asynchronous rollouts against the real student server (issue 18) -----------------------------------
# Placed last: it moves the student server's weights, which the tests above check against the first run.
ASYNC_ITERS = 12  # 3 rollouts of 4 optimizer steps; batch b is sampled by weight version max(0, b - 1)


@pytest.fixture(scope="module")
def trained_async(qwen3_pair, qwen3_servers, tmp_path_factory):
    """``megatron-opd train --max-staleness 1`` against the same servers."""
    _, student, _, data = qwen3_pair
    student_url, teacher_url = (server.url for server in qwen3_servers)
    run_dir = tmp_path_factory.mktemp("opd_real_sglang_async")
    flags = {**TRAIN_FLAGS, "--student-hf": student, "--data-path": data, "--rollout-url": student_url,
             "--teacher-url": teacher_url, "--run-dir": run_dir, "--max-staleness": 1,
             "--train-iters": ASYNC_ITERS}
    args = []
    for flag, value in flags.items():
        args += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    with VersionWatcher(student_url) as watcher:
        proc = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "train", *args], capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"rows": steps(rows), "versions": watcher.seen}


def test_async_no_sample_lost_or_duplicated_across_syncs(trained_async):
    rows = trained_async["rows"]
    per_batch = TRAIN_FLAGS["--prompts-per-rollout"] * TRAIN_FLAGS["--samples-per-prompt"]
    assert [r["step"] for r in rows] == list(range(1, ASYNC_ITERS + 1))
    firsts = [r for r in rows if r["update_in_rollout"] == 0]
    # The slot ledger raises on a duplicated or missing (batch, prompt, sample); it counted every one.
    assert [r["samples_consumed_total"] for r in firsts] == [per_batch, 2 * per_batch, 3 * per_batch]
    # The server was synced to v0 (batches 0 and 1) and v1 (batch 2), between batches, in order.
    assert trained_async["versions"][-2:] == ["v0", "v1"], trained_async["versions"]


def test_async_every_sample_within_k_versions(trained_async):
    """From the log: the staleness histogram of every step (built from each sample's
    meta_info.weight_version, and asserted <= K by the trainer before the step ran)."""
    per_step = (TRAIN_FLAGS["--prompts-per-rollout"] * TRAIN_FLAGS["--samples-per-prompt"]
                // TRAIN_FLAGS["--minibatches-per-rollout"])
    for row in trained_async["rows"]:
        age = min(row["batch_index"], 1)
        assert row["staleness_max"] == age <= 1 and row[f"staleness_{age}"] == per_step, row
        assert sum(row.get(f"staleness_{a}", 0) for a in (0, 1)) == per_step


def test_async_behaviour_recomputed_with_the_sampling_weights(trained_async):
    """The stale batches' π_old is recomputed with the weights that sampled them: it matches the server's
    log-probs as closely as in the synchronous run (the current weights would be far off)."""
    for row in trained_async["rows"]:
        assert row["engine_logprob_gap_max"] <= LOGPROB_ATOL, row
    stale_first = [r for r in trained_async["rows"] if r["update_in_rollout"] == 0 and r["batch_index"] >= 1]
    assert stale_first and all(r["abs_drift_max"] > 0 for r in stale_first)  # the gates see the lag
