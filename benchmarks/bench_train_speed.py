"""Trainer train-step throughput against a plain HF transformers loop on the same model, side by side.

One process, world size 1. Both sides start from the same weights, see the same SFT batch (random
token ids, right-padded, loss on the response positions) and step AdamW with the same settings:

* ``megatron``: the trainer's ``training.step.train_step`` — Megatron ``GPTModel`` (local spec) in
  Megatron DDP, Megatron optimizer, the trainer's SFT ``MicrobatchLoss`` (vocab-parallel ops);
* ``hf``: ``Qwen3ForCausalLM`` (SDPA attention), ``log_softmax`` + gather, ``clip_grad_norm_``,
  ``torch.optim.AdamW``.

Steps alternate (megatron, hf, megatron, …) so load from other processes on a shared machine hits
both alike; the ratio of medians is the number to read. Tokens/s counts every (padded) input token
of the batch, per wall second and per CPU second of this process (on a loaded machine the CPU-time
ratio is the steadier one; with one thread it is the work a step needs). The per-step losses of the two must agree (same model, same data, same optimizer):
the benchmark prints the largest difference and fails if it exceeds ``--loss-tol``.

    .venv/bin/python benchmarks/bench_train_speed.py --shape long --threads 1
    .venv/bin/python benchmarks/bench_train_speed.py --shape toy --threads 2
    .venv/bin/python benchmarks/bench_train_speed.py --shape long --profile   # op breakdown of both sides
    .venv/bin/python benchmarks/bench_train_speed.py --sides megatron,megatron-bf16,hf,hf-bf16   # bf16 vs fp32
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class BenchShape:
    """Model and batch shape of one benchmark setting."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    prompt_len: int
    min_response: int
    max_response: int
    micro_batch: int


ADAM_BETA2 = 0.95

SHAPES = {
    # The long-horizon task (issue 12): ~60-char vocab, responses 256–512 tokens, sequences ~600.
    "long": BenchShape(layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=384, vocab=60,
                       prompt_len=88, min_response=256, max_response=512, micro_batch=16),
    # The old toy task: the demo's model, responses up to ~61 tokens, micro-batch 128.
    "toy": BenchShape(layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=384, vocab=59,
                      prompt_len=20, min_response=20, max_response=61, micro_batch=128),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="long")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (shape default)")
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--sides", default="megatron,hf",
                        help="comma-separated sides to alternate: megatron, hf, megatron-bf16 (the trainer's --bf16: "
                             "bf16 model, fp32 main params), hf-bf16 (fp32 params under torch.autocast bf16), "
                             "hf-shim (hf under the CPU shim's TorchFunctionMode, to measure its cost)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss-tol", type=float, default=1e-4,
                        help="largest allowed |loss - loss_hf| of an fp32 side (bf16 sides: --bf16-loss-tol)")
    parser.add_argument("--bf16-loss-tol", type=float, default=5e-2)
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler op breakdown of both sides (3 alternating steps) instead of timing")
    parser.add_argument("--stock-layers", action="store_true",
                        help="Megatron sides use Megatron's own unfused local attention and gated MLP (the "
                             "trainer before models/sdpa_attention.py and models/swiglu_mlp.py)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_hf_model(shape: BenchShape, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         architectures=["Qwen3ForCausalLM"], attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def build_batch(shape: BenchShape, num_sequences: int, seed: int):
    """An SFT ``Experience`` of random tokens: fixed-length prompts, response lengths spread over the
    shape's range (the longest one is always present, so the padded length is fixed)."""
    from megatron_opd.training.experience import build_sft_experience

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shape.min_response, shape.max_response + 1, (num_sequences,), generator=gen)
    lengths[0] = shape.max_response
    prompts = [torch.randint(1, shape.vocab, (shape.prompt_len,), generator=gen).tolist()
               for _ in range(num_sequences)]
    responses = [torch.randint(1, shape.vocab, (int(n),), generator=gen).tolist() for n in lengths]
    return build_sft_experience(prompts, responses, pad_id=0)


