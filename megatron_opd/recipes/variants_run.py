"""Running a study's runs: a queue feeding one long-lived training worker, the on-disk run and
evaluation caches (``Study``), and one (variant, seed) trained and evaluated, including the
continued-SFT control at equal wall time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_opd.recipes.common import evaluate_hf_dir, free_port
from megatron_opd.recipes.presets import SFT_CONTROL
from megatron_opd.recipes.train_worker import TRAINED, done_path, job_path
from megatron_opd.recipes.variants_plan import (
    CALIBRATION_STEPS,
    EvalSpec,
    calibration_flags,
    curve_steps,
    flags_key,
)


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
        index, self.count = self.count, self.count + 1
        tmp = self.dir / f"{index:05d}.tmp"
        tmp.write_text(json.dumps({"flags": flags, "run_dir": str(run_dir)}))
        os.replace(tmp, job_path(self.dir, index))  # atomic: the worker never reads half a job
        if self.proc is None:
            self._start()
        return index

    def _start(self) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron_opd.recipes.train_worker",
               str(self.dir), str(os.getpid())]
        threads = worker_threads(self.nproc)
        self.log = (self.dir / "worker.log").open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, OMP_NUM_THREADS=threads))

    def wait(self, index: int) -> dict:
        """The status of job ``index`` (``{"ok", "wall_s"}`` or ``{"ok": False, "error"}``)."""
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
