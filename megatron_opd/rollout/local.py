"""In-process rollout engine: a batched, KV-cached sampler on HF transformers weights (CPU workhorse).

Batching never changes a sample: every row draws its noise from its own generator seeded by
``derive_sample_seed`` (see ``sampler.py``). Prompts are left-padded with
``position_ids = cumsum(mask) - 1`` so padded rows see the same positions as unpadded ones.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_opd.rollout.base import RolloutEngine, validate_prompts
from megatron_opd.rollout.hf_weights import load_hf_state_dict
from megatron_opd.rollout.sampler import chosen_logprobs, masked_logprobs, nucleus_mask, sample_tokens
from megatron_opd.rollout.types import Sample, SamplingParams


@dataclass
class RowResult:
    """Output of one row of the sampler."""

    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    matched_stop: int | None = None


def load_hf_causal_lm(model_or_path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An HF causal LM in eval mode, from an in-memory model or a local HF directory."""
    if isinstance(model_or_path, (str, Path)):
        from transformers import AutoModelForCausalLM

        model_or_path = AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype=dtype)
    return model_or_path.eval()


def model_eos_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """EOS ids from the model's generation/model config (SGLang stops on these unless ignore_eos)."""
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos is not None:
            return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return ()


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, L_max) int64, prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def cache_field_name(model: torch.nn.Module) -> str:
    """Name of the KV cache in ``model.forward``'s arguments and outputs.

    transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns, and goes away in
    5.40); the releases before only know ``past_key_values``. Both sides use the same name.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@functools.cache
def _growing_layer_class():
    """A KV-cache layer that writes into a buffer grown by doubling (None where transformers has no
    cache layers, before 5.0: its default cache is used).

    transformers' ``DynamicLayer`` concatenates the whole cache on every decoding step, quadratic in
    the response length (``benchmarks/bench_sampler.py`` times both on 278-token chain responses).
    """
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._buffers, self._length = None, 0
            end = self._length + key_states.shape[-2]
            if self._buffers is None or end > self._buffers[0].shape[-2]:
                capacity = max(end, 2 * self._length, 64)
                grown = []
                for old, new in zip(self._buffers or (None, None), (key_states, value_states)):
                    buf = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
                    if old is not None:
                        buf[..., :self._length, :] = old[..., :self._length, :]
                    grown.append(buf)
                self._buffers = tuple(grown)
            self._buffers[0][..., self._length:end, :] = key_states
            self._buffers[1][..., self._length:end, :] = value_states
            self._length = end
            self.keys, self.values = (buf[..., :end, :] for buf in self._buffers)
            return self.keys, self.values

    return GrowingLayer


def new_kv_cache():
    """An empty KV cache for ``_Decoder`` (None: the model builds its default one)."""
    layer = _growing_layer_class()
    if layer is None:
        return None
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    if getattr(cache, "layer_class_to_replicate", None) is None or getattr(cache, "layers", None) != []:
        return None  # a cache built another way: keep the model's default
    cache.layer_class_to_replicate = layer
    return cache


class _Decoder:
    """KV-cached incremental forward of a left-padded batch."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]]) -> None:
        self.model = model
        device = next(model.parameters()).device  # the inputs go where the model is (CPU or CUDA)
        self.input_ids, self.mask = (t.to(device) for t in left_pad(prompts))
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        self.cache = new_kv_cache()
        self.cache_name = cache_field_name(model)

    def first_logits(self) -> torch.Tensor:
        return self._forward(self.input_ids, self.positions)

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends ``tokens`` (B,) and returns logits (B, V) of the next position."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self._forward(tokens[:, None], self.positions)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_name: self.cache})
        self.cache = getattr(out, self.cache_name)
        return out.logits[:, -1, :]


