"""engine_logprob_gap: |engine - recompute| over response tokens only (padding never counts)."""

import pytest
import torch

from megatron_opd.training.loop import engine_logprob_gap


def test_gap_over_valid_response_tokens_only():
    exp = type("Exp", (), {})()
    exp.response_ids = torch.zeros(2, 3, dtype=torch.long)
    exp.response_lens = torch.tensor([3, 1])
    exp.engine_logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    exp.old_logprobs = torch.tensor([[-1.0, -2.5, -2.9], [-0.25, -9.0, -9.0]])  # padding differs by 9
    gap = engine_logprob_gap(exp)
    assert gap["engine_logprob_gap_max"] == pytest.approx(0.5)
    assert gap["engine_logprob_gap_mean"] == pytest.approx((0 + 0.5 + 0.1 + 0.25) / 4)
