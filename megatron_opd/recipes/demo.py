"""The embedded CPU default of ``examples/run_block64.sh``: everything on a laptop-sized task.

1. the synthetic toy task (``data.toy_task``) written as JSONL train/test files;
2. a tiny Qwen3 teacher trained on reference solutions by this trainer's ``sft`` objective (cached);
3. a weaker tiny student (a short SFT of the same kind, cached);
4. Block64-gated OPD of the student from the teacher at TP=2 on CPU, in-process engines;
5. pass@k on held-out problems for teacher, student before, student after — and, to stay honest
   about what OPD buys, a student given the same extra wall time of plain SFT instead.

Each training phase is a ``torchrun`` of ``megatron-opd train``; the recipe is data (``DemoRecipe``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from megatron_opd.recipes.common import (
    DemoRecipe,
    evaluate_hf_dir,
    phase_times,
    prepare_models,
    quick_recipe,
    run_train,
)


def run_demo(recipe: DemoRecipe, workdir: Path, cache_dir: Path) -> dict:
    from tqdm import tqdm

    from megatron_opd.eval.grading import GradingPool

    after_dir = workdir / "student_after_opd"
    total = int(recipe.sft["--train-iters"]) + int(recipe.opd["--train-iters"])
    start = time.time()
    with tqdm(total=total, desc="demo", unit="step", dynamic_ncols=True) as bar:
        teacher_dir, student_dir, data_path = prepare_models(recipe, workdir, cache_dir, bar)
        times = {"sft (teacher + student snapshot)": time.time() - start}
        opd_flags = {**recipe.opd, "--data-path": str(data_path), "--seed": recipe.seed,
                     "--tensor-model-parallel-size": recipe.nproc, "--log-interval": 10,
                     "--student-hf": str(student_dir), "--teacher-hf": str(teacher_dir),
                     "--rollout-url": "local", "--teacher-url": "local", "--save-hf": str(after_dir)}
        shutil.rmtree(after_dir, ignore_errors=True)
        times["opd"] = run_train(opd_flags, recipe.nproc, workdir / "run_opd", bar)
    start = time.time()
    max_new = int(recipe.opd.get("--max-new-tokens", 128))
    with GradingPool(num_workers=2) as pool:
        results = {}
        for name, slug, path in (("teacher", "teacher", teacher_dir), ("student before OPD", "before", student_dir),
                                 ("student after OPD", "after", after_dir)):
            res = evaluate_hf_dir(path, workdir / "eval" / slug, benchmarks=("toy",), n=recipe.eval_n,
                                  seed=recipe.seed, limit=recipe.eval_problems, max_new_tokens=max_new,
                                  data_dir=None, pool=pool)
            metrics = res["benchmarks"]["toy"]["metrics"]
            results[name] = {k: metrics[k]["value"] for k in ("pass@1", f"pass@{recipe.eval_n}")}
            results[name]["ci"] = [metrics[f"pass@{recipe.eval_n}"]["ci_low"],
                                   metrics[f"pass@{recipe.eval_n}"]["ci_high"]]
    times["eval"] = time.time() - start
    return {"results": results, "times": times, "phase_times": phase_times(workdir / "run_opd")}


def format_table(summary: dict, n: int) -> str:
    rows = [f"| model | pass@1 | pass@{n} |", "|---|---|---|"]
    for name, res in summary["results"].items():
        rows.append(f"| {name} | {res['pass@1']:.3f} | {res[f'pass@{n}']:.3f} |")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in summary["times"].items())
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in summary["phase_times"].items())
    return "\n".join(rows) + f"\n\nwall time: {times}\nOPD phases: {phases}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-opd demo", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (pipeline check for the tests)")
    parser.add_argument("--workdir", default="runs/demo", help="run outputs (data, logs, the trained student)")
    parser.add_argument("--cache-dir", default=os.environ.get("MEGATRON_OPD_CACHE",
                                                              str(Path.home() / ".cache" / "megatron_opd")),
                        help="teacher and student SFT checkpoints are cached here, keyed by the recipe")
    args = parser.parse_args(argv)
    recipe = quick_recipe() if args.quick else DemoRecipe()
    workdir = Path(args.workdir)
    start = time.time()
    summary = run_demo(recipe, workdir, Path(args.cache_dir) / "demo")
    table = format_table(summary, recipe.eval_n)
    (workdir / "results.json").write_text(json.dumps(summary, indent=2))
    (workdir / "results.md").write_text(table)
    print(f"\nheld-out toy problems: {recipe.eval_problems}, {recipe.eval_n} samples each\n\n{table}")
    print(f"total {time.time() - start:.0f} s; results in {workdir}/results.md")
    return 0
