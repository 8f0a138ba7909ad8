#!/usr/bin/env python
"""One command that verifies the GPU path and measures it on one GPU (about 5 of its 8-minute budget),
writing a JSON report.

    python tools/gpu_check.py --out gpu_check.json                      # first GPU machine: CUDA, full sizes
    python tools/gpu_check.py --wheels ./wheels --out gpu_check.json    # no network: deps from a wheel folder
    python tools/gpu_check.py --device cpu --tiny --out report.json     # the test suite's run (every line)

torch always comes from the machine (the NGC image); ``--wheels DIR`` installs the wheels that
``scripts/fetch_gpu_wheels.sh DIR`` fetched (what the GPU image lacks: megatron-core, datasets, math-verify and
their few dependencies) offline with ``--no-deps``, under a constraints file that freezes the installed torch
and every CUDA-built package, then checks that torch is still the same build.

Sections (each reports ``passed``, ``seconds``, ``error`` and its numbers; a failing section never stops
the others; the process exits 0 only when all passed):

* ``environment``: device, torch/CUDA/TE, the version check against ``megatron_opd/versions.py``
  (reported, not enforced: the Docker build enforces it), the wheel install.
* ``bf16_load_resume``: a HF Qwen3 → ``tools/convert_hf_to_megatron.py`` (on the CPU) → ``torchrun -m megatron_opd.cli
  train --bf16 --load`` (lr 1e-9: the exported weights must equal the converted ones to bf16 rounding,
  which fails when bf16 trains from random weights) with checkpoints → a second run resumes from the
  checkpoint and runs only the next step.
* ``vocab_parallel_ops``: log-probs, entropy, log Z, gather, top-K and the gradient on the device, against
  an fp64 full-vocabulary PyTorch reference (a padded vocabulary of Qwen3's real size on GPU).
* ``engines``: the in-process rollout engine and teacher on the device; the behaviour log-probs must
  equal the teacher's re-scoring of the same tokens, and the device's scores the CPU engine's.
* ``te_parity``: ``tools/check_te_parity.py`` (TE spec vs HF, bf16 and fp32) when TE imports; without TE
  the same comparison with the local spec (reported as such).
* ``throughput_mfu``: the trainer's OPD ``train_step`` (sampled objective, Block64 gate, bf16, Megatron
  DDP + optimizer) on a Qwen3-1.7B-shaped model, one 8192-token sequence per micro-batch. Model FLOPs
  per step = 6·N·T + 6·L·H·d_h·T², with N the matmul parameters a token passes through (every linear
  layer and the LM head: L·(2·d·H·d_h + 2·d·K·d_h + 3·d·F) + d·V), T tokens, L layers, H query heads
  of width d_h, K key/value heads, F the MLP width, V the vocabulary: 2 FLOPs per multiply-add, backward
  = 2× forward, and the attention scores and values (4·T²·d_h per head forward) counted for the causal
  half. MFU = those FLOPs / step time / the bf16 matmul peak MEASURED on the same device
  (an n×n×n bf16 matmul, 2·n³ FLOPs).
* ``chunked_head`` (``tools/chunked_head_section.py``): the trainer's head + loss forward + backward in bf16 on
  the Qwen3-1.7B head, the materialised logits against the chunked head: peak memory
  (``torch.cuda.max_memory_allocated``), time and their ratios at T = 4k, 16k, 32k, and the longest T that fits at
  TP = 1 for each path (bounded doubling search, under a minute in all).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the checkout's megatron_opd, installed or not

from chunked_head_section import section_chunked_head  # noqa: E402 - tools/ is on the path beside this file


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run (full on a GPU, tiny for the CPU suite)."""

    toy_model: dict  # ModelShape fields of the bf16/engines model
    ops_vocab: int
    ops_width: int  # logits columns (the padded vocab)
    ops_tokens: int
    bench_model: dict  # HF Qwen3Config fields of the throughput model
    bench_tokens: int
    bench_warmup: int
    bench_steps: int
    peak_n: int
    te_dtypes: tuple
    moe_model: dict  # HF Qwen3MoeConfig fields of the MoE throughput model
    moe_tokens: int


