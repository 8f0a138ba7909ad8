"""The embedded CPU default of ``examples/run_block64.sh``: Block64-gated OPD on a laptop-sized task.

1. the long-horizon chain task (``data.chain_task``: 278-token responses, more than 4 blocks of
   64 tokens) written as a JSONL train file; its test split is the ``chain`` benchmark;
2. a tiny Qwen3 teacher and its early SFT snapshot as the student, both trained by this trainer's
   ``sft`` objective and shipped in ``recipes/assets/chain`` (``--from-scratch`` retrains them);
3. LSM + Block64 OPD of the student from the teacher at TP=2 on CPU, in-process engines, with
   rollout reuse (2 epochs x 2 minibatches per rollout);
4. an honesty baseline: the same student given the same wall time of plain SFT instead;
5. pass@1 and pass@8 with 95% CIs on held-out test problems for every model, a plot, and the time
   of every phase.

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
    ASSET_RECORD,
    DemoRecipe,
    evaluate_hf_dir,
    phase_times,
    prepare_models,
    quick_recipe,
    ready_models,
    run_train,
    sft_flags,
    train_command,
)

MODEL_ROWS = (("teacher", "teacher"), ("student before OPD", "before"), ("student after OPD", "after"),
              ("student after SFT, same wall time", "sft_baseline"))

ASSET_ROWS = {"teacher": "teacher", "student before OPD": "student"}


def opd_flags(recipe: DemoRecipe, data_path: Path, teacher_dir: Path, student_dir: Path, out_dir: Path) -> dict:
    return {**recipe.opd, "--data-path": str(data_path), "--seed": recipe.seed,
            "--tensor-model-parallel-size": recipe.nproc, "--log-interval": 4, "--student-hf": str(student_dir),
            "--teacher-hf": str(teacher_dir), "--rollout-url": "local", "--teacher-url": "local",
            "--save-hf": str(out_dir)}


def sft_baseline_flags(recipe: DemoRecipe, data_path: Path, student_dir: Path, out_dir: Path) -> dict:
    """Continued SFT of the student on reference solutions at about the learning rate the SFT run had
    at the student's step (constant; a fresh optimizer, so a short warm-up); a snapshot every 5 steps
    so a wall-time stop keeps one."""
    lr, steps = sft_lr_at(recipe, recipe.student_snapshot_step), 10_000
    return {**sft_flags(recipe, data_path, student_dir, out_dir), "--train-iters": steps, "--lr": lr,
            "--min-lr": lr, "--lr-decay-style": "constant", "--lr-warmup-iters": 5, "--log-interval": 25,
            "--export-hf-at": ",".join(str(s) for s in range(5, steps, 5))}


def sft_lr_at(recipe: DemoRecipe, step: int) -> float:
    """The SFT run's learning rate at ``step`` (linear warm-up, then cosine to --min-lr)."""
    import math

    top, low = float(recipe.sft["--lr"]), float(recipe.sft.get("--min-lr", 0.0))
    warmup, total = int(recipe.sft.get("--lr-warmup-iters", 0)), int(recipe.sft["--train-iters"])
    if step < warmup:
        return top * step / warmup
    if recipe.sft.get("--lr-decay-style") != "cosine":
        return top
    return low + (top - low) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def run_sft_baseline(recipe: DemoRecipe, data_path: Path, student_dir: Path, workdir: Path, seconds: float,
                     say) -> Path | None:
    """SFT from the student for ``seconds`` of wall time (start-up included, as for OPD); the last
    snapshot written in time is the baseline model."""
    run_dir = workdir / "run_sft_baseline"
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = sft_baseline_flags(recipe, data_path, student_dir, run_dir / "final")
    run_train(flags, recipe.sft_nproc, run_dir, stop_after_s=seconds)
    snapshots = sorted(run_dir.glob("hf_step*"), key=lambda p: int(p.name[len("hf_step"):]))
    if not snapshots:
        say(f"sft baseline: no snapshot within {seconds:.0f} s; skipped")
        return None
    say(f"sft baseline: {snapshots[-1].name[len('hf_step'):]} SFT steps in {seconds:.0f} s")
    return snapshots[-1]


