"""tools/gpu_check.py --device cpu --tiny: every section of the GPU check runs (and passes) on CPU, so each
line is exercised before a GPU exists; the JSON report carries the fields a GPU run is read by.

Also runs the ``--wheels`` path against an empty wheel folder: every requirement is already installed, so pip
must succeed offline without touching torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import chunked_head_section  # noqa: E402
import gpu_check  # noqa: E402


def test_flops_formula_on_the_qwen3_1p7b_shape():
    """N counts every matmul weight a token passes (layers + LM head): Qwen3-1.7B's ~1.72e9 parameters
    (its tied embedding counted once, as the LM head; norms are not matmuls)."""
    flops = gpu_check.model_flops_per_step(gpu_check.FULL.bench_model, 8192)
    layer = 2 * 2048 * 16 * 128 + 2 * 2048 * 8 * 128 + 3 * 2048 * 6144
    assert flops["matmul_params"] == 28 * layer + 2048 * 151_936 == 1_720_451_072
    assert flops["dense_flops"] == 6 * 1_720_451_072 * 8192
    assert flops["attention_flops"] == 6 * 28 * 16 * 128 * 8192 ** 2
    assert flops["total_flops"] == flops["dense_flops"] + flops["attention_flops"]


def test_weight_comparison_tells_loaded_from_random_weights(tmp_path):
    """The bf16 section's load check: two random models differ by O(1), a model and itself by 0."""
    from megatron_opd.recipes.common import ModelShape, write_initial_model

    shape = ModelShape(**gpu_check.TINY.toy_model)
    a, b = write_initial_model(tmp_path / "a", shape, seed=1), write_initial_model(tmp_path / "b", shape, seed=2)
    assert gpu_check._max_relative_difference(a, a) == (0.0, gpu_check._max_relative_difference(a, b)[1])
    worst, compared = gpu_check._max_relative_difference(a, b)
    assert compared > 0 and worst > 0.5  # far above the 2^-7 the check allows


def test_cpu_tiny_run_passes_every_section(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--wheels", str(wheels), "--out", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    failed = {name: s["error"] for name, s in sections.items() if not s["passed"]}
    assert not failed, json.dumps(failed, indent=1)[:4000]
    assert proc.returncode == 0 and report["passed"] is True
    assert list(sections) == list(gpu_check.SECTIONS)

    env_s = sections["environment"]
    assert env_s["wheels"]["torch_before"] == env_s["wheels"]["torch_after"]
    assert "torch==" in env_s["wheels"]["constraints"]

    bf16 = sections["bf16_load_resume"]
    assert bf16["first_run_steps"] == [1, 2] and bf16["resumed_run_steps"] == [3]
    assert bf16["weights_compared"] > 0 and bf16["max_rel_weight_change"] < 2 ** -7
    assert bf16["latest_checkpoint"] == "iter_0000002" and bf16["latest_after_resume"] == "iter_0000003"

    ops = sections["vocab_parallel_ops"]["max_abs_errors"]
    assert set(ops) == {"float32", "bfloat16"}
    assert all(err <= 1e-4 for name, err in ops["float32"].items()), ops

    engines = sections["engines"]
    assert engines["behaviour_vs_teacher_max_err"] < 1e-3 and engines["topk_ids_equal_cpu"]

    te = sections["te_parity"]
    assert te["cases"] and all(case["passed"] for case in te["cases"])

    mfu = sections["throughput_mfu"]
    model, tokens = mfu["model"], mfu["tokens_per_micro_batch"]
    assert mfu["total_flops"] == gpu_check.model_flops_per_step(model, tokens)["total_flops"]
    assert 0 < mfu["mfu"] <= 1 and mfu["measured_bf16_peak_tflops"] > 0
    assert abs(mfu["tokens_per_s"] - tokens / mfu["median_step_s"]) < 1e-6 * mfu["tokens_per_s"]
    assert abs(mfu["mfu"] - mfu["achieved_tflops"] / mfu["measured_bf16_peak_tflops"]) < 1e-9

    head = sections["chunked_head"]
    assert [row["tokens"] for row in head["rows"]] == list(chunked_head_section.TINY_HEAD.tokens)
    for row in head["rows"]:
        assert row["loss_rel_diff"] <= 1e-3 and row["old"]["seconds"] > 0 and row["new"]["seconds"] > 0
    assert set(head["longest_tokens_tp1"]) == {"new", "old"}
    assert head["longest_tokens_tp1"]["new"]["tokens"] >= chunked_head_section.TINY_HEAD.tokens[-1]
    moe = sections["moe"]
    assert moe["tiny_logit_max_err_vs_hf"] < 1e-4  # fp32 on the CPU
    flops = gpu_check.moe_active_flops_per_step(moe["model"], moe["tokens_per_micro_batch"])
    assert moe["total_flops"] == flops["total_flops"] and 0 < moe["mfu"] <= 1
    assert moe["active_matmul_params"] < moe["total_matmul_params"]


def test_moe_flops_count_the_active_parameters_of_qwen3_30b_a3b():
    """Qwen3-30B-A3B at its 48 layers: Qwen reports 3.3e9 activated of 30.5e9 parameters, both counting the
    input embedding (0.31e9), which is a lookup, not a matmul: ~3.04e9 active of ~30.2e9 matmul parameters."""
    shape = dict(gpu_check.FULL.moe_model, num_hidden_layers=48)
    flops = gpu_check.moe_active_flops_per_step(shape, 8192)
    attention = 2 * 2048 * 32 * 128 + 2 * 2048 * 4 * 128
    layer_active = attention + 2048 * 128 + 8 * 3 * 2048 * 768
    assert flops["active_matmul_params"] == 48 * layer_active + 2048 * 151_936
    embedding = 2048 * 151_936
    assert abs(flops["active_matmul_params"] + embedding - 3.3e9) < 0.1e9
    assert abs(flops["total_matmul_params"] + embedding - 30.5e9) < 0.1e9
    assert flops["dense_flops"] == 6 * flops["active_matmul_params"] * 8192
