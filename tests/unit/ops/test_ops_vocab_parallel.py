"""TP=1 checks of the vocab-parallel ops against a full-vocab PyTorch reference.

Tolerances: fp32 and fp64 inputs within 1e-5 (outputs and gradients); bf16 inputs: outputs within
1e-5 of the fp32 reference on the same bf16 values (both compute in fp32), gradients (returned in
bf16) within 1e-2 relative + 1e-3 absolute.
"""

import pytest
import torch

from megatron_opd.ops import (
    vocab_parallel_entropy,
    vocab_parallel_gather,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
    vocab_parallel_stats,
    vocab_parallel_topk,
)

V_PADDED, V_REAL = 48, 41


def reference(logits, token_ids, gather_ids, vocab_size):
    """Dense fp32 reference on the real vocab columns."""
    z = logits[..., :vocab_size].float()
    log_p = torch.log_softmax(z, dim=-1)
    logprobs = log_p.gather(-1, token_ids[..., None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logprobs, entropy, logits.float().gather(-1, gather_ids)


def make_inputs(dtype, shape=(3, 5), seed=0, padding_value=None):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, V_PADDED, generator=gen)).to(dtype)
    if padding_value is not None:
        logits[..., V_REAL:] = padding_value
    token_ids = torch.randint(0, V_REAL, shape, generator=gen)
    gather_ids = torch.randint(0, V_REAL, (*shape, 4), generator=gen)
    weights = [torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
               torch.randn(*shape, 4, generator=gen)]
    return logits.requires_grad_(True), token_ids, gather_ids, weights


def weighted_sum(outputs, weights):
    return sum((o.float() * w).sum() for o, w in zip(outputs, weights))


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_match_dense_reference(dtype, chunk_size):
    logits, token_ids, gather_ids, weights = make_inputs(dtype)
    ours = vocab_parallel_stats(logits, token_ids, gather_ids, vocab_size=V_REAL, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(weighted_sum(ours[:3], weights), logits)
    ref_logits = logits.detach().float().requires_grad_(True)
    ref = reference(ref_logits, token_ids, gather_ids, V_REAL)
    (ref_grad,) = torch.autograd.grad(weighted_sum(ref, weights), ref_logits)
    for mine, theirs in zip(ours[:3], ref):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad, **tol)
    assert torch.all(grad[..., V_REAL:] == 0), "vocab padding must get no gradient"