def evaluate_models(recipe: DemoRecipe, models: dict[str, Path], workdir: Path, benchmark: str,
                    limit: int | None = None) -> dict:
    """{row name: {pass@1, pass@n, ci: {metric: [low, high]}}} on ``benchmark``."""
    from megatron_opd.eval.grading import GradingPool

    n, results = recipe.eval_n, {}
    max_new = int(recipe.opd.get("--max-new-tokens", 128))
    with GradingPool(num_workers=2) as pool:
        for name, path in models.items():
            slug = dict(MODEL_ROWS).get(name, name)
            res = evaluate_hf_dir(path, workdir / "eval" / benchmark / slug, benchmarks=(benchmark,), n=n,
                                  seed=recipe.seed, limit=limit or recipe.eval_problems, max_new_tokens=max_new,
                                  data_dir=None, pool=pool, batch_problems=32)
            metrics = res["benchmarks"][benchmark]["metrics"]
            keys = ("pass@1", f"pass@{n}")
            results[name] = {k: metrics[k]["value"] for k in keys}
            results[name]["ci"] = {k: [metrics[k]["ci_low"], metrics[k]["ci_high"]] for k in keys}
    return results


def progress_plan(recipe: DemoRecipe, *, sft_runs: bool, opd_runs: bool) -> dict[str, int]:
    """{phase: optimizer steps} of the training phases that will run, in order: what the progress bar
    counts. Shipped or cached SFT checkpoints are no phase (not 800 steps done at once)."""
    plan = {}
    if sft_runs:
        plan["sft"] = recipe.sft_steps
    if opd_runs:
        plan["opd"] = int(recipe.opd["--train-iters"])
    return plan


def run_demo(recipe: DemoRecipe, workdir: Path, cache_dir: Path, *, from_scratch: bool = False,
             models_only: bool = False, sft_baseline: bool = True) -> dict:
    from tqdm import tqdm

    after_dir = workdir / "student_after_opd"
    sft_runs = ready_models(recipe, cache_dir, from_scratch=from_scratch) is None
    plan = progress_plan(recipe, sft_runs=sft_runs, opd_runs=not models_only)
    start = time.time()
    times: dict[str, float] = {}
    with tqdm(total=sum(plan.values()), desc="demo: " + " + ".join(f"{k} {v}" for k, v in plan.items()),
              unit="step", dynamic_ncols=True, disable=not plan) as bar:
        teacher_dir, student_dir, data_path = prepare_models(recipe, workdir, cache_dir, bar,
                                                             from_scratch=from_scratch)
        times["sft (teacher + student snapshot)"] = time.time() - start
        models = {"teacher": teacher_dir, "student before OPD": student_dir}
        if not models_only:
            shutil.rmtree(after_dir, ignore_errors=True)
            flags = opd_flags(recipe, data_path, teacher_dir, student_dir, after_dir)
            bar.write(f"opd: seed {recipe.seed}; command: "
                      f"{' '.join(train_command(flags, recipe.nproc, workdir / 'run_opd')[1:])}")
            times["opd"] = run_train(flags, recipe.nproc, workdir / "run_opd", bar)
            models["student after OPD"] = after_dir
    if sft_baseline and not models_only:
        t0 = time.time()
        baseline = run_sft_baseline(recipe, data_path, student_dir, workdir, times["opd"], print)
        times["sft baseline (same wall time as opd)"] = time.time() - t0
        if baseline is not None:
            models["student after SFT, same wall time"] = baseline
    t0 = time.time()
    results = evaluate_models(recipe, models, workdir, recipe.test_benchmark)
    times["eval"] = time.time() - t0
    summary = {"benchmark": recipe.test_benchmark, "eval_problems": recipe.eval_problems, "n": recipe.eval_n,
               "seed": recipe.seed, "results": results, "times": times,
               "models": {k: str(v) for k, v in models.items()}}
    if not models_only:
        summary["phase_times"] = phase_times(workdir / "run_opd")
    return summary


