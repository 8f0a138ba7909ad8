"""The teacher client accepts SGLang 0.5.23's echo of the last vocabulary id as 0 in
``input_token_logprobs`` (shown on the real server in tests/real_sglang/test_vocab_boundary_real.py)
and no other substitution."""

import pytest

from megatron_opd.rollout.sglang_http import RetryableError
from megatron_opd.teacher.sglang import parse_score_answer

V = 59


def answer(reported_ids: list[int], rid: str = "r") -> dict:
    """A scoring answer for prompt [..., 7] and len(reported_ids) response tokens, top-K off."""
    entries = [[None, 7, None]] + [[-1.5, t, None] for t in reported_ids]
    return {"meta_info": {"id": rid, "input_token_logprobs": entries}}


@pytest.mark.parametrize("response, reported", [
    ([V - 1, 3, V - 1], [0, 3, 0]),      # SGLang 0.5.23: 0 for vocab_size - 1
    ([V - 1, 3, V - 1], [V - 1, 3, 0]),  # a server that echoes it unchanged
    ([0, V - 1], [0, 0]),
])
def test_last_id_reported_as_0_is_accepted(response, reported):
    score = parse_score_answer(answer(reported), rid="r", response=response, top_k=0, vocab_size=V)
    assert score.token_logprobs.tolist() == [-1.5] * len(response)


@pytest.mark.parametrize("response, reported, vocab_size", [
    ([V - 2], [0], V),     # only the last id
    ([V - 1], [1], V),     # only as 0
    ([0], [V - 1], V),     # not the other way round
    ([V - 1], [0], V + 1),  # under the served vocab_size only
    ([V - 1], [0], None),  # unknown vocab_size: nothing accepted
])
def test_any_other_substitution_is_rejected(response, reported, vocab_size):
    with pytest.raises(RetryableError, match=r"input_token_logprobs\[1:\]\[0\]"):
        parse_score_answer(answer(reported), rid="r", response=response, top_k=0, vocab_size=vocab_size)
