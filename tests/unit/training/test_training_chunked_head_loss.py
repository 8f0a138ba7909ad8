"""MicrobatchLoss on hidden states + output weight (the chunked head, computed only at the real response
tokens) equals MicrobatchLoss on the materialised logits, fp64: loss, every report field, and the gradients
of the hidden states and the weight. Micro-batch of 3 sequences with 10, 7 and 4 response tokens (right
padding), a padded vocabulary (11 real ids of 16 rows), LSM with the tail bucket and sampled-token OPD with
PPO clipping, Block4 gates under drift. Tolerance 1e-12."""

import dataclasses

import pytest
import torch
from test_training_loss import make_microbatch

from megatron_opd.gating import DriftGateConfig
from megatron_opd.training.loss import LossSettings, MicrobatchLoss

VOCAB, PADDED, K, H = 11, 16, 3, 6


def _microbatch(gen):
    mb = make_microbatch(gen, vocab=VOCAB)
    return dataclasses.replace(
        mb, teacher_topk_ids=torch.stack([torch.randperm(VOCAB, generator=gen)[:K] for _ in range(30)]).view(3, 10, K),
        teacher_topk_logprobs=torch.log_softmax(torch.randn(3, 10, K, generator=gen, dtype=torch.float64), -1))


@pytest.mark.parametrize("objective", ["lsm", "sampled"])
def test_chunked_head_loss_equals_logits_loss(objective):
    gen = torch.Generator().manual_seed(0)
    mb = _microbatch(gen)
    hidden = torch.randn(*mb.input_ids.shape, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(PADDED, H, generator=gen, dtype=torch.float64)
    settings = LossSettings(objective=objective, vocab_size=VOCAB, topk=K, lsm_tail=True, ppo_clip=0.2,
                            gate=DriftGateConfig(granularity="block", block_size=4, tau=2.0), head_chunk_tokens=4)
    results = []
    for chunked in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss_fn = MicrobatchLoss(settings, None, None)
        if chunked:
            loss_sum, tokens, report = loss_fn(mb, h, head_weight=w)
        else:
            loss_sum, tokens, report = loss_fn(mb, h @ w.t())
        results.append((loss_sum, tokens, report, torch.autograd.grad(loss_sum, (h, w))))
    (loss, tokens, report, grads), (ref_loss, ref_tokens, ref_report, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert tokens == ref_tokens and set(report) == set(ref_report)
    for name in report:  # the logits path's top-K overlap is an fp32 mean
        tol = 1e-7 if name == "topk_overlap_sum" else 1e-12
        torch.testing.assert_close(report[name], ref_report[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    assert grads[1].abs().max() > 0
    # prompt positions and the padding after each response get no gradient (they are never computed)
    first = int(mb.prompt_lens[2]) - 1 + int(mb.response_lens[2])
    assert grads[0][2, first:].abs().max() == 0 and grads[0][:, : int(mb.prompt_lens[0]) - 1].abs().max() == 0