@torch.no_grad()
def sample_rows(model: torch.nn.Module, prompts: list[list[int]], seeds: list[int], params: SamplingParams,
                vocab_size: int, stop_ids: set[int]) -> list[RowResult]:
    """Samples one response per prompt row (rows = prompts, each with its own seed)."""
    results = [RowResult([], [], "length") for _ in prompts]
    if params.max_new_tokens == 0:
        return results
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    suppress = torch.tensor(params.suppress_token_ids, dtype=torch.long)
    top_k = 1 if params.greedy else params.effective_top_k  # SGLang runs greedy as top_k = 1
    decoder = _Decoder(model, prompts)
    logits = decoder.first_logits()
    active = torch.ones(len(prompts), dtype=torch.bool)
    for step in range(params.max_new_tokens):
        logp = masked_logprobs(logits, params.temperature, vocab_size, suppress)
        keep = nucleus_mask(logp, params.top_p, top_k)
        live = [g if a else None for g, a in zip(gens, active.tolist())]
        tokens = sample_tokens(logp, keep, live, params.greedy)
        lps = chosen_logprobs(logp, keep, tokens, params.renormalize_logprobs)
        _record(results, active, tokens.tolist(), lps.tolist(), stop_ids)  # host sync: ids to lists
        if not active.any() or step + 1 == params.max_new_tokens:
            break
        logits = decoder.next_logits(tokens)
    return results


def _record(results: list[RowResult], active: torch.Tensor, tokens: list[int], lps: list[float],
            stop_ids: set[int]) -> None:
    """Appends each active row's token; rows hitting a stop id finish with reason "stop"."""
    for row, res in enumerate(results):
        if not active[row]:
            continue
        res.response_ids.append(tokens[row])
        res.logprobs.append(lps[row])
        if tokens[row] in stop_ids:
            res.finish_reason, res.matched_stop = "stop", tokens[row]
            active[row] = False


class LocalRolloutEngine(RolloutEngine):
    """Rollouts from an in-memory HF causal LM (or a local HF dir), batched over all samples.

    vocab_size: the real (tokenizer) vocab; model columns beyond it are never sampled.
    max_batch_rows: rows per forward batch (memory bound); results do not depend on it.
    """

    def __init__(self, model, *, vocab_size: int | None = None, seed: int = 0, max_batch_rows: int = 512,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(seed)
        self.model = load_hf_causal_lm(model, dtype)
        self.vocab_size = int(vocab_size or self.model.config.vocab_size)
        if self.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"LocalRolloutEngine: vocab_size {self.vocab_size} exceeds the model's "
                             f"{self.model.config.vocab_size} output columns")
        self.max_batch_rows = int(max_batch_rows)
        self.eos_ids = model_eos_ids(self.model)
        self.weight_version: int | str = 0
        """Recorded in every sample's ``meta["weight_version"]``: counts weight updates unless the caller names
        the version (the trainer passes its own version number, as SGLang's ``meta_info.weight_version``)."""

    def stop_ids(self, params: SamplingParams) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        validate_prompts(prompts, self.vocab_size, "LocalRolloutEngine.generate")
        seeds = self._take_seeds(len(prompts), params)
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]  # prompt-major
        results = self.sample(
            [prompts[i] for i, _ in rows], [seeds[i][j] for i, j in rows], params)
        return [Sample(prompt_ids=list(prompts[i]), response_ids=r.response_ids, logprobs=r.logprobs,
                       finish_reason=r.finish_reason, prompt_index=i, sample_index=j,
                       meta={"seed": seeds[i][j], "weight_version": self.weight_version})
                for (i, j), r in zip(rows, results)]

    def sample(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams) -> list[RowResult]:
        """One response per (prompt, seed) row, in micro-batches of ``max_batch_rows``."""
        stop = self.stop_ids(params)
        out: list[RowResult] = []
        for start in range(0, len(prompts), self.max_batch_rows):
            end = start + self.max_batch_rows
            out += sample_rows(self.model, prompts[start:end], seeds[start:end], params, self.vocab_size, stop)
        return out

    def update_weights(self, source: dict[str, torch.Tensor] | str | Path, *,
                       weight_version: int | str | None = None) -> int | str:
        """Loads the weights; returns the version the next samples record."""
        load_hf_state_dict(self.model, source, where="LocalRolloutEngine.update_weights")
        self.weight_version = (self.weight_version + 1 if isinstance(self.weight_version, int) else 1) \
            if weight_version is None else weight_version
        return self.weight_version
