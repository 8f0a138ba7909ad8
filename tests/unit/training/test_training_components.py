"""Component checks that run before any model is built: tokenizer agreement, special-token masks."""

import pytest

from megatron_opd.data.toy_task import build_toy_tokenizer
from megatron_opd.teacher.consistency import TokenizerMismatchError
from megatron_opd.training.cli import parse_config
from megatron_opd.training.components import _check_teacher_tokenizer, special_token_ids
from megatron_opd.training.config import ConfigError


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    student = build_toy_tokenizer()
    teacher = build_toy_tokenizer()
    teacher.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = parse_config(["--student-hf", "unused", "--teacher-hf", str(tmp_path / "teacher"), "--data-path", "toy"])
    with pytest.raises(TokenizerMismatchError):
        _check_teacher_tokenizer(cfg, student)


def test_same_tokenizer_passes(tmp_path):
    build_toy_tokenizer().save_pretrained(tmp_path / "teacher")
    cfg = parse_config(["--student-hf", "unused", "--teacher-hf", str(tmp_path / "teacher"), "--data-path", "toy"])
    _check_teacher_tokenizer(cfg, build_toy_tokenizer())


def test_unloadable_teacher_tokenizer_names_the_flag(tmp_path):
    cfg = parse_config(["--student-hf", "unused", "--teacher-hf", str(tmp_path / "missing"), "--data-path", "toy"])
    with pytest.raises(ConfigError, match="--teacher-hf"):
        _check_teacher_tokenizer(cfg, build_toy_tokenizer())


def test_special_token_mask_modes():
    tokenizer = build_toy_tokenizer()
    auto = special_token_ids(tokenizer, "auto")
    assert tokenizer.eos_token_id in auto and tokenizer.convert_tokens_to_ids("<think>") in auto
    assert tokenizer.convert_tokens_to_ids("7") not in auto
    assert special_token_ids(tokenizer, "none") == frozenset()
    assert special_token_ids(tokenizer, "3,4") == frozenset({3, 4})
    with pytest.raises(ConfigError, match="--special-token-mask"):
        special_token_ids(tokenizer, "eos")
