"""Where training batches come from: student rollouts scored by the teacher (OPD), or reference
solutions (SFT cold start). Both return an ``Experience`` identical on every rank.

The work of one rollout batch is split over all ranks (each generates and scores a contiguous
share of the prompts), then all-gathered: on CPU this keeps every core busy; with SGLang the
servers do the work and the split only spreads the HTTP requests.
"""

from __future__ import annotations

import functools
import random
import time

import torch
import torch.distributed as dist

from megatron_opd.data.prompts import PromptRecord
from megatron_opd.rollout.types import Sample, SamplingParams
from megatron_opd.training.experience import Experience, build_experience, build_sft_experience


@functools.lru_cache(maxsize=4)
def _epoch_order(num_prompts: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(num_prompts))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def prompts_for_batch(num_prompts: int, batch_size: int, batch_index: int, seed: int) -> list[int]:
    """Dataset indices of batch ``batch_index``: consecutive slices of a per-epoch seeded permutation.

    A pure function of its arguments, so a resumed run needs only the batch index.
    """
    start = batch_index * batch_size
    return [_epoch_order(num_prompts, seed, position // num_prompts)[position % num_prompts]
            for position in range(start, start + batch_size)]


def _my_share(num_items: int, group=None) -> range:
    """Contiguous share of ``num_items`` for this rank (all ranks together cover every item once)."""
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if dist.is_initialized() else (1, 0)
    per_rank = -(-num_items // world)
    return range(min(rank * per_rank, num_items), min((rank + 1) * per_rank, num_items))


def _all_gather_list(items: list, group=None) -> list:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return items
    gathered = [None] * dist.get_world_size(group)
    # collective (on ``group``: the asynchronous producer's own group): every rank gets every share, in rank order
    dist.all_gather_object(gathered, items, group=group)
    return [item for share in gathered for item in share]


class RolloutExperienceMaker:
    """Rollouts from the student engine + teacher scores -> Experience (+ phase timings and metrics)."""

    def __init__(self, *, prompts: list[PromptRecord], rollout_engine, teacher_engine, sampling: SamplingParams,
                 prompts_per_rollout: int, topk: int, pad_id: int, special_token_ids: frozenset[int],
                 seed: int, pad_to_multiple: int = 1):
        self.prompts = prompts
        self.rollout_engine = rollout_engine
        self.teacher_engine = teacher_engine
        self.sampling = sampling
        self.prompts_per_rollout = prompts_per_rollout
        self.topk = topk
        self.pad_id = pad_id
        self.special_token_ids = special_token_ids
        self.seed = seed
        self.pad_to_multiple = pad_to_multiple

    def make(self, batch_index: int, group=None) -> tuple[Experience, dict]:
        """Batch ``batch_index``; ``group``: the process group of the all-gather (None: the default group;
        the asynchronous producer thread passes its own, see ``training/async_rollout.py``)."""
        indices = prompts_for_batch(len(self.prompts), self.prompts_per_rollout, batch_index, self.seed)
        share = _my_share(len(indices), group)
        prompt_ids = [self.prompts[indices[i]].prompt_ids for i in share]
        t0 = time.perf_counter()
        # The sampling stream is a pure function of (seed, global prompt position, sample index).
        self.rollout_engine.load_state_dict({"seed": self.seed,
                                             "prompt_counter": batch_index * self.prompts_per_rollout + share.start})
        samples = self.rollout_engine.generate(prompt_ids, self.sampling) if prompt_ids else []
        for sample in samples:
            sample.meta["slot"] = (batch_index, share.start + sample.prompt_index, sample.sample_index)
        t1 = time.perf_counter()
        scores = self.teacher_engine.score([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                           top_k=self.topk) if samples else []
        t2 = time.perf_counter()
        samples, scores = _all_gather_list(samples, group), _all_gather_list(scores, group)
        t3 = time.perf_counter()
        exp = build_experience(samples, scores, pad_id=self.pad_id, special_token_ids=self.special_token_ids,
                               pad_to_multiple=self.pad_to_multiple)
        metrics = rollout_metrics(samples, exp)
        metrics.update(time_rollout=t1 - t0, time_teacher=t2 - t1, time_gather=t3 - t2)
        # Which (batch, prompt position, sample) slot each row fills: the rollout source counts them (popped there,
        # never logged) to prove no sample is lost or duplicated.
        metrics["sample_slots"] = [s.meta["slot"] for s in samples]
        return exp, metrics


def rollout_metrics(samples: list[Sample], exp: Experience) -> dict:
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float64)
    metrics = {"response_length": lengths.mean().item(), "response_length_max": lengths.max().item(),
               "truncation_rate": exp.truncated.double().mean().item(), "rollout_tokens": lengths.sum().item()}
    if exp.teacher_topk_ids is not None:
        valid = exp.loss_mask
        outside = ~(exp.teacher_topk_ids == exp.response_ids.unsqueeze(-1)).any(-1)
        metrics["sampled_outside_topk"] = (outside & valid).sum().item() / max(valid.sum().item(), 1)
    return metrics


class SFTExperienceMaker:
    """Reference solutions (prompt + solution + EOS) as the batch, for --objective sft."""

    def __init__(self, *, prompts: list[PromptRecord], tokenizer, batch_size: int, eos_id: int, pad_id: int,
                 seed: int, pad_to_multiple: int = 1):
        self.prompts = prompts
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.pad_to_multiple = pad_to_multiple
        self.solutions = [tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [eos_id] for p in prompts]

    def make(self, batch_index: int) -> tuple[Experience, dict]:
        indices = prompts_for_batch(len(self.prompts), self.batch_size, batch_index, self.seed)
        exp = build_sft_experience([self.prompts[i].prompt_ids for i in indices],
                                   [self.solutions[i] for i in indices], pad_id=self.pad_id,
                                   pad_to_multiple=self.pad_to_multiple)
        return exp, {"response_length": exp.response_lens.double().mean().item()}
