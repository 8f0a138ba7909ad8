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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_opd.recipes.common import DemoRecipe, evaluate_hf_dir, prepare_models, quick_recipe
from megatron_opd.recipes.train_worker import TRAINED

BLOCK64 = {"--gate": "block", "--gate-block-size": 64}
DEFAULT_VARIANTS: list[dict] = [
    {"name": "base (no training)", "flags": None},
    {"name": "sampled", "flags": {"--objective": "sampled", "--gate": "none"}},
    {"name": "sampled + Block64", "flags": {"--objective": "sampled", **BLOCK64}},
    {"name": "LSM", "flags": {"--objective": "lsm", "--gate": "none"}},
    {"name": "LSM + Block64", "flags": {"--objective": "lsm", **BLOCK64}},
    {"name": "LSM + newline spans", "flags": {"--objective": "lsm", "--gate": "span"}},
]
ABLATION_VARIANTS: list[dict] = [
    {"name": "LSM", "flags": {"--objective": "lsm", "--gate": "none"}},
    {"name": "LSM + token gate", "flags": {"--objective": "lsm", "--gate": "token"}},
    *({"name": f"LSM + Block{n}", "flags": {"--objective": "lsm", "--gate": "block", "--gate-block-size": n}}
      for n in (16, 32, 64, 128)),
    {"name": "LSM + sequence gate", "flags": {"--objective": "lsm", "--gate": "sequence"}},
    *({"name": f"LSM + Block64 τ={tau:g}", "flags": {"--objective": "lsm", **BLOCK64, "--gate-tau": tau}}
      for tau in (0.5, 2.0, 4.0)),
]
PRESETS = {"six": DEFAULT_VARIANTS, "ablations": ABLATION_VARIANTS}
# Paired comparisons reported by default: (variant, reference) when both are in the study.
DEFAULT_PAIRS = [("sampled + Block64", "sampled"), ("LSM + Block64", "LSM"), ("LSM + newline spans", "LSM")]
SFT_CONTROL = "continued SFT (equal wall time)"


def load_variants(spec: str | None, names: list[str] | None) -> list[dict]:
    """A preset name, a JSON file of ``[{name, flags}]``, or None (the six variants)."""
    variants = PRESETS.get(spec or "six")
    if variants is None:
        variants = json.loads(Path(spec).read_text())
    for i, variant in enumerate(variants):
        if not isinstance(variant, dict) or "name" not in variant or "flags" not in variant:
            raise ValueError(f"{spec or 'six'}[{i}]: each variant needs 'name' and 'flags' (null = untrained)")
    if names:
        unknown = set(names) - {v["name"] for v in variants}
        if unknown:
            raise ValueError(f"--only: unknown variant(s) {sorted(unknown)}; known: {[v['name'] for v in variants]}")
        variants = [v for v in variants if v["name"] in names]
    return variants


def default_pairs(variants: list[dict]) -> list[tuple[str, str]]:
    """Paired comparisons for the report, in variant order: the paper's pairs, and every other LSM
    variant against ungated LSM."""
    names = {v["name"] for v in variants}
    known = dict(DEFAULT_PAIRS)
    pairs = []
    for v in variants:
        name = v["name"]
        if name in known and known[name] in names:
            pairs.append((name, known[name]))
        elif "LSM" in names and name != "LSM" and v["flags"] and v["flags"].get("--objective") == "lsm":
            pairs.append((name, "LSM"))
    return pairs


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


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


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


def worker_threads(nproc: int) -> str:
    """Threads per rank of the training worker: a caller's OMP_NUM_THREADS, else the cores split
    between the ranks."""
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))


def evaluation_threads(nproc: int) -> int:
    """Threads for this process's evaluations while the worker trains: the cores the worker leaves,
    at least one (both at full width oversubscribe the cores)."""
    return max(1, (os.cpu_count() or 1) - nproc * int(worker_threads(nproc)))


