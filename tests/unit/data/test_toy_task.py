"""The embedded toy task: problem structure checked by an independent evaluator, splits, tokenizer."""

import re

import pytest
from transformers import AutoTokenizer

from megatron_opd.data.toy_task import build_toy_tokenizer, generate_toy_problems

PROBLEM_RE = re.compile(r"^a=(\d+)((?:;[b-e]=[a-d][+-]\d+)*);([a-d])([+-])(\d+)=\?$")


def _evaluate_problem(problem: str) -> tuple[int, list[int], list[int]]:
    """Independent reference: parse the problem text, return (answer, operands, all values)."""
    match = PROBLEM_RE.match(problem)
    assert match, f"malformed problem {problem!r}"
    env = {"a": int(match.group(1))}
    operands, values = [], [env["a"]]
    for name, prev, op, num in re.findall(r";([b-e])=([a-d])([+-])(\d+)", match.group(2)):
        assert prev in env and name not in env, problem
        env[name] = env[prev] + int(num) if op == "+" else env[prev] - int(num)
        operands.append(int(num))
        values.append(env[name])
    last, op, num = match.group(3), match.group(4), int(match.group(5))
    answer = env[last] + num if op == "+" else env[last] - num
    operands.append(num)
    values.append(answer)
    return answer, operands, values


@pytest.mark.parametrize("split", ["train", "test"])
def test_problems_follow_the_task_definition(split):
    records = generate_toy_problems(400, seed=3, split=split)
    assert len(records) == 400
    op_counts = set()
    for rec in records:
        answer, operands, values = _evaluate_problem(rec["problem"])
        assert rec["answer"] == str(answer)
        assert all(10 <= x <= 99 for x in operands + [values[0]]), rec
        assert all(0 <= v <= 999 for v in values), rec
        op_counts.add(len(operands))
        # Each solution step "lhs=x op y=z" must be true arithmetic and end in the boxed answer.
        *steps, boxed = rec["solution"].split(";")
        assert boxed == f"\\boxed{{{answer}}}"
        assert len(steps) == len(operands)
        for step in steps:
            x, op, y, z = re.fullmatch(r"(?:[b-e]=)?(\d+)([+-])(\d+)=(\d+)", step).groups()
            assert (int(x) + int(y) if op == "+" else int(x) - int(y)) == int(z), step
        assert steps[-1].endswith(f"={answer}")
    assert op_counts == {2, 3, 4}


def test_deterministic_by_seed_and_unique():
    a = generate_toy_problems(200, seed=7)
    assert a == generate_toy_problems(200, seed=7)
    assert a != generate_toy_problems(200, seed=8)
    assert generate_toy_problems(50, seed=7) == a[:50]  # prefix-stable
    assert len({r["id"] for r in a}) == len({r["problem"] for r in a}) == 200


def test_train_and_test_are_disjoint():
    train = {r["problem"] for seed in (0, 1) for r in generate_toy_problems(3000, seed=seed)}
    test = {r["problem"] for seed in (0, 1) for r in generate_toy_problems(1000, seed=seed, split="test")}
    assert not train & test


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        generate_toy_problems(3, seed=0, split="valid")
    with pytest.raises(ValueError, match="n must be"):
        generate_toy_problems(-1, seed=0)


def test_tokenizer_round_trip_and_small_vocab():
    tok = build_toy_tokenizer()
    assert len(tok) < 64
    for rec in generate_toy_problems(50, seed=0) + generate_toy_problems(20, seed=0, split="test"):
        for text in (rec["problem"], rec["solution"], rec["problem"] + "\n " + rec["solution"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text)  # one id per character
            assert tok.decode(ids) == text
    assert tok.unk_token_id in tok("Q", add_special_tokens=False)["input_ids"]


def test_tokenizer_ids_are_stable():
    tok = build_toy_tokenizer()
    # Pinned: checkpoints trained with this tokenizer depend on these ids never moving.
    expected = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<think>": 3, "</think>": 4,
                "<unk>": 5, "0": 6, "9": 15, "a": 16, "z": 41, "=": 42, "\\": 47, "\n": 50, " ": 51}
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    assert tok.get_vocab() == build_toy_tokenizer().get_vocab()


def test_chat_template_and_save_pretrained(tmp_path):
    tok = build_toy_tokenizer()
    messages = [{"role": "user", "content": "a=63;b=a+43;b-61=?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\na=63;b=a+43;b-61=?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.convert_tokens_to_ids("\n")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert (loaded.pad_token, loaded.eos_token) == ("<|endoftext|>", "<|im_end|>")
