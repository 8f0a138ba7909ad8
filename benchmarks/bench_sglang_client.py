"""Throughput of the SGLang client against the loopback contract server, and teacher top-K payload size.

    .venv/bin/python benchmarks/bench_sglang_client.py [--requests 128] [--max-new-tokens 48]

Prints requests/s and generated tokens/s of ``SGLangRolloutEngine`` at several concurrency levels
(the contract server batches concurrent requests, so concurrency matters as it does with SGLang),
the in-process engine on the same work as a baseline, and the JSON bytes per response token of a
teacher scoring answer with top-K = 16, 32, 64 (measured on the wire, plus the same answer
re-encoded with Qwen3-sized 6-digit ids).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from contract_server import start_contract_server  # noqa: E402
from sglang_contract.tiny import tiny_qwen3  # noqa: E402

from megatron_opd.rollout import LocalRolloutEngine, SamplingParams  # noqa: E402
from megatron_opd.rollout.sglang_client import SGLangRolloutEngine  # noqa: E402
from megatron_opd.teacher.sglang import score_payload  # noqa: E402


def _prompts(count: int) -> list[list[int]]:
    return [[4 + (i * 7 + j) % 56 for j in range(12 + i % 8)] for i in range(count)]


def bench_generate(url: str, model, count: int, max_new: int, levels: list[int]) -> list[tuple]:
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new, n=1, seed=0, ignore_eos=True)
    prompts = _prompts(count)
    rows = []
    for level in levels:
        engine = SGLangRolloutEngine(url, max_concurrency=level)
        start = time.perf_counter()
        samples = engine.generate(prompts, params)
        wall = time.perf_counter() - start
        tokens = sum(len(s.response_ids) for s in samples)
        rows.append((f"client, concurrency {level}", count / wall, tokens / wall))
    start = time.perf_counter()
    samples = LocalRolloutEngine(model).generate(prompts, params)
    wall = time.perf_counter() - start
    rows.append(("in-process engine (one batch)", count / wall, sum(len(s.response_ids) for s in samples) / wall))
    return rows


def _qwen3_sized(body: dict) -> dict:
    """The same answer with every token id widened to a 6-digit Qwen3-sized id."""
    meta = body["meta_info"]
    for key in ("input_token_logprobs",):
        meta[key] = [e if e is None else [e[0], 100000 + e[1], None] for e in meta[key]]
    meta["input_top_logprobs"] = [r if r is None else [[lp, 100000 + t, None] for lp, t, _ in r]
                                  for r in meta["input_top_logprobs"]]
    return body


def bench_payload(url: str, response_len: int) -> list[tuple]:
    prompt, response = _prompts(1)[0], [4 + i % 56 for i in range(response_len)]
    rows = []
    for k in (16, 32, 64):
        r = httpx.post(url + "/generate", json=score_payload(prompt, response, k, f"bench-{k}"), timeout=120.0)
        wide = len(json.dumps(_qwen3_sized(r.json())).encode())
        rows.append((k, len(r.content) / response_len, wide / response_len))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="SGLang client throughput against the contract server")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--response-len", type=int, default=64)
    args = parser.parse_args(argv)
    # one intra-op thread: with more, OpenMP workers spin against the server's HTTP threads and the
    # client's event loop in the same process (measured 5-20x slower on 2 shared cores)
    torch.set_num_threads(1)
    model = tiny_qwen3(seed=0, hidden=96, layers=2)
    server = start_contract_server(copy.deepcopy(model))
    try:
        rows = bench_generate(server.url, model, args.requests, args.max_new_tokens,
                              [int(x) for x in args.levels.split(",")])
        payload = bench_payload(server.url, args.response_len)
    finally:
        server.close()
    print(f"generation: {args.requests} requests x {args.max_new_tokens} new tokens, tiny Qwen3 2x96, CPU")
    print(f"{'setting':32} {'requests/s':>11} {'tokens/s':>10}")
    for name, rps, tps in rows:
        print(f"{name:32} {rps:11.1f} {tps:10.0f}")
    print(f"\nteacher top-K scoring answer, JSON bytes per response token (R = {args.response_len})")
    print(f"{'K':>4} {'measured (2-digit ids)':>24} {'Qwen3-sized 6-digit ids':>25}")
    for k, measured, wide in payload:
        print(f"{k:4d} {measured:24.0f} {wide:25.0f}")


if __name__ == "__main__":
    main()
