"""The learning-rate sweep of a study: per objective, a short run per learning rate (no gate, one
seed) evaluated on the VALIDATION benchmarks; the best validation pass@n sets that objective's lr for
every variant that does not fix ``--lr`` itself."""

from __future__ import annotations

from pathlib import Path

from megatron_opd.recipes.variants_run import Study, TrainingFailed, headline


def parse_lr_grid(text: str) -> dict[str, list[float]]:
    """``"sampled=1e-4,3e-4;lsm=3e-4,1e-3"`` -> {objective: [lr, ...]}."""
    grid = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        objective, _, values = part.partition("=")
        try:
            grid[objective.strip()] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError as e:
            raise ValueError(f"--lr-sweep: bad learning rate in {part!r} ({e}); expected OBJ=LR,LR;OBJ=LR") from e
        if not values.strip() or not grid[objective.strip()]:
            raise ValueError(f"--lr-sweep: {part!r} has no learning rates; expected OBJ=LR,LR;OBJ=LR")
    return grid


def objective_of(flags: dict | None, base_flags: dict) -> str | None:
    return None if flags is None else str(flags.get("--objective", base_flags.get("--objective", "sampled")))


def sweep_learning_rates(study: Study, grid: dict[str, list[float]], iters: int, seed: int,
                         sft_flags: dict) -> dict:
    """Per objective, the lr with the best validation pass@n (ties: pass@1, then the smaller lr)."""
    if study.val is None:
        raise ValueError("--lr-sweep needs --val-benchmarks: the learning rate is chosen on validation, never on test")
    n, table, chosen = study.val.n, {}, {}

    def sweep_flags(objective: str, lr: float) -> dict:
        flags = ({**sft_flags, "--lr": lr} if objective == "sft" else
                 {**study.base_flags, "--objective": objective, "--gate": "none", "--lr": lr})
        return {**flags, "--train-iters": iters, "--seed": seed}

    for objective, lrs in grid.items():
        for lr in lrs:
            study.submit(sweep_flags(objective, lr))
    for objective, lrs in grid.items():
        rows = []
        for lr in lrs:
            try:
                record = study.train(sweep_flags(objective, lr))
            except TrainingFailed as err:
                rows.append({"lr": lr, "pass@1": 0.0, f"pass@{n}": 0.0, "wall_s": 0.0, "failed": str(err)[-300:]})
                print(f"lr sweep {objective} lr={lr:g}: FAILED (counted as 0)", flush=True)
                continue
            res = study.evaluate(record["hf"], Path(record["run_dir"]) / "eval", seed, study.val)
            rows.append({"lr": lr, **headline(res, n), "wall_s": record["wall_s"]})
            print(f"lr sweep {objective} lr={lr:g}: validation {rows[-1]}", flush=True)
        best = max(rows, key=lambda r: (r[f"pass@{n}"], r["pass@1"], -r["lr"]))
        table[objective], chosen[objective] = rows, best["lr"]
    return {"chosen": chosen, "table": table, "iters": iters, "seed": seed, "student_hf": str(study.student_hf),
            "teacher_hf": study.base_flags.get("--teacher-hf"), "val": vars(study.val)}


def with_objective_lr(flags: dict | None, base: dict, lrs: dict[str, float]) -> dict | None:
    """The variant's flags with its objective's chosen lr, unless it fixes ``--lr`` itself."""
    objective = objective_of(flags, base)
    if flags is None or "--lr" in flags or objective not in lrs:
        return flags
    return {**flags, "--lr": lrs[objective]}
