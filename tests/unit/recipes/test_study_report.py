"""The study report from a hand-made study record: paired differences by hand, plain-words answers,
failed and missing runs listed, drift/gate statistics averaged over seeds by update index."""

import json
import math

import pytest

from megatron_opd.recipes.lr_sweep import parse_lr_grid
from megatron_opd.recipes.presets import ABLATION_VARIANTS, DEFAULT_VARIANTS, default_pairs
from megatron_opd.recipes.study_report import conclusion_lines, format_study, paired_rows, write_study_report

T975_DF2 = 4.30265273  # t_{0.975, 2}


def _run(p1, p8, drift=None):
    run = {"test": {"pass@1": p1, "pass@8": p8}, "wall_s": 10.0, "lr": 1e-3}
    if drift is not None:
        run["update_stats"] = {"abs_drift_mean": {"0": 0.0, "1": drift}}
    return run


def _study():
    results = {
        "LSM": {"1": _run(0.10, 0.30, 0.2), "2": _run(0.20, 0.50, 0.4), "3": _run(0.15, 0.40, 0.3)},
        "LSM + Block64": {"1": _run(0.12, 0.36, 0.1), "2": _run(0.21, 0.55, 0.3), "3": {"seed": 3, "failed": "boom"}},
        "sampled": {"1": _run(0.0, 0.1), "2": _run(0.0, 0.2), "3": _run(0.0, 0.3)},
        "sampled + Block64": {"1": _run(0.0, 0.0), "2": _run(0.0, 0.1), "3": _run(0.0, 0.2)},
    }
    variants = [{"name": name, "flags": {"--objective": "lsm" if "LSM" in name else "sampled"}} for name in results]
    variants.append({"name": "LSM + newline spans", "flags": {"--objective": "lsm"}})
    return {"variants": variants, "results": results, "pairs": default_pairs(variants), "seeds": [1, 2, 3], "n": 8,
            "base_flags": {"--epochs-per-rollout": 4, "--minibatches-per-rollout": 4, "--prompts-per-rollout": 16,
                           "--samples-per-prompt": 4, "--train-iters": 32},
            "student_hf": "s", "sweep": None, "lrs": {},
            "eval": {"test": {"benchmarks": ["chain"], "limit": 32}, "val": None, "curve": None}}


def test_paired_difference_by_hand():
    rows = {r["pair"]: r for r in paired_rows(_study())}
    gated = rows["LSM + Block64 − LSM"]["pass@8"]  # seed 3 failed: pairs over seeds 1 and 2 only
    assert gated["seeds"] == [1, 2] and gated["mean"] == pytest.approx(0.055)
    assert gated["std"] == pytest.approx(math.sqrt(2 * 0.005**2))
    sampled = rows["sampled + Block64 − sampled"]["pass@8"]
    assert sampled["mean"] == pytest.approx(-0.1) and sampled["std"] == pytest.approx(0.0, abs=1e-12)
    assert "LSM + newline spans − LSM" not in rows  # never run: no row


def test_answers_in_plain_words():
    lines = conclusion_lines(_study())
    # all three seeds moved pass@8 by exactly -0.1: a zero-width interval, which is no verdict
    assert any(line.startswith("- Does sampled + Block64 beat sampled? cannot say (the 3 paired differences are "
                               "all equal)") for line in lines)
    lsm = next(line for line in lines if line.startswith("- Does LSM + Block64 beat LSM?"))
    half = 12.7062047 * math.sqrt(2 * 0.005**2) / math.sqrt(2)  # t_{0.975, 1}: two common seeds
    assert "**no detectable difference**" in lsm and f"[{0.055 - half:+.3f}, {0.055 + half:+.3f}]" in lsm


def test_report_lists_failures_and_averages_drift_over_seeds(tmp_path):
    text = format_study(_study(), "t")
    assert "LSM + Block64: seeds 3 FAILED" in text and "LSM + newline spans: seeds 1, 2, 3 not run yet" in text
    assert "4 epochs × 4 minibatches = 16 optimizer steps" in text
    lsm_row = next(line for line in text.splitlines() if line.startswith("| LSM | 0.001 |"))
    assert f"0.400 ± {T975_DF2 * 0.1 / math.sqrt(3):.3f}" in lsm_row  # pass@8 0.3/0.5/0.4
    drift_row = next(line for line in text.splitlines() if line.startswith("| LSM | 0.0000 |"))
    assert drift_row.endswith("| 0.3000 |")  # mean of 0.2, 0.4, 0.3 at update 1
    paths = write_study_report(_study(), tmp_path, "s")
    assert json.loads(paths["json"].read_text())["n"] == 8 and paths["gates"].exists() and paths["test"].exists()


def test_presets_and_lr_grid():
    assert [v["name"] for v in DEFAULT_VARIANTS][0] == "base (no training)" and len(DEFAULT_VARIANTS) == 6
    sizes = [v["flags"].get("--gate-block-size") for v in ABLATION_VARIANTS if v["flags"]["--gate"] == "block"]
    assert sizes == [16, 32, 64, 128, 64, 64, 64]
    assert default_pairs(ABLATION_VARIANTS)[0] == ("LSM + token gate", "LSM") and len(default_pairs(ABLATION_VARIANTS)) == 9
    assert parse_lr_grid("sampled=1e-4,3e-4; lsm=1e-3") == {"sampled": [1e-4, 3e-4], "lsm": [1e-3]}
    with pytest.raises(ValueError, match="no learning rates"):
        parse_lr_grid("lsm=")


