"""--rollout-url / --teacher-url take comma-separated worker lists (issue 10): the trainer passes the
flag's string to the engine factories unchanged, so the SGLang engines split it themselves."""

import pytest

from megatron_opd.rollout import build_rollout_engine
from megatron_opd.teacher import build_teacher_engine

URLS = "http://127.0.0.1:30001, http://127.0.0.1:30002/"


def test_rollout_and_teacher_flags_take_comma_separated_workers():
    rollout = build_rollout_engine(URLS, vocab_size=64)
    teacher = build_teacher_engine(URLS, vocab_size=64)
    want = ["http://127.0.0.1:30001", "http://127.0.0.1:30002"]
    assert rollout.urls == want and rollout.weights.urls == want  # weight sync reaches every worker
    assert teacher.runner.pool.urls == want


def test_a_bad_entry_is_named():
    with pytest.raises(ValueError, match=r"'127.0.0.1:30002' \(from .*\) is not an http\(s\) URL"):
        build_rollout_engine("http://127.0.0.1:30001,127.0.0.1:30002", vocab_size=64)