FULL = Sizes(
    toy_model=dict(layers=4, hidden=256, heads=8, kv_heads=2, head_dim=32, intermediate=512),
    ops_vocab=151_669, ops_width=151_936, ops_tokens=512,
    # Qwen3-1.7B (its config.json): 28 layers, d 2048, 16 q heads / 8 kv heads of 128, F 6144, V 151936, tied
    bench_model=dict(num_hidden_layers=28, hidden_size=2048, num_attention_heads=16, num_key_value_heads=8,
                     head_dim=128, intermediate_size=6144, vocab_size=151_936, tie_word_embeddings=True,
                     max_position_embeddings=40_960, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    bench_tokens=8192, bench_warmup=2, bench_steps=5, peak_n=8192, te_dtypes=("bfloat16", "float32"),
    # Qwen3-30B-A3B (its config.json) with 4 of its 48 layers
    moe_model=dict(num_hidden_layers=4, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                   head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                   num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151_936, tie_word_embeddings=False,
                   max_position_embeddings=40_960, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    moe_tokens=8192)
TINY = Sizes(
    toy_model=dict(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=64),
    ops_vocab=1000, ops_width=1024, ops_tokens=16,
    bench_model=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, intermediate_size=128, vocab_size=512, tie_word_embeddings=True,
                     max_position_embeddings=256, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    bench_tokens=128, bench_warmup=1, bench_steps=2, peak_n=128, te_dtypes=("float32",),
    moe_model=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                   num_experts_per_tok=2, norm_topk_prob=True, vocab_size=512, tie_word_embeddings=False,
                   max_position_embeddings=256, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    moe_tokens=128)

SECTIONS = ("environment", "bf16_load_resume", "vocab_parallel_ops", "engines", "te_parity", "throughput_mfu",
            "chunked_head", "moe")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device under test")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test suite)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="folder of wheels: install the project's dependencies from it, offline, torch untouched")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON report path")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds; sections not started by then are reported as failed (not run)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- running sections


class Check:
    """What a section records: numbers (``put``) and named pass/fail conditions (``expect``)."""

    def __init__(self):
        self.details: dict = {}
        self.failures: list[str] = []

    def put(self, **values) -> None:
        self.details.update(values)

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            self.failures.append(message)


def run_section(name: str, func, *args) -> dict:
    """Run one section; an exception or a failed expectation fails it (with the error), never the others."""
    check, start = Check(), time.time()
    try:
        func(check, *args)
        error = "; ".join(check.failures) or None
    except Exception as err:  # noqa: BLE001 - every failure goes into the report
        error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"
    result = {"passed": error is None, "seconds": round(time.time() - start, 2), "error": error, **check.details}
    print(f"[gpu_check] {name}: {'PASS' if error is None else 'FAIL'} ({result['seconds']} s)"
          + (f"\n  {error.splitlines()[0]}" if error else ""), flush=True)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host-device sync: timings cover the queued kernels


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(device: str) -> dict:
    """Environment of the subprocesses: the checkout on the path; no GPU for a CPU run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run(cmd: list[str], env: dict, log: Path, timeout: float) -> float:
    """Run ``cmd`` with its output in ``log``; its wall seconds. Raises with the log's tail when it fails."""
    start = time.time()
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}; {log}:\n{log.read_text()[-2500:]}")
    return round(time.time() - start, 2)


# ---------------------------------------------------------------- environment (+ wheels)


def _torch_identity() -> dict:
    return {"version": torch.__version__, "file": str(Path(torch.__file__).resolve()), "cuda": torch.version.cuda}


def _frozen_constraints(path: Path) -> Path:
    """torch and every CUDA-built package of this environment pinned to what is installed."""
    names = ("torch", "torchvision", "triton", "transformer-engine", "transformer_engine", "apex", "flash-attn",
             "flash_attn")
    lines = []
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.lower() in names or name.lower().startswith(("nvidia-", "transformer-engine", "transformer_engine")):
            lines.append(f"{name}=={dist.version}")
    path.write_text("\n".join(sorted(set(lines))) + "\n")
    return path


def install_wheels(wheels: Path, workdir: Path) -> dict:
    """pip install every wheel in ``wheels`` (scripts/fetch_gpu_wheels.sh: exactly what the GPU image lacks),
    offline and with --no-deps, so the image's torch and its other packages stay as they are; returns facts,
    including ``pip check``'s complaints (reported, not fatal: a version bound of a fetched package that the
    image's copy misses usually does not matter, and the sections below show whether it does)."""
    if not wheels.is_dir():
        raise FileNotFoundError(f"--wheels {wheels} is not a directory")
    before = _torch_identity()
    files = sorted(str(f) for f in wheels.glob("*.whl"))
    constraints = _frozen_constraints(workdir / "frozen-constraints.txt")
    if files:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--constraint", str(constraints),
               *files]
        env = dict(os.environ, PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1")
        _run(cmd, env, workdir / "pip-install.log", timeout=240)
    pip_check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    after = subprocess.run([sys.executable, "-c", "import json, torch, pathlib; print(json.dumps({'version': "
                            "torch.__version__, 'file': str(pathlib.Path(torch.__file__).resolve()), "
                            "'cuda': torch.version.cuda}))"], capture_output=True, text=True, check=True)
    return {"torch_before": before, "torch_after": json.loads(after.stdout), "constraints": constraints.read_text(),
            "wheels_dir": str(wheels), "wheel_files": [Path(f).name for f in files],
            "pip_check": pip_check.stdout.strip().splitlines()[-20:]}


def section_environment(check: Check, args, device: torch.device, workdir: Path) -> None:
    check.put(torch=torch.__version__, torch_cuda=torch.version.cuda, python=sys.version.split()[0],
              device=str(device))
    if args.wheels is not None:
        facts = install_wheels(args.wheels, workdir)
        check.put(wheels=facts)
        check.expect(facts["torch_before"] == facts["torch_after"], "the wheel install changed torch")
    if device.type == "cuda":
        check.expect(torch.cuda.is_available(), "--device cuda but torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(device)
        check.put(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                  capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    from megatron_opd import versions
    from megatron_opd.models import transformer_engine_available

    checks = versions.collect_checks(gpu=device.type == "cuda")
    check.put(versions={c.name: {"pinned": c.pinned, "installed": c.installed, "status": c.status} for c in checks},
              version_warnings=[c.message for c in checks if c.status in versions.PROBLEMS],
              transformer_engine=transformer_engine_available())
    import megatron.core  # noqa: F401 - the trainer's dependencies import

    check.put(megatron_core=importlib.metadata.version("megatron-core"),
              transformers=importlib.metadata.version("transformers"))


# ---------------------------------------------------------------- bf16 + --load + checkpoint + resume


def _write_toy_models(workdir: Path, sizes: Sizes) -> tuple[Path, Path, Path]:
    from megatron_opd.recipes.common import ModelShape, quick_recipe, write_initial_model, write_toy_data

    recipe = quick_recipe()
    recipe.train_problems = 64
    data = write_toy_data(workdir, recipe)
    shape = ModelShape(**sizes.toy_model)
    return data, write_initial_model(workdir / "student", shape, seed=1), write_initial_model(workdir / "teacher", shape, seed=2)


def _train_cmd(flags: dict) -> list[str]:
    from megatron_opd.recipes.common import flags_to_argv

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "megatron_opd.cli", "train", *flags_to_argv(flags)]


def _steps_logged(log: Path) -> list[int]:
    return [int(line.split(":")[0].split()[1]) for line in log.read_text().splitlines()
            if line.startswith("step ") and ":" in line and line.split(":")[0].split()[1].isdigit()]


def _max_relative_difference(reference_dir: Path, exported_dir: Path) -> tuple[float, int]:
    """max |a-b| / (|b|_max) over tensors both HF dirs hold, and how many were compared."""
    from safetensors.torch import load_file

    def tensors(directory: Path) -> dict:
        out = {}
        for file in sorted(directory.glob("*.safetensors")):
            out.update(load_file(str(file)))
        return out

    ref, got = tensors(reference_dir), tensors(exported_dir)
    common = sorted(set(ref) & set(got))
    worst = 0.0
    for name in common:
        a, b = got[name].double(), ref[name].double()
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)))
    return worst, len(common)


