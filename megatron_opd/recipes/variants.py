"""The paper's comparison: train each variant from the same student with the same step budget and
seeds, evaluate each, and report mean ± 95% t-interval over seeds, paired differences, learning
curves and the gate statistics by update index within a rollout.

Variants are data: a JSON list of ``{"name": ..., "flags": {"--flag": value, ...}}`` (``flags``
null = the untrained student), or a preset name: ``six`` (the paper's six variants, the default)
or ``ablations`` (LSM with block sizes 16/32/64/128, token and sequence gates, τ 0.5/1/2/4).

One study, in order (each step optional):
1. ``--lr-sweep``: per objective, a short run per learning rate (no gate, one seed) evaluated on the
   **validation** benchmarks; the best validation pass@n sets that objective's lr for every variant
   that does not fix ``--lr`` itself (choosing on the ungated variant favours the baseline, if anything);
2. every (variant, seed): train, evaluate on the test benchmarks; with ``--curve-every`` also HF
   snapshots every that many steps, evaluated on ``--curve-limit`` problems of the curve benchmarks;
3. ``--sft-control``: continued SFT of the same student for the same wall time per seed as the mean
   OPD run of that seed (the step count comes from a short timed SFT calibration run);
4. the report (``study.md``, ``study.json``, PNGs) in ``--workdir``.

Runs are cached by their flags (``WORKDIR/runs/<hash>/seed<k>``): a re-run, or a second study in the
same workdir (the ablations share LSM and LSM + Block64 with the six variants), trains nothing twice.
On CPU the base is the embedded recipe of ``megatron-opd demo`` (its cached teacher and student); on
GPUs pass ``--base-flags FILE.json --student-hf DIR --benchmarks aime24,aime25,math500,amc23``.

This module is the command line and the study's order of work; the pieces live in ``presets``
(variants, pairs), ``variants_plan`` (flags, evaluations, cache keys), ``variants_run`` (training
queue, caches, one run) and ``lr_sweep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from megatron_opd.recipes.lr_sweep import parse_lr_grid, sweep_learning_rates, with_objective_lr
from megatron_opd.recipes.presets import (
    ABLATION_VARIANTS,
    BLOCK64,
    DEFAULT_PAIRS,
    DEFAULT_VARIANTS,
    PRESETS,
    SFT_CONTROL,
    default_pairs,
    load_variants,
)
from megatron_opd.recipes.study_report import write_study_report
from megatron_opd.recipes.variants_plan import (
    EvalSpec,
    apply_overrides,
    build_sft_flags,
    calibration_flags,
    eval_specs,
    model_salt,
    recipe_setup,
)
from megatron_opd.recipes.variants_run import (
    Study,
    TrainingFailed,
    TrainQueue,
    evaluation_threads,
    run_flags_of,
    run_sft_control,
    sft_calibration,
    snapshots_for,
    train_and_evaluate,
    worker_threads,
)

# The names this module had before it was split (presets, planning, running, lr sweep), still importable here.
__all__ = ["ABLATION_VARIANTS", "BLOCK64", "DEFAULT_PAIRS", "DEFAULT_VARIANTS", "PRESETS", "SFT_CONTROL", "EvalSpec",
           "Study", "TrainQueue", "TrainingFailed", "build_parser", "build_sft_flags", "default_pairs",
           "evaluation_threads", "load_variants", "main", "parse_lr_grid", "run_study", "worker_threads"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-opd variants", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--variants", help="preset (six | ablations | async) or JSON list of {name, flags}; default: six")
    add("--only", help="comma-separated variant names to run")
    add("--seeds", default="1,2,3", help="comma-separated seeds (CPU: several, for mean ± CI)")
    add("--workdir", default="runs/variants")
    add("--cache-dir", default=os.environ.get("MEGATRON_OPD_CACHE", str(Path.home() / ".cache" / "megatron_opd")))
    add("--quick", action="store_true", help="tiny settings (pipeline check)")
    add("--base-flags", help="JSON of train flags for real runs (student, teacher, URLs, data)")
    add("--student-hf", help="with --base-flags: the student HF dir every variant starts from")
    add("--benchmarks", help="TEST benchmarks (default: the recipe's, e.g. toy)")
    add("--val-benchmarks", help="VALIDATION benchmarks: the lr sweep and (by default) the learning curves")
    add("--data-dir", help="local benchmark JSONL copies")
    add("--train-iters", type=int, help="optimizer-step budget of every trained variant (the paper: 200)")
    add("--reuse", help="EPOCHSxMINIBATCHES per rollout, e.g. 4x4 (16 optimizer steps on each rollout)")
    add("--set", help='JSON of extra train flags for every OPD run, e.g. \'{"--lr-warmup-iters": 4}\'')
    add("--nproc", type=int, default=2, help="processes (= TP degree on the embedded recipe) per training run")
    add("--eval-n", type=int, default=8)
    add("--eval-limit", type=int, help="test problems per benchmark (default: the recipe's / all)")
    add("--lr-sweep", help="per-objective lr grid on VALIDATION, e.g. 'sampled=1e-4,3e-4,1e-3;lsm=3e-4,1e-3;sft=1e-3'")
    add("--sweep-iters", type=int, help="steps of each sweep run (default: the study's budget)")
    add("--sweep-seed", type=int, default=0)
    add("--sweep-only", action="store_true", help="run the lr sweep, write its report and stop")
    add("--sweep-from", help="take the lr sweep (and its choices) from an earlier report JSON instead of running it")
    add("--val-limit", type=int, help="validation problems for the sweep (default: --eval-limit)")
    add("--curve-every", type=int, default=0, help="learning curve: HF snapshot every N steps (0: off)")
    add("--curve-limit", type=int, default=32, help="problems per curve evaluation")
    add("--curve-benchmarks", help="benchmarks of the learning curve (default: --val-benchmarks, else test)")
    add("--curve-seeds", help="comma-separated seeds that get a learning curve (default: all; evaluation is costly)")
    add("--sft-control", action="store_true", help="continued SFT of the student at equal wall time per seed")
    add("--sft-lr", type=float, help="lr of the SFT control (default: the sweep's 'sft' choice, else the recipe's)")
    add("--title", default="Six-variant study", help="report title")
    add("--report-dir", help="where the report goes (default: --workdir), e.g. docs/results")
    add("--report-name", default="variants", help="report file stem: NAME.md, NAME.json, NAME_*.png")
    add("--notes", help="Markdown file of notes put near the top of the report (what the numbers mean, caveats)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    variants = load_variants(args.variants, args.only.split(",") if args.only else None)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.base_flags:
        base, student_dir, recipe = json.loads(Path(args.base_flags).read_text()), Path(args.student_hf), None
    else:
        base, student_dir, recipe = recipe_setup(args)
    base = apply_overrides(base, args)
    test, val, curve = eval_specs(args, recipe, base)
    from megatron_opd.eval.grading import GradingPool

    command = "megatron-opd variants " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report_dir, report_name = Path(args.report_dir or workdir), args.report_name

    def report(data: dict) -> dict:
        notes = Path(args.notes).read_text() if args.notes and Path(args.notes).exists() else None
        places = {"WORKDIR": str(workdir), "CACHE_DIR": args.cache_dir}  # placeholders in the report
        return write_study_report({**data, "command": command, "notes": notes, "places": places}, report_dir,
                                  report_name, title=args.title)

    import torch

    torch.set_num_threads(evaluation_threads(args.nproc))
    with GradingPool(num_workers=2) as pool:
        queue = TrainQueue(workdir / f"queue-{os.getpid()}", args.nproc)
        study = Study(base_flags=base, student_hf=student_dir, workdir=workdir, queue=queue, pool=pool,
                      test=test, val=val, curve=curve, curve_every=args.curve_every,
                      curve_seeds=tuple(int(x) for x in args.curve_seeds.split(",")) if args.curve_seeds else None,
                      salt=model_salt(student_dir, base.get("--teacher-hf")))
        try:
            paths = report(run_study(study, args, variants, seeds, recipe, on_update=report))
        except BaseException:
            queue.kill()  # do not let the worker drain a queue nobody will read
            raise
        queue.close()
    print(paths["markdown"].read_text())
    return 0


def run_study(study: Study, args, variants: list[dict], seeds: list[int], recipe, on_update=None) -> dict:
    """Sweep → variants × seeds → SFT control; returns the study record. ``on_update(record)`` is called
    after every finished (variant, seed), so a long study leaves a partial report behind."""
    base = study.base_flags
    data = {"variants": [{"name": v["name"], "flags": v["flags"]} for v in variants], "results": {},
            "pairs": default_pairs(variants), "seeds": seeds, "base_flags": base, "sweep": None, "lrs": {},
            "sft_calibration": None, "student_hf": str(study.student_hf), "n": study.test.n,
            "curve_every": study.curve_every,
            "eval": {k: vars(spec) if spec else None for k, spec in
                     (("test", study.test), ("val", study.val), ("curve", study.curve))}}
    update = on_update or (lambda record: None)
    sft_flags = build_sft_flags(recipe, base, args.sft_lr)
    if args.sweep_from:
        data["sweep"] = json.loads(Path(args.sweep_from).read_text())["sweep"]
        data["sweep"]["source"] = args.sweep_from
    elif args.lr_sweep:
        grid = parse_lr_grid(args.lr_sweep)
        data["sweep"] = sweep_learning_rates(study, grid, args.sweep_iters or int(base["--train-iters"]),
                                             args.sweep_seed, sft_flags)
    if data["sweep"]:
        data["lrs"] = data["sweep"]["chosen"]
        if args.sft_lr is None and "sft" in data["lrs"]:
            sft_flags["--lr"] = data["lrs"]["sft"]
        update(data)
        if args.sweep_only:
            return data
    flags_by_name = {v["name"]: with_objective_lr(v["flags"], base, data["lrs"]) for v in variants}
    # Queue every training up front, seed-major (complete seeds first: paired differences exist early),
    # so the worker trains while this process evaluates.
    if args.sft_control:
        study.submit(calibration_flags(sft_flags, args.sweep_seed))
    for seed in seeds:
        for flags in flags_by_name.values():
            if flags is not None:
                run_flags = run_flags_of(study, flags, seed)
                study.submit(run_flags, snapshots_for(study, run_flags))
    for seed in seeds:
        for name, flags in flags_by_name.items():
            data["results"].setdefault(name, {})[str(seed)] = train_and_evaluate(study, name, flags, seed)
            update(data)
    if args.sft_control:
        data["sft_calibration"] = sft_calibration(study, sft_flags, args.sweep_seed)
        data["variants"].append({"name": SFT_CONTROL, "flags": sft_flags})
        data["results"][SFT_CONTROL] = {}
        opd = {name: {int(s): r for s, r in runs.items()} for name, runs in data["results"].items()
               if name != SFT_CONTROL}
        for seed in seeds:
            result = run_sft_control(study, sft_flags, seed, opd, data["sft_calibration"])
            if result is not None:
                data["results"][SFT_CONTROL][str(seed)] = result
                update(data)
    return data