def test_padding_columns_never_leak():
    base = make_inputs(torch.float32, padding_value=None)
    huge = make_inputs(torch.float32, padding_value=1e4)
    for a, b in zip(vocab_parallel_stats(base[0], base[1], base[2], vocab_size=V_REAL)[:2],
                    vocab_parallel_stats(huge[0], huge[1], huge[2], vocab_size=V_REAL)[:2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    values, ids = vocab_parallel_topk(huge[0], 5, vocab_size=V_REAL)
    assert int(ids.max()) < V_REAL


def test_wrappers_agree_with_fused_and_log_normalizer():
    logits, token_ids, gather_ids, _ = make_inputs(torch.float32, shape=(2, 3, 4))
    stats = vocab_parallel_stats(logits, token_ids, gather_ids, vocab_size=V_REAL, chunk_size=5)
    lp, ent = vocab_parallel_logprobs_and_entropy(logits, token_ids, vocab_size=V_REAL, chunk_size=2)
    torch.testing.assert_close(lp, vocab_parallel_logprobs(logits, token_ids, vocab_size=V_REAL))
    torch.testing.assert_close(ent, vocab_parallel_entropy(logits, vocab_size=V_REAL))
    torch.testing.assert_close(lp, stats.logprobs)
    torch.testing.assert_close(stats.gathered_logits, vocab_parallel_gather(logits, gather_ids, vocab_size=V_REAL))
    log_z = torch.logsumexp(logits[..., :V_REAL].detach(), -1)
    torch.testing.assert_close(stats.log_normalizer, log_z)
    assert not stats.log_normalizer.requires_grad


def test_gradcheck_float64():
    logits, token_ids, gather_ids, _ = make_inputs(torch.float64, shape=(2, 3))
    logits = logits.detach()[..., :12].clone().requires_grad_(True)
    token_ids, gather_ids = token_ids % 10, gather_ids % 10
    for fn in (
        lambda z: vocab_parallel_logprobs(z, token_ids, vocab_size=10, chunk_size=2),
        lambda z: vocab_parallel_entropy(z, vocab_size=10, chunk_size=4),
        lambda z: vocab_parallel_gather(z, gather_ids, vocab_size=10),
        lambda z: vocab_parallel_stats(z, token_ids, gather_ids, vocab_size=10, chunk_size=5)[:3],
    ):
        assert torch.autograd.gradcheck(fn, (logits,))


def test_gather_gradient_only_at_ids():
    logits, _, gather_ids, weights = make_inputs(torch.float32)
    values = vocab_parallel_gather(logits, gather_ids, vocab_size=V_REAL)
    (grad,) = torch.autograd.grad((values * weights[2]).sum(), logits)
    expected = torch.zeros_like(grad).scatter_add_(-1, gather_ids, weights[2])
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("return_logprobs", [False, True])
def test_topk_matches_torch(return_logprobs):
    logits, *_ = make_inputs(torch.float32, padding_value=50.0)
    values, ids = vocab_parallel_topk(logits, 7, vocab_size=V_REAL, chunk_size=4, return_logprobs=return_logprobs)
    z = logits.detach()[..., :V_REAL]
    ref = torch.log_softmax(z, -1) if return_logprobs else z
    ref_values, ref_ids = ref.topk(7, dim=-1)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, ref_ids)


def test_saved_tensors_hold_no_full_fp32_copy():
    """Autograd keeps the input logits and per-row stats only: no extra [tokens, V] tensor."""
    logits, token_ids, gather_ids, _ = make_inputs(torch.bfloat16, shape=(4, 8))
    big = []

    def pack(t):
        if t.numel() >= logits.shape[-1] * 8 and t.data_ptr() != logits.data_ptr():
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_stats(logits, token_ids, gather_ids, vocab_size=V_REAL)
    assert big == []


# ---- bad input --------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    logits, token_ids, gather_ids, _ = make_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"token_ids has shape \(3, 4\)"):
        vocab_parallel_logprobs(logits, token_ids[:, :4], vocab_size=V_REAL)
    with pytest.raises(TypeError, match="token_ids must be an integer tensor"):
        vocab_parallel_logprobs(logits, token_ids.float(), vocab_size=V_REAL)
    with pytest.raises(TypeError, match="logits must be fp16/bf16/fp32/fp64"):
        vocab_parallel_entropy(logits.detach().long())
    with pytest.raises(ValueError, match="token_ids is on meta"):
        vocab_parallel_logprobs(logits, token_ids.to("meta"), vocab_size=V_REAL)
    with pytest.raises(ValueError, match=f"token_ids contains id {V_REAL} outside the vocab"):
        vocab_parallel_logprobs(logits, torch.full_like(token_ids, V_REAL), vocab_size=V_REAL)
    with pytest.raises(ValueError, match="gather_ids contains id -[0-9]+ outside"):
        vocab_parallel_stats(logits, None, gather_ids - 100, vocab_size=V_REAL)
    with pytest.raises(ValueError, match="ids contains id 48 outside the vocab"):
        vocab_parallel_gather(logits, gather_ids.clamp(max=0) + 48)
    with pytest.raises(ValueError, match="k=42 is larger than the vocab size 41"):
        vocab_parallel_topk(logits, 42, vocab_size=V_REAL)
    with pytest.raises(ValueError, match="vocab_size=49 is larger than the sharded vocab"):
        vocab_parallel_entropy(logits, vocab_size=49)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        vocab_parallel_entropy(logits, chunk_size=0)