def section_bf16_load_resume(check: Check, args, device: torch.device, workdir: Path, sizes: Sizes) -> None:
    root = workdir / "bf16"
    root.mkdir(parents=True, exist_ok=True)
    env = _child_env(args.device)
    data, student, teacher = _write_toy_models(root, sizes)
    mcore = root / "student-mcore"
    # converted on the CPU (local spec), as docker/README.md tells users; the GPU trainer loads it into the
    # Transformer Engine spec, whose key set differs (the TE norms' _extra_state)
    convert_s = _run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(student),
                      "--save", str(mcore), "--overwrite"], _child_env("cpu"), root / "convert.log", timeout=180)
    flags = {"--student-hf": student, "--teacher-hf": teacher, "--data-path": data, "--rollout-url": "local",
             "--teacher-url": "local", "--bf16": True, "--load": mcore, "--save": root / "ckpt",
             "--save-interval": 2, "--train-iters": 2, "--lr": 1e-9, "--min-lr": 1e-9, "--lr-warmup-iters": 0,
             "--weight-decay": 0.0, "--objective": "lsm", "--topk": 4, "--gate": "block", "--prompts-per-rollout": 2,
             "--samples-per-prompt": 2, "--micro-batch-size": 4, "--max-new-tokens": 16, "--epochs-per-rollout": 1,
             "--minibatches-per-rollout": 1, "--eval-interval": 0, "--run-dir": root / "run", "--no-progress": True,
             "--save-hf": root / "hf_after_2"}
    train_s = _run(_train_cmd(flags), env, root / "train.log", timeout=300)
    first_steps = _steps_logged(root / "train.log")
    worst, compared = _max_relative_difference(student, root / "hf_after_2")
    # lr 1e-9 moves no weight visibly: what comes out is what --load put in, to bf16 rounding (2^-8 relative)
    check.put(convert_s=convert_s, train_s=train_s, first_run_steps=first_steps, weights_compared=compared, max_rel_weight_change=worst,
              latest_checkpoint=(root / "ckpt" / "latest").read_text().strip()
              if (root / "ckpt" / "latest").exists() else None)
    check.expect(first_steps == [1, 2], f"first run logged steps {first_steps}, expected [1, 2]")
    check.expect(compared > 0, "no tensor in common between the student and the exported weights")
    check.expect(worst < 2 ** -7, f"exported weights differ from the converted checkpoint by {worst:.3g} "
                                   "(relative): --bf16 --load did not train from the loaded weights")
    resumed = {**flags, "--load": root / "ckpt", "--train-iters": 3, "--save-hf": None}
    resume_s = _run(_train_cmd(resumed), env, root / "resume.log", timeout=300)
    resumed_steps = _steps_logged(root / "resume.log")
    check.put(resume_s=resume_s, resumed_run_steps=resumed_steps)
    check.expect(resumed_steps == [3], f"resumed run logged steps {resumed_steps}, expected only [3]")
    latest = (root / "ckpt" / "latest").read_text().strip()
    check.put(latest_after_resume=latest)
    check.expect(latest == "iter_0000003", f"the resumed run's final checkpoint is {latest}, not iter_0000003")


