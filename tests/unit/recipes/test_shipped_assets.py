"""The demo's shipped teacher and student: they match the recipe, are small, ship as package data,
carry their record (command, seed, measured pass@k), and the teacher really solves the task."""

import fnmatch
import json
from pathlib import Path

import tomllib
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_opd.data.chain_task import generate_chain_problems
from megatron_opd.data.prompts import render_prompt
from megatron_opd.data.toy_task import build_toy_tokenizer
from megatron_opd.eval.grading import grade_verdict
from megatron_opd.recipes.common import ASSET_RECORD, DemoRecipe, shipped_models

REPO = Path(__file__).resolve().parents[3]


def test_shipped_models_match_the_default_recipe_and_are_small():
    recipe = DemoRecipe()
    shipped = shipped_models(recipe)
    assert shipped is not None, f"{recipe.assets}: no checkpoints for recipe fingerprint {recipe.fingerprint()}"
    record = json.loads((recipe.assets / ASSET_RECORD).read_text())
    assert record["seed"] == recipe.seed and "megatron-opd demo --from-scratch" in record["command"]
    measured = record["measured"][recipe.test_benchmark]
    n = record["measured"]["n"]
    assert measured["teacher"][f"pass@{n}"] >= 0.9 and measured["student"][f"pass@{n}"] <= 0.4
    total = sum(f.stat().st_size for f in recipe.assets.rglob("*") if f.is_file())
    assert total < 5 * 2**20, total
    for path in shipped:
        tok = AutoTokenizer.from_pretrained(path)
        assert len(tok) == len(build_toy_tokenizer())
        assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == len(tok)


def test_assets_are_package_data():
    """Every shipped file matches a package-data pattern of pyproject.toml (a wheel carries it)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["megatron_opd.recipes"]
    root = REPO / "megatron_opd" / "recipes"
    files = [f.relative_to(root).as_posix() for f in (root / "assets").rglob("*") if f.is_file()]
    assert files
    unmatched = [f for f in files if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/")
                                             for p in patterns)]
    assert not unmatched, unmatched


def test_teacher_solves_test_problems_greedily_and_the_student_does_worse():
    """An independent check of the record: greedy decoding with plain HF on 6 test problems."""
    teacher_dir, student_dir = shipped_models(DemoRecipe())
    problems = generate_chain_problems(6, seed=2024, split="test")
    solved = {}
    for name, path in (("teacher", teacher_dir), ("student", student_dir)):
        tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
        prompts = [render_prompt(tok, p["problem"], chat_template=False, enable_thinking=None, instruction="")
                   for p in problems]
        with torch.no_grad():
            out = model.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts), len(prompts[0]),
                                 dtype=torch.long), max_new_tokens=300, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, len(prompts[0]):], skip_special_tokens=True)
        solved[name] = sum(grade_verdict(t, p["answer"]) == "correct" for t, p in zip(texts, problems))
    assert solved["teacher"] >= 5 and solved["student"] < solved["teacher"], solved
