#!/usr/bin/env python
"""GPU check: the Transformer Engine layer spec vs transformers' Qwen3ForCausalLM in bf16 (and fp32).

    python tools/check_te_parity.py                      # 1 GPU, TP=1
    torchrun --nproc-per-node 2 tools/check_te_parity.py --tp 2

Builds a small random Qwen3 (GQA, head_dim ≠ hidden/heads, tied and untied), loads it into the TE-spec
Megatron model (norms fused into linear_qkv / linear_fc1), and reports the max |Δlogit| against HF on the
real vocab, plus a bit-exact check of ``gather_hf_state_dict``. Exits 0 when within tolerance, 1 otherwise,
2 (skipped) without CUDA or Transformer Engine.

Every rank builds its HF reference on its own device (``ParallelState.device``, i.e. cuda:LOCAL_RANK), not
on cuda:0. The HF reference runs with TF32 disabled (true fp32); TE cannot be told the same (see
``TOLERANCE``).
"""

from __future__ import annotations

import argparse
import sys

import torch

TOLERANCE = {"bfloat16": 0.15, "float32": 0.03}
"""Max |Δlogit| on logits of magnitude ~5-10 after 4 layers.

bfloat16: a few bf16 ulps (unit roundoff 2^-8) accumulated over the layers.
float32: Transformer Engine runs every pure-fp32 GEMM with ``CUBLAS_COMPUTE_32F_FAST_TF32``
(``transformer_engine/common/gemm/cublaslt_gemm.cu``: "Use TF32 only for pure FP32 GEMM"), whatever
``torch.backends.cuda.matmul.allow_tf32`` says. TF32 keeps 10 mantissa bits (unit roundoff 2^-11), 8x
finer than bf16, so the bf16 bound scaled by 1/8 (≈0.019), rounded up to 0.03 for headroom. A true-fp32
mismatch (a wrong weight, a missing norm) is O(0.1-1), still far above it.
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size under torchrun)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=sorted(TOLERANCE))
    return parser.parse_args(argv)


def disable_tf32() -> None:
    """The HF reference must be true fp32 (torch would otherwise be free to use TF32 matmuls/convs)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def check(tie: bool, dtype_name: str, state, use_te: bool = True) -> tuple[float, bool]:
    """Max |Δlogit| vs HF and whether the gathered HF weights are bit-exact.

    ``state`` is this rank's ``ParallelState``: the HF model and the inputs go to ``state.device``.
    ``use_te=False`` runs the same comparison with the local spec (how the CPU suite exercises it).
    """
    import torch.distributed as dist

    from megatron_opd.models import build_qwen3_model, forward_logits, gather_hf_state_dict, load_hf_weights
    from megatron_opd.models.tiny import tiny_qwen3_config, tiny_qwen3_model

    dtype = getattr(torch, dtype_name)
    tp = state.tp_size
    cfg = tiny_qwen3_config(tie, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=64, vocab_size=1000)
    hf = tiny_qwen3_model(cfg, seed=0).to(device=state.device, dtype=dtype)
    chunks = build_qwen3_model(cfg, state.config, dtype=dtype, use_te=use_te)
    load_hf_weights(chunks, hf.state_dict(), cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).to(state.device)
    logits = forward_logits(chunks, ids)
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=state.tp_group)  # collective over TP
    with torch.no_grad():
        ref = hf(ids).logits
    err = (torch.cat(parts, -1)[..., : cfg.vocab_size].float() - ref.float()).abs().max().item()  # host sync
    gathered = gather_hf_state_dict(chunks, cfg)
    exact = all(torch.equal(gathered[k], v) for k, v in hf.state_dict().items() if k in gathered)
    return err, exact


def run_checks(dtypes, tp: int, use_te: bool = True) -> list[dict]:
    """Every (dtype, tied) case on this rank; one result dict per case."""
    from megatron_opd.platform import ParallelConfig, initialize_distributed

    disable_tf32()
    state = initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    results = []
    for dtype_name in dtypes:
        for tie in (False, True):
            err, exact = check(tie, dtype_name, state, use_te=use_te)
            results.append(dict(dtype=dtype_name, tied=tie, tp=tp, max_abs_dlogit=err, tolerance=TOLERANCE[dtype_name],
                                gather_exact=exact, passed=err < TOLERANCE[dtype_name] and exact))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_opd.models import transformer_engine_available

    if not transformer_engine_available():
        print("SKIPPED: needs CUDA and transformer_engine (not counted as a pass)")
        return 2
    from megatron_opd.platform import destroy_distributed

    results = run_checks(args.dtypes, args.tp)
    for r in results:
        print(f"{r['dtype']:9s} tied={r['tied']!s:5s} tp={r['tp']} max|dlogit|={r['max_abs_dlogit']:.3e} "
              f"(tol {r['tolerance']}) gather_exact={r['gather_exact']} {'PASS' if r['passed'] else 'FAIL'}")
    destroy_distributed()
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