class TrainQueue:
    """Parent side of ``recipes.train_worker``: one long-lived torchrun job trains every run in turn.

    Started on the first submit; ``close`` lets it drain the queue and exit. Jobs run in submission
    order, so submitting a study's runs up front lets the worker train while this process evaluates.
    """

    def __init__(self, queue_dir: Path, nproc: int):
        self.dir, self.nproc, self.proc, self.count = queue_dir, nproc, None, 0
        shutil.rmtree(queue_dir, ignore_errors=True)
        queue_dir.mkdir(parents=True)

    def submit(self, flags: dict, run_dir: Path) -> int:
        from megatron_opd.recipes.train_worker import job_path

        index, self.count = self.count, self.count + 1
        tmp = self.dir / f"{index:05d}.tmp"
        tmp.write_text(json.dumps({"flags": flags, "run_dir": str(run_dir)}))
        os.replace(tmp, job_path(self.dir, index))  # atomic: the worker never reads half a job
        if self.proc is None:
            self._start()
        return index

    def _start(self) -> None:
        from megatron_opd.recipes.common import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron_opd.recipes.train_worker",
               str(self.dir), str(os.getpid())]
        threads = worker_threads(self.nproc)
        self.log = (self.dir / "worker.log").open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, OMP_NUM_THREADS=threads))

    def wait(self, index: int) -> dict:
        """The status of job ``index`` (``{"ok", "wall_s"}`` or ``{"ok": False, "error"}``)."""
        from megatron_opd.recipes.train_worker import done_path

        done = done_path(self.dir, index)
        while not done.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"training worker exited ({self.proc.returncode}) before job {index}; log "
                                   f"{self.dir / 'worker.log'}:\n{(self.dir / 'worker.log').read_text()[-3000:]}")
            time.sleep(0.5)
        return json.loads(done.read_text())

    def close(self) -> None:
        """Let the worker finish the queued jobs and exit."""
        (self.dir / "stop").touch()
        if self.proc is not None:
            self.proc.wait()
            self.log.close()

    def kill(self) -> None:
        (self.dir / "stop").touch()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # torchrun forwards SIGTERM to its ranks
            self.proc.wait()


class TrainingFailed(RuntimeError):
    """One training run failed (the worker goes on with the next)."""


@dataclass(kw_only=True)
class Study:
    """Everything the runs of one study share; ``train`` and ``evaluate`` cache on disk."""

    base_flags: dict
    student_hf: Path
    workdir: Path
    queue: TrainQueue
    pool: object
    test: EvalSpec
    val: EvalSpec | None = None
    curve: EvalSpec | None = None
    curve_every: int = 0
    curve_seeds: tuple[int, ...] | None = None
    """Seeds that get a learning curve (None: all)."""
    salt: str = ""
    """Fingerprint of the student/teacher weights, part of every cache key."""
    pending: dict = field(default_factory=dict)

    def _run_dir(self, flags: dict, snapshots: tuple[int, ...]) -> tuple[dict, Path]:
        flags = {**flags, "--student-hf": str(self.student_hf)}
        if snapshots:
            flags["--export-hf-at"] = ",".join(map(str, snapshots))
        return flags, self.workdir / "runs" / flags_key({**flags, "salt": self.salt}) / f"seed{flags['--seed']}"

    def submit(self, flags: dict, snapshots: tuple[int, ...] = ()) -> None:
        """Queue a run unless it is cached or already queued."""
        flags, run_dir = self._run_dir(flags, snapshots)
        if (run_dir / "run.json").exists() or str(run_dir) in self.pending:
            return
        if (run_dir / TRAINED).exists():  # trained by an earlier, interrupted study: record it
            self._record(flags, run_dir, json.loads((run_dir / TRAINED).read_text()))
            return
        shutil.rmtree(run_dir, ignore_errors=True)
        self.pending[str(run_dir)] = self.queue.submit({**flags, "--save-hf": str(run_dir / "hf")}, run_dir)

    def train(self, flags: dict, snapshots: tuple[int, ...] = ()) -> dict:
        """The record of a run (training it first unless cached). Raises TrainingFailed."""
        self.submit(flags, snapshots)
        flags, run_dir = self._run_dir(flags, snapshots)
        record_file = run_dir / "run.json"
        if record_file.exists():
            return json.loads(record_file.read_text())
        status = self.queue.wait(self.pending.pop(str(run_dir)))
        if not status["ok"]:
            raise TrainingFailed(f"training {run_dir} failed:\n{status['error']}")
        return self._record(flags, run_dir, status)

    @staticmethod
    def _record(flags: dict, run_dir: Path, status: dict) -> dict:
        record = {"flags": flags, "run_dir": str(run_dir), "hf": str(run_dir / "hf"), "wall_s": status["wall_s"]}
        (run_dir / "run.json").write_text(json.dumps(record, indent=2))
        return record

    def evaluate(self, model_dir: str | Path, out_dir: Path, seed: int, spec: EvalSpec) -> dict:
        """Evaluate (or load the cached results of) ``model_dir`` under ``spec``."""
        out_dir = out_dir / f"{spec.name}-n{spec.n}-l{spec.limit}-s{seed}"
        done, stamp = out_dir / "results.json", f"{model_dir} {self.salt}"
        if done.exists() and (out_dir / "model.txt").exists() and (out_dir / "model.txt").read_text() == stamp:
            return json.loads(done.read_text())
        results = evaluate_hf_dir(Path(model_dir), out_dir, benchmarks=spec.benchmarks, n=spec.n, seed=seed,
                                  limit=spec.limit, max_new_tokens=spec.max_new_tokens, data_dir=spec.data_dir,
                                  pool=self.pool, batch_problems=32)
        (out_dir / "model.txt").write_text(stamp)
        return results


