"""The paper's comparison: train each variant from the same student with the same step budget and
seeds, evaluate each, and write one table (rows = variants, columns = benchmarks + mean, pass@k)
plus the gate statistics of every run.

Variants are data: a JSON list of ``{"name": ..., "flags": {"--flag": value, ...}}`` (``flags``
null = the untrained student). On CPU the default base is the embedded toy setting of
``megatron-opd demo`` (its cached teacher and student); on GPUs pass ``--base-flags FILE.json``
with the real student/teacher/SGLang settings and ``--benchmarks aime24,aime25,math500,amc23``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from megatron_opd.recipes.common import DemoRecipe, evaluate_hf_dir, prepare_models, quick_recipe, run_train

DEFAULT_VARIANTS: list[dict] = [
    {"name": "base (no training)", "flags": None},
    {"name": "sampled", "flags": {"--objective": "sampled", "--gate": "none"}},
    {"name": "sampled + Block64", "flags": {"--objective": "sampled", "--gate": "block", "--gate-block-size": 64}},
    {"name": "LSM", "flags": {"--objective": "lsm", "--gate": "none"}},
    {"name": "LSM + Block64", "flags": {"--objective": "lsm", "--gate": "block", "--gate-block-size": 64}},
    {"name": "LSM + newline spans", "flags": {"--objective": "lsm", "--gate": "span"}},
]


def load_variants(path: str | None, names: list[str] | None) -> list[dict]:
    variants = DEFAULT_VARIANTS if path is None else json.loads(Path(path).read_text())
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict) or "name" not in variant or "flags" not in variant:
            raise ValueError(f"{path or 'DEFAULT_VARIANTS'}[{i}]: each variant needs 'name' and 'flags' (null = untrained)")
    if names:
        unknown = set(names) - {v["name"] for v in variants}
        if unknown:
            raise ValueError(f"--only: unknown variant(s) {sorted(unknown)}; known: {[v['name'] for v in variants]}")
        variants = [v for v in variants if v["name"] in names]
    return variants


def gate_summary(run_dir: Path) -> dict:
    """Mean over steps of the gate statistics of one training run (empty without a gate)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = ("gate_std", "gate_min", "gate_max", "gate_raw_below_half", "abs_drift_mean", "loss", "reverse_kl")
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = sum(values) / len(values)
    return out


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run_variants(*, variants: list[dict], seeds: list[int], base_flags: dict, student_hf: Path, workdir: Path,
                 eval_fn, nproc: int, steps_flag_value: int | None = None) -> dict:
    """Train + evaluate every (variant, seed); returns {variant: [results per seed]} and gate stats."""
    results: dict[str, list[dict]] = {}
    gates: dict[str, list[dict]] = {}
    for variant in variants:
        for seed in seeds:
            run_dir = workdir / slug(variant["name"]) / f"seed{seed}"
            if variant["flags"] is None:
                model_dir = student_hf
            else:
                model_dir = run_dir / "hf"
                shutil.rmtree(run_dir, ignore_errors=True)
                flags = {**base_flags, **variant["flags"], "--seed": seed, "--student-hf": str(student_hf),
                         "--save-hf": str(model_dir)}
                if steps_flag_value:
                    flags["--train-iters"] = steps_flag_value
                run_train(flags, nproc, run_dir)
                gates.setdefault(variant["name"], []).append(gate_summary(run_dir))
            res = eval_fn(model_dir, run_dir / "eval", seed)
            results.setdefault(variant["name"], []).append(res)
            print(f"{variant['name']} seed {seed}: mean pass@k {res['mean']['metrics']}", flush=True)
    return {"results": results, "gates": gates}


