"""tools/gpu_check.py section ``chunked_head`` (issue 17): the trainer's head + loss, forward + backward, on
the device in bf16, today's path (logits materialised) against the chunked head.

Per T: peak memory above the inputs (``torch.cuda.max_memory_allocated`` after a reset; on CPU the RSS
high-water mark, as benchmarks/bench_long_context.py measures), the median time of ``repeats`` runs, and the
relative difference of the two losses (the same work must give the same loss). Then the longest T that fits
at TP = 1 for each path: T doubles from the largest measured one until an out-of-memory error, the cap
``max_tokens`` or the time bound; the answer is the last T that ran. The workload is
``bench_long_context.build_case``: Qwen3-1.7B's head, LSM (K = 32, tail bucket, top-K overlap), Block64 gate.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class HeadSizes:
    hidden: int
    vocab: int
    topk: int
    tokens: tuple[int, ...]
    max_tokens: int
    repeats: int
    time_bound_s: float  # the two searches for the longest T start no new T after half of this each


FULL_HEAD = HeadSizes(hidden=2048, vocab=151_936, topk=32, tokens=(4096, 16384, 32768), max_tokens=1 << 20,
                      repeats=3, time_bound_s=30.0)
TINY_HEAD = HeadSizes(hidden=32, vocab=512, topk=4, tokens=(64, 128), max_tokens=512, repeats=1, time_bound_s=20.0)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_long_context", REPO / "benchmarks" / "bench_long_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host-device sync: the timing covers the queued kernels


class _PeakMemory:
    """Peak bytes above the level at ``start`` (CUDA allocator stats; the RSS high-water mark on CPU)."""

    def __init__(self, device: torch.device, bench):
        self.device, self.bench, self.base = device, bench, 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.bench.reset_peak_rss()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return self.bench._read_status("VmHWM") - self.base


def run_case(bench, impl: str, tokens: int, sizes: HeadSizes, device: torch.device, repeats: int,
             chunk_tokens: int | None = None) -> dict:
    """One (path, T): peak bytes, median seconds and the loss; inputs freed before returning."""
    hidden, weight, mb, loss = bench.build_case(tokens, sizes.hidden, sizes.vocab, sizes.topk, device=device,
                                                dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    memory, times, peak, value = _PeakMemory(device, bench), [], 0, 0.0
    try:
        for _ in range(repeats):
            hidden.grad = weight.grad = None
            _sync(device)
            memory.start()
            start = time.perf_counter()
            value = bench.head_loss_step(impl, hidden, weight, mb, loss, chunk_tokens)  # host sync: the loss value
            _sync(device)
            times.append(time.perf_counter() - start)
            peak = max(peak, memory.peak())
    finally:
        del hidden, weight, mb, loss
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"peak_bytes": peak, "seconds": statistics.median(times), "loss": value}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def longest_fitting(bench, impl: str, start: int, sizes: HeadSizes, device, deadline: float) -> dict:
    """Double T from ``start`` while it runs; {"tokens": last T that ran, "stopped_by": why the search ended}."""
    tokens, last = start, {"tokens": start, "stopped_by": "cap"}
    while tokens * 2 <= sizes.max_tokens:
        if time.time() > deadline:
            last["stopped_by"] = "time bound"
            break
        tokens *= 2
        try:
            run_case(bench, impl, tokens, sizes, device, repeats=1)
        except Exception as err:  # noqa: BLE001 - only an out-of-memory error ends the search quietly
            if not _is_oom(err):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            last["stopped_by"] = f"out of memory at T={tokens}"
            break
        last["tokens"] = tokens
    return last


def section_chunked_head(check, args, device: torch.device, workdir: Path, sizes) -> None:
    head = TINY_HEAD if args.tiny else FULL_HEAD
    bench = _bench()
    rows = []
    for tokens in head.tokens:
        old = run_case(bench, "old", tokens, head, device, head.repeats)
        new = run_case(bench, "new", tokens, head, device, head.repeats)
        rel = abs(new["loss"] - old["loss"]) / max(abs(old["loss"]), 1e-30)
        rows.append({"tokens": tokens, "old": old, "new": new, "peak_ratio": new["peak_bytes"] / max(old["peak_bytes"], 1),
                     "time_ratio": new["seconds"] / old["seconds"], "loss_rel_diff": rel})
        # the same bf16 logits feed the same fp32 statistics: only the matmul's blocking can differ
        check.expect(rel <= 1e-3, f"T={tokens}: old and chunked losses differ by {rel:.2e} (relative)")
    longest = {impl: longest_fitting(bench, impl, head.tokens[-1], head, device, time.time() + head.time_bound_s / 2)
               for impl in ("new", "old")}
    largest = rows[-1]
    check.put(dtype="bfloat16", hidden=head.hidden, vocab=head.vocab, topk=head.topk, rows=rows,
              longest_tokens_tp1=longest, memory_target_met=largest["peak_ratio"] <= 0.1,
              time_target_met=largest["time_ratio"] <= 1.25,
              targets="issue 17: peak new/old <= 0.1 and time new/old <= 1.25 at the largest T")
