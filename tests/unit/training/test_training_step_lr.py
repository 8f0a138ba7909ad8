"""The ``lr`` that ``train_step`` reports (metrics.jsonl) is the rate its optimizer step ran at, not the next
step's rate the scheduler moves on to: checked against the rate measured from the weight change of a plain
SGD step (Δw = -lr · g with g = 1), under the trainer's own Megatron ``OptimizerParamScheduler`` with warm-up.
The Megatron pipeline schedule and the cross-rank reduction are replaced (no process group needed)."""

from types import SimpleNamespace

import pytest
import torch
from test_training_loss import make_microbatch

from megatron_opd.training import step as step_module
from megatron_opd.training.megatron_setup import _build_scheduler

PEAK_LR, WARMUP = 0.1, 2


class SGDLikeMegatron:
    """The part of Megatron's optimizer interface ``train_step`` uses, over plain SGD."""

    def __init__(self, params):
        self.inner = torch.optim.SGD(params, lr=123.0)  # the scheduler sets the real rate at once

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self):
        self.inner.zero_grad()

    def step(self):
        self.inner.step()
        return True, 1.0, None  # (update ok, grad norm, zeros in grad)


def test_logged_lr_is_the_rate_the_step_ran_at(monkeypatch):
    weight = torch.nn.Parameter(torch.zeros(1))

    def schedule(model, microbatches, loss_func, device, forward_only, chunked_head=False):
        weight.grad = torch.ones(1)  # g = 1: the step moves the weight by exactly -lr
        return [{"loss_sum": torch.tensor(1.0), "tokens": torch.tensor(1.0)}]

    monkeypatch.setattr(step_module, "_run_schedule", schedule)
    monkeypatch.setattr(step_module, "reduce_reports", lambda local, state, keys: local)
    optimizer = SGDLikeMegatron([weight])
    optim_cfg = SimpleNamespace(lr=PEAK_LR, min_lr=0.0, lr_warmup_iters=WARMUP, train_iters=6,
                                lr_decay_style="cosine", weight_decay=0.0)
    student = SimpleNamespace(model=[SimpleNamespace(zero_grad_buffer=lambda: None)], optimizer=optimizer,
                              scheduler=_build_scheduler(SimpleNamespace(optim=optim_cfg), optimizer))
    loss = SimpleNamespace(normalizer=SimpleNamespace(reset=lambda: None), settings=SimpleNamespace(chunked_head=True))
    state = SimpleNamespace(dp_size=1, dp_rank=0, device=torch.device("cpu"))
    minibatch = make_microbatch(torch.Generator().manual_seed(0))
    logged, applied = [], []
    for _ in range(5):
        before = weight.item()
        result = step_module.train_step(student, loss, minibatch, state, minibatch.num_sequences, ["loss_sum"])
        logged.append(result["lr"])
        applied.append(before - weight.item())
    assert logged == pytest.approx(applied, abs=1e-7)
    # Linear warm-up from 0: step k (1-based) runs at PEAK_LR * (k - 1) / WARMUP, then the cosine decay.
    assert logged[:3] == pytest.approx([0.0, PEAK_LR / 2, PEAK_LR], abs=1e-7)
    assert PEAK_LR > logged[3] > logged[4] > 0.0
