"""Planning a study's runs: the flags of every run (base recipe, overrides, SFT control), the
evaluations, and the cache keys that let a re-run train nothing twice."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.recipes.common import DemoRecipe, prepare_models, quick_recipe


def flags_key(flags: dict) -> str:
    """Short stable hash of a run's flags (the run cache key)."""
    return hashlib.sha256(json.dumps(flags, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass(kw_only=True)
class EvalSpec:
    """One kind of evaluation: which benchmarks, how many problems and samples."""

    name: str
    benchmarks: tuple[str, ...]
    n: int
    limit: int | None
    max_new_tokens: int
    data_dir: str | None = None


def curve_steps(train_iters: int, every: int) -> tuple[int, ...]:
    """Snapshot steps strictly inside the run (the final model is the run's own export)."""
    return tuple(range(every, train_iters, every)) if every else ()


CALIBRATION_STEPS = 6


def calibration_flags(sft_flags: dict, seed: int) -> dict:
    return {**sft_flags, "--train-iters": CALIBRATION_STEPS, "--seed": seed}


DATA_FLAGS = ("--data-path", "--prompt-field", "--answer-field", "--solution-field", "--max-prompt-length",
              "--chat-template", "--no-chat-template", "--enable-thinking", "--instruction")
"""Trainer flags that say what the prompts are and how they are rendered."""


def build_sft_flags(recipe: DemoRecipe | None, base: dict, lr: float | None) -> dict:
    """Continued SFT of the student on the training solutions (the recipe's SFT batch and betas)."""
    sft = dict(recipe.sft) if recipe is not None else {"--prompts-per-rollout": 64, "--adam-beta2": 0.95}
    batch = int(sft.get("--prompts-per-rollout", 64))
    # The prompts must look as in OPD (e.g. raw chain prompts: --no-chat-template), or the control
    # trains on another prompt format than the one it is evaluated on.
    data = {key: base[key] for key in DATA_FLAGS if key in base}
    flags = {**data, "--tensor-model-parallel-size": base.get("--tensor-model-parallel-size", 1),
             "--objective": "sft", "--gate": "none", "--epochs-per-rollout": 1, "--minibatches-per-rollout": 1,
             "--prompts-per-rollout": batch, "--micro-batch-size": batch, "--adam-beta2": sft.get("--adam-beta2", 0.95),
             "--lr": lr if lr is not None else sft.get("--min-lr", sft.get("--lr", 1e-3)),
             "--lr-warmup-iters": base.get("--lr-warmup-iters", 0), "--no-progress": True}
    return flags


def recipe_setup(args) -> tuple[dict, Path, DemoRecipe]:
    """Base flags and student of the embedded recipe (teacher/student cached like ``megatron-opd demo``)."""
    recipe = quick_recipe() if args.quick else DemoRecipe()
    teacher_dir, student_dir, data_path = prepare_models(recipe, Path(args.workdir), Path(args.cache_dir) / "demo")
    base = {**recipe.opd, "--data-path": str(data_path), "--teacher-hf": str(teacher_dir),
            "--rollout-url": "local", "--teacher-url": "local", "--tensor-model-parallel-size": args.nproc,
            "--gate-span-delimiter": recipe.span_delimiter, "--no-progress": True}
    return base, student_dir, recipe


def apply_overrides(base: dict, args) -> dict:
    """--train-iters, --reuse EPOCHSxMINIBATCHES and --set JSON on top of the recipe's OPD flags."""
    base = dict(base)
    if args.train_iters:
        base["--train-iters"] = args.train_iters
    if args.reuse:
        epochs, _, minibatches = args.reuse.partition("x")
        base["--epochs-per-rollout"], base["--minibatches-per-rollout"] = int(epochs), int(minibatches)
        sequences = int(base["--prompts-per-rollout"]) * int(base["--samples-per-prompt"])
        base["--micro-batch-size"] = min(int(base.get("--micro-batch-size", 1)), sequences // int(minibatches))
    if args.set:
        base.update(json.loads(args.set))
    return base


def eval_specs(args, recipe, base) -> tuple[EvalSpec, EvalSpec | None, EvalSpec | None]:
    """The test, validation (lr sweep) and learning-curve evaluations of the command line's study."""
    max_new = int(base.get("--max-new-tokens", 4096))
    default_bench = getattr(recipe, "test_benchmark", "toy") if recipe is not None else "toy"
    test_bench = tuple(filter(None, (args.benchmarks or default_bench).split(",")))
    limit = args.eval_limit or (recipe.eval_problems if recipe is not None else None)
    common = {"n": args.eval_n, "max_new_tokens": max_new, "data_dir": args.data_dir}
    test = EvalSpec(name="test", benchmarks=test_bench, limit=limit, **common)
    val_bench = tuple(filter(None, (args.val_benchmarks or "").split(",")))
    val = EvalSpec(name="val", benchmarks=val_bench, limit=args.val_limit or limit, **common) if val_bench else None
    curve = None
    if args.curve_every:
        curve_bench = tuple(filter(None, (args.curve_benchmarks or "").split(","))) or val_bench or test_bench
        kind = "val" if curve_bench == val_bench else ("test" if curve_bench == test_bench else "curve")
        curve = EvalSpec(name=f"curve-{kind}", benchmarks=curve_bench, limit=args.curve_limit, **common)
    return test, val, curve


def model_salt(*model_dirs) -> str:
    """Size and mtime of the weights: a run cache entry is stale once a checkpoint is rewritten in place."""
    stamps = []
    for model_dir in filter(None, model_dirs):
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            stat = path.stat()
            stamps.append([str(path), stat.st_size, stat.st_mtime_ns])
    return flags_key({"models": stamps})
