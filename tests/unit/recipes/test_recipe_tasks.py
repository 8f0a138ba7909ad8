"""Per-task settings of the embedded recipes: the spans gate must split a task's solutions at its steps."""

from pathlib import Path

import pytest

from megatron_opd.data.chain_task import STEPS, generate_chain_problems
from megatron_opd.data.toy_task import generate_toy_problems
from megatron_opd.recipes import variants_plan, variants_run
from megatron_opd.recipes.common import TASKS, DemoRecipe, quick_recipe

GENERATORS = {"chain": generate_chain_problems, "toy": generate_toy_problems}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_span_delimiter_splits_every_solution_into_its_steps(task):
    delimiter = DemoRecipe(task=task, assets=None).span_delimiter
    for record in GENERATORS[task](20, seed=3, split="train"):
        steps = record["solution"].split(delimiter)
        assert len(steps) >= 2 and all(steps), (task, record["solution"])
        if task == "chain":
            assert len(steps) == STEPS + 1  # nine step lines and the boxed answer


@pytest.mark.parametrize("recipe", [DemoRecipe(), quick_recipe()], ids=["chain", "toy"])
def test_variants_base_flags_use_the_tasks_delimiter(recipe, monkeypatch, tmp_path):
    """The study's spans variant gets the task's delimiter (chain: newline), not the toy's ';'
    (which never occurs in a chain solution, so every span would be the whole response)."""
    from megatron_opd.recipes.variants import build_parser

    monkeypatch.setattr(variants_plan, "prepare_models", lambda *a, **k: (Path("t"), Path("s"), Path("d.jsonl")))
    monkeypatch.setattr(variants_plan, "quick_recipe", lambda: recipe)
    monkeypatch.setattr(variants_plan, "DemoRecipe", lambda: recipe)
    args = build_parser().parse_args(["--workdir", str(tmp_path), "--quick"])
    base, _, _ = variants_plan.recipe_setup(args)
    assert base["--gate-span-delimiter"] == recipe.span_delimiter
    sample = GENERATORS[recipe.task](1, seed=0, split="train")[0]["solution"]
    assert base["--gate-span-delimiter"] in sample


def test_sft_control_renders_prompts_as_the_opd_runs_do():
    """The SFT control/sweep reads the same data, rendered the same way (chain: raw prompts, no
    chat template): with the template it trained on prompts it is never evaluated on."""
    recipe = DemoRecipe()
    base = {**recipe.opd, "--data-path": "d.jsonl", "--instruction": "Solve.", "--tensor-model-parallel-size": 2}
    flags = variants_plan.build_sft_flags(recipe, base, lr=1e-3)
    assert flags["--no-chat-template"] is True and recipe.opd["--no-chat-template"] is True
    assert flags["--data-path"] == "d.jsonl" and flags["--instruction"] == "Solve."
    assert flags["--objective"] == "sft" and flags["--lr"] == 1e-3


def test_a_restarted_study_records_runs_the_worker_finished(tmp_path):
    """A study killed after the worker trained a run but before it read the result: the restarted
    study records that run from its ``trained.json`` instead of training it again."""
    from megatron_opd.recipes.train_worker import TRAINED

    class NoQueue:
        def submit(self, flags, run_dir):
            raise AssertionError(f"queued again: {run_dir}")

    study = variants_run.Study(base_flags={}, student_hf=tmp_path / "s", workdir=tmp_path, queue=NoQueue(), pool=None,
                           test=None)
    flags = {"--objective": "lsm", "--seed": 1}
    _, run_dir = study._run_dir(flags, ())
    run_dir.mkdir(parents=True)
    (run_dir / TRAINED).write_text('{"ok": true, "wall_s": 12.5}')
    record = study.train(flags)
    assert record["wall_s"] == 12.5 and record["run_dir"] == str(run_dir)
    assert (run_dir / "run.json").exists()


def test_evaluation_leaves_the_workers_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(variants_run.os, "cpu_count", lambda: 8)
    assert variants_run.worker_threads(2) == "4" and variants_run.evaluation_threads(2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert variants_run.evaluation_threads(2) == 6
