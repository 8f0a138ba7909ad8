"""The variant runner's long-lived training worker: several runs in one torchrun job.

A run's result must not depend on what ran before it in the process (the runner caches runs by their
flags), and one failing run must not stop the ones queued after it.
"""

import json

from conftest import read_metrics

from megatron_opd.recipes.variants_run import TrainQueue


def test_runs_are_independent_of_order_and_failures_are_isolated(toy_models, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data, student, teacher = toy_models
    common = {"--student-hf": str(student), "--teacher-hf": str(teacher), "--data-path": str(data),
              "--rollout-url": "local", "--teacher-url": "local", "--objective": "lsm", "--topk": 8,
              "--gate": "block", "--gate-block-size": 16, "--train-iters": 4, "--epochs-per-rollout": 2,
              "--minibatches-per-rollout": 2, "--prompts-per-rollout": 4, "--samples-per-prompt": 2,
              "--micro-batch-size": 4, "--max-new-tokens": 24, "--lr": 1e-2}
    queue = TrainQueue(tmp_path / "queue", nproc=1)
    jobs = [("a", {**common, "--seed": 1}), ("bad", {**common, "--gate": "no-such-gate", "--seed": 1}),
            ("b", {**common, "--seed": 2, "--lr": 3e-2}), ("a_again", {**common, "--seed": 1})]
    indices = {name: queue.submit(flags, tmp_path / name) for name, flags in jobs}
    try:
        statuses = {name: queue.wait(index) for name, index in indices.items()}
    finally:
        queue.close()
    assert not statuses["bad"]["ok"] and "no-such-gate" in statuses["bad"]["error"]
    assert all(statuses[name]["ok"] and statuses[name]["wall_s"] > 0 for name in ("a", "b", "a_again")), statuses

    def trajectory(name):
        return [(r["loss"], r["abs_drift_mean"], r.get("gate_min")) for r in read_metrics(tmp_path / name)
                if "loss" in r]

    # Same flags after a different run (and a failed one) in the same process: the same run, bit for bit.
    assert len(trajectory("a")) == 4
    assert trajectory("a_again") == trajectory("a")
    assert trajectory("b") != trajectory("a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["optim"]["seed"] == 1
    # The worker's log: Megatron's TE/Apex fallbacks named once, not a wall of warnings.
    log = (tmp_path / "queue" / "worker.log").read_text()
    assert log.count("megatron-core fallbacks in use:") == 1 and "Falling back" not in log, log[:3000]
