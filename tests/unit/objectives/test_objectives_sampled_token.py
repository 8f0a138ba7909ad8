"""Sampled-token OPD loss against hand-made cases and an independent PPO reference."""

import math

import pytest
import torch

from megatron_opd.objectives import ppo_clipped, sampled_token_opd_loss


def _inputs(seed=0, shape=(3, 7)):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=gen) * 4
    cur = (old + 0.5 * torch.randn(shape, generator=gen)).requires_grad_(True)
    teacher = -torch.rand(shape, generator=gen) * 4
    return cur, old, teacher


def test_first_pass_is_reinforce_on_reverse_kl_reward():
    _, old, teacher = _inputs()
    cur = old.clone().requires_grad_(True)
    loss = sampled_token_opd_loss(cur, old, teacher)
    torch.testing.assert_close(loss, -(teacher - old))
    (grad,) = torch.autograd.grad(loss.sum(), cur)
    torch.testing.assert_close(grad, -(teacher - old))  # −r_t ∇log π_θ


def test_clipped_loss_matches_reference_and_hand_values():
    cur, old, teacher = _inputs(1)
    ratio = torch.exp(cur - old)
    reward = teacher - old
    ref = -torch.min(ratio * reward, ratio.clamp(0.8, 1.2) * reward)
    torch.testing.assert_close(sampled_token_opd_loss(cur, old, teacher, clip_eps=0.2), ref)
    asym = -torch.min(ratio * reward, ratio.clamp(0.9, 1.3) * reward)
    torch.testing.assert_close(sampled_token_opd_loss(cur, old, teacher, clip_eps=(0.1, 0.3)), asym)
    # hand-made: ρ = 1.5, r = ±1, ε = 0.2
    cur1 = torch.tensor([[math.log(1.5), math.log(1.5)]], requires_grad=True)
    zero = torch.zeros(1, 2)
    loss = sampled_token_opd_loss(cur1, zero, torch.tensor([[1.0, -1.0]]), clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5]]))
    (grad,) = torch.autograd.grad(loss.sum(), cur1)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.5]]))  # clipped branch has no gradient


def test_mask_hides_invalid_positions_even_nan():
    cur, old, teacher = _inputs(2)
    mask = torch.rand(cur.shape, generator=torch.Generator().manual_seed(3)) > 0.3
    teacher = torch.where(mask, teacher, float("nan"))
    old = torch.where(mask, old, float("-inf"))
    loss, metrics = sampled_token_opd_loss(cur, old, teacher, clip_eps=0.2, mask=mask, return_metrics=True)
    assert torch.all(loss[~mask] == 0) and torch.isfinite(loss).all()
    (grad,) = torch.autograd.grad(loss.sum(), cur)
    assert torch.isfinite(grad).all() and torch.all(grad[~mask] == 0)
    expected = ppo_clipped(cur, torch.where(mask, old, 0.0), 0.2) & mask
    torch.testing.assert_close(metrics["clip_fraction"], expected.float())


def test_bad_inputs():
    cur, old, teacher = _inputs()
    with pytest.raises(ValueError, match=r"teacher_logprobs has a non-finite value nan at index \(1, 2\)"):
        bad = teacher.clone()
        bad[1, 2] = float("nan")
        sampled_token_opd_loss(cur, old, bad)
    with pytest.raises(ValueError, match="teacher_logprobs has a non-finite value -inf"):
        sampled_token_opd_loss(cur, old, torch.full_like(teacher, float("-inf")))
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(3, 6\), expected \(3, 7\)"):
        sampled_token_opd_loss(cur, old[:, :6], teacher)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        sampled_token_opd_loss(cur, old, teacher, mask=torch.ones(3, 7))
    with pytest.raises(ValueError, match="teacher_logprobs is on meta"):
        sampled_token_opd_loss(cur, old, teacher.to("meta"))
    with pytest.raises(ValueError, match="clip_eps must be"):
        sampled_token_opd_loss(cur, old, teacher, clip_eps=1.5)