# ---------------------------------------------------------------- vocab-parallel ops vs fp64


def section_vocab_parallel_ops(check: Check, args, device: torch.device, workdir: Path, sizes: Sizes) -> None:
    from megatron_opd.ops import vocab_parallel_stats, vocab_parallel_topk

    gen = torch.Generator().manual_seed(0)
    vocab, width, tokens, k = sizes.ops_vocab, sizes.ops_width, sizes.ops_tokens, 8
    base = torch.randn(tokens, width, generator=gen, dtype=torch.float64) * 4  # logits of a trained LM's scale
    base[:, vocab:] = 1e4  # padding columns: huge values that must be ignored
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    gather_ids = torch.randint(0, vocab, (tokens, k), generator=gen)
    weights = torch.randn(tokens, generator=gen, dtype=torch.float64)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits = base.to(dtype).to(device).requires_grad_(True)
        stats = vocab_parallel_stats(logits, ids.to(device), gather_ids.to(device), vocab_size=vocab)
        (stats.logprobs.double() * weights.to(device)).sum().backward()
        top_lp, top_ids = vocab_parallel_topk(logits.detach(), k, vocab_size=vocab, return_logprobs=True)
        # the reference at the same input rounding (bf16 inputs are rounded before any op)
        rounded = base[:, :vocab].to(dtype).double()
        r_logp = torch.log_softmax(rounded, -1)
        errors = {
            "logprobs": _max_err(stats.logprobs, r_logp.gather(1, ids[:, None]).squeeze(1)),
            "entropy": _max_err(stats.entropy, -(r_logp.exp() * r_logp).sum(-1)),
            "log_z": _max_err(stats.log_normalizer, torch.logsumexp(rounded, -1)),
            "gather": _max_err(stats.gathered_logits, rounded.gather(1, gather_ids)),
            "topk_logprobs": _max_err(top_lp, torch.topk(r_logp, k, dim=-1).values),
            "grad": _max_err(logits.grad[:, :vocab], _reference_grad(rounded, ids, weights)),
            "grad_padding": float(logits.grad[:, vocab:].abs().max()) if width > vocab else 0.0,
        }
        results[str(dtype).removeprefix("torch.")] = errors
        # fp32 compute on every path (bf16 inputs are rounded in the reference too); the gradient is
        # stored in the logits' dtype, so bf16 allows its rounding (2^-8 of the largest gradient)
        grad_scale = float(_reference_grad(rounded, ids, weights).abs().max())
        tolerances = {name: 1e-4 for name in errors}
        if dtype == torch.bfloat16:
            tolerances["grad"] = 2 ** -8 * grad_scale
        for name, err in errors.items():
            check.expect(err <= tolerances[name], f"{dtype} {name}: max error {err:.3g} > {tolerances[name]:.3g}")
        if dtype == torch.float32:  # bf16-rounded logits tie often: their ids are not unique, their values are
            check.expect(torch.equal(top_ids.cpu(), torch.topk(r_logp, k, dim=-1).indices),
                         "fp32 top-K ids differ from the fp64 reference's")
    check.put(vocab=vocab, width=width, tokens=tokens, k=k, device=str(device), max_abs_errors=results,
              reference="fp64 full-vocab log_softmax / autograd on the same (rounded) logits")


