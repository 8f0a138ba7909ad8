#!/usr/bin/env python
"""GPU check: the Transformer Engine layer spec vs transformers' Qwen3ForCausalLM in bf16 (and fp32).

    python tools/check_te_parity.py                      # 1 GPU, TP=1
    torchrun --nproc-per-node 2 tools/check_te_parity.py --tp 2

Builds a small random Qwen3 (GQA, head_dim ≠ hidden/heads, tied and untied), loads it into the TE-spec
Megatron model (norms fused into linear_qkv / linear_fc1), and reports the max |Δlogit| against HF on the
real vocab, plus a bit-exact check of ``gather_hf_state_dict``. Exits 0 when within tolerance, 1 otherwise,
2 (skipped) without CUDA or Transformer Engine.
"""

from __future__ import annotations

import argparse
import sys

import torch

TOLERANCE = {"bfloat16": 0.15, "float32": 1e-3}
"""bf16 logits of magnitude ~5-10 after 4 layers: a few bf16 ulps; TE fp32 uses TF32-free GEMMs."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size under torchrun)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=sorted(TOLERANCE))
    return parser.parse_args(argv)


def check(tie: bool, dtype_name: str, tp: int) -> tuple[float, bool]:
    """Max |Δlogit| vs HF and whether the gathered HF weights are bit-exact."""
    import torch.distributed as dist

    from megatron_opd.models import build_qwen3_model, forward_logits, gather_hf_state_dict, load_hf_weights
    from megatron_opd.models.tiny import tiny_qwen3_config, tiny_qwen3_model
    from megatron_opd.platform import ParallelConfig, initialize_distributed

    dtype = getattr(torch, dtype_name)
    cfg = tiny_qwen3_config(tie, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=64, vocab_size=1000)
    hf = tiny_qwen3_model(cfg, seed=0).to(device="cuda", dtype=dtype)
    state = initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    chunks = build_qwen3_model(cfg, state.config, dtype=dtype, use_te=True)
    load_hf_weights(chunks, hf.state_dict(), cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    logits = forward_logits(chunks, ids)
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=state.tp_group)  # collective over TP
    with torch.no_grad():
        ref = hf(ids).logits
    err = (torch.cat(parts, -1)[..., : cfg.vocab_size].float() - ref.float()).abs().max().item()
    gathered = gather_hf_state_dict(chunks, cfg)
    exact = all(torch.equal(gathered[k], v) for k, v in hf.state_dict().items() if k in gathered)
    return err, exact


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_opd.models import transformer_engine_available

    if not transformer_engine_available():
        print("SKIPPED: needs CUDA and transformer_engine (not counted as a pass)")
        return 2
    from megatron_opd.platform import destroy_distributed

    ok = True
    for dtype_name in args.dtypes:
        for tie in (False, True):
            err, exact = check(tie, dtype_name, args.tp)
            passed = err < TOLERANCE[dtype_name] and exact
            ok &= passed
            print(f"{dtype_name:9s} tied={tie!s:5s} tp={args.tp} max|dlogit|={err:.3e} "
                  f"(tol {TOLERANCE[dtype_name]}) gather_exact={exact} {'PASS' if passed else 'FAIL'}")
    destroy_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
