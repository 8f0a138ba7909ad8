"""The in-process sampler's KV cache: transformers' default (concatenate every step) against the
sampler's buffer grown by doubling (``rollout.local.new_kv_cache``), side by side in one process.

Both sides sample the same rows with the same seeds from the shipped chain teacher (278-token
responses, the demo's evaluation shape); the samples must be identical (the benchmark fails
otherwise). Sides alternate, so load from other processes hits both alike; read the ratio of medians.

    .venv/bin/python benchmarks/bench_sampler.py --rows 256 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="sampled rows per generation (problems x samples)")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from megatron_opd.data.chain_task import generate_chain_problems
    from megatron_opd.recipes.common import ASSETS_DIR
    from megatron_opd.rollout import LocalRolloutEngine, SamplingParams, local

    model_dir = ASSETS_DIR / "chain" / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = generate_chain_problems(max(1, args.rows // 8), seed=1, split="test")
    prompts = [tokenizer(p["problem"], add_special_tokens=False)["input_ids"] for p in problems]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                            n=max(1, args.rows // len(prompts)), seed=7)
    growing = local.new_kv_cache
    sides = {"default cache": lambda: None, "growing cache": growing}
    times: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, make_cache in sides.items():
            local.new_kv_cache = make_cache  # what _Decoder calls for its cache
            engine = LocalRolloutEngine(str(model_dir), seed=0)
            start = time.perf_counter()
            samples = engine.generate(prompts, params)
            times[name].append(time.perf_counter() - start)
            outputs[name] = [s.response_ids for s in samples]
    local.new_kv_cache = growing
    if outputs["default cache"] != outputs["growing cache"]:
        raise SystemExit("FAIL: the two caches gave different samples")
    tokens = sum(len(r) for r in outputs["growing cache"])
    base = statistics.median(times["default cache"])
    print(f"{len(outputs['growing cache'])} rows, {tokens} sampled tokens, {args.threads} threads, "
          f"{args.repeats} repeats (median); samples identical")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:14s} {med:7.2f} s  {tokens / med:8.0f} tokens/s  speed-up x{base / med:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
