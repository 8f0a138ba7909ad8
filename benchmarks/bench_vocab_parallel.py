"""Peak memory and time of sampled-token log-prob + entropy + LSM (K=32) forward+backward:
megatron_opd.ops (chunked, vocab-parallel, TP=1 and TP=2 over gloo) against a naive full-vocab
fp32 PyTorch implementation, each measured in fresh processes of the same run.

Memory: "extra" = peak RSS (ru_maxrss) − RSS once the inputs (logits, ids, teacher top-K) exist,
so it counts everything the loss computation allocates, the logits' gradient included. Per rank
for TP=2. A configuration whose predicted need exceeds the available memory is not run; its
numbers are extrapolated linearly in T from the largest measured T and marked "est.".
Timings on a shared CPU are noisy: rerun on a quiet machine.

    .venv/bin/python benchmarks/bench_vocab_parallel.py --tokens 2048 8192 32768 --tp 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

GIB = 1024**3
NAIVE_COPIES = 7  # predicted [T, V] fp32 buffers of the naive path (logits + log-softmax, exp, products, grads)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def _inputs(torch, tokens, vocab_local, vocab, topk, dtype, rank):
    gen = torch.Generator().manual_seed(1234 + rank)
    logits = torch.randn(tokens, vocab_local, generator=gen, dtype=dtype).requires_grad_(True)
    gen.manual_seed(99)  # ids and teacher scores identical on every rank
    token_ids = torch.randint(0, vocab, (tokens,), generator=gen)
    topk_ids = torch.randint(0, vocab, (tokens, topk), generator=gen)
    teacher = torch.log_softmax(torch.randn(tokens, topk, generator=gen), -1) - 1.0
    weights = torch.randn(2, tokens, generator=gen)
    return logits, token_ids, topk_ids, teacher, weights


def _ours_step(logits, token_ids, topk_ids, teacher, weights, group, vocab, chunk_size):
    from megatron_opd.objectives import topk_lsm_loss
    from megatron_opd.ops import vocab_parallel_stats

    stats = vocab_parallel_stats(logits, token_ids, topk_ids, group, vocab_size=vocab, chunk_size=chunk_size)
    lsm = topk_lsm_loss(stats.gathered_logits[None], teacher[None])
    loss = (stats.logprobs * weights[0]).sum() + (stats.entropy * weights[1]).sum() + lsm.sum()
    loss.backward()


def _naive_step(logits, token_ids, topk_ids, teacher, weights):
    import torch

    from megatron_opd.objectives import topk_lsm_loss

    log_p = torch.log_softmax(logits.float(), dim=-1)  # [T, V] fp32
    logprobs = log_p.gather(-1, token_ids[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    lsm = topk_lsm_loss(logits.float().gather(-1, topk_ids)[None], teacher[None])
    loss = (logprobs * weights[0]).sum() + (entropy * weights[1]).sum() + lsm.sum()
    loss.backward()


def run_worker(args) -> None:
    """One measurement in this process: prints one JSON line."""
    import torch
    import torch.distributed as dist

    import megatron_opd.objectives  # noqa: F401  (imported before the RSS baseline)
    import megatron_opd.ops  # noqa: F401

    torch.set_num_threads(args.threads)
    group = None
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.world)
        group = dist.group.WORLD
    dtype = getattr(torch, args.dtype)
    vocab_local = -(-args.vocab // args.world)  # Megatron pads the vocab to a TP multiple
    inputs = _inputs(torch, args.worker_tokens, vocab_local, args.vocab, args.topk, dtype, args.rank)
    baseline = _rss_bytes()
    times = []
    for _ in range(args.repeats):
        if group is not None:
            dist.barrier(group=group)  # collective: start the timed region together
        start = time.perf_counter()
        if args.impl == "naive":
            _naive_step(*inputs)
        else:
            _ours_step(*inputs, group, args.vocab, args.chunk_size)
        times.append(time.perf_counter() - start)
        inputs[0].grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rank": args.rank, "extra": peak - baseline, "time": min(times)}))
    if group is not None:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(impl: str, tokens: int, world: int, args) -> dict:
    """Run one measurement in ``world`` fresh processes; worst rank's extra memory and time."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    base = [sys.executable, __file__, "--impl", impl, "--worker-tokens", str(tokens), "--world", str(world),
            "--port", str(port), "--vocab", str(args.vocab), "--topk", str(args.topk), "--dtype", args.dtype,
            "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.chunk_size:
        base += ["--chunk-size", str(args.chunk_size)]
    procs = [subprocess.Popen(base + ["--rank", str(r)], stdout=subprocess.PIPE, env=env, text=True)
             for r in range(world)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{impl} T={tokens} TP={world} failed (exit codes {[p.returncode for p in procs]})")
    rows = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return {"extra": max(r["extra"] for r in rows), "time": max(r["time"] for r in rows), "est": False}


def _predicted_bytes(impl: str, tokens: int, world: int, args) -> float:
    """Rough total need of one measurement (all ranks), to skip what cannot fit."""
    elem = 2 if args.dtype == "bfloat16" else 4
    if impl == "naive":
        return tokens * args.vocab * 4 * NAIVE_COPIES
    return tokens * args.vocab * elem * 2 + world * 0.6 * GIB


def _measure_or_estimate(impl, tokens, world, args, measured) -> dict | None:
    key = (impl, world)
    if _predicted_bytes(impl, tokens, world, args) < args.memory_fraction * _available_bytes():
        result = _launch(impl, tokens, world, args)
        measured.setdefault(key, []).append((tokens, result))
        return result
    if not measured.get(key):
        return None
    ref_tokens, ref = measured[key][-1]
    scale = tokens / ref_tokens  # both memory and time are linear in T at fixed V
    return {"extra": ref["extra"] * scale, "time": ref["time"] * scale, "est": True}


def _fmt(value, unit, est):
    if value is None:
        return "n/a"
    text = f"{value / GIB:.2f} GiB" if unit == "mem" else f"{value:.2f} s"
    return text + (" est." if est else "")


def run_bench(args) -> None:
    measured: dict = {}
    print(f"V={args.vocab} K={args.topk} dtype={args.dtype} threads/rank={args.threads} repeats={args.repeats}")
    header = "| T | TP | naive extra mem | ours extra mem/rank | mem ratio | naive time | ours time | time ratio |"
    print(header + "\n|" + "---|" * 8)
    for tokens in args.tokens:
        naive = _measure_or_estimate("naive", tokens, 1, args, measured)
        for world in args.tp:
            ours = _measure_or_estimate("ours", tokens, world, args, measured)
            mem_ratio = ours["extra"] / naive["extra"] if ours and naive else None
            time_ratio = ours["time"] / naive["time"] if ours and naive else None
            est = bool((ours and ours["est"]) or (naive and naive["est"]))
            print(f"| {tokens} | {world} | {_fmt(naive and naive['extra'], 'mem', naive and naive['est'])} | "
                  f"{_fmt(ours and ours['extra'], 'mem', ours and ours['est'])} | "
                  f"{'n/a' if mem_ratio is None else f'{mem_ratio:.3f}'}{' est.' if est else ''} | "
                  f"{_fmt(naive and naive['time'], 'time', naive and naive['est'])} | "
                  f"{_fmt(ours and ours['time'], 'time', ours and ours['est'])} | "
                  f"{'n/a' if time_ratio is None else f'{time_ratio:.3f}'}{' est.' if est else ''} |", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--memory-fraction", type=float, default=0.7,
                        help="run a configuration only if its predicted need is below this share of MemAvailable")
    parser.add_argument("--impl", choices=["naive", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.impl:
        run_worker(args)
    else:
        run_bench(args)


if __name__ == "__main__":
    main()
