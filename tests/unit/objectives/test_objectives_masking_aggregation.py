"""Special-token masking and token-mean aggregation."""

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from megatron_opd.objectives import (
    aggregate_token_mean,
    build_special_token_mask,
    default_special_token_ids,
    default_special_token_sequences,
    masked_mean,
    topk_overlap,
)


def _tokenizer():
    vocab = {"<unk>": 0, "<|im_end|>": 1, "<": 2, "think": 3, ">": 4, "a": 5, "b": 6, "/": 7}
    raw = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|im_end|>")
    return tok


def test_default_ids_and_sequences():
    tok = _tokenizer()
    assert default_special_token_ids(tok) == {0, 1}
    assert default_special_token_ids(tok, keep_eos=True) == {0}
    assert (2, 3, 4) in default_special_token_sequences(tok)  # "<think>" in pieces


def test_mask_drops_ids_and_whole_sequences_only():
    ids = torch.tensor([[2, 3, 4, 5, 2, 5, 1], [5, 2, 3, 4, 2, 3, 4]])
    mask = torch.tensor([[True] * 7, [True] * 6 + [False]])
    out = build_special_token_mask(ids, mask, special_ids={1}, special_sequences=[(2, 3, 4)])
    expected = torch.tensor([[False, False, False, True, True, True, False],
                             [True, False, False, False, False, False, False]])
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="token_ids has shape"):
        build_special_token_mask(ids[:, :3], mask)


def test_token_mean_with_weights_and_fixed_denominator():
    loss = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    weights = torch.tensor([[0.5, 1.5, 9.0], [1.0, 9.0, 2.0]])
    result = aggregate_token_mean(loss, mask, weights)
    assert result.num_tokens.item() == 4 and not bool(result.empty)
    torch.testing.assert_close(result.loss, torch.tensor((0.5 + 3.0 + 3.0 + 10.0) / 4))
    fixed = aggregate_token_mean(loss, mask, weights, num_tokens=10)
    torch.testing.assert_close(fixed.loss, torch.tensor(16.5 / 10))
    (grad,) = torch.autograd.grad(fixed.loss, loss)
    torch.testing.assert_close(grad, torch.where(mask, weights / 10, 0.0))


def test_empty_mask_gives_zero_loss_and_flag():
    loss = torch.randn(2, 3, requires_grad=True)
    result = aggregate_token_mean(loss, torch.zeros(2, 3, dtype=torch.bool))
    assert result.loss.item() == 0.0 and bool(result.empty)
    result.loss.backward()
    assert torch.all(loss.grad == 0)
    assert masked_mean(loss, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="num_tokens must be a non-negative scalar"):
        aggregate_token_mean(loss, torch.ones(2, 3, dtype=torch.bool), num_tokens=-1)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\)"):
        aggregate_token_mean(loss, torch.ones(2, 2, dtype=torch.bool))


def test_topk_overlap():
    student = torch.tensor([[[1, 2, 3], [4, 5, 6]]])
    teacher = torch.tensor([[[3, 2, 9], [7, 8, 9]]])
    torch.testing.assert_close(topk_overlap(student, teacher), torch.tensor([[2 / 3, 0.0]]))
