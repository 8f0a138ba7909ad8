"""The demo's progress bar counts the training steps that run: with the shipped (or cached) teacher
and student there is no SFT phase, so its 800 steps are not shown as done at once."""

import tqdm

from megatron_opd.recipes import demo
from megatron_opd.recipes.common import DemoRecipe, quick_recipe, ready_models


class RecordingBar:
    """Stands in for tqdm: records the total and every update."""

    made: list["RecordingBar"] = []

    def __init__(self, total=None, disable=False, **kwargs):
        self.total, self.disable, self.updates = total, disable, []
        RecordingBar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.updates.append(n)

    def write(self, text):
        pass


def test_progress_plan_counts_only_phases_that_run():
    recipe = DemoRecipe()
    assert demo.progress_plan(recipe, sft_runs=False, opd_runs=True) == {"opd": 64}
    assert demo.progress_plan(recipe, sft_runs=True, opd_runs=True) == {"sft": 800, "opd": 64}
    assert demo.progress_plan(recipe, sft_runs=True, opd_runs=False) == {"sft": 800}
    assert demo.progress_plan(recipe, sft_runs=False, opd_runs=False) == {}


def test_ready_models_are_the_shipped_then_the_cached_ones(tmp_path):
    assert ready_models(DemoRecipe(), tmp_path)[2] == "shipped"
    assert ready_models(DemoRecipe(), tmp_path, from_scratch=True) is None
    recipe = quick_recipe()  # no shipped checkpoints
    assert ready_models(recipe, tmp_path) is None
    for name in ("teacher", "student"):
        (tmp_path / f"{name}-{recipe.fingerprint()}").mkdir()
        (tmp_path / f"{name}-{recipe.fingerprint()}" / "config.json").write_text("{}")
    teacher, student, source = ready_models(recipe, tmp_path)
    assert source == "cached" and teacher.name.startswith("teacher-") and student.name.startswith("student-")


def test_demo_with_shipped_models_counts_only_opd_steps(tmp_path, monkeypatch):
    """run_demo end to end with the training and evaluation replaced: each run_train advances the bar
    by its own steps, as the real one does from metrics.jsonl."""
    RecordingBar.made.clear()
    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)
    trained = []

    def fake_train(flags, nproc, run_dir, bar=None, **kwargs):
        trained.append(flags["--objective"])
        bar.update(int(flags["--train-iters"]))
        return 1.0

    monkeypatch.setattr(demo, "run_train", fake_train)
    monkeypatch.setattr(demo, "evaluate_models", lambda *args, **kwargs: {})
    monkeypatch.setattr(demo, "phase_times", lambda run_dir: {})
    demo.run_demo(DemoRecipe(), tmp_path / "work", tmp_path / "cache", sft_baseline=False)
    (bar,) = RecordingBar.made
    assert trained == ["lsm"]  # no SFT ran: the shipped teacher and student were used
    assert bar.total == 64 and bar.updates == [64]