def build_megatron_side(hf_model, workdir: Path, args, state, micro_batch: int, batch_size: int, bf16: bool):
    """The trainer's student (Megatron model + DDP + optimizer + scheduler) initialised from ``hf_model``
    and its SFT micro-batch loss, exactly as ``training.components`` wires them."""
    from megatron_opd.gating import DriftGateConfig
    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.loss import LossSettings, MicrobatchLoss
    from megatron_opd.training.megatron_setup import build_student

    if not (workdir / "model").exists():
        hf_model.save_pretrained(workdir / "model")
    flags = ["--student-hf", str(workdir / "model"), "--data-path", str(workdir / "unused.jsonl"),
             "--objective", "sft", "--gate", "none", "--lr", str(args.lr), "--min-lr", str(args.lr),
             "--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--weight-decay", "0.0",
             "--clip-grad", "1.0", "--adam-beta1", "0.9", "--adam-beta2", str(ADAM_BETA2), "--train-iters", "1000", "--micro-batch-size", str(micro_batch),
             "--prompts-per-rollout", str(batch_size), "--samples-per-prompt", "1",
             "--run-dir", str(workdir / "run"), "--no-progress"] + (["--bf16"] if bf16 else [])
    cfg = parse_config(flags)
    weights = {name: value.detach().clone() for name, value in hf_model.state_dict().items()}
    student = build_student(cfg, state, weights)
    settings = LossSettings(objective="sft", gate=DriftGateConfig(granularity="none"),
                            vocab_size=hf_model.config.vocab_size)
    return student, MicrobatchLoss(settings, state.tp_group, state.dp_cp_group)


def megatron_step(student, loss, exp, state, micro_batch: int) -> float:
    from megatron_opd.training.loop import REPORT_KEYS
    from megatron_opd.training.step import train_step

    result = train_step(student, loss, exp, state, micro_batch, REPORT_KEYS)
    return result["loss_sum"] / result["tokens"]


def hf_step(model, optimizer, exp, micro_batch: int, bf16: bool, under_shim: bool = False) -> float:
    """A plain HF loop runs without the CPU shim's process-wide device-rewriting TorchFunctionMode
    (``under_shim``: with it, to measure what the mode costs)."""
    with contextlib.nullcontext() if under_shim else torch._C.DisableTorchFunction():
        return _hf_step(model, optimizer, exp, micro_batch, bf16)


def _hf_step(model, optimizer, exp, micro_batch: int, bf16: bool) -> float:
    """Mean response-token NLL over the whole step, summed over micro-batches like the trainer does;
    ``bf16``: the forward under ``torch.autocast`` (fp32 weights and optimizer, as HF's Trainer does)."""
    num_tokens = exp.loss_mask.sum()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, exp.num_sequences, micro_batch):
        mb = exp.rows(torch.arange(start, start + micro_batch))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=mb.input_ids).logits  # (b, S, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        positions = mb.response_positions()  # (b, T)
        picked = logp.gather(1, positions[..., None].expand(-1, -1, logp.shape[-1]))  # (b, T, V)
        token_logp = picked.gather(2, mb.response_ids[..., None]).squeeze(-1)  # (b, T)
        loss_sum = -torch.where(mb.loss_mask, token_logp, torch.zeros_like(token_logp)).sum()
        (loss_sum / num_tokens).backward()
        total += loss_sum.item()  # host sync, as the trainer's report
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return total / num_tokens.item()


def _top_range(event) -> str | None:
    """The ``side:<name>`` record_function range an op event ran under, if any."""
    while event is not None:
        if event.name.startswith("side:"):
            return event.name[len("side:"):]
        event = event.cpu_parent
    return None