def _max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.detach().double().cpu() - ref.detach().double().cpu()).abs().max())  # host sync


def _reference_grad(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    x = logits.clone().requires_grad_(True)
    (torch.log_softmax(x, -1).gather(1, ids[:, None]).squeeze(1) * weights).sum().backward()
    return x.grad


# ---------------------------------------------------------------- in-process engines


def section_engines(check: Check, args, device: torch.device, workdir: Path, sizes: Sizes) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_opd.rollout import LocalRolloutEngine, SamplingParams
    from megatron_opd.teacher import LocalTeacher

    root = workdir / "bf16"
    if not (root / "student" / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        _write_toy_models(root, sizes)
    model_dir = root / "student"
    on_device = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    on_cpu = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, n=2, seed=7, ignore_eos=True)
    samples = LocalRolloutEngine(on_device, seed=7).generate(prompts, params)
    check.expect(all(len(s.response_ids) == 16 for s in samples), "a sample is not max_new_tokens long")
    responses = [s.response_ids for s in samples]
    rows = [s.prompt_ids for s in samples]
    scores = LocalTeacher(on_device).score(rows, responses, top_k=4)
    cpu_scores = LocalTeacher(on_cpu).score(rows, responses, top_k=4)
    behaviour = torch.tensor([s.logprobs for s in samples])
    rescored = torch.stack([s.token_logprobs for s in scores])
    on_cpu_lp = torch.stack([s.token_logprobs for s in cpu_scores])
    self_err = float((behaviour - rescored).abs().max())
    device_err = float((rescored - on_cpu_lp).abs().max())
    topk_same = all(torch.equal(a.topk_ids, b.topk_ids) for a, b in zip(scores, cpu_scores))
    check.put(samples=len(samples), tokens=int(behaviour.numel()), behaviour_vs_teacher_max_err=self_err,
              device_vs_cpu_max_err=device_err, topk_ids_equal_cpu=topk_same,
              score_device=str(scores[0].token_logprobs.device))
    check.expect(self_err < 1e-3, f"rollout log-probs differ from the teacher's re-scoring by {self_err:.3g}")
    check.expect(device_err < 1e-3, f"{device} teacher scores differ from CPU ones by {device_err:.3g}")
    check.expect(topk_same, f"{device} teacher top-K ids differ from CPU ones")
    check.expect(scores[0].token_logprobs.device.type == "cpu", "teacher scores are not returned on the CPU")


# ---------------------------------------------------------------- TE parity


def section_te_parity(check: Check, args, device: torch.device, workdir: Path, sizes: Sizes) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    import check_te_parity

    from megatron_opd.models import transformer_engine_available

    use_te = transformer_engine_available()
    results = check_te_parity.run_checks(sizes.te_dtypes, tp=1, use_te=use_te)
    check.put(spec="transformer_engine" if use_te else "local (Transformer Engine does not import here)",
              cases=results)
    for r in results:
        check.expect(r["passed"], f"{r['dtype']} tied={r['tied']}: max|dlogit| {r['max_abs_dlogit']:.3g} "
                                  f"(tol {r['tolerance']}) gather_exact={r['gather_exact']}")


# ---------------------------------------------------------------- throughput and MFU


def model_flops_per_step(cfg: dict, tokens: int) -> dict:
    """6·N·T + 6·L·H·d_h·T² for one sequence of ``tokens`` (see the module docstring)."""
    layers, d, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    kv, dh, ff, vocab = cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]
    matmul_params = layers * (2 * d * heads * dh + 2 * d * kv * dh + 3 * d * ff) + d * vocab
    dense = 6 * matmul_params * tokens
    attention = 6 * layers * heads * dh * tokens ** 2
    return {"matmul_params": matmul_params, "dense_flops": dense, "attention_flops": attention,
            "total_flops": dense + attention}


