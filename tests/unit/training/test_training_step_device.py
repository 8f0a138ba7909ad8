"""Device placement of the trainer's micro-batch path, checked on CPU with the ``meta`` device as the
"accelerator": meta tensors hold no data and torch refuses to mix them with CPU tensors, so one
micro-batch through ``step._forward_step`` and ``MicrobatchLoss`` (ops, objective, drift gate,
report, backward) on meta fails wherever a tensor is left on, or created on, the host (the
``token_ids is on cpu but logits are on cuda`` class of bug)."""

import dataclasses

import pytest
import torch
from test_training_loss import make_microbatch

from megatron_opd.gating import DriftGateConfig
from megatron_opd.training.loss import LossSettings, MicrobatchLoss
from megatron_opd.training.step import _forward_step

META = torch.device("meta")
VOCAB, PADDED_VOCAB, K = 11, 16, 3


class MetaModel:
    """Stands in for GPTModel on the accelerator: records its inputs' devices, returns logits there."""

    def __init__(self):
        self.input_devices = []

    def __call__(self, input_ids, position_ids, attention_mask):
        self.input_devices = [t.device for t in (input_ids, position_ids, attention_mask)]
        return torch.zeros(*input_ids.shape, PADDED_VOCAB, device=input_ids.device, requires_grad=True)


def host_microbatch():
    gen = torch.Generator().manual_seed(0)
    mb = make_microbatch(gen, vocab=VOCAB)
    return dataclasses.replace(
        mb, teacher_topk_ids=torch.randint(0, VOCAB, (*mb.response_ids.shape, K), generator=gen),
        teacher_topk_logprobs=torch.log_softmax(torch.randn(*mb.response_ids.shape, K, generator=gen), -1))


@pytest.mark.parametrize("objective,granularity,normalization", [
    ("sampled", "block", "mean"), ("sampled", "token", "clipped"), ("lsm", "block", "mean"),
    ("lsm", "span", "residual"), ("lsm", "sequence", "none"), ("sft", "none", "mean")])
def test_microbatch_loss_runs_on_the_model_device(objective, granularity, normalization):
    mb = host_microbatch()
    settings = LossSettings(objective=objective, vocab_size=VOCAB, topk=K, ppo_clip=0.2, lsm_tail=True,
                            gate=DriftGateConfig(granularity=granularity, block_size=4, normalization=normalization),
                            span_delimiter_ids=frozenset({3, 7}))
    loss_fn = MicrobatchLoss(settings, None, None)
    model = MetaModel()
    output, loss_func = _forward_step(loss_fn, META, iter([mb]), model)  # the host micro-batch goes in
    assert model.input_devices == [META] * 3
    loss_sum, num_tokens, report = loss_func(output)
    assert loss_sum.device == META and num_tokens.device == META
    assert {name: value.device for name, value in report.items()} == {name: META for name in report}
    loss_sum.backward()  # the ops' backward (chunked softmax gradient, scatter to the support) on meta too
    assert output.grad.device == META
    assert loss_fn.normalizer.weighted.device == META  # Σ m g stays on the device: no sync per micro-batch


@pytest.mark.parametrize("objective", ["lsm", "sampled"])
def test_chunked_head_loss_runs_on_the_model_device(objective):
    """The chunked head (hidden states + output weight, the trainer's default) on the device too. Meta tensors
    hold no values, so ``nonzero`` (which response slots are real tokens) is told to take them all."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        _chunked_head_loss_on_meta(objective)


def _chunked_head_loss_on_meta(objective):
    mb = host_microbatch().to(META)
    settings = LossSettings(objective=objective, vocab_size=VOCAB, topk=K, ppo_clip=0.2, lsm_tail=True,
                            gate=DriftGateConfig(granularity="block", block_size=4), head_chunk_tokens=5)
    loss_fn = MicrobatchLoss(settings, None, None)
    hidden = torch.zeros(*mb.input_ids.shape, 8, device=META, requires_grad=True)
    weight = torch.zeros(PADDED_VOCAB, 8, device=META, requires_grad=True)
    loss_sum, num_tokens, report = loss_fn(mb, hidden, head_weight=weight)
    assert loss_sum.device == META and num_tokens.device == META
    assert {name: value.device for name, value in report.items()} == {name: META for name in report}
    loss_sum.backward()
    assert hidden.grad.device == META and weight.grad.device == META
