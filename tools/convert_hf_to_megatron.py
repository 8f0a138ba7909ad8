#!/usr/bin/env python
"""Convert a HF Qwen3 checkpoint (safetensors, sharded with an index or single-file) into a Megatron
dist-checkpoint (torch_dist) that loads at any TP/PP layout.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-0.6B --save ckpt/qwen3-0.6b-mcore

Runs in one process (no GPU needed); the output is written atomically (``<save>.tmp`` renamed when complete).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, type=Path,
                        help="HF model directory: config.json + model.safetensors[.index.json] and shards")
    parser.add_argument("--save", required=True, type=Path, help="output Megatron checkpoint directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype of the checkpoint (default: the dtype of the HF tensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    return parser.parse_args(argv)


def convert(hf_dir: Path, save: Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Validate the HF checkpoint fully, then build a TP=1/PP=1 model, load it and save a dist-checkpoint."""
    from megatron_opd.models import build_qwen3_model, load_hf_config, load_hf_weights, read_hf_checkpoint
    from megatron_opd.models.checkpoint import save_checkpoint
    from megatron_opd.models.weight_mapping import check_hf_state_dict
    from megatron_opd.platform import ParallelConfig, destroy_distributed, initialize_distributed

    if save.exists() and any(save.iterdir()) and not overwrite:
        raise FileExistsError(f"{save} exists and is not empty (pass --overwrite to replace it)")
    hf_config = load_hf_config(hf_dir)
    state = read_hf_checkpoint(hf_dir, progress=True)
    check_hf_state_dict(state, hf_config, source=str(hf_dir))  # every error before anything is written
    torch_dtype = DTYPES[dtype] if dtype else state["model.embed_tokens.weight"].dtype
    state = {name: tensor.to(torch_dtype) for name, tensor in state.items()}
    parallel = initialize_distributed(ParallelConfig())
    try:
        chunks = build_qwen3_model(hf_config, parallel.config, dtype=torch_dtype)
        load_hf_weights(chunks, state, hf_config)
        save_checkpoint(save, chunks, extra_state={"hf_config": hf_config.to_dict(), "source": str(hf_dir)},
                        save_rng=False)
    finally:
        destroy_distributed()
    return save


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert(args.hf_dir, args.save, args.dtype, args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 1
    print(f"wrote Megatron checkpoint {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