def _cell(res: dict, key: str) -> str:
    low, high = res["ci"][key]
    return f"{res[key]:.3f} [{low:.3f}, {high:.3f}]"


def format_table(summary: dict, n: int) -> str:
    rows = [f"| model | pass@1 [95% CI] | pass@{n} [95% CI] |", "|---|---|---|"]
    for name, res in summary["results"].items():
        rows.append(f"| {name} | {_cell(res, 'pass@1')} | {_cell(res, f'pass@{n}')} |")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in summary["times"].items())
    out = "\n".join(rows) + f"\n\nwall time: {times}\n"
    if summary.get("phase_times"):
        out += "OPD phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["phase_times"].items()) + "\n"
    return out


def verdict(summary: dict, n: int) -> str:
    """Whether OPD's gain is separated by the 95% CIs, in one sentence per metric."""
    res = summary["results"]
    if "student after OPD" not in res:
        return ""
    lines = []
    for key in ("pass@1", f"pass@{n}"):
        before, after = res["student before OPD"], res["student after OPD"]
        separated = after["ci"][key][0] > before["ci"][key][1]
        lines.append(f"{key}: {before[key]:.3f} -> {after[key]:.3f} "
                     f"({'CIs separated' if separated else 'CIs overlap: not separated'})")
    return "OPD gain " + "; ".join(lines) + "\n"