def measure_bf16_peak(device: torch.device, n: int, iters: int = 10) -> float:
    """FLOP/s of an n×n×n bf16 matmul on ``device`` (best of ``iters`` after a warm-up)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def _opd_experience(tokens: int, vocab: int, seed: int = 0):
    """One sequence of ``tokens``: a 64-token prompt and the rest as the response, with teacher log-probs."""
    from megatron_opd.rollout import Sample
    from megatron_opd.teacher import TeacherScore
    from megatron_opd.training.experience import build_experience

    gen = torch.Generator().manual_seed(seed)
    prompt_len = min(64, tokens // 2)
    prompt = torch.randint(1, vocab, (prompt_len,), generator=gen).tolist()
    response = torch.randint(1, vocab, (tokens - prompt_len,), generator=gen).tolist()
    behaviour = (-torch.rand(len(response), generator=gen) * 5).tolist()
    sample = Sample(prompt_ids=prompt, response_ids=response, logprobs=behaviour, finish_reason="length",
                    prompt_index=0, sample_index=0)
    teacher = TeacherScore(token_logprobs=-torch.rand(len(response), generator=gen) * 5)
    exp = build_experience([sample], [teacher], pad_id=0)
    exp.old_logprobs = exp.engine_logprobs.clone()
    return exp


def _build_opd_student(workdir: Path, sizes: Sizes, state, device: torch.device, moe: bool = False):
    """The trainer's student and its OPD micro-batch loss, wired as ``training.components`` does."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.components import _rescale_grads
    from megatron_opd.training.loss import LossSettings, MicrobatchLoss
    from megatron_opd.training.megatron_setup import build_student

    model_dir = workdir / ("moe_bench_model" if moe else "bench_model")
    if moe:
        Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], **sizes.moe_model).save_pretrained(model_dir)
    else:
        Qwen3Config(architectures=["Qwen3ForCausalLM"], **sizes.bench_model).save_pretrained(model_dir)
    cfg = parse_config(["--student-hf", str(model_dir), "--teacher-hf", str(model_dir), "--data-path", "toy",
                        "--objective", "sampled",
                        "--gate", "block", "--gate-block-size", "64", "--bf16", "--micro-batch-size", "1",
                        "--prompts-per-rollout", "1", "--samples-per-prompt", "1", "--lr", "1e-6",
                        "--run-dir", str(workdir / "bench_run"), "--no-progress"])
    holder: list = []
    student = build_student(cfg, state, None, finalize_hook=lambda model: _rescale_grads(model, holder[0], state))
    settings = LossSettings(objective="sampled", gate=cfg.gate, vocab_size=student.vocab_size)
    holder.append(MicrobatchLoss(settings, state.tp_group, state.dp_cp_group))
    return student, holder[0]


