"""Grader: box extraction, table-driven golds of every benchmark, pathological inputs time out."""

import time
from pathlib import Path

import pytest

from megatron_opd.eval import GradingPool, extract_last_boxed, grade
from megatron_opd.eval.benchmarks import PAPER_BENCHMARKS, load_benchmark

DATA_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "benchmarks"
needs_data = pytest.mark.skipif(not (DATA_DIR / "math500.jsonl").is_file(),
                                reason=f"benchmark copies not found at {DATA_DIR} (../shared beside the repo)")
WRONG = "-987654321"


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then later \\boxed{2}", "2"),  # several boxes: the last one
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped set braces do not close the box
    ("\\boxed{a{b{c}}d} x", "a{b{c}}d"),
    ("\\fbox{7}", "7"),
    ("\\boxed {5}", "5"),
    ("no box at all", None),
    ("\\boxed{3} and then \\boxed{12", None),  # last box cut off: unfinished, no answer
    ("\\boxed", None),
    ("\\boxed{}", ""),
])
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


def test_grade_public_function():
    assert grade("The answer is \\boxed{\\frac{1}{2}}", "0.5")
    assert grade("\\boxed{0.5}", "\\frac12")
    assert not grade("\\boxed{1/3}", "\\frac{1}{2}")
    assert not grade("answer: 1/2", "\\frac{1}{2}")  # no box: wrong
    assert grade("\\boxed{1} no wait \\boxed{2}", "2") and not grade("\\boxed{1} no wait \\boxed{2}", "1")
    assert not grade("\\boxed{2} but then \\boxed{", "2")  # truncated final answer


@pytest.fixture(scope="module")
def pool():
    with GradingPool(num_workers=2, timeout_s=6.0) as p:
        yield p


@needs_data
def test_every_benchmark_gold_grades_correct_and_a_wrong_answer_wrong(pool):
    records = [r for name in PAPER_BENCHMARKS for r in load_benchmark(name, DATA_DIR)]
    assert len(records) == 600
    golds = [r["answer"] for r in records]
    assert WRONG not in golds
    right = pool.grade_many([(f"Thus the answer is $\\boxed{{{g}}}$.", g) for g in golds])
    bad = [(r["id"], g, v) for r, g, v in zip(records, golds, right) if v != "correct"]
    assert not bad, f"golds not graded correct against themselves: {bad[:10]}"
    wrong = [f"\\boxed{{{int(g) + 1}}}" if g.lstrip("-").isdigit() else f"\\boxed{{{WRONG}}}" for g in golds]
    verdicts = pool.grade_many(list(zip(wrong, golds)))
    bad = [(r["id"], g, v) for r, g, v in zip(records, golds, verdicts) if v != "wrong"]
    assert not bad, f"wrong answers not graded wrong: {bad[:10]}"


def test_pool_verdicts_in_order_and_no_answer_counted(pool):
    items = [("\\boxed{5}", "5"), ("no box", "5"), ("\\boxed{4}", "5"), ("\\boxed{5", "5"), ("\\boxed{x^2}", "x^2")]
    assert pool.grade_many(items) == ["correct", "no_answer", "wrong", "no_answer", "correct"]
    assert pool.grade_many([]) == []


def test_pathological_input_times_out_without_hanging(pool):
    items = [("\\boxed{9^{9^{9^{9}}}}", "3"), ("\\boxed{3}", "3"), ("\\boxed{10^{10^{10^{10}}}}", "1")] + \
            [("\\boxed{7}", "7")] * 4
    start = time.monotonic()
    verdicts = pool.grade_many(items)
    assert verdicts[0] == verdicts[2] == "timeout"
    assert verdicts[1] == "correct" and verdicts[3:] == ["correct"] * 4
    assert time.monotonic() - start < 3 * pool.timeout_s


def test_hard_limit_kills_and_replaces_a_stuck_worker():
    # math-verify's own timeout set far beyond the hard limit: only the kill can stop the item.
    with GradingPool(num_workers=1, timeout_s=1.5, verifier_timeout_s=60) as p:
        start = time.monotonic()
        verdicts = p.grade_many([("\\boxed{9^{9^{9^{9}}}}", "3"), ("\\boxed{3}", "3")])
        elapsed = time.monotonic() - start
        assert verdicts == ["timeout", "correct"]
        assert p.num_killed == 1
        assert elapsed < 20  # 1.5 s limit + one worker restart (imports), far below the 60 s inner timeout


def test_pool_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_workers"):
        GradingPool(num_workers=0)
