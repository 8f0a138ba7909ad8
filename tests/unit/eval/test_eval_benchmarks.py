"""Benchmark loading from local JSONL: record shape, counts, and clear errors on bad files."""

import json
import shutil
from pathlib import Path

import pytest

from megatron_opd.eval.benchmarks import EXPECTED_COUNTS, PAPER_BENCHMARKS, load_benchmark, normalize_answer

DATA_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "benchmarks"
needs_data = pytest.mark.skipif(not (DATA_DIR / "math500.jsonl").is_file(),
                                reason=f"benchmark copies not found at {DATA_DIR} (../shared beside the repo)")


@needs_data
@pytest.mark.parametrize("name", PAPER_BENCHMARKS)
def test_local_copies_load_with_expected_counts(name):
    records = load_benchmark(name, DATA_DIR)
    raw = [json.loads(line) for line in (DATA_DIR / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == EXPECTED_COUNTS[name] == len(raw)
    for rec, src in zip(records, raw):
        assert rec["id"] == src["id"] and rec["problem"] == src["problem"]
        assert rec["answer"] == normalize_answer(src["answer"]) and isinstance(rec["answer"], str)
    assert len({r["id"] for r in records}) == len(records)


def test_toy_benchmark_is_the_held_out_split():
    from megatron_opd.data.toy_task import generate_toy_problems

    toy = load_benchmark("toy")
    assert toy == load_benchmark("toy") and len(toy) >= 100
    assert all(r["id"].startswith("toy-test-") for r in toy)
    train = {r["problem"] for r in generate_toy_problems(5000, seed=0)}
    assert not train & {r["problem"] for r in toy}


def test_normalize_answer():
    assert normalize_answer(27.0) == "27" and normalize_answer("025") == "25"
    assert normalize_answer(" \\frac{1}{2} ") == "\\frac{1}{2}" and normalize_answer(-1.0) == "-1"


def _write(tmp_path, name, lines):
    (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def test_wrong_count_is_reported(tmp_path):
    _write(tmp_path, "aime24", [json.dumps({"id": f"x{i}", "problem": "p", "answer": "1"}) for i in range(29)])
    with pytest.raises(ValueError, match=r"aime24.*29 records, expected 30"):
        load_benchmark("aime24", tmp_path)


@needs_data
def test_corrupt_line_names_file_and_line(tmp_path):
    shutil.copy(DATA_DIR / "amc23.jsonl", tmp_path / "amc23.jsonl")
    lines = (tmp_path / "amc23.jsonl").read_text().splitlines()
    lines[6] = lines[6][: len(lines[6]) // 2]  # a truncated record
    _write(tmp_path, "amc23", lines)
    with pytest.raises(ValueError, match=r"amc23.jsonl line 7: not valid JSON"):
        load_benchmark("amc23", tmp_path)


def test_missing_field_duplicate_id_missing_file_unknown_name(tmp_path):
    _write(tmp_path, "amc23", [json.dumps({"id": "a", "problem": "p"})])
    with pytest.raises(ValueError, match=r"line 1: missing field 'answer'"):
        load_benchmark("amc23", tmp_path)
    _write(tmp_path, "amc23", [json.dumps({"id": "a", "problem": "p", "answer": 1})] * 40)
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        load_benchmark("amc23", tmp_path)
    with pytest.raises(FileNotFoundError, match="aime25.jsonl"):
        load_benchmark("aime25", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'gsm8k'"):
        load_benchmark("gsm8k", tmp_path)


def test_hub_path_maps_fields_concatenates_configs_and_checks_counts(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(repo, config, split):
        calls.append((repo, config, split))
        part = "I" if config == "AIME2025-I" else "II"
        return [{"question": f"q{part}{i}", "answer": f"0{i}"} for i in range(15)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_benchmark("aime25")
    assert calls == [("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test")]
    assert records[16]["problem"] == "qII1" and records[16]["answer"] == "1" and records[16]["id"] == "aime25-16"
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, config, split: [{"problem": "p", "answer": 1.0}] * 3)
    with pytest.raises(ValueError, match="hub dataset HuggingFaceH4/aime_2024 has 3 records, expected 30"):
        load_benchmark("aime24")


def test_toy_validation_is_disjoint_from_test_and_train():
    from megatron_opd.data.toy_task import _split_of

    val, test = load_benchmark("toy_val"), load_benchmark("toy")
    assert len(val) == len(test) and val == load_benchmark("toy_val")
    assert not {r["problem"] for r in val} & {r["problem"] for r in test}
    assert all(_split_of(r["problem"]) == "test" for r in val)  # never a problem of the training split
    assert len({r["id"] for r in val}) == len(val) and all(r["id"].startswith("toy-val-") for r in val)