def _timed_train_steps(student, loss, exp, state, device, sizes: Sizes) -> tuple[list, list, float, dict]:
    """``bench_warmup`` untimed then ``bench_steps`` timed OPD train steps on ``exp``: (step seconds, per-token
    losses of every step, the median step time, the last step's metrics)."""
    from megatron_opd.training.loop import REPORT_KEYS
    from megatron_opd.training.step import train_step

    times, losses = [], []
    for step in range(sizes.bench_warmup + sizes.bench_steps):
        _sync(device)
        start = time.perf_counter()
        result = train_step(student, loss, exp, state, 1, REPORT_KEYS)
        _sync(device)
        if step >= sizes.bench_warmup:
            times.append(time.perf_counter() - start)
        losses.append(result["loss_sum"] / max(result["tokens"], 1))
    return times, losses, sorted(times)[len(times) // 2], result


def section_throughput_mfu(check: Check, args, device: torch.device, workdir: Path, sizes: Sizes) -> None:
    from megatron_opd.platform import ParallelConfig, initialize_distributed
    from megatron_opd.platform.parallel import process_group_timeout

    peak = measure_bf16_peak(device, sizes.peak_n)
    state = initialize_distributed(ParallelConfig())
    # the NCCL (gloo on CPU) groups carry the configured timeout, not torch's 10-minute default
    timeouts = {name: process_group_timeout(group).total_seconds() / 60
                for name, group in (("world", None), ("tp", state.tp_group), ("dp", state.dp_group))}
    check.put(process_group_timeout_minutes=timeouts)
    check.expect(set(timeouts.values()) == {float(state.config.distributed_timeout_minutes)},
                 f"process-group timeouts {timeouts} != {state.config.distributed_timeout_minutes} min")
    student, loss = _build_opd_student(workdir, sizes, state, device)
    exp = _opd_experience(sizes.bench_tokens, sizes.bench_model["vocab_size"])
    times, losses, step_time, _ = _timed_train_steps(student, loss, exp, state, device, sizes)
    flops = model_flops_per_step(sizes.bench_model, sizes.bench_tokens)
    achieved = flops["total_flops"] / step_time
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    check.put(model=sizes.bench_model, tokens_per_micro_batch=sizes.bench_tokens, step_times_s=times,
              median_step_s=step_time, tokens_per_s=sizes.bench_tokens / step_time, **flops,
              achieved_tflops=achieved / 1e12, measured_bf16_peak_tflops=peak / 1e12, mfu=achieved / peak,
              peak_matmul_n=sizes.peak_n, losses=losses, max_memory_gib=memory,
              flops_formula="6*N*T + 6*L*H*d_h*T^2 (N: matmul params incl. LM head; causal attention half)")
    check.expect(all(math.isfinite(v) for v in losses), f"non-finite train-step loss: {losses}")
    check.expect(0 < achieved / peak <= 1.0, f"MFU {achieved / peak:.3f} is outside (0, 1]: timing or FLOPs are wrong")


# ---------------------------------------------------------------- MoE


def moe_active_flops_per_step(cfg: dict, tokens: int) -> dict:
    """6·N_active·T + 6·L·H·d_h·T² for one sequence of ``tokens`` (see the module docstring)."""
    layers, d, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    kv, dh, vocab = cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]
    experts, topk, ff = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    active = layers * (2 * d * heads * dh + 2 * d * kv * dh + d * experts + topk * 3 * d * ff) + d * vocab
    total = layers * (2 * d * heads * dh + 2 * d * kv * dh + d * experts + experts * 3 * d * ff) + d * vocab
    dense = 6 * active * tokens
    attention = 6 * layers * heads * dh * tokens ** 2
    return {"active_matmul_params": active, "total_matmul_params": total, "dense_flops": dense,
            "attention_flops": attention, "total_flops": dense + attention}


