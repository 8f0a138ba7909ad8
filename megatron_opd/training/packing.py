"""Token-budget micro-batches ("dynamic batch size"): which rows of a minibatch each data-parallel
rank runs, in which micro-batch. Plain Python on sequence lengths; no process group, no Megatron.

Layout chosen: rows of similar length are grouped, one sequence per row, each micro-batch
right-padded to its own longest row. Sequences are never concatenated into one row, so no token
attends across sequences and nothing in the model changes (the causal mask, positions and the
pipeline's tensors are exactly those of an ordinary micro-batch). On a long-tailed length
distribution (log-normal, 200 to 16k tokens) grouping alone keeps padding under 10 % of the
computed tokens at realistic step sizes (see ``python -m megatron_opd.training.packing``);
concatenation with a block-diagonal mask would remove the rest, but needs reset positions and,
on GPU, Transformer Engine's THD layout (``packed_seq_params`` with ``cu_seqlens``).

Algorithm (deterministic: a pure function of the lengths and the settings):

1. Sort the sequences by padded length, longest first (ties by index).
2. Next fit: a micro-batch takes the next sequences while ``rows × longest ≤ budget``. A sequence
   longer than the budget gets a micro-batch of its own (logged), never dropped.
3. Equal micro-batch counts: every data-parallel rank runs the same number of micro-batches (a
   multiple of ``microbatch_multiple``, e.g. the pipeline size under VPP), so per-micro-batch
   collectives (the local gate normalisations) stay matched. Micro-batches with the most rows are
   halved until the count divides; halving only lowers padding.
4. DP balance: micro-batches are dealt in rounds of ``dp_size``, largest cost first, each round's
   largest going to the least-loaded rank. The cost is the computed tokens ``rows × padded_len``
   (linear layers and the head), plus ``attention_weight × rows × padded_len²`` when given (the
   quadratic attention part; ≈ 1 / (6 × hidden) weighs it like the FLOPs of a dense layer).
   Then pairwise swaps between the most- and least-loaded ranks narrow the gap (typically to
   within 2 % on the long-tailed distribution). Invariant: the most- and least-loaded ranks differ
   by at most the largest micro-batch cost.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Microbatch:
    rows: tuple[int, ...]
    """Row indices into the minibatch."""
    padded_len: int
    """Length every row is padded to (the longest row, rounded up to ``pad_to_multiple``)."""

    @property
    def computed_tokens(self) -> int:
        return len(self.rows) * self.padded_len

    def cost(self, attention_weight: float = 0.0) -> float:
        return self.computed_tokens * (1.0 + attention_weight * self.padded_len)


@dataclass(frozen=True)
class MicrobatchPlan:
    ranks: tuple[tuple[Microbatch, ...], ...]
    """``ranks[r]``: the micro-batches of data-parallel rank r, in the order they run."""
    real_tokens: int
    """Σ sequence lengths (unpadded) of the minibatch."""

    @property
    def computed_tokens(self) -> int:
        return sum(mb.computed_tokens for rank in self.ranks for mb in rank)

    @property
    def padding_fraction(self) -> float:
        """Padding as a fraction of the computed tokens (all ranks)."""
        computed = self.computed_tokens
        return 1.0 - self.real_tokens / computed if computed else 0.0

    def rank_loads(self, attention_weight: float = 0.0) -> list[float]:
        return [sum(mb.cost(attention_weight) for mb in rank) for rank in self.ranks]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_lengths(lengths) -> list[int]:
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ValueError("micro-batch packing: the minibatch has no sequences")
    bad = [i for i, n in enumerate(lengths) if n < 1]
    if bad:
        raise ValueError(f"micro-batch packing: sequence {bad[0]} has length {lengths[bad[0]]} (must be >= 1)")
    return lengths


def fixed_microbatch_plan(lengths, dp_size: int, micro_batch_size: int, pad_to_multiple: int = 1) -> MicrobatchPlan:
    """Today's layout (``--max-tokens-per-micro-batch 0``): contiguous rows per rank, blocks of
    ``micro_batch_size`` rows, every block padded to the rank's longest row."""
    lengths = _check_lengths(lengths)
    if len(lengths) % dp_size or (len(lengths) // dp_size) % micro_batch_size:
        raise ValueError(f"{len(lengths)} sequences do not split over {dp_size} data-parallel ranks into micro-"
                         f"batches of {micro_batch_size}")
    per_rank = len(lengths) // dp_size
    ranks = []
    for rank in range(dp_size):
        rows = range(rank * per_rank, (rank + 1) * per_rank)
        padded = _round_up(max(lengths[i] for i in rows), pad_to_multiple)
        ranks.append(tuple(Microbatch(tuple(rows[s: s + micro_batch_size]), padded)
                           for s in range(0, per_rank, micro_batch_size)))
    return MicrobatchPlan(ranks=tuple(ranks), real_tokens=sum(lengths))


def _next_fit(order: list[int], padded: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive runs of ``order`` (longest first) with rows × longest ≤ max_tokens."""
    groups: list[list[int]] = []
    for index in order:
        if groups and (len(groups[-1]) + 1) * padded[groups[-1][0]] <= max_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    oversized = [g[0] for g in groups if padded[g[0]] > max_tokens]
    if oversized:
        logger.warning("%d sequence(s) longer than --max-tokens-per-micro-batch %d (longest %d) run alone in "
                       "their own micro-batch", len(oversized), max_tokens, max(padded[i] for i in oversized))
    return groups


def _equalize_count(groups: list[list[int]], multiple: int, num_sequences: int) -> list[list[int]]:
    """Halve the micro-batches with the most rows until their count is a multiple of ``multiple``."""
    if num_sequences < multiple:
        raise ValueError(f"{num_sequences} sequences cannot give each of the data-parallel ranks the same "
                         f"number of micro-batches ({multiple} needed at least): raise --prompts-per-rollout / "
                         "--samples-per-prompt or lower --minibatches-per-rollout")
    groups = [list(g) for g in groups]
    while len(groups) % multiple:
        # Most rows first, then the earliest (longest) group: deterministic.
        split = max(range(len(groups)), key=lambda k: (len(groups[k]), -k))
        group = groups[split]
        half = (len(group) + 1) // 2
        groups[split: split + 1] = [group[:half], group[half:]]
    return groups


def pack_microbatches(lengths, dp_size: int, max_tokens: int, *, pad_to_multiple: int = 1,
                      microbatch_multiple: int = 1, attention_weight: float = 0.0) -> MicrobatchPlan:
    """Token-budget micro-batches of a minibatch with sequence lengths ``lengths`` (see the module
    docstring). Every sequence appears exactly once; ``rows × padded_len ≤ max_tokens`` for every
    micro-batch of more than one row."""
    lengths = _check_lengths(lengths)
    if max_tokens < 1:
        raise ValueError(f"--max-tokens-per-micro-batch must be >= 1, got {max_tokens}")
    if dp_size < 1 or microbatch_multiple < 1:
        raise ValueError(f"dp_size {dp_size} and microbatch_multiple {microbatch_multiple} must be >= 1")
    padded = [_round_up(n, pad_to_multiple) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-padded[i], i))
    groups = _equalize_count(_next_fit(order, padded, max_tokens), dp_size * microbatch_multiple, len(lengths))
    microbatches = [Microbatch(tuple(g), padded[g[0]]) for g in groups]
    # Largest cost first; ties keep the length order.
    ranked = sorted(range(len(microbatches)), key=lambda k: (-microbatches[k].cost(attention_weight), k))
    loads = [0.0] * dp_size
    assigned: list[list[Microbatch]] = [[] for _ in range(dp_size)]
    for start in range(0, len(ranked), dp_size):
        # One round: the round's largest micro-batch to the least-loaded rank, and so on.
        by_load = sorted(range(dp_size), key=lambda r: (loads[r], r))
        for rank, k in zip(by_load, ranked[start: start + dp_size]):
            assigned[rank].append(microbatches[k])
            loads[rank] += microbatches[k].cost(attention_weight)
    _rebalance(assigned, attention_weight)
    return MicrobatchPlan(ranks=tuple(tuple(r) for r in assigned), real_tokens=sum(lengths))


def _rebalance(assigned: list[list[Microbatch]], attention_weight: float, max_swaps: int = 1000) -> None:
    """Swap one micro-batch of the most-loaded rank with one of the least-loaded rank while that
    narrows their gap (best swap first). Counts per rank stay equal, and the spread never grows."""
    for _ in range(max_swaps):
        loads = [sum(mb.cost(attention_weight) for mb in rank) for rank in assigned]
        high = max(range(len(loads)), key=lambda r: (loads[r], -r))
        low = min(range(len(loads)), key=lambda r: (loads[r], r))
        gap = loads[high] - loads[low]
        best = None  # (new gap, i, j)
        for i, heavy in enumerate(assigned[high]):
            for j, light in enumerate(assigned[low]):
                moved = heavy.cost(attention_weight) - light.cost(attention_weight)
                if 0 < moved < gap and (best is None or abs(gap - 2 * moved) < best[0]):
                    best = (abs(gap - 2 * moved), i, j)
        if best is None:
            return
        _, i, j = best
        assigned[high][i], assigned[low][j] = assigned[low][j], assigned[high][i]


def plan_microbatches(lengths, dp_size: int, *, micro_batch_size: int, max_tokens: int | None,
                      pad_to_multiple: int = 1, microbatch_multiple: int = 1) -> MicrobatchPlan:
    """The trainer's plan: token-budget micro-batches when ``max_tokens`` is set (> 0), else today's
    fixed micro-batches of ``micro_batch_size`` rows."""
    if max_tokens:
        return pack_microbatches(lengths, dp_size, max_tokens, pad_to_multiple=pad_to_multiple,
                                 microbatch_multiple=microbatch_multiple)
    return fixed_microbatch_plan(lengths, dp_size, micro_batch_size, pad_to_multiple)


class PaddingFractions(NamedTuple):
    before: float
    """Fixed micro-batches of ``micro_batch_size`` rows, padded to each rank's longest row (today)."""
    after: float
    """Token-budget micro-batches."""


def padding_fraction(lengths, max_tokens: int, *, micro_batch_size: int = 1, dp_size: int = 1,
                     pad_to_multiple: int = 1) -> PaddingFractions:
    """Padding as a fraction of computed tokens, before (fixed micro-batches) and after packing,
    for one minibatch of sequences of ``lengths`` tokens."""
    before = fixed_microbatch_plan(lengths, dp_size, micro_batch_size, pad_to_multiple).padding_fraction
    after = pack_microbatches(lengths, dp_size, max_tokens, pad_to_multiple=pad_to_multiple).padding_fraction
    return PaddingFractions(before, after)


def lognormal_lengths(count: int, seed: int, low: int = 200, high: int = 16384) -> list[int]:
    """``count`` seeded long-tailed lengths: log-normal with median √(low·high) and σ = ln(high/low)/4
    (so [low, high] is ±2σ), clipped to [low, high]."""
    rng = random.Random(seed)
    mu, sigma = math.log(low * high) / 2, math.log(high / low) / 4
    return [min(high, max(low, round(rng.lognormvariate(mu, sigma)))) for _ in range(count)]


def _demo() -> None:
    print("padding fraction of computed tokens, log-normal lengths 200..16384 (seed 0); before = fixed "
          "micro-batches padded to the rank's longest row")
    print(f"{'seqs/step':>9} {'DP':>3} {'mbs':>4} {'budget':>7} {'before':>7} {'after':>7} {'mb/rank':>8} "
          f"{'DP load max/min':>16}")
    for count in (64, 256, 512):
        lengths = lognormal_lengths(count, seed=0)
        for dp_size in (1, 2):
            for budget in (16384, 32768, 65536):
                fractions = padding_fraction(lengths, budget, micro_batch_size=4, dp_size=dp_size)
                plan = pack_microbatches(lengths, dp_size, budget)
                loads = plan.rank_loads()
                print(f"{count:>9} {dp_size:>3} {4:>4} {budget:>7} {fractions.before:>7.3f} {fractions.after:>7.3f} "
                      f"{len(plan.ranks[0]):>8} {max(loads) / min(loads):>16.3f}")


if __name__ == "__main__":
    _demo()
