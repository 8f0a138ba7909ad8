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
    expected = ppo_clipped(cur, torch.where(mask, old, 0.0), 0.2, torch.where(mask, teacher - old, 0.0)) & mask
    torch.testing.assert_close(metrics["clip_fraction"], expected.float())


def test_clip_fraction_counts_positions_where_the_clipped_branch_is_taken():
    # exact arithmetic: ρ = 1.5 / 0.5 / 1.1, r = ±1 or 0, ε = 0.2 (symmetric) and (0.1, 0.6)
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 1.5, 0.85]])
    reward = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, 0.0, -1.0]])
    old = torch.zeros_like(ratio)
    cur = ratio.log().requires_grad_(True)
    cases = {0.2: [1, 0, 0, 1, 0, 0, 0], (0.1, 0.6): [0, 0, 0, 1, 0, 0, 1]}
    for clip_eps, expected in cases.items():
        loss, metrics = sampled_token_opd_loss(cur, old, reward, clip_eps=clip_eps, return_metrics=True)
        torch.testing.assert_close(metrics["clip_fraction"], torch.tensor([expected], dtype=torch.float32))
        assert ppo_clipped(cur, old, clip_eps, reward).int().tolist() == [expected]
        # The counted positions are exactly those without gradient (r = 0 has none either way).
        (grad,) = torch.autograd.grad(loss.sum(), cur)
        assert ((grad == 0) & (reward != 0)).int().tolist() == [expected]


def test_large_log_ratio_stays_finite_with_exact_gradients_where_they_matter():
    cap = math.exp(20.0)  # MAX_LOG_RATIO: ρ is capped at e^20 in value, straight-through in gradient
    delta = torch.tensor([[100.0, 100.0, 5.0, 5.0, -100.0]])
    reward = torch.tensor([[1.0, -1.0, 1.0, -1.0, -1.0]])
    old = torch.full_like(delta, -120.0)
    cur = (old + delta).requires_grad_(True)
    teacher = old + reward
    rho = [cap, cap, math.exp(5.0), math.exp(5.0), math.exp(-100.0)]
    # plain IS loss: ℓ = −ρ r, ∂ℓ/∂log π = −ρ r (ρ capped where Δ > 20)
    loss = sampled_token_opd_loss(cur, old, teacher)
    (grad,) = torch.autograd.grad(loss.sum(), cur)
    expected = torch.tensor([[-p * r for p, r in zip(rho, reward[0].tolist())]])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=0.0)
    # PPO-clipped, ε = 0.2: ρ > 1.2 with r > 0 takes the clipped branch (ℓ = −1.2 r, no gradient),
    # ρ > 1.2 with r < 0 the unclipped one (ℓ = ρ|r|, gradient ρ|r|), ρ ≈ 0 with r < 0: ℓ = 0.8, no gradient.
    loss, metrics = sampled_token_opd_loss(cur, old, teacher, clip_eps=0.2, return_metrics=True)
    (grad,) = torch.autograd.grad(loss.sum(), cur)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, cap, -1.2, math.exp(5.0), 0.8]]), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(grad, torch.tensor([[0.0, cap, 0.0, math.exp(5.0), 0.0]]), rtol=1e-5, atol=0.0)
    assert metrics["clip_fraction"].tolist() == [[1.0, 0.0, 1.0, 0.0, 1.0]]
    assert torch.isfinite(metrics["ratio"]).all()


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