def _moe_parity(device: torch.device) -> float:
    """Max |logit error| of a tiny Qwen3-MoE (8 experts, top-2) built by the trainer on ``device`` (fp32)
    against HF transformers' fp32 forward on the CPU."""
    from megatron_opd.models import build_qwen3_model, forward_logits, load_hf_weights
    from megatron_opd.models.tiny import tiny_qwen3_moe_config, tiny_qwen3_moe_model
    from megatron_opd.platform import ParallelConfig, initialize_distributed

    config = tiny_qwen3_moe_config()
    hf = tiny_qwen3_moe_model(config, seed=3)
    state = initialize_distributed(ParallelConfig())
    chunks = build_qwen3_model(config, state.config, dtype=torch.float32)
    load_hf_weights(chunks, hf.state_dict(), config)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
    got = forward_logits(chunks, ids.to(device))[..., :config.vocab_size].float().cpu()
    return _max_err(got, expected)


def section_moe(check: Check, args, device: torch.device, workdir: Path, sizes: Sizes) -> None:
    import gc

    from megatron_opd.platform import ParallelConfig, initialize_distributed

    parity = _moe_parity(device)
    check.put(tiny_logit_max_err_vs_hf=parity)
    check.expect(parity < 1e-2, f"tiny Qwen3-MoE logits differ from HF by {parity:.3g} (fp32; allowed 1e-2)")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    peak = measure_bf16_peak(device, sizes.peak_n)
    state = initialize_distributed(ParallelConfig())
    student, loss = _build_opd_student(workdir, sizes, state, device, moe=True)
    exp = _opd_experience(sizes.moe_tokens, sizes.moe_model["vocab_size"])
    times, losses, step_time, result = _timed_train_steps(student, loss, exp, state, device, sizes)
    flops = moe_active_flops_per_step(sizes.moe_model, sizes.moe_tokens)
    achieved = flops["total_flops"] / step_time
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    check.put(model=sizes.moe_model, expert_model_parallel_size=1, tokens_per_micro_batch=sizes.moe_tokens,
              step_times_s=times, median_step_s=step_time, tokens_per_s=sizes.moe_tokens / step_time, **flops,
              achieved_tflops=achieved / 1e12, measured_bf16_peak_tflops=peak / 1e12, mfu=achieved / peak,
              losses=losses, max_memory_gib=memory, router_load={k: v for k, v in result.items() if k.startswith("moe_")},
              flops_formula="6*N_active*T + 6*L*H*d_h*T^2 (N_active: attention, router, top-k experts, LM head)")
    check.expect(all(math.isfinite(v) for v in losses), f"non-finite MoE train-step loss: {losses}")
    check.expect(0 < achieved / peak <= 1.0, f"MoE MFU {achieved / peak:.3f} is outside (0, 1]")
    del student, loss
    gc.collect()


# ---------------------------------------------------------------- main


def _all_sections() -> dict:
    return {"environment": lambda c, a, d, w, s: section_environment(c, a, d, w),
            "bf16_load_resume": section_bf16_load_resume, "vocab_parallel_ops": section_vocab_parallel_ops,
            "engines": section_engines, "te_parity": section_te_parity, "throughput_mfu": section_throughput_mfu,
            "chunked_head": section_chunked_head, "moe": section_moe}


def _write_report(path: Path, report: dict, start: float) -> None:
    report["total_seconds"] = round(time.time() - start, 1)
    report["passed"] = all(s["passed"] for s in report["sections"].values()) and bool(report["sections"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = TINY if args.tiny else FULL
    device = torch.device(args.device)
    chosen = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    start = time.time()
    cleanup = contextlib.ExitStack()
    workdir = args.workdir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "tiny": args.tiny, "sizes": asdict(sizes), "sections": {}}
    functions = _all_sections()
    with cleanup:
        # environment first (the wheel install must precede any import of the project's dependencies), then
        # the subprocess section, then the in-process ones; the report is rewritten after every section so
        # a run killed by a time limit still leaves what it measured
        for name in SECTIONS:
            if name not in chosen:
                continue
            if time.time() - start > args.budget:
                report["sections"][name] = {"passed": False, "seconds": 0.0,
                                            "error": f"not run: the {args.budget:.0f} s budget was spent"}
                continue
            report["sections"][name] = run_section(name, functions[name], args, device, workdir, sizes)
            _write_report(args.out, report, start)
    with contextlib.suppress(Exception):
        from megatron_opd.platform import destroy_distributed

        destroy_distributed()
    _write_report(args.out, report, start)
    print(f"[gpu_check] {'PASSED' if report['passed'] else 'FAILED'} in {report['total_seconds']} s; report: {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