def profile_sides(sides: dict, steps: int = 3, rows: int = 25) -> None:
    """torch.profiler over alternating steps of both sides; self CPU time per op, side by side."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile, record_function

    for step in sides.values():
        step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            for name, step in sides.items():
                with record_function(f"side:{name}"):
                    step()
    self_ms: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in prof.events():
        side = _top_range(event)
        if side is not None and not event.name.startswith("side:"):
            self_ms[event.name][side] += event.self_cpu_time_total / 1000 / steps
    names = list(sides)
    totals = {n: sum(per[n] for per in self_ms.values()) for n in names}
    print(f"== self CPU ms per step (torch.profiler, {steps} alternating steps) ==")
    print("| op | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for op, per in sorted(self_ms.items(), key=lambda kv: -max(kv[1].values()))[:rows]:
        print(f"| {op[:60]} | " + " | ".join(f"{per[n]:.1f}" for n in names) + " |")
    print("| total | " + " | ".join(f"{totals[n]:.1f}" for n in names) + " |")


def build_sides(names: list[str], args, state, shape: BenchShape, exp, micro_batch: int) -> dict:
    """Step functions by side name, all from the same initial weights."""
    import copy

    hf_model = build_hf_model(shape, args.seed)
    sides = {}
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        for name in names:
            kind, _, precision = name.partition("-")
            bf16 = precision == "bf16"
            if kind == "megatron" and precision in ("", "bf16"):
                student, loss = build_megatron_side(hf_model, Path(tmp), args, state, micro_batch,
                                                    exp.num_sequences, bf16)
                sides[name] = lambda s=student, lo=loss: megatron_step(s, lo, exp, state, micro_batch)
            elif kind == "hf" and precision in ("", "bf16", "shim"):
                model = copy.deepcopy(hf_model).train()
                opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, ADAM_BETA2), eps=1e-8,
                                        weight_decay=0.0)
                sides[name] = lambda m=model, o=opt, b=bf16, u=precision == "shim": hf_step(m, o, exp, micro_batch, b, u)
            else:
                raise SystemExit(f"--sides: unknown side {name!r} (megatron, hf, megatron-bf16, hf-bf16, hf-shim)")
    return sides


def time_sides(sides: dict, steps: int) -> tuple[dict, dict, dict]:
    """Alternate one step of each side ``steps`` + 2 times; (wall times, CPU times of this process — both
    without the 2 warm-up steps —, losses). CPU time is what a step costs when other processes compete for
    the cores (waiting for a core is not counted)."""
    wall = {name: [] for name in sides}
    cpu = {name: [] for name in sides}
    losses = {name: [] for name in sides}
    for rep in range(steps + 2):
        for name, step in sides.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            losses[name].append(step())
            if rep >= 2:  # the first steps warm up allocators and caches
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu, losses


def report(wall: dict, cpu: dict, losses: dict, tokens: int, args) -> bool:
    """Print the table, the ratios and the loss agreement; True when every side's losses agree."""
    rate = {name: tokens / statistics.median(t) for name, t in wall.items()}
    cpu_rate = {name: tokens / statistics.median(t) for name, t in cpu.items()}
    print("| side | median step wall (s) | tokens/s (wall) | median step CPU (s) | tokens per CPU-s |")
    print("|---|---|---|---|---|")
    for name in wall:
        print(f"| {name} | {statistics.median(wall[name]):.3f} | {rate[name]:.0f} | "
              f"{statistics.median(cpu[name]):.3f} | {cpu_rate[name]:.0f} |")
    for num, den in (("megatron", "hf"), ("megatron-bf16", "hf-bf16"), ("megatron-bf16", "megatron"),
                     ("hf-bf16", "hf"), ("hf-shim", "hf")):
        if num in rate and den in rate:
            print(f"ratio {num}/{den}: {rate[num] / rate[den]:.3f} (wall), {cpu_rate[num] / cpu_rate[den]:.3f} (CPU)")
    reference = "hf" if "hf" in losses else next(iter(losses))
    ok = True
    for name, values in losses.items():
        print(f"losses per step {name:14s} {[round(x, 5) for x in values]}")
        if name != reference:
            diff = max(abs(a - b) for a, b in zip(values, losses[reference]))
            tol = args.bf16_loss_tol if "bf16" in name else args.loss_tol
            ok &= diff <= tol
            print(f"max |loss_{name} - loss_{reference}| over {len(values)} steps: {diff:.2e} (tolerance {tol:g})")
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_opd.platform import ParallelConfig, initialize_distributed

    shape = SHAPES[args.shape]
    micro_batch = args.micro_batch or shape.micro_batch
    batch_size = micro_batch * args.microbatches
    state = initialize_distributed(ParallelConfig(seed=args.seed))
    if args.stock_layers:
        from megatron_opd.models.sdpa_attention import SDPADotProductAttention
        from megatron_opd.models.swiglu_mlp import SwiGLUMLP

        SDPADotProductAttention._fast_path_ok = lambda *a, **k: False  # always Megatron's own path
        SwiGLUMLP._plain_swiglu = lambda *a, **k: False
    exp = build_batch(shape, batch_size, args.seed + 1)
    sides = build_sides(args.sides.split(","), args, state, shape, exp, micro_batch)
    tokens = exp.input_ids.numel()
    print(f"shape {args.shape}: {shape}; {batch_size} sequences x {exp.input_ids.shape[1]} tokens = {tokens} "
          f"per step ({int(exp.loss_mask.sum())} loss tokens), micro-batch {micro_batch}, "
          f"torch threads {torch.get_num_threads()}, megatron layers "
          f"{'stock Megatron local' if args.stock_layers else 'SDPA attention + SwiGLU MLP'}")
    if args.profile:
        profile_sides(sides)
        return 0
    wall, cpu, losses = time_sides(sides, args.steps)
    return 0 if report(wall, cpu, losses, tokens, args) else 1


if __name__ == "__main__":
    sys.exit(main())
