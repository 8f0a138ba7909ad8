"""Long reasoning traces (issue 17): peak memory and time of the trainer's head + loss, forward + backward,
today's path (materialised logits) against the chunked head, side by side; and the padding of micro-batches.

Workload: Qwen3-1.7B's head (H = 2048, V = 151,936; 152,064 padded at TP 2), one sequence of T tokens
(16-token prompt), fp32 on the CPU, the trainer's own loss code (``training.loss.MicrobatchLoss``: LSM with
K = 32 and the tail bucket, top-K overlap, Block64 drift gate, entropy). "old" = ``hidden @ Wᵀ`` (what
Megatron's output layer computes) then the loss on the logits (``--no-chunked-head``); "new" = the loss on
the hidden states with the weight (``ops.vocab_parallel_head_stats``, the default).

TP = 2 is simulated in one process as rank 0's work: the weight shard [V_pad/2, H] with the vocabulary of that
shard (all ids below V_pad/2). A real TP = 2 rank does exactly this arithmetic plus collectives on per-token
statistics ([chunk, 3], [chunk, K + 1], [chunk, K]) and one all-reduce of the [T, H] hidden gradient, none of
which allocate more than O(T·H).

Memory: every case runs in a fresh process. After the inputs exist (hidden, weight, the batch), the process
resets the kernel's RSS high-water mark (``/proc/self/clear_refs`` ← 5) and reads its RSS; after forward +
backward it reads the high-water mark ``VmHWM``. Peak = VmHWM − that RSS: every byte torch allocated and
touched at the worst moment, gradients of hidden and weight included (torch's CPU allocator returns large
blocks to the OS, so RSS follows live tensors; tracemalloc would not see torch's allocations at all).
Time: the best of ``--repeats`` forward + backward runs in that process. A case whose predicted need exceeds
``--memory-fraction`` of MemAvailable is not run; the script says so and why, and for the old path prints
numbers extrapolated linearly in T from its largest measured T at that TP (marked "est.").

    .venv/bin/python benchmarks/bench_long_context.py                 # T = 4k, 16k, 32k; TP = 1, 2
    .venv/bin/python benchmarks/bench_long_context.py --tiny          # seconds, in one process: the test suite's run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1024**3
PROMPT = 16
OLD_LOGIT_COPIES = 2.3  # predicted [T, V/TP] fp32 buffers of the old path: logits, their gradient, op temporaries


# ---------------------------------------------------------------- one case (runs in its own process)

def build_case(tokens: int, hidden_size: int, vocab_local: int, topk: int, seed: int = 0, device="cpu",
               dtype=None):
    """(hidden [1, S, H], weight [V_local, H], micro-batch, loss) of one sequence; ids below V_local.
    Made on ``device`` (tools/gpu_check.py's chunked_head section uses it on the GPU, in bf16)."""
    import torch

    from megatron_opd.gating import DriftGateConfig
    from megatron_opd.training.experience import Experience
    from megatron_opd.training.loss import LossSettings, MicrobatchLoss

    gen = torch.Generator(device).manual_seed(seed)
    dtype = dtype or torch.float32
    resp = tokens - PROMPT

    def ones(*shape, kind=torch.bool):
        return torch.ones(*shape, dtype=kind, device=device)

    hidden = torch.randn(1, tokens, hidden_size, generator=gen, device=device).to(dtype)
    weight = (torch.randn(vocab_local, hidden_size, generator=gen, device=device) * hidden_size ** -0.5).to(dtype)
    input_ids = torch.randint(0, vocab_local, (1, tokens), generator=gen, device=device)
    topk_ids = torch.randint(0, vocab_local, (1, resp, topk), generator=gen, device=device)
    mb = Experience(input_ids=input_ids, prompt_lens=ones(1, kind=torch.long) * PROMPT,
                    response_lens=ones(1, kind=torch.long) * resp, response_ids=input_ids[:, PROMPT:].clone(),
                    loss_mask=ones(1, resp), truncated=~ones(1),
                    old_logprobs=-torch.rand(1, resp, generator=gen, device=device) - 10.0,
                    teacher_logprobs=-torch.rand(1, resp, generator=gen, device=device) - 10.0,
                    teacher_topk_ids=topk_ids,
                    teacher_topk_logprobs=torch.log_softmax(torch.randn(1, resp, topk, generator=gen, device=device),
                                                            -1))
    settings = LossSettings(objective="lsm", topk=topk, lsm_tail=True, vocab_size=vocab_local,
                            gate=DriftGateConfig(granularity="block", block_size=64))
    return hidden, weight, mb, MicrobatchLoss(settings, None, None)


def head_loss_step(impl: str, hidden, weight, mb, loss, chunk_tokens=None) -> float:
    """Forward + backward of the head and the trainer's loss; leaves .grad on hidden and weight."""
    loss.settings.head_chunk_tokens = chunk_tokens
    if impl == "old":
        logits = hidden @ weight.t()  # [1, S, V_local]: Megatron's output layer (B = 1: no transpose copy)
        loss_sum, _, _ = loss(mb, logits)
    else:
        loss_sum, _, _ = loss(mb, hidden, head_weight=weight)
    loss_sum.backward()
    return float(loss_sum.detach())


def local_vocab(vocab: int, tp: int) -> int:
    """Columns of one TP rank: the vocabulary padded to a multiple of 128·TP (Megatron's rule), over TP."""
    multiple = 128 * tp
    return -(-vocab // multiple) * multiple // tp


def _read_status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset the kernel's RSS high-water mark to the current RSS; returns the current RSS (bytes)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _read_status("VmRSS")


def run_case(args) -> dict:
    """Measure one (impl, T, TP) in this process."""
    import torch

    torch.set_num_threads(args.threads)
    vocab_local = local_vocab(args.vocab, args.case_tp)
    hidden, weight, mb, loss = build_case(args.case_tokens, args.hidden, vocab_local, args.topk)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    times, peak = [], 0
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        baseline = reset_peak_rss()
        start = time.perf_counter()
        value = head_loss_step(args.case_impl, hidden, weight, mb, loss, args.chunk_tokens)
        times.append(time.perf_counter() - start)
        peak = max(peak, _read_status("VmHWM") - baseline)
    return {"peak": peak, "time": min(times), "loss": value}


# ---------------------------------------------------------------- section: memory and time

def predicted_bytes(impl: str, tokens: int, tp: int, args) -> float:
    """Rough peak of one case, to skip what cannot fit (weight gradient included)."""
    vocab_local = local_vocab(args.vocab, tp)
    weight_grad = vocab_local * args.hidden * 4
    if impl == "old":
        return OLD_LOGIT_COPIES * tokens * vocab_local * 4 + weight_grad
    chunk = args.chunk_tokens or max(1, (1 << 26) // vocab_local)
    return 3 * min(chunk, tokens) * vocab_local * 4 + weight_grad + 4 * tokens * args.hidden * 4


def launch_case(impl: str, tokens: int, tp: int, args) -> dict:
    """One case in a fresh process (memory needs a clean high-water mark); its JSON result. With --tiny
    in this process (a process start costs more than the case; the numbers then only check the code)."""
    if args.tiny:
        return run_case(argparse.Namespace(**{**vars(args), "case_impl": impl, "case_tokens": tokens, "case_tp": tp}))
    cmd = [sys.executable, __file__, "--case-impl", impl, "--case-tokens", str(tokens), "--case-tp", str(tp),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--topk", str(args.topk),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.chunk_tokens:
        cmd += ["--chunk-tokens", str(args.chunk_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{impl} T={tokens} TP={tp} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(impl: str, tokens: int, tp: int, args) -> tuple[dict | None, str]:
    """(result or None, why not) for one case."""
    need, available = predicted_bytes(impl, tokens, tp, args), psutil.virtual_memory().available
    if need > args.memory_fraction * available:
        return None, (f"{impl} T={tokens} TP={tp} not run: needs ~{need / GIB:.1f} GiB, "
                      f"{args.memory_fraction:.0%} of the {available / GIB:.1f} GiB available is the limit")
    return launch_case(impl, tokens, tp, args), ""


def _cell(result, key):
    if result is None:
        return "skipped"
    text = f"{result[key] / GIB:.3f} GiB" if key == "peak" else f"{result[key]:.2f} s"
    return text + (" est." if result.get("estimated") else "")


def _ratio(new, old, key):
    if new is None or old is None or not old[key]:
        return "n/a"
    return f"{new[key] / old[key]:.3f}" + (" est." if old.get("estimated") else "")


def extrapolate_old(measured: dict, tokens: int, tp: int, args) -> dict | None:
    """The old path at ``tokens`` from its largest measured T at this TP: everything but the weight gradient
    ([V/TP, H] fp32, fixed) scales linearly in T (logits, their gradient, the op temporaries; the matmuls)."""
    if measured is None:
        return None
    scale = tokens / measured["tokens"]
    weight_grad = local_vocab(args.vocab, tp) * args.hidden * 4
    return {"peak": (measured["peak"] - weight_grad) * scale + weight_grad, "time": measured["time"] * scale,
            "estimated": True}


def memory_time_section(args) -> list[dict]:
    """Peak memory and time of head + loss fwd+bwd, old vs new, per (T, TP); prints a table; returns rows."""
    print(f"## head + loss, forward + backward: H={args.hidden} V={args.vocab} K={args.topk} fp32, "
          f"{args.threads} thread(s), best of {args.repeats}; chunk={args.chunk_tokens or 'default'} tokens")
    print("| T | TP | old peak | new peak | peak new/old | old time | new time | time new/old |")
    print("|---|---|---|---|---|---|---|---|")
    rows, notes, largest_old = [], [], {}
    for tokens in args.tokens:
        for tp in args.tp:
            old, why = measure("old", tokens, tp, args)
            if old:
                largest_old[tp] = {**old, "tokens": tokens}
            if why:
                old = extrapolate_old(largest_old.get(tp), tokens, tp, args)
                notes.append(why + ("; its numbers (est.) are extrapolated linearly in T from T="
                                    f"{largest_old[tp]['tokens']}" if old else ""))
            new, why = measure("new", tokens, tp, args)
            if why:
                notes.append(why)
            if old and new and "loss" in old and abs(old["loss"] - new["loss"]) > 1e-4 * max(1.0, abs(old["loss"])):
                raise RuntimeError(f"T={tokens} TP={tp}: the two paths' losses differ: {old['loss']} vs {new['loss']}")
            rows.append({"tokens": tokens, "tp": tp, "old": old, "new": new})
            print(f"| {tokens} | {tp} | {_cell(old, 'peak')} | {_cell(new, 'peak')} | {_ratio(new, old, 'peak')} | "
                  f"{_cell(old, 'time')} | {_cell(new, 'time')} | {_ratio(new, old, 'time')} |", flush=True)
    for note in notes:
        print(f"- {note}")
    print("Targets (issue 17): peak new/old <= 0.1 at T = 32k, time new/old <= 1.25.")
    for row in rows:
        if row["tokens"] == max(args.tokens) and row["old"] and row["new"] and row["old"]["peak"] > 0:
            peak, time_ratio = row["new"]["peak"] / row["old"]["peak"], row["new"]["time"] / row["old"]["time"]
            est = " (old path extrapolated)" if row["old"].get("estimated") else ""
            print(f"- T={row['tokens']} TP={row['tp']}{est}: peak {peak:.3f} "
                  f"({'met' if peak <= 0.1 else 'NOT met'}), time {time_ratio:.3f} "
                  f"({'met' if time_ratio <= 1.25 else 'NOT met'})")
    return rows


# ---------------------------------------------------------------- section: padding of micro-batches

def padding_section(args) -> None:
    """Padding as a share of computed tokens on long-tailed lengths (log-normal, 200..16k tokens), today's
    fixed micro-batches (rows padded to the longest of each block of a rank) against token-budget packing
    (``--max-tokens-per-micro-batch``, ``training.packing``), for one minibatch per optimizer step."""
    from megatron_opd.training.packing import lognormal_lengths, pack_microbatches, padding_fraction

    print("## padding of micro-batches (share of computed tokens; log-normal lengths 200..16384, seed 0)")
    print(f"{'seqs/step':>9} {'DP':>3} {'mbs':>4} {'budget':>7} {'fixed':>7} {'packed':>7} {'mb/rank':>8}")
    for sequences in args.padding_sequences:
        lengths = lognormal_lengths(sequences, seed=0)
        for dp in (1, 2):
            for budget in (16384, 32768, 65536):
                before, after = padding_fraction(lengths, budget, micro_batch_size=4, dp_size=dp)
                per_rank = len(pack_microbatches(lengths, dp, budget).ranks[0])
                print(f"{sequences:>9} {dp:>3} {4:>4} {budget:>7} {before:>7.1%} {after:>7.1%} {per_rank:>8}")


# ---------------------------------------------------------------- main

SECTIONS = {"memory_time": memory_time_section, "padding": padding_section}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary (Megatron pads it to 128·TP)")
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--chunk-tokens", type=int, default=None, help="chunked head's tokens per chunk")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (best is kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per case")
    parser.add_argument("--memory-fraction", type=float, default=0.8,
                        help="run a case only if its predicted peak is below this share of MemAvailable")
    parser.add_argument("--padding-sequences", type=lambda v: [int(x) for x in v.split(",")], default=[64, 256, 512],
                        help="comma-separated minibatch sizes (sequences per step) for the padding section")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated of {list(SECTIONS)}")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, seconds (the test suite's run)")
    parser.add_argument("--case-impl", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--case-tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--case-tp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.tokens, args.hidden, args.vocab, args.topk, args.repeats = [96, 160], 32, 500, 4, 1
        args.chunk_tokens, args.threads, args.padding_sequences = 40, 1, [64]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case_impl:
        print(json.dumps(run_case(args)))
        return 0
    for name in args.sections.split(","):
        if name not in SECTIONS:
            raise SystemExit(f"--sections: unknown {name!r}; choose from {list(SECTIONS)}")
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
