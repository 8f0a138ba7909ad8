"""End to end: ``python -m megatron_opd.eval`` with a tiny random Qwen3 on every benchmark (subsets),
killed with SIGKILL mid-generation, then resumed without regenerating finished problems."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO / ".." / "shared" / "data" / "benchmarks"
BENCHMARKS = ["aime24", "aime25", "math500", "amc23", "toy"]
LIMIT = 4


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_opd.data.toy_task import build_toy_tokenizer

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_qwen3")
    Qwen3ForCausalLM(config).save_pretrained(path)
    build_toy_tokenizer().save_pretrained(path)
    return path


def _cmd(model_dir, out_dir, entry=("megatron_opd.eval",)):
    return [sys.executable, "-m", *entry, "--model-hf", str(model_dir), "--data-dir", str(DATA_DIR),
            "--out-dir", str(out_dir), "--benchmarks", ",".join(BENCHMARKS), "--limit", str(LIMIT),
            "--n", "4", "--k", "1,4", "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "64",
            "--batch-problems", "1", "--grader-workers", "1", "--no-progress"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _complete_lines(out_dir) -> dict[str, list[str]]:
    gen = Path(out_dir) / "generations"
    found = {}
    for name in BENCHMARKS:
        path = gen / f"{name}.jsonl"
        text = path.read_text() if path.exists() else ""
        found[name] = text[: text.rfind("\n") + 1].splitlines()
    return found


@pytest.mark.skipif(not (DATA_DIR / "math500.jsonl").is_file(), reason=f"benchmark copies not found at {DATA_DIR}")
def test_eval_cli_runs_writes_reports_and_resumes_after_sigkill(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.Popen(_cmd(tiny_model_dir, out), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while sum(map(len, _complete_lines(out).values())) < 3:
        assert proc.poll() is None, f"eval exited early: {proc.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, "no generations written within 240 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-run: a kill, not a clean shutdown
    proc.wait()
    proc.stderr.close()
    before = _complete_lines(out)
    done_before = sum(map(len, before.values()))
    total = LIMIT * len(BENCHMARKS)
    assert 3 <= done_before < total, f"kill landed after {done_before} of {total} problems"
    assert not (out / "results.json").exists()

    # Resume through the console-script dispatcher (`megatron-opd eval`).
    run = subprocess.run(_cmd(tiny_model_dir, out, entry=("megatron_opd.cli", "eval")), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    after = _complete_lines(out)
    for name in BENCHMARKS:
        bench = results["benchmarks"][name]
        assert after[name][: len(before[name])] == before[name]  # finished problems untouched
        assert bench["resumed"] == len(before[name]) and bench["generated"] == LIMIT - len(before[name])
        assert len(after[name]) == LIMIT and len({json.loads(x)["id"] for x in after[name]}) == LIMIT
        assert bench["num_samples"] == 4 * LIMIT and set(bench["metrics"]) == {"pass@1", "pass@4", "mean@4"}
    assert results["mean"]["benchmarks"] == BENCHMARKS[:4]
    assert (out / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"
    assert "| aime24 | 4 |" in (out / "results.md").read_text()

    # Everything finished: a rerun only re-grades, without loading the model.
    rerun = subprocess.run(_cmd(tiny_model_dir, out), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0 and "model not loaded" in rerun.stderr, rerun.stderr[-2000:]
    again = json.loads((out / "results.json").read_text())
    assert all(b["generated"] == 0 for b in again["benchmarks"].values())
    assert again["benchmarks"] == {k: {**v, "resumed": LIMIT, "generated": 0} for k, v in results["benchmarks"].items()}


def test_generations_do_not_depend_on_batching(tiny_model_dir, tmp_path):
    """The real in-process engine: one problem per call or four per call give identical samples."""
    from megatron_opd.eval import GradingPool, evaluate
    from megatron_opd.eval.cli import load_tokenizer
    from megatron_opd.rollout import build_rollout_engine

    tok = load_tokenizer(str(tiny_model_dir))
    engine = build_rollout_engine(str(tiny_model_dir), vocab_size=len(tok), seed=0)
    texts = []
    with GradingPool(num_workers=1) as pool:
        for batch in (1, 4):
            out = tmp_path / f"b{batch}"
            evaluate(engine, tok, benchmarks=["toy"], n=3, ks=[1, 3], out_dir=out, limit=4, temperature=1.0,
                     top_p=1.0, max_new_tokens=24, batch_problems=batch, pool=pool, show_progress=False)
            lines = [json.loads(x) for x in (out / "generations" / "toy.jsonl").read_text().splitlines()]
            texts.append([[s["text"] for s in line["samples"]] for line in lines])
    assert texts[0] == texts[1]
    assert len({t for problem in texts[0] for t in problem}) > 4  # samples differ from each other
    assert engine.prompt_counter == 0  # the engine's own sampling stream is left as it was
