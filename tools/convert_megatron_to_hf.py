#!/usr/bin/env python
"""Convert a megatron-opd dist-checkpoint back into a HF Qwen3 checkpoint: sharded safetensors + index,
with config.json and the tokenizer files copied from --hf-config.

    python tools/convert_megatron_to_hf.py --load ckpt/step200 --save Qwen3-0.6B-opd --hf-config Qwen3-0.6B

Runs in one process (no GPU needed); the output is written atomically (temporary sibling, renamed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, type=Path, help="Megatron checkpoint directory (save_checkpoint)")
    parser.add_argument("--save", required=True, type=Path, help="output HF model directory")
    parser.add_argument("--hf-config", required=True, type=Path,
                        help="HF model directory whose config.json and tokenizer files describe the model")
    parser.add_argument("--max-shard-size", type=float, default=5.0, help="largest safetensors shard, in GiB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    return parser.parse_args(argv)


def convert(load: Path, save: Path, hf_config_dir: Path, max_shard_bytes: int, overwrite: bool = False) -> Path:
    """Load the checkpoint into a TP=1/PP=1 model, gather HF tensors and write them with the side files."""
    from megatron_opd.models import (
        build_qwen3_model,
        gather_hf_state_dict,
        load_checkpoint,
        load_hf_config,
        read_checkpoint_marker,
        write_hf_checkpoint,
    )
    from megatron_opd.platform import ParallelConfig, destroy_distributed, initialize_distributed

    if save.exists() and any(save.iterdir()) and not overwrite:
        raise FileExistsError(f"{save} exists and is not empty (pass --overwrite to replace it)")
    hf_config = load_hf_config(hf_config_dir)
    dtype = getattr(torch, read_checkpoint_marker(load)["layout"]["dtype"])
    parallel = initialize_distributed(ParallelConfig())
    try:
        chunks = build_qwen3_model(hf_config, parallel.config, dtype=dtype)
        load_checkpoint(load, chunks, load_rng=False)
        state = gather_hf_state_dict(chunks, hf_config)
    finally:
        destroy_distributed()
    return write_hf_checkpoint(save, state, hf_config_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                               progress=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert(args.load, args.save, args.hf_config, int(args.max_shard_size * 2**30), args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 1
    print(f"wrote HF checkpoint {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