def headline(results: dict, n: int) -> dict:
    """pass@1 and pass@n of the benchmark mean of one results dict."""
    metrics = results["mean"]["metrics"]
    return {"pass@1": metrics["pass@1"]["value"], f"pass@{n}": metrics[f"pass@{n}"]["value"]}


def update_index_stats(metrics_file: Path) -> dict[str, dict[int, float]]:
    """{metric: {update index within the rollout: mean over rollouts}} for the drift and gate metrics."""
    keys = ("abs_drift_mean", "abs_drift_max", "gate_std", "gate_min", "gate_max", "gate_raw_below_half")
    sums: dict[str, dict[int, list[float]]] = {k: {} for k in keys}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "update_in_rollout" not in row:
            continue
        for key in keys:
            if key in row:
                sums[key].setdefault(int(row["update_in_rollout"]), []).append(float(row[key]))
    return {k: {u: sum(v) / len(v) for u, v in sorted(per.items())} for k, per in sums.items() if per}


def curve_steps(train_iters: int, every: int) -> tuple[int, ...]:
    """Snapshot steps strictly inside the run (the final model is the run's own export)."""
    return tuple(range(every, train_iters, every)) if every else ()


def wants_curve(study: Study, seed: int) -> bool:
    return study.curve is not None and (study.curve_seeds is None or seed in study.curve_seeds)


def snapshots_for(study: Study, flags: dict) -> tuple[int, ...]:
    if not wants_curve(study, int(flags["--seed"])):
        return ()
    return curve_steps(int(flags["--train-iters"]), study.curve_every)


def run_flags_of(study: Study, flags: dict, seed: int) -> dict:
    return {**study.base_flags, **flags, "--seed": seed}


def train_and_evaluate(study: Study, name: str, flags: dict | None, seed: int) -> dict:
    """One (variant, seed): train, evaluate on test, and the learning curve on the curve benchmarks.
    A failed training (e.g. a diverged run) is recorded as ``{"seed", "failed"}``, not raised."""
    if flags is None:  # the untrained student: evaluated only (the seed varies its sampling)
        return evaluate_student(study, seed)
    run_flags = run_flags_of(study, flags, seed)
    steps = int(run_flags["--train-iters"])
    try:
        record = study.train(run_flags, snapshots_for(study, run_flags))
    except TrainingFailed as err:
        print(f"{name} seed {seed}: FAILED ({str(err).splitlines()[-1]})", flush=True)
        return {"seed": seed, "failed": str(err)[-1500:], "lr": run_flags.get("--lr")}
    run_dir = Path(record["run_dir"])
    res = study.evaluate(record["hf"], run_dir / "eval", seed, study.test)
    out = {"seed": seed, "test": headline(res, study.test.n), "wall_s": record["wall_s"], "run_dir": str(run_dir),
           "lr": run_flags.get("--lr"), "train_iters": steps,
           "update_stats": update_index_stats(run_dir / "metrics.jsonl")}
    if wants_curve(study, seed):
        points = evaluate_student(study, seed)["curve"]
        models = [(step, run_dir / f"hf_step{step}") for step in snapshots_for(study, run_flags)]
        for step, model in [*models, (steps, Path(record["hf"]))]:
            points.append([step, headline(study.evaluate(model, run_dir / "eval", seed, study.curve), study.curve.n)])
        out["curve"] = points
    print(f"{name} seed {seed}: test {out['test']} ({record['wall_s']:.0f} s)", flush=True)
    return out


