"""SDPA core attention of the local spec: the same outputs and gradients as Megatron's unfused
``DotProductAttention`` and as an explicit float64 softmax attention, Megatron's path for masks that
are not causal, and the local spec actually using it."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from megatron_opd.models.megatron_config import to_transformer_config
from megatron_opd.models.provider import build_layer_spec
from megatron_opd.models.sdpa_attention import SDPADotProductAttention, is_causal_mask
from megatron_opd.models.tiny import tiny_qwen3_config
from megatron_opd.platform import ParallelConfig

HEADS, GROUPS, HEAD_DIM, SEQ, BATCH = 4, 2, 24, 37, 3


class _OneRankGroup:
    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


@pytest.fixture
def megatron_cpu(monkeypatch):
    """What Megatron's own attention needs from global state, on CPU, undone after the test: a global
    memory buffer (allocated on torch.cuda.current_device()) and an RNG tracker to fork."""
    from megatron.core import parallel_state
    from megatron.core.transformer import dot_product_attention
    from megatron.core.utils import GlobalMemoryBuffer

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", GlobalMemoryBuffer())
    tracker = SimpleNamespace(fork=nullcontext)
    monkeypatch.setattr(dot_product_attention.tensor_parallel, "get_cuda_rng_tracker", lambda: tracker)


def _attention(cls, dtype=torch.float32):
    from megatron.core.transformer.enums import AttnMaskType

    hf = tiny_qwen3_config(num_attention_heads=HEADS, num_key_value_heads=GROUPS, head_dim=HEAD_DIM)
    config = to_transformer_config(hf, ParallelConfig(), dtype)
    return cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
               pg_collection=SimpleNamespace(tp=_OneRankGroup()))


def _inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(SEQ, BATCH, HEADS, HEAD_DIM), (SEQ, BATCH, GROUPS, HEAD_DIM), (SEQ, BATCH, GROUPS, HEAD_DIM)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _causal(seq=SEQ):
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]


def _reference(query, key, value, mask):
    """Float64 softmax attention written out: [s, b, np, hn] inputs, True in ``mask`` = masked."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, hn)
    k, v = (t.repeat_interleave(HEADS // GROUPS, dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return (probs @ v).permute(2, 0, 1, 3).reshape(SEQ, BATCH, HEADS * HEAD_DIM)


def _output_and_grads(module, inputs, mask):
    out = module(*inputs, attention_mask=mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out.detach(), grads


@pytest.mark.parametrize("mask", [_causal(), None], ids=["explicit-causal-mask", "no-mask-causal-type"])
def test_sdpa_matches_megatron_attention_and_float64_reference(megatron_cpu, mask):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    inputs = _inputs()
    out, grads = _output_and_grads(_attention(SDPADotProductAttention), inputs, mask)
    base_out, base_grads = _output_and_grads(_attention(DotProductAttention), inputs, _causal())
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, ref_grads = _output_and_grads(
        lambda *qkv, attention_mask: _reference(*qkv, _causal()), ref_inputs, None)
    assert out.shape == (SEQ, BATCH, HEADS * HEAD_DIM)
    torch.testing.assert_close(out, base_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    for grad, base, ref in zip(grads, base_grads, ref_grads):
        torch.testing.assert_close(grad, base, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad.double(), ref, atol=1e-5, rtol=1e-5)


def test_bf16_sdpa_is_close_to_float64_reference(megatron_cpu):
    inputs = _inputs(torch.bfloat16)
    out = _attention(SDPADotProductAttention, torch.bfloat16)(*inputs, attention_mask=_causal())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(*inputs, _causal()), atol=2e-2, rtol=2e-2)


def test_non_causal_mask_takes_megatron_path(megatron_cpu, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1))  # must not be reached
    padding = _causal().clone()
    padding[..., -3:] = True  # the last keys are padding: not the causal mask any more
    inputs = _inputs()
    out = _attention(SDPADotProductAttention)(*inputs, attention_mask=padding)
    torch.testing.assert_close(out.double(), _reference(*inputs, padding), atol=1e-5, rtol=1e-5)
    assert not calls


def test_is_causal_mask():
    assert is_causal_mask(_causal(5), 5, 5)
    assert is_causal_mask(_causal(5).expand(2, 1, 5, 5), 5, 5)
    assert not is_causal_mask(None, 5, 5)
    assert not is_causal_mask(~_causal(5), 5, 5)
    assert not is_causal_mask(_causal(5)[..., :4], 5, 4)
    assert not is_causal_mask(_causal(5).float(), 5, 5)


def test_local_spec_uses_sdpa_attention():
    spec = build_layer_spec(use_te=False)
    assert spec.submodules.self_attention.submodules.core_attention is SDPADotProductAttention
