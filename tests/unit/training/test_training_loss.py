"""The trainer's micro-batch loss on plain tensors (no Megatron, no process group):
the exact global mean gate normalisation equals the paper's formula L = Σ m ĝ ℓ / Σ m."""

import dataclasses

import pytest
import torch

from megatron_opd.gating import DriftGateConfig, drift_gates
from megatron_opd.objectives import sampled_token_opd_loss
from megatron_opd.training.experience import Experience
from megatron_opd.training.loss import LossSettings, MicrobatchLoss
from megatron_opd.training.metrics import derive_step_metrics


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


@pytest.mark.parametrize("normalization", ["mean", "none", "clipped", "residual"])
def test_trained_gradient_equals_the_gated_token_mean_for_every_normalisation(normalization):
    """What the trainer applies: ∇(loss_sum) / Σ m (Megatron's per-token scaling) times the step's
    gate scale (GateNormalizer, applied after finalize_model_grads) must be ∇ of Σ m ĝ ℓ / Σ m, with
    ĝ the gates of ``normalization`` (mean: g / mean g; none: raw g; clipped: in the clip range)."""
    gen = torch.Generator().manual_seed(3)
    mb = make_microbatch(gen)
    logits = torch.randn(*mb.input_ids.shape, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    gate = DriftGateConfig(granularity="block", block_size=4, tau=2.0, normalization=normalization,
                           clip_range=(0.5, 1.5))
    loss_fn = MicrobatchLoss(LossSettings(objective="sampled", gate=gate, vocab_size=11), None, None)
    loss_sum, num_tokens, report = loss_fn(mb, logits)
    scale = loss_fn.normalizer.scale(None, None, 0)
    (trained,) = torch.autograd.grad(loss_sum * scale / num_tokens, logits)
    cur = response_logprobs(logits, mb)
    ell = sampled_token_opd_loss(cur, mb.old_logprobs.double(), mb.teacher_logprobs.double())
    gates, _ = drift_gates(cur.detach(), mb.old_logprobs.double(), mb.loss_mask, gate)
    mask = mb.loss_mask
    (expected,) = torch.autograd.grad(torch.where(mask, gates.double() * ell, 0.0).sum() / mask.sum(), logits)
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-8)
    # The logged loss is the loss that was trained.
    sums = {name: float(value) for name, value in report.items()}
    trained_loss = (torch.where(mask, gates.double() * ell, 0.0).sum() / mask.sum()).detach()
    assert derive_step_metrics(sums, scale)["loss"] == pytest.approx(float(trained_loss), rel=1e-5)
    if normalization == "none":
        assert float((gates * mask).sum() / mask.sum()) < 0.9  # raw gates: 'none' must differ from 'mean'
    if normalization == "clipped":  # the clip range binds, and the weights the trainer applies stay in it
        assert bool((gates[mask] == 1.5).any())
        assert 0.5 <= float(gates[mask].min()) and float(gates[mask].max() * scale) <= 1.5


@pytest.mark.parametrize("objective", ["sampled", "lsm"])
def test_padded_positions_cannot_poison_the_gradient(objective):
    """NaN or huge values at padded (mask = False) positions leave the gradient finite and unchanged."""
    gen = torch.Generator().manual_seed(4)
    mb = make_microbatch(gen)
    k = 3
    mb = dataclasses.replace(mb, teacher_topk_ids=torch.randint(0, 11, (*mb.response_ids.shape, k), generator=gen),
                             teacher_topk_logprobs=torch.log_softmax(torch.randn(*mb.response_ids.shape, k,
                                                                                 generator=gen), -1))
    logits = torch.randn(*mb.input_ids.shape, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    pad = ~mb.loss_mask
    assert bool(pad.any())
    poisoned = {
        "huge": dataclasses.replace(mb, old_logprobs=mb.old_logprobs.masked_fill(pad, -3e38),
                                    teacher_logprobs=mb.teacher_logprobs.masked_fill(pad, 3e38)),
        "nan": dataclasses.replace(mb, teacher_logprobs=mb.teacher_logprobs.masked_fill(pad, float("nan")),
                                   teacher_topk_logprobs=mb.teacher_topk_logprobs.masked_fill(pad[..., None],
                                                                                              float("nan"))),
    }
    settings = LossSettings(objective=objective, gate=DriftGateConfig(granularity="block", block_size=4),
                            vocab_size=11, topk=k, ppo_clip=0.2)

    def gradient(batch):
        loss_sum, _, _ = MicrobatchLoss(settings, None, None)(batch, logits)
        return torch.autograd.grad(loss_sum, logits)[0]

    clean = gradient(mb)
    for name, batch in poisoned.items():
        grad = gradient(batch)
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, clean, rtol=0, atol=0, msg=name)