def evaluate_student(study: Study, seed: int) -> dict:
    """The untrained student on test (and at step 0 of the learning curve)."""
    res = study.evaluate(study.student_hf, study.workdir / "base", seed, study.test)
    out = {"seed": seed, "test": headline(res, study.test.n), "wall_s": 0.0}
    if wants_curve(study, seed):
        curve_res = study.evaluate(study.student_hf, study.workdir / "base", seed, study.curve)
        out["curve"] = [[0, headline(curve_res, study.curve.n)]]
    return out


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


CALIBRATION_STEPS = 6


def calibration_flags(sft_flags: dict, seed: int) -> dict:
    return {**sft_flags, "--train-iters": CALIBRATION_STEPS, "--seed": seed}


def sft_calibration(study: Study, sft_flags: dict, seed: int) -> dict:
    """Build seconds and seconds per SFT step, from one short timed SFT run (cached)."""
    steps = CALIBRATION_STEPS
    record = study.train(calibration_flags(sft_flags, seed))
    times = [json.loads(line)["time"] for line in Path(record["run_dir"], "metrics.jsonl").read_text().splitlines()
             if line.strip() and "update_in_rollout" in json.loads(line)]
    per_step = (times[-1] - times[0]) / max(len(times) - 1, 1)
    return {"startup_s": max(record["wall_s"] - times[-1], 0.0), "step_s": max(per_step, 1e-3), "steps": steps}


def run_sft_control(study: Study, sft_flags: dict, seed: int, per_seed: dict[str, dict[int, dict]],
                    calibration: dict) -> dict | None:
    """Continued SFT for the mean wall time of this seed's OPD runs (None when it has none)."""
    walls = [runs[seed]["wall_s"] for runs in per_seed.values() if runs.get(seed, {}).get("wall_s", 0) > 0]
    if not walls:
        return None
    target = sum(walls) / len(walls)
    steps = max(1, round((target - calibration["startup_s"]) / calibration["step_s"]))
    result = train_and_evaluate(study, SFT_CONTROL, {**sft_flags, "--train-iters": steps}, seed)
    return {**result, "target_wall_s": target, "sft_steps": steps}


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


def _recipe_setup(args) -> tuple[dict, Path, DemoRecipe]:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-opd variants", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--variants", help="preset (six | ablations) or JSON list of {name, flags}; default: six")
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


def _eval_specs(args, recipe, base) -> tuple[EvalSpec, EvalSpec | None, EvalSpec | None]:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    variants = load_variants(args.variants, args.only.split(",") if args.only else None)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.base_flags:
        base, student_dir, recipe = json.loads(Path(args.base_flags).read_text()), Path(args.student_hf), None
    else:
        base, student_dir, recipe = _recipe_setup(args)
    base = apply_overrides(base, args)
    test, val, curve = _eval_specs(args, recipe, base)
    from megatron_opd.eval.grading import GradingPool
    from megatron_opd.recipes.study_report import write_study_report

    command = "megatron-opd variants " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report_dir, report_name = Path(args.report_dir or workdir), args.report_name

    def report(data: dict) -> dict:
        notes = Path(args.notes).read_text() if args.notes and Path(args.notes).exists() else None
        return write_study_report({**data, "command": command, "notes": notes}, report_dir, report_name,
                                  title=args.title)

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


def model_salt(*model_dirs) -> str:
    """Size and mtime of the weights: a run cache entry is stale once a checkpoint is rewritten in place."""
    stamps = []
    for model_dir in filter(None, model_dirs):
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            stat = path.stat()
            stamps.append([str(path), stat.st_size, stat.st_mtime_ns])
    return flags_key({"models": stamps})


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
