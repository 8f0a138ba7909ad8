"""A long-lived training worker: one ``torchrun`` job runs many ``megatron-opd train`` configs in turn.

On a small CPU box, starting torchrun and initialising Megatron costs more than a short training run
(≈ 30-60 s against a few seconds of steps), and a study has dozens of runs. The variant runner puts
jobs in a queue directory; every rank of the worker takes them in numbering order (so all ranks run
the same job), reseeds every RNG from the job's own seed (a run must not depend on what ran before it
in the process), trains, and rank 0 writes ``NNNNN.done`` with the wall seconds of the run or the
traceback of its failure. The worker exits when ``stop`` exists and the queue is drained, or when
the parent process is gone.

usage: torchrun --nproc-per-node N -m megatron_opd.recipes.train_worker QUEUE_DIR PARENT_PID
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path


def job_path(queue_dir: Path, index: int) -> Path:
    return queue_dir / f"{index:05d}.json"


def done_path(queue_dir: Path, index: int) -> Path:
    return queue_dir / f"{index:05d}.done"


TRAINED = "trained.json"
"""Written into a run's directory once it trained: ``{"ok": true, "wall_s": ...}``."""


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _parent_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def _wait_for_job(queue_dir: Path, index: int, parent_pid: int) -> dict | None:
    """The job ``index`` once it exists; None when told to stop (or orphaned) with nothing left."""
    while True:
        if not _parent_alive(parent_pid):
            return None  # nobody will read the results: do not train the rest of the queue
        path = job_path(queue_dir, index)
        if path.exists():
            return json.loads(path.read_text())
        if (queue_dir / "stop").exists():
            return None
        time.sleep(0.5)


def run_job(job: dict, state) -> float:
    """Train one job on the shared process group; returns its wall seconds."""
    from megatron_opd.platform.parallel import _set_seeds
    from megatron_opd.recipes.common import flags_to_argv
    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.loop import run_training

    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = parse_config(flags_to_argv(job["flags"]) + ["--run-dir", str(run_dir), "--no-progress"])
    if cfg.parallel.tensor_model_parallel_size != state.config.tensor_model_parallel_size:
        raise ValueError(f"job {run_dir}: --tensor-model-parallel-size {cfg.parallel.tensor_model_parallel_size} "
                         f"differs from the worker's {state.config.tensor_model_parallel_size}")
    _set_seeds(dataclasses.replace(state.config, seed=cfg.optim.seed))
    start = time.time()
    with (run_dir / "train.log").open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run_training(cfg, state)
    return time.time() - start


def serve(queue_dir: Path, parent_pid: int) -> None:
    from megatron_opd.platform import destroy_distributed, initialize_distributed
    from megatron_opd.recipes.common import flags_to_argv
    from megatron_opd.training.cli import parse_config

    state, index = None, 0
    try:
        while (job := _wait_for_job(queue_dir, index, parent_pid)) is not None:
            if state is None:  # the first job's parallel layout is the worker's
                first = parse_config(flags_to_argv(job["flags"]) + ["--run-dir", job["run_dir"], "--no-progress"])
                state = initialize_distributed(first.parallel)
            try:
                status = {"ok": True, "wall_s": run_job(job, state)}
            except Exception:  # one bad run must not take the rest of the study with it
                status = {"ok": False, "error": traceback.format_exc()[-4000:]}
            if state.rank == 0:
                if status["ok"]:  # in the run dir too: a restarted study finds the run trained
                    _write_json(Path(job["run_dir"]) / TRAINED, status)
                _write_json(done_path(queue_dir, index), status)
            index += 1
    finally:
        if state is not None:
            destroy_distributed()


if __name__ == "__main__":
    from megatron_opd.platform.fallbacks import fallback_summary, quiet_megatron_fallbacks

    quiet_megatron_fallbacks()  # as `megatron-opd train`: one summary line, not a wall of warnings
    if os.environ.get("RANK", "0") == "0":
        print(fallback_summary(), file=sys.stderr, flush=True)
    serve(Path(sys.argv[1]), int(sys.argv[2]))
