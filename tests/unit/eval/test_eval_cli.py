"""CLI: frozen flag set, engine selection and config errors reported by flag name."""

import pytest

from megatron_opd.eval.cli import build_parser, main

FROZEN_FLAGS = {
    "--model-hf", "--url", "--tokenizer", "--dtype", "--max-batch-rows", "--benchmarks", "--n", "--k",
    "--data-dir", "--out-dir", "--limit", "--temperature", "--top-p", "--top-k", "--max-new-tokens", "--seed",
    "--instruction", "--no-chat-template", "--enable-thinking", "--batch-problems", "--grader-workers",
    "--grade-timeout", "--run-name", "--compare", "--metric", "--no-progress", "--help", "-h",
}


def test_flags_are_frozen():
    flags = {opt for action in build_parser()._actions for opt in action.option_strings}
    assert flags == FROZEN_FLAGS, "eval CLI flags changed: update FROZEN_FLAGS and the docs together"


def test_defaults_are_the_paper_setting():
    args = build_parser().parse_args(["--url", "http://x"])
    assert args.benchmarks == ("aime24", "aime25", "math500", "amc23") and args.n == 8 and args.k == (1, 8)


@pytest.mark.parametrize("argv, message", [
    ([], "choose exactly one engine"),
    (["--model-hf", "a", "--url", "http://b"], "choose exactly one engine"),
    (["--url", "http://b"], "--url needs --tokenizer"),
    (["--url", "http://b", "--tokenizer", "toy", "--n", "4"], "--n 4 must be >= every k"),
    (["--url", "http://b", "--tokenizer", "toy", "--benchmarks", "aime24,gsm8k"], "unknown ['gsm8k']"),
    (["--url", "http://b", "--tokenizer", "toy", "--benchmarks", "chain,math500"], "evaluate them in separate runs"),
])
def test_bad_command_lines_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, chat_template", [
    (["--benchmarks", "chain"], False),  # the chain task is trained and evaluated on raw prompts
    (["--benchmarks", "chain,chain_val"], False),
    (["--benchmarks", "math500"], True),
    (["--benchmarks", "math500", "--no-chat-template"], False),
])
def test_raw_prompt_benchmarks_default_to_raw_prompts(argv, chat_template):
    from megatron_opd.eval.cli import config_from_args

    args = build_parser().parse_args(["--url", "http://b", "--tokenizer", "toy", *argv])
    assert config_from_args(args).chat_template is chat_template


def test_compare_needs_finished_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        main(["--compare", str(tmp_path), "--out-dir", str(tmp_path / "cmp")])
