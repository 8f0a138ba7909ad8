"""The chunked output-layer op against today's path: logits materialised (hidden @ Wᵀ / τ, −inf masked
columns) and fed to ``vocab_parallel_stats`` / ``vocab_parallel_topk`` (themselves tested against
full-vocabulary PyTorch in test_ops_vocab_parallel.py), plus ``gradcheck``.

Tolerances: fp64 values and gradients 1e-12 (abs and rel; seen ≤ 1e-14); fp32 2e-5 rel / 2e-5 abs
(values) and 1e-4 rel / 1e-5 abs (gradients: both sides sum ~V products in a different order).
Cases: a padded vocabulary (37 real ids in 44 columns), chunks that split the sequence (5 tokens per
chunk over [S=7, B=3]), temperature 0.7, −inf masked columns, the LSM tail bucket.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_opd import objectives
from megatron_opd.ops import vocab_parallel_head_stats, vocab_parallel_stats, vocab_parallel_topk

S, B, H, V_PAD, VOCAB, K = 7, 3, 6, 44, 37, 4
MASKED = (2, 30)
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}
GRAD_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _unmasked_ids(gen, shape):
    allowed = torch.tensor([i for i in range(VOCAB) if i not in MASKED])
    return allowed[torch.randint(0, len(allowed), shape, generator=gen)]


def _case(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (2 * torch.randn(S, B, H, generator=gen)).to(dtype)
    weight = torch.randn(V_PAD, H, generator=gen).to(dtype)
    token_ids = _unmasked_ids(gen, (S, B))
    topk_ids = torch.stack([torch.randperm(VOCAB, generator=gen)[:K] for _ in range(S * B)]).view(S, B, K)
    topk_ids = torch.where(torch.isin(topk_ids, torch.tensor(MASKED)), topk_ids.new_tensor(5), topk_ids)
    return hidden, weight, token_ids, topk_ids, gen


def materialised_logits(hidden, weight, temperature, masked):
    """Today's path: the output layer's logits, tempered, masked columns at −inf."""
    logits = (hidden @ weight.t()) / temperature
    columns = torch.zeros(weight.shape[0], dtype=torch.bool)
    columns[list(masked or ())] = True
    return logits.masked_fill(columns, float("-inf"))


def _both_paths(dtype, temperature=0.7, masked=MASKED, chunk_size=5):
    hidden, weight, token_ids, topk_ids, gen = _case(dtype)
    upstream = [torch.randn(S, B, generator=gen, dtype=dtype), torch.randn(S, B, generator=gen, dtype=dtype),
                torch.randn(S, B, K, generator=gen, dtype=dtype)]
    results = []
    for chunked in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if chunked:
            out = vocab_parallel_head_stats(h, w, token_ids, topk_ids, overlap_ids=topk_ids, temperature=temperature,
                                            vocab_size=VOCAB, masked_ids=masked, chunk_size=chunk_size)
            overlap = out.topk_overlap
        else:
            logits = materialised_logits(h, w, temperature, masked)
            out = vocab_parallel_stats(logits, token_ids, topk_ids, vocab_size=VOCAB)
            _, student_top = vocab_parallel_topk(logits.detach(), K, vocab_size=VOCAB)
            overlap = objectives.topk_overlap(student_top, topk_ids).to(dtype)
        loss = sum((o * u).sum() for o, u in zip(out[:3], upstream))
        grads = torch.autograd.grad(loss, (h, w))
        results.append((out.logprobs, out.entropy, out.gathered_logits, out.log_normalizer, overlap, *grads))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature,masked", [(0.7, MASKED), (1.0, None)])
def test_forward_and_gradients_equal_materialised_path(dtype, temperature, masked):
    ours, today = _both_paths(dtype, temperature, masked)
    names = ("logprobs", "entropy", "gathered", "log_z", "overlap", "grad hidden", "grad weight")
    for name, mine, theirs in zip(names, ours, today):
        tol = GRAD_TOL[dtype] if name.startswith("grad") else TOL[dtype]
        torch.testing.assert_close(mine, theirs, **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert ours[6][VOCAB:].abs().max() == 0  # vocab padding rows of the weight get no gradient
    if masked:
        assert ours[6][list(masked)].abs().max() == 0  # nor do the masked columns' rows


def test_one_chunk_and_many_chunks_agree_and_gradcheck():
    hidden, weight, token_ids, topk_ids, _ = _case(torch.float64)
    hidden, weight = hidden[:3, :2].clone().requires_grad_(True), weight.clone().requires_grad_(True)
    token_ids, topk_ids = token_ids[:3, :2], topk_ids[:3, :2]

    def outputs(h, w, chunk):
        out = vocab_parallel_head_stats(h, w, token_ids, topk_ids, temperature=1.3, vocab_size=VOCAB,
                                        masked_ids=MASKED, chunk_size=chunk)
        return out.logprobs, out.entropy, out.gathered_logits

    for one, many in zip(outputs(hidden, weight, 100), outputs(hidden, weight, 2)):
        torch.testing.assert_close(one, many, rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(lambda h, w: outputs(h, w, 4), (hidden, weight))


def _opd_losses(stats, mb, dtype):
    """Sampled-token OPD (ratio, PPO clip) + LSM with the tail bucket, as the trainer combines them."""
    sampled = objectives.sampled_token_opd_loss(stats.logprobs, mb["old"], mb["teacher"], clip_eps=0.2,
                                                mask=mb["mask"])
    lsm = objectives.topk_lsm_loss(stats.gathered_logits, mb["teacher_topk"], mask=mb["mask"],
                                   sampled_ids=mb["sampled"], teacher_topk_ids=mb["topk_ids"],
                                   teacher_sampled_logprobs=mb["teacher"])
    return (sampled * mb["gates"]).sum() + lsm.sum() + 0.01 * stats.entropy.sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_through_the_opd_losses_equals_materialised_path(dtype):
    hidden, weight, token_ids, topk_ids, gen = _case(dtype)
    # [B, S, ...] batch-first like the trainer's loss input
    hidden, token_ids, topk_ids = (t.transpose(0, 1) for t in (hidden, token_ids, topk_ids))
    with torch.no_grad():
        base = vocab_parallel_stats(materialised_logits(hidden, weight, 1.0, ()), token_ids, vocab_size=VOCAB)
    mb = {"old": base.logprobs + 0.3 * torch.randn(B, S, generator=gen, dtype=dtype),  # ratios far from 1: clip acts
          "teacher": base.logprobs - torch.rand(B, S, generator=gen, dtype=dtype),
          "mask": torch.rand(B, S, generator=gen) > 0.2, "sampled": token_ids, "topk_ids": topk_ids,
          "teacher_topk": torch.log_softmax(torch.randn(B, S, K, generator=gen, dtype=dtype), -1),
          "gates": torch.rand(B, S, generator=gen, dtype=dtype) + 0.5}
    support = torch.cat([topk_ids, token_ids[..., None]], -1)
    grads = []
    for chunked in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if chunked:
            stats = vocab_parallel_head_stats(h, w, token_ids, support, vocab_size=VOCAB, chunk_size=4)
        else:
            stats = vocab_parallel_stats(materialised_logits(h, w, 1.0, ()), token_ids, support, vocab_size=VOCAB)
        grads.append(torch.autograd.grad(_opd_losses(stats, mb, dtype), (h, w)))
    for mine, theirs in zip(*grads):
        torch.testing.assert_close(mine, theirs, **GRAD_TOL[dtype])
        assert mine.abs().max() > 0


class _LargestLogitsBlock(TorchDispatchMode):
    """Records the most rows of any [rows, V_valid] (or V_PAD-wide) tensor an op produces, other than
    the weight's own [H, V] views (``weight.t()`` and its gradient)."""

    def __init__(self, widths):
        super().__init__()
        self.widths, self.rows = widths, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if (isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] in self.widths
                    and tensor.shape[0] != H):
                self.rows = max(self.rows, tensor.numel() // tensor.shape[-1])
        return out


@pytest.mark.parametrize("chunked", [True, False])
def test_never_more_than_one_chunk_of_logits(chunked):
    """Forward + backward never create a logits-wide tensor of more rows than one chunk (today's path does)."""
    hidden, weight, token_ids, topk_ids, _ = _case(torch.float32)
    hidden, weight = hidden.requires_grad_(True), weight.requires_grad_(True)
    probe = _LargestLogitsBlock({VOCAB, V_PAD})
    with probe:
        if chunked:
            stats = vocab_parallel_head_stats(hidden, weight, token_ids, topk_ids, overlap_ids=topk_ids,
                                              vocab_size=VOCAB, chunk_size=5)
        else:
            stats = vocab_parallel_stats(hidden @ weight.t(), token_ids, topk_ids, vocab_size=VOCAB, chunk_size=5)
        (stats.logprobs.sum() + stats.entropy.sum() + stats.gathered_logits.sum()).backward()
    if chunked:
        assert probe.rows <= 5
    else:
        assert probe.rows == S * B


def test_bad_inputs_name_the_field():
    hidden, weight, token_ids, topk_ids, _ = _case(torch.float32)
    with pytest.raises(ValueError, match="same H"):
        vocab_parallel_head_stats(hidden, weight[:, :3], token_ids)
    with pytest.raises(ValueError, match="token_ids has shape"):
        vocab_parallel_head_stats(hidden, weight, token_ids[:2])
    with pytest.raises(ValueError, match="gather_ids contains id 40"):
        vocab_parallel_head_stats(hidden, weight, gather_ids=torch.full((S, B, 2), 40), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_head_stats(hidden, weight, token_ids, temperature=0.0)
    with pytest.raises(ValueError, match="masked_ids"):
        vocab_parallel_head_stats(hidden, weight, token_ids, vocab_size=VOCAB, masked_ids=[VOCAB])
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_head_stats(hidden, weight, token_ids, chunk_size=0)
    with pytest.raises(TypeError, match="token_ids must be an integer"):
        vocab_parallel_head_stats(hidden, weight, token_ids.float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_rows_compute_only_those_rows(dtype):
    """token_rows (repeats allowed) = the full computation read at those rows, gradients included."""
    hidden, weight, token_ids, topk_ids, gen = _case(dtype)
    rows = torch.tensor([0, 4, 5, 5, 17, 20])  # of the S·B = 21 flattened [S, B] rows
    upstream = [torch.randn(len(rows), generator=gen, dtype=dtype), torch.randn(len(rows), generator=gen, dtype=dtype),
                torch.randn(len(rows), K, generator=gen, dtype=dtype)]
    results = []
    for selected in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if selected:
            out = vocab_parallel_head_stats(h, w, token_ids.reshape(-1)[rows], topk_ids.reshape(-1, K)[rows],
                                            overlap_ids=topk_ids.reshape(-1, K)[rows], vocab_size=VOCAB,
                                            token_rows=rows, chunk_size=4)
            outputs = out[:5]
        else:
            out = vocab_parallel_head_stats(h, w, token_ids, topk_ids, overlap_ids=topk_ids, vocab_size=VOCAB,
                                            chunk_size=4)
            outputs = [t.reshape(S * B, *t.shape[2:])[rows] for t in out[:5]]
        loss = sum((o * u).sum() for o, u in zip(outputs[:3], upstream))
        results.append((*outputs, *torch.autograd.grad(loss, (h, w))))
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, **GRAD_TOL[dtype])
    assert results[0][5].reshape(S * B, H)[[1, 2, 3]].abs().max() == 0  # rows not asked for: no gradient
    with pytest.raises(ValueError, match="token_rows holds row 21"):
        vocab_parallel_head_stats(hidden, weight, token_ids.reshape(-1)[:1], token_rows=torch.tensor([21]))


@pytest.mark.parametrize("wgrad_block", [16384, 7])
def test_bf16_weights_match_the_materialised_bf16_path(wgrad_block, monkeypatch):
    """bf16 (the GPU trainer): the matmul in bf16 like Megatron's layer, statistics in fp32, the weight
    gradient summed over chunks in fp32 (in vocab blocks of ``wgrad_block`` rows; 7 splits the 37 real rows
    unevenly). Tolerances: values 1e-3 abs (both sides round the same bf16 logits), gradients 2e-2 of their
    largest entry (bf16 matmuls, rounded per chunk here, once there)."""
    from megatron_opd.ops import chunked_head

    monkeypatch.setattr(chunked_head, "WGRAD_VOCAB_BLOCK", wgrad_block)
    hidden, weight, token_ids, topk_ids, gen = _case(torch.float32)
    upstream = [torch.randn(S, B, generator=gen), torch.randn(S, B, generator=gen), torch.randn(S, B, K, generator=gen)]
    results = []
    for chunked in (True, False):
        h, w = hidden.bfloat16().requires_grad_(True), weight.bfloat16().requires_grad_(True)
        if chunked:
            out = vocab_parallel_head_stats(h, w, token_ids, topk_ids, vocab_size=VOCAB, chunk_size=5)
        else:
            out = vocab_parallel_stats(h @ w.t(), token_ids, topk_ids, vocab_size=VOCAB)
        loss = sum((o * u).sum() for o, u in zip(out[:3], upstream))
        results.append((*out[:4], *torch.autograd.grad(loss, (h, w))))
    for index, (mine, theirs) in enumerate(zip(*results)):
        assert mine.dtype == theirs.dtype
        if index < 4:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-3)
        else:
            scale = theirs.float().abs().max().item()
            assert (mine.float() - theirs.float()).abs().max().item() <= 2e-2 * scale
