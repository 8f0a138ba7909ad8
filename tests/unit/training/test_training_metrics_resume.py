"""metrics.jsonl on resume: lines a killed run logged past the resumed checkpoint are dropped, atomically."""

import json

from megatron_opd.training.metrics import MetricsLogger, drop_metrics_after


def _write(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in steps) + tail)


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_drop_keeps_lines_up_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2, 2, 3, 4], tail='{"step": 5, "lo')  # two lines at step 2 (step + sync); a cut-off line
    assert drop_metrics_after(path, 2) == 3
    assert _steps(path) == [1, 2, 2]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert drop_metrics_after(path, 2) == 0 and _steps(path) == [1, 2, 2]
    assert drop_metrics_after(tmp_path / "missing.jsonl", 3) == 0


def test_logger_started_at_a_step_logs_each_step_once(tmp_path):
    _write(tmp_path / "metrics.jsonl", [1, 2, 3])  # a killed run got to step 3; the checkpoint holds step 2
    log = MetricsLogger(str(tmp_path), enabled=True, total_steps=4, progress=False, start_step=2)
    for step in (3, 4):
        log.log(step, {"loss": 0.0}, summary=False)
    log.close()
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]