def format_gate_table(gates: dict[str, list[dict]]) -> str:
    keys = ("gate_std", "gate_min", "gate_max", "gate_raw_below_half", "abs_drift_mean")
    rows = ["| variant (mean over steps and seeds) | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, per_seed in gates.items():
        cells = []
        for key in keys:
            values = [g[key] for g in per_seed if key in g]
            cells.append(f"{sum(values) / len(values):.4f}" if values else "—")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _toy_setup(args) -> tuple[dict, Path, object]:
    """Base flags, student dir and eval function of the embedded toy setting (teacher/student cached)."""
    recipe = quick_recipe() if args.quick else DemoRecipe()
    # Same cache as `megatron-opd demo`: the variants start from the demo's teacher and student.
    teacher_dir, student_dir, data_path = prepare_models(recipe, Path(args.workdir), Path(args.cache_dir) / "demo")
    # The toy solutions have no newlines: ';' ends each step, so it is the toy task's span delimiter.
    base = {**recipe.opd, "--data-path": str(data_path), "--teacher-hf": str(teacher_dir),
            "--rollout-url": "local", "--teacher-url": "local", "--tensor-model-parallel-size": recipe.nproc,
            "--gate-span-delimiter": ";", "--no-progress": True}
    return base, student_dir, recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-opd variants", description=__doc__.split("\n")[0])
    parser.add_argument("--variants", help="JSON list of {name, flags}; default: the six variants of the paper")
    parser.add_argument("--only", help="comma-separated variant names to run")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (CPU: several, for mean ± spread)")
    parser.add_argument("--workdir", default="runs/variants")
    parser.add_argument("--cache-dir", default=os.environ.get("MEGATRON_OPD_CACHE",
                                                              str(Path.home() / ".cache" / "megatron_opd")))
    parser.add_argument("--quick", action="store_true", help="tiny toy settings (pipeline check)")
    parser.add_argument("--base-flags", help="JSON of train flags for real runs (student, teacher, URLs, data)")
    parser.add_argument("--student-hf", help="with --base-flags: the student HF dir every variant starts from")
    parser.add_argument("--benchmarks", default="toy", help="benchmarks to evaluate on")
    parser.add_argument("--data-dir", help="local benchmark JSONL copies")
    parser.add_argument("--train-iters", type=int, help="override the step budget (the paper: 200)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per training run (torchrun)")
    parser.add_argument("--eval-n", type=int, default=8)
    parser.add_argument("--eval-limit", type=int, help="problems per benchmark (default: all)")
    args = parser.parse_args(argv)
    variants = load_variants(args.variants, args.only.split(",") if args.only else None)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    workdir = Path(args.workdir)
    if args.base_flags:
        base, student_dir = json.loads(Path(args.base_flags).read_text()), Path(args.student_hf)
        eval_limit, max_new = args.eval_limit, int(base.get("--max-new-tokens", 4096))
    else:
        base, student_dir, recipe = _toy_setup(args)
        eval_limit, max_new = args.eval_limit or recipe.eval_problems, int(recipe.opd["--max-new-tokens"])
    from megatron_opd.eval.grading import GradingPool
    from megatron_opd.eval.report import aggregate_seeds, format_seed_table, write_comparison

    benchmarks = tuple(b for b in args.benchmarks.split(",") if b)
    metric = f"pass@{args.eval_n}"
    with GradingPool(num_workers=2) as pool:
        def eval_fn(model_dir, out_dir, seed):
            return evaluate_hf_dir(model_dir, out_dir, benchmarks=benchmarks, n=args.eval_n, seed=seed,
                                   limit=eval_limit, max_new_tokens=max_new, data_dir=args.data_dir, pool=pool)

        out = run_variants(variants=variants, seeds=seeds, base_flags=base, student_hf=student_dir,
                           workdir=workdir, eval_fn=eval_fn, nproc=args.nproc, steps_flag_value=args.train_iters)
    aggregated = aggregate_seeds(out["results"], metric=metric)
    table = format_seed_table(aggregated, metric=metric) + "\n" + format_gate_table(out["gates"])
    write_comparison({f"{name} (seed {seeds[0]})": runs[0] for name, runs in out["results"].items()}, workdir, metric)
    (workdir / "variants.md").write_text(table)
    (workdir / "variants.json").write_text(json.dumps({"aggregated": aggregated, "gates": out["gates"],
                                                      "seeds": seeds}, indent=2))
    print(table)
    return 0