def test_merge_of_seed_parallel_studies():
    from megatron_opd.recipes.study_report import merge_studies

    full = _study()
    parts = []
    for seed in ("1", "2", "3"):
        part = {**full, "seeds": [int(seed)], "command": f"run {seed}",
                "results": {name: {seed: runs[seed]} for name, runs in full["results"].items()}}
        parts.append(part)
    merged = merge_studies(parts)
    assert merged["seeds"] == [1, 2, 3] and merged["results"] == full["results"]
    assert paired_rows(merged) == paired_rows(full) and merged["command"].count("run ") == 3
    six = merge_studies(parts, preset="six")
    assert [v["name"] for v in six["variants"]][:2] == ["base (no training)", "sampled"]


def test_report_names_no_absolute_paths_of_the_machine(tmp_path):
    """Reports are committed (docs/results): the study's workdir and cache become WORKDIR and CACHE_DIR,
    paths inside the checkout become relative to it; a look-alike directory is left alone."""
    from megatron_opd.recipes.study_report import REPO_ROOT

    work, cache, other = tmp_path / "study", tmp_path / "cache", tmp_path / "study2"
    student = REPO_ROOT / "megatron_opd" / "recipes" / "assets" / "chain" / "student"
    study = {**_study(), "student_hf": str(student), "places": {"WORKDIR": str(work), "CACHE_DIR": str(cache)},
             "command": f"megatron-opd variants --workdir {work} --cache-dir {cache} --notes {other}/n.md"}
    study["base_flags"] = {**study["base_flags"], "--data-path": f"{work}/chain_train.jsonl",
                           "--teacher-hf": str(cache / "demo" / "teacher-1")}
    study["results"]["LSM"]["1"]["run_dir"] = str(work / "runs" / "ab12" / "seed1")
    paths = write_study_report(study, tmp_path / "report", "s")
    for text in (paths["markdown"].read_text(), paths["json"].read_text()):
        assert str(work) + "/" not in text and str(cache) not in text and str(REPO_ROOT) not in text, text
        assert "--workdir WORKDIR --cache-dir CACHE_DIR" in text and f"--notes {other}/n.md" in text
        assert "WORKDIR/chain_train.jsonl" in text and "CACHE_DIR/demo/teacher-1" in text
    markdown = paths["markdown"].read_text()
    assert "- Student: `megatron_opd/recipes/assets/chain/student`" in markdown
    record = json.loads(paths["json"].read_text())
    assert record["results"]["LSM"]["1"]["run_dir"] == "WORKDIR/runs/ab12/seed1" and "places" not in record


def test_staleness_tables_pivot_the_async_variants_by_k(tmp_path):
    """Variants named "<base> K=<k>" get tables by K: scores over seeds, |δ| at u0 (the staleness alone) and
    averaged over the updates, by hand; and a staleness plot. A study without K in its names gets neither."""
    def run(p8, drifts):
        return {"test": {"pass@1": p8 / 2, "pass@8": p8}, "wall_s": 1.0, "lr": 1e-3,
                "update_stats": {"abs_drift_mean": {str(u): d for u, d in enumerate(drifts)}}}

    results = {"LSM K=0": {"1": run(0.5, [0.0, 0.2]), "2": run(0.7, [0.0, 0.4])},
               "LSM K=2": {"1": run(0.3, [0.6, 0.8]), "2": run(0.5, [0.2, 0.4])},
               "LSM + TIS K=2": {"1": run(0.4, [0.1, 0.1])}}
    data = {**_study(), "results": results, "pairs": [],
            "variants": [{"name": n, "flags": {"--objective": "lsm"}} for n in results]}
    text = format_study(data, "t")
    section = text.split("## By staleness K\n")[1]
    half = 12.7062047 * math.sqrt(0.02) / math.sqrt(2)  # t_{0.975, 1} · s / √2, s² = 0.02
    assert f"| LSM | 0.600 ± {half:.3f} | 0.400 ± {half:.3f} |" in section
    assert "| LSM + TIS | — | 0.400 (n=1, no CI) |" in section
    u0 = section.split("mean |δ| on the first update")[1]
    assert "| LSM | 0.0000 | 0.4000 |" in u0.split("**")[1]  # u0 mean over seeds: (0.6 + 0.2) / 2
    over = section.split("mean |δ| over the updates")[1]
    assert "| LSM | 0.1500 | 0.5000 |" in over.split("**")[1]  # (0 + 0.3) / 2 and (0.4 + 0.6) / 2
    paths = write_study_report(data, tmp_path, name="s", title="t")
    assert paths["staleness"].stat().st_size > 0
    assert "By staleness" not in format_study(_study(), "t")
    assert "staleness" not in write_study_report(_study(), tmp_path / "plain", name="p", title="t")
