"""SwiGLU of the local spec's MLP: the values and gradients of Megatron's unfused gated activation
(and of float64 autograd), Megatron's path for every other MLP setting, and the spec using it."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_opd.models.megatron_config import to_transformer_config
from megatron_opd.models.provider import build_layer_spec
from megatron_opd.models.swiglu_mlp import SwiGLUMLP, swiglu
from megatron_opd.models.tiny import tiny_qwen3_config
from megatron_opd.platform import ParallelConfig


def _megatron_glu(fused):
    """Megatron's unfused gated activation (transformer/mlp.py, glu_linear_offset 0)."""
    x_glu, x_linear = torch.chunk(fused, 2, dim=-1)
    return F.silu(x_glu) * (x_linear + 0.0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_swiglu_matches_megatron_glu_values_and_grads(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    fused = (3 * torch.randn(7, 3, 2 * 40, generator=gen, dtype=torch.float64)).to(dtype)  # (s, b, 2f)
    grad_out = torch.randn(7, 3, 40, generator=gen, dtype=torch.float64).to(dtype)
    results = []
    for fn in (swiglu, _megatron_glu):
        x = fused.clone().requires_grad_()
        out = fn(x)
        out.backward(grad_out)
        results.append((out.detach(), x.grad))
    (out, grad), (ref_out, ref_grad) = results
    assert out.shape == (7, 3, 40) and grad.shape == fused.shape and grad.is_contiguous()
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(grad, ref_grad, atol=tol, rtol=tol)


def test_swiglu_gradcheck_float64():
    fused = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (fused,))


def _config(**changes):
    config = to_transformer_config(tiny_qwen3_config(), ParallelConfig())
    return dataclasses.replace(config, **changes) if changes else config


def test_only_plain_swiglu_takes_the_fused_path():
    plain = SimpleNamespace(config=_config())
    assert SwiGLUMLP._plain_swiglu(plain, None)
    assert not SwiGLUMLP._plain_swiglu(plain, torch.ones(3))  # per-token scales (MoE experts)
    for changes in (dict(glu_linear_offset=1.0), dict(activation_func_clamp_value=7.0),
                    dict(activation_func=F.gelu), dict(gated_linear_unit=False)):
        assert not SwiGLUMLP._plain_swiglu(SimpleNamespace(config=_config(**changes)), None), changes


def test_local_spec_uses_swiglu_mlp():
    assert build_layer_spec(use_te=False).submodules.mlp.module is SwiGLUMLP
