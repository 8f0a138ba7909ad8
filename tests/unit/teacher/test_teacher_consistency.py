"""Student/teacher tokenizer agreement checks: pass on equal tokenizers, name the culprit otherwise."""

import copy

import pytest

from megatron_opd.data.toy_task import build_toy_tokenizer
from megatron_opd.teacher.consistency import TokenizerMismatchError, check_tokenizers_agree

MESSAGES = [[{"role": "user", "content": "a=1;b=a+2;b=?"}]]


def test_identical_tokenizers_agree():
    check_tokenizers_agree(build_toy_tokenizer(), build_toy_tokenizer(), MESSAGES)


def test_different_eos_is_named():
    teacher = build_toy_tokenizer()
    teacher.eos_token = "<|endoftext|>"
    with pytest.raises(TokenizerMismatchError, match="eos_token_id: student 2 != teacher 0"):
        check_tokenizers_agree(build_toy_tokenizer(), teacher)


def test_extra_teacher_token_is_named():
    teacher = build_toy_tokenizer()
    teacher.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    with pytest.raises(TokenizerMismatchError, match="special token '<tool>': student id None != teacher id 59"):
        check_tokenizers_agree(build_toy_tokenizer(), teacher)


def test_chat_template_difference_is_named():
    student, teacher = build_toy_tokenizer(), build_toy_tokenizer()
    teacher.chat_template = copy.copy(student.chat_template).replace("<|im_start|>", "<|im_start|>\n", 1)
    with pytest.raises(TokenizerMismatchError, match="prompt 0: chat templates render differently"):
        check_tokenizers_agree(student, teacher, MESSAGES)
