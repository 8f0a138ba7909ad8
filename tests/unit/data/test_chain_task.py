"""The long-horizon chain task: an independent simulator checks every line, the lengths cover at
least four blocks of 64 tokens, the splits are disjoint, and the project's grader grades it."""

import re

import pytest

from megatron_opd.data.chain_task import (
    SPLITS,
    STEPS,
    generate_chain_problems,
    render_chain_problem,
    split_of,
)
from megatron_opd.data.toy_task import build_toy_tokenizer
from megatron_opd.eval.grading import grade_verdict

PROBLEM_RE = re.compile(r"^9:\.{8}\+([01]{8})=(\d{8})\n$")
LINE_RE = re.compile(r"^(\d):(\d{8})\+([01]{8})=(\d{8})$")


def _reference_chain(start: str, key: str, steps: int) -> list[str]:
    """Independent reference: states as integers, digit i = (x // 10**i) % 10, summed mod 10."""
    s, k, states = int(start), int(key), []
    for _ in range(steps):
        s = sum(((s // 10**i + k // 10**i) % 10) * 10**i for i in range(8))
        states.append(f"{s:08d}")
    return states


@pytest.mark.parametrize("split", SPLITS)
def test_solutions_follow_the_task_definition(split):
    records = generate_chain_problems(300, seed=5, split=split)
    assert len(records) == 300 and len({r["problem"] for r in records}) == 300
    steps, keys = STEPS, set()
    for rec in records:
        key, start = PROBLEM_RE.match(rec["problem"]).groups()
        keys.add(key)
        expected = _reference_chain(start, key, steps)
        lines = rec["solution"].split("\n")
        assert len(lines) == steps + 1 and lines[-1] == f"\\boxed{{{expected[-1]}}}"
        state = start
        for i, line in enumerate(lines[:-1]):
            label, operand, line_key, result = LINE_RE.match(line).groups()
            assert int(label) == steps - 1 - i and operand == state and line_key == key
            assert result == expected[i]
            state = result
        assert rec["answer"] == expected[-1]
        assert rec["id"].startswith(f"chain-{split}-5-")
        # No shortcut: every digit the key advances takes a new value on every line, and the answer
        # is not the start state.
        if "1" in key:
            assert len(set(expected)) == steps and expected[-1] != start
    assert len(keys) > 100


def test_responses_span_at_least_four_blocks_of_64_tokens():
    tokenizer = build_toy_tokenizer()
    lengths = []
    for rec in generate_chain_problems(200, seed=0, split="train"):
        ids = tokenizer(rec["solution"], add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, rec["solution"]
        assert tokenizer.decode(ids) == rec["solution"]
        lengths.append(len(ids) + 1)  # + EOS
        prompt = tokenizer(rec["problem"], add_special_tokens=False)["input_ids"]
        assert len(prompt) == len("9:........+00000000=00000000\n")  # fixed-length prompt, one chain line
    assert min(lengths) >= 256 and max(lengths) <= 512, (min(lengths), max(lengths))


def test_splits_are_disjoint_and_deterministic():
    by_split = {split: generate_chain_problems(500, seed=1, split=split) for split in SPLITS}
    problems = {split: {r["problem"] for r in recs} for split, recs in by_split.items()}
    assert not problems["train"] & problems["test"]
    assert not problems["train"] & problems["validation"]
    assert not problems["validation"] & problems["test"]
    for split, recs in by_split.items():
        assert all(split_of(r["problem"]) == split for r in recs)
    assert generate_chain_problems(500, seed=1, split="test") == by_split["test"]
    assert generate_chain_problems(50, seed=2, split="test")[0] != by_split["test"][0]
    # The hash split gives each of the held-out splits about a tenth of the problem space.
    counts = {s: 0 for s in SPLITS}
    for i in range(5000):
        counts[split_of(render_chain_problem(f"{i:08d}", "01101001")["problem"])] += 1
    assert 350 < counts["test"] < 650 and 350 < counts["validation"] < 650, counts


def test_grader_accepts_the_solution_and_one_early_slip_derails_it():
    rec = render_chain_problem("48213157", "01101001")
    assert rec["solution"].startswith("8:48213157+01101001=49314158\n7:49314158+01101001=40415159\n")
    assert grade_verdict(rec["solution"], rec["answer"]) == "correct"
    # One wrong digit in the first result: continuing the chain from it gives a wrong answer.
    slipped = render_chain_problem("48223157", "01101001")  # = the chain after a slip 49314158 -> 49324158
    assert slipped["answer"] != rec["answer"]
    assert grade_verdict(slipped["solution"], rec["answer"]) == "wrong"
    assert grade_verdict(rec["solution"][:-3], rec["answer"]) == "no_answer"  # cut off mid-box


@pytest.mark.parametrize("args, field", [(("4821", "01101001"), "start"), (("4821315a", "01101001"), "start"),
                                         (("48213157", "0110100"), "key"), (("48213157", "01101002"), "key")])
def test_bad_input_names_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        render_chain_problem(*args)


def test_bad_split_and_count_are_refused():
    with pytest.raises(ValueError, match="split"):
        generate_chain_problems(3, seed=0, split="dev")
    with pytest.raises(ValueError, match="n must be"):
        generate_chain_problems(-1, seed=0)


def test_benchmarks_are_the_held_out_splits_with_no_instruction():
    from megatron_opd.eval.benchmarks import available_benchmarks, load_benchmark
    from megatron_opd.eval.config import EvalConfig

    test, val = load_benchmark("chain"), load_benchmark("chain_val")
    assert len(test) == len(val) == 256
    assert all(split_of(r["problem"]) == "test" for r in test)
    assert all(split_of(r["problem"]) == "validation" for r in val)
    assert {"chain", "chain_val"} <= set(available_benchmarks())
    assert EvalConfig(benchmarks=("chain",)).instruction_for("chain") == ""
    assert EvalConfig(benchmarks=("chain_val",)).instruction_for("chain_val") == ""
