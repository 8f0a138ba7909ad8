"""Teacher-TopK/LSM loss: closed forms, K=1, K=V reverse KL, tail bucket, gradcheck, bad input."""

import math

import pytest
import torch

from megatron_opd.objectives import student_topk_mass, topk_lsm_loss


def test_closed_form_hand_cases():
    student = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p̃ = (1/4, 3/4) and (1/2, 1/2)
    teacher = torch.log(torch.tensor([[[0.1, 0.3], [0.1, 0.3]]]))  # q̃ = (1/4, 3/4)
    expected = torch.tensor([[0.0, 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)]])
    torch.testing.assert_close(topk_lsm_loss(student, teacher), expected, rtol=0, atol=1e-6)


def test_k1_is_exactly_zero_and_shift_invariance():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 1, generator=gen) * 10
    assert torch.all(topk_lsm_loss(student, -torch.rand(2, 5, 1, generator=gen)) == 0.0)
    student, teacher = torch.randn(2, 5, 4, generator=gen), -torch.rand(2, 5, 4, generator=gen) * 3
    torch.testing.assert_close(topk_lsm_loss(student + 7.0, teacher - 2.0), topk_lsm_loss(student, teacher))


def test_k_equals_v_with_full_teacher_is_full_reverse_kl():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(2, 3, 11, generator=gen, dtype=torch.float64), -1)
    log_p = torch.log_softmax(student, -1)
    full_kl = (log_p.exp() * (log_p - teacher)).sum(-1)
    torch.testing.assert_close(topk_lsm_loss(student, teacher).double(), full_kl, rtol=1e-6, atol=1e-6)


def _tail_case(seed=2):
    gen = torch.Generator().manual_seed(seed)
    topk_ids = torch.stack([torch.randperm(20, generator=gen)[:4] for _ in range(6)]).view(2, 3, 4)
    sampled = torch.randint(0, 20, (2, 3), generator=gen)
    sampled[0, 0] = topk_ids[0, 0, 2]  # one sampled token inside S_t
    sampled[1, 2] = 19 if 19 not in topk_ids[1, 2] else 18 - int(18 in topk_ids[1, 2])
    student = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    teacher_topk = -torch.rand(2, 3, 4, generator=gen, dtype=torch.float64) * 3
    teacher_sampled = -torch.rand(2, 3, generator=gen, dtype=torch.float64) * 6
    return student, teacher_topk, topk_ids, sampled, teacher_sampled


def test_tail_bucket_adds_sampled_token_only_when_outside():
    student, teacher_topk, topk_ids, sampled, teacher_sampled = _tail_case()
    loss = topk_lsm_loss(student, teacher_topk, sampled_ids=sampled, teacher_topk_ids=topk_ids,
                         teacher_sampled_logprobs=teacher_sampled)
    for b in range(2):
        for t in range(3):
            inside = bool((topk_ids[b, t] == sampled[b, t]).any())
            cols = 4 if inside else 5
            teacher = torch.cat([teacher_topk[b, t], teacher_sampled[b, t:t + 1]])[:cols]
            p = torch.softmax(student[b, t, :cols], 0)
            ref = (p * (torch.log(p) - torch.log_softmax(teacher, 0))).sum()
            torch.testing.assert_close(loss[b, t], ref)
    assert bool((topk_ids[0, 0] == sampled[0, 0]).any()) and not bool((topk_ids[1, 2] == sampled[1, 2]).any())


def test_gradcheck_float64_plain_and_tail_with_mask():
    student, teacher_topk, topk_ids, sampled, teacher_sampled = _tail_case(3)
    student = student.requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.autograd.gradcheck(lambda s: topk_lsm_loss(s[..., :4], teacher_topk, mask=mask), (student,))
    assert torch.autograd.gradcheck(
        lambda s: topk_lsm_loss(s, teacher_topk, mask=mask, sampled_ids=sampled, teacher_topk_ids=topk_ids,
                                teacher_sampled_logprobs=teacher_sampled), (student,))


def test_masked_positions_may_hold_nan_and_metrics():
    student, teacher_topk, topk_ids, sampled, _ = _tail_case(4)
    student = student[..., :4].clone().requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    teacher = torch.where(mask[..., None], teacher_topk, float("nan"))
    log_z = torch.randn(2, 3, dtype=torch.float64) + 5
    loss, metrics = topk_lsm_loss(student, teacher, mask=mask, sampled_ids=sampled, teacher_topk_ids=topk_ids,
                                  student_log_normalizer=log_z, return_metrics=True)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and torch.all(grad[~mask] == 0)
    mass = torch.exp(student.detach() - log_z[..., None]).sum(-1).float()
    torch.testing.assert_close(metrics["student_topk_mass"], torch.where(mask, mass, 0.0))
    torch.testing.assert_close(student_topk_mass(student, log_z), mass)
    outside = ~(topk_ids == sampled[..., None]).any(-1) & mask
    assert torch.equal(metrics["sampled_outside_topk"], outside.float())


def test_bad_inputs():
    student, teacher_topk, topk_ids, sampled, teacher_sampled = _tail_case()
    bad = teacher_topk.clone()
    bad[1, 1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs has a non-finite value inf at index \(1, 1, 3\)"):
        topk_lsm_loss(student[..., :4], bad)
    with pytest.raises(ValueError, match="tail bucket.*pass sampled_ids, teacher_topk_ids and teacher_sampled_logprobs"):
        topk_lsm_loss(student, teacher_topk)
    with pytest.raises(ValueError, match=r"student_logits_at_topk has shape \(2, 3, 3\)"):
        topk_lsm_loss(student[..., :3], teacher_topk)
    with pytest.raises(ValueError, match="must be \\[B, T, K\\]"):
        topk_lsm_loss(student[0], teacher_topk[0])
    with pytest.raises(ValueError, match="teacher_sampled_logprobs has a non-finite value nan"):
        topk_lsm_loss(student, teacher_topk, sampled_ids=sampled, teacher_topk_ids=topk_ids,
                      teacher_sampled_logprobs=torch.full_like(teacher_sampled, float("nan")))