def plot_summary(summary: dict, n: int, path: Path) -> Path:
    """Bar chart: pass@1 and pass@n with 95% CIs per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["results"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key in zip(axes, ("pass@1", f"pass@{n}")):
        values = [summary["results"][m][key] for m in names]
        low = [v - summary["results"][m]["ci"][key][0] for m, v in zip(names, values)]
        high = [summary["results"][m]["ci"][key][1] - v for m, v in zip(names, values)]
        ax.bar(range(len(names)), values, yerr=[low, high], capsize=4,
               color=["#555555", "#c44e52", "#4c72b0", "#8c8c8c"][:len(names)])
        ax.set_xticks(range(len(names)), [m.replace("student ", "").replace(", ", ",\n") for m in names],
                      fontsize=8)
        ax.set_title(f"{key} on {summary['benchmark']} ({summary['eval_problems']} problems, 95% CI)")
        ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_assets(recipe: DemoRecipe, summary: dict, teacher_dir: Path, student_dir: Path, out: Path,
                sft_seconds: float | None, command: str) -> None:
    """Ship the teacher and student: HF dirs plus the recipe record (command, seed, measured pass@k)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, src in (("teacher", teacher_dir), ("student", student_dir)):
        dst = out / name
        if dst.resolve() != src.resolve():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.tmp", "__pycache__"))
    record = {"fingerprint": recipe.fingerprint(), "task": recipe.task, "seed": recipe.seed, "command": command,
              "sft_flags": recipe.sft, "sft_nproc": recipe.sft_nproc, "student_snapshot_step": recipe.student_snapshot_step,
              "teacher_snapshot_step": recipe.teacher_snapshot_step,
              "model": recipe.model.__dict__, "train_problems": recipe.train_problems, "sft_seconds": sft_seconds,
              "measured": summary["measured"]}
    (out / ASSET_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(assets_readme(record))


def assets_readme(record: dict) -> str:
    measured = record["measured"]
    n = measured["n"]
    lines = [f"# Shipped teacher and student of the `{record['task']}` demo task", "",
             "Both are HF Qwen3 checkpoints (safetensors + the character-level tokenizer) made by this",
             "project's own SFT (`megatron-opd train --objective sft`) in one run from random init: the teacher is",
             (f"its step-{record['teacher_snapshot_step']} snapshot" if record.get("teacher_snapshot_step")
              else "its end") + f", the student its step-{record['student_snapshot_step']} snapshot. Remake them with",
             "", f"    {record['command']}", "",
             f"seed {record['seed']}; SFT flags {json.dumps(record['sft_flags'])} at TP={record['sft_nproc']}; "
             f"model {json.dumps(record['model'])}; {record['train_problems']} training problems.",
             (f"The SFT run took {record['sft_seconds']:.0f} s to the teacher's step." if record.get("sft_seconds")
              else ""), "",
             f"Measured ({measured['eval_problems']} problems per split, {n} samples each, temperature 1, "
             f"eval seed {measured['eval_seed']}; 95% bootstrap CIs):", "",
             f"| split | model | pass@1 | pass@{n} |", "|---|---|---|---|"]
    for split, rows in measured.items():
        if not isinstance(rows, dict):
            continue
        for name, res in rows.items():
            lines.append(f"| {split} | {name} | {_cell(res, 'pass@1')} | {_cell(res, f'pass@{n}')} |")
    if record.get("provenance"):
        lines += ["", record["provenance"]]
    lines += ["", "`recipe.json` holds the same record; the demo uses these checkpoints only while its recipe's",
              "fingerprint equals the recorded one (otherwise it retrains them).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-opd demo", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (pipeline check for the tests)")
    parser.add_argument("--workdir", default="runs/demo", help="run outputs (data, logs, the trained student)")
    parser.add_argument("--cache-dir", default=os.environ.get("MEGATRON_OPD_CACHE",
                                                              str(Path.home() / ".cache" / "megatron_opd")),
                        help="SFT checkpoints trained here (keyed by the recipe) when the shipped ones do not apply")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train teacher and student by SFT from random init (ignore shipped and cached ones)")
    parser.add_argument("--models-only", action="store_true",
                        help="stop after preparing and evaluating the teacher and student (no OPD)")
    parser.add_argument("--save-assets", metavar="DIR",
                        help="write the teacher, student and their record (command, seed, pass@k) to DIR")
    parser.add_argument("--no-sft-baseline", action="store_true", help="skip the SFT-for-equal-wall-time baseline")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per evaluated model otherwise
    recipe = quick_recipe() if args.quick else DemoRecipe()
    workdir = Path(args.workdir)
    start = time.time()
    summary = run_demo(recipe, workdir, Path(args.cache_dir) / "demo", from_scratch=args.from_scratch,
                       models_only=args.models_only, sft_baseline=not (args.no_sft_baseline or args.quick))
    n = recipe.eval_n
    if args.save_assets:
        if recipe.val_benchmark:
            val = evaluate_models(recipe, {k: Path(v) for k, v in summary["models"].items()
                                           if k in ("teacher", "student before OPD")}, workdir, recipe.val_benchmark)
        else:
            val = {}
        def as_assets(rows: dict) -> dict:  # the record names the shipped models, not the demo's rows
            return {ASSET_ROWS.get(name, name): res for name, res in rows.items()}

        summary["measured"] = {recipe.test_benchmark: as_assets(summary["results"]),
                               **({recipe.val_benchmark: as_assets(val)} if val else {}),
                               "eval_problems": recipe.eval_problems, "n": n, "eval_seed": recipe.seed}
        sft_file = workdir / "sft_seconds.txt"
        seconds = float(sft_file.read_text()) if sft_file.exists() else None
        command = "megatron-opd demo --from-scratch --models-only --save-assets " + args.save_assets
        save_assets(recipe, summary, Path(summary["models"]["teacher"]), Path(summary["models"]["student before OPD"]),
                    Path(args.save_assets), seconds, command)
    table = format_table(summary, n)
    plot = plot_summary(summary, n, workdir / "demo.png")
    (workdir / "results.json").write_text(json.dumps(summary, indent=2))
    (workdir / "results.md").write_text(table)
    print(f"\n{summary['benchmark']}: {recipe.eval_problems} held-out test problems, {n} samples each "
          f"(temperature 1), seed {recipe.seed}\n\n{table}\n{verdict(summary, n)}")
    print(f"total {time.time() - start:.0f} s; results in {workdir}/results.md, plot {plot}")
    return 0
