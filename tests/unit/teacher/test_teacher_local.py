"""In-process teacher: scores equal a direct full-vocab forward of each unpadded sequence."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sglang_contract.tiny import reference_logprobs, tiny_qwen3  # noqa: E402

from megatron_opd.teacher import LocalTeacher, build_teacher_engine  # noqa: E402

PROMPTS = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16], [17, 18]]
RESPONSES = [[20, 21, 22], [23, 24, 25, 26, 27, 28], [29], []]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3(seed=2, layers=3)


@pytest.mark.parametrize("temperature,vocab_size,batch_tokens", [(1.0, None, 32768), (1.7, 60, 9)])
def test_scores_equal_direct_forward(model, temperature, vocab_size, batch_tokens):
    teacher = LocalTeacher(model, vocab_size=vocab_size, temperature=temperature, max_tokens_per_batch=batch_tokens)
    scores = teacher.score(PROMPTS, RESPONSES, top_k=8)
    for p, r, s in zip(PROMPTS, RESPONSES, scores):
        assert s.token_logprobs.shape == (len(r),) and s.topk_ids.shape == (len(r), 8)
        if not r:
            continue
        ref = reference_logprobs(model, p, r, temperature, vocab_size)  # (R, V) float64
        expect_tok = ref.gather(1, torch.tensor(r)[:, None]).squeeze(1)
        assert torch.allclose(s.token_logprobs.double(), expect_tok, atol=1e-5)
        ref_top, ref_ids = ref.topk(8, dim=-1)
        assert torch.equal(s.topk_ids, ref_ids)
        assert torch.allclose(s.topk_logprobs.double(), ref_top, atol=1e-5)
        assert torch.allclose(s.topk_logprobs.double(), ref.gather(1, s.topk_ids), atol=1e-5)


def test_without_top_k_returns_only_token_logprobs(model):
    scores = LocalTeacher(model).score(PROMPTS, RESPONSES)
    assert all(s.topk_ids is None and s.topk_logprobs is None for s in scores)


def test_bad_inputs_are_named(model):
    teacher = LocalTeacher(model, vocab_size=60)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        teacher.score([[1], [2]], [[3]])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        teacher.score([[1], []], [[3], [4]])
    with pytest.raises(ValueError, match=r"row 0 has token ids outside \[0, 60\): \[63\]"):
        teacher.score([[1]], [[63]])
    with pytest.raises(FileNotFoundError, match="neither an http"):
        build_teacher_engine("/no/such/dir")
