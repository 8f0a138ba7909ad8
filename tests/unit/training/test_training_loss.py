"""The trainer's micro-batch loss on plain tensors (no Megatron, no process group):
the exact global mean gate normalisation equals the paper's formula L = Σ m ĝ ℓ / Σ m."""

import dataclasses

import pytest
import torch

from megatron_opd.gating import DriftGateConfig, drift_gates
from megatron_opd.objectives import sampled_token_opd_loss
from megatron_opd.training.experience import Experience
from megatron_opd.training.loss import LossSettings, MicrobatchLoss


def make_microbatch(gen, batch=3, prompt=4, resp=10, vocab=11):
    input_ids = torch.randint(1, vocab, (batch, prompt + resp), generator=gen)
    response_ids = input_ids[:, prompt:].clone()
    lens = torch.tensor([resp, resp - 3, resp - 6])
    mask = torch.arange(resp)[None, :] < lens[:, None]
    return Experience(input_ids=input_ids, prompt_lens=torch.full((batch,), prompt), response_lens=lens,
                      response_ids=response_ids, loss_mask=mask, truncated=torch.zeros(batch, dtype=torch.bool),
                      old_logprobs=-torch.rand(batch, resp, generator=gen) - 1.0,
                      teacher_logprobs=-torch.rand(batch, resp, generator=gen) * 3.0)


def response_logprobs(logits, mb):
    """Full-vocab log π(y_t): the logit at sequence position prompt_len - 1 + t predicts response token t."""
    logp = torch.log_softmax(logits.double(), -1)
    positions = mb.prompt_lens[:, None] - 1 + torch.arange(mb.response_ids.shape[1])[None, :]
    return torch.stack([logp[b, positions[b], mb.response_ids[b]] for b in range(mb.response_ids.shape[0])])


@pytest.mark.parametrize("granularity", ["block", "token", "sequence"])
def test_gate_weighted_sum_equals_mean_normalised_loss(granularity):
    gen = torch.Generator().manual_seed(0)
    mb = make_microbatch(gen)
    logits = torch.randn(*mb.input_ids.shape, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    gate = DriftGateConfig(granularity=granularity, block_size=4, tau=2.0)
    loss_fn = MicrobatchLoss(LossSettings(objective="sampled", gate=gate, vocab_size=11), None, None)
    loss_sum, num_tokens, report = loss_fn(mb, logits)
    # Reference: full-vocab log-probs, the objective, gates with the paper's mean normalisation.
    cur = response_logprobs(logits, mb)
    ell = sampled_token_opd_loss(cur, mb.old_logprobs.double(), mb.teacher_logprobs.double())
    gates, _ = drift_gates(cur.detach(), mb.old_logprobs.double(), mb.loss_mask, gate)
    mask = mb.loss_mask
    expected = (torch.where(mask, gates.double() * ell, 0.0)).sum() / mask.sum()
    normalised = loss_sum / loss_fn.normalizer.weighted * loss_fn.normalizer.tokens
    assert int(num_tokens) == int(mask.sum())
    assert float(normalised.detach() / num_tokens) == pytest.approx(float(expected.detach()), rel=1e-5)
    raw, _ = drift_gates(cur.detach(), mb.old_logprobs.double(), mask, dataclasses.replace(gate, normalization="none"))
    assert loss_fn.normalizer.scale(None, None, 0) == pytest.approx(float(mask.sum() / (raw * mask).sum()), rel=1e-6)


def test_no_drift_gives_unit_gates_and_plain_token_mean():
    gen = torch.Generator().manual_seed(1)
    mb = make_microbatch(gen)
    logits = torch.randn(*mb.input_ids.shape, 11, generator=gen, dtype=torch.float64)
    mb = dataclasses.replace(mb, old_logprobs=response_logprobs(logits, mb).float())
    loss_fn = MicrobatchLoss(LossSettings(objective="sampled", gate=DriftGateConfig(), vocab_size=11), None, None)
    loss_fn(mb, logits)
    assert float(loss_fn.normalizer.weighted) == pytest.approx(float(loss_fn.normalizer.tokens), abs=1e-9)


def test_sft_loss_is_negative_log_likelihood_of_the_response():
    gen = torch.Generator().manual_seed(2)
    mb = dataclasses.replace(make_microbatch(gen), old_logprobs=None, teacher_logprobs=None)
    logits = torch.randn(*mb.input_ids.shape, 11, generator=gen, dtype=torch.float64)
    settings = LossSettings(objective="sft", gate=DriftGateConfig(granularity="none"), vocab_size=11)
    loss_sum, num_tokens, _ = MicrobatchLoss(settings, None, None)(mb, logits)
    expected = -torch.where(mb.loss_mask, response_logprobs(logits, mb), 0.0).sum()
    assert float(loss_sum) == pytest.approx(float(expected), rel=1e-6)
