"""SGLang rollout engine: async HTTP client for one server, several workers, or a router.

Every sample is one ``/generate`` request with its own ``rid``, so each result fills exactly one
(prompt, sample) slot. The sample's seed (``derive_sample_seed``) is sent as ``sampling_seed`` only
when every server runs with ``--enable-deterministic-inference`` (``/get_server_info``): SGLang
ignores it otherwise, and then retries and failover draw a fresh sample. Weight sync writes HF
safetensors to a shared directory (or takes one) and calls ``/update_weights_from_disk`` on every
worker, then checks that the worker reports the new weight version (and optionally a log-prob
probe), then ``/flush_cache``; or broadcasts the tensors over a weight-update group (``weight_sync=
"distributed"``) with the same checks. After a sync every generate answer must carry that weight version
(``meta_info.weight_version``): a stale answer is rejected and retried on another worker.
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import torch

from megatron_opd.rollout.base import RolloutEngine, validate_prompts
from megatron_opd.rollout.sglang_http import (
    RequestRunner,
    RetryableError,
    RetryPolicy,
    SGLangError,
    WorkerPool,
    run_sync,
    split_urls,
)
from megatron_opd.rollout.sglang_protocol import generate_payload, parse_generate_answer
from megatron_opd.rollout.sglang_weights import WeightSyncClient
from megatron_opd.rollout.types import Sample, SamplingParams


class SGLangRolloutEngine(RolloutEngine):
    """Rollouts from SGLang (native API).

    url: one server, a router, or a list of workers (a list or one comma-separated string; failover
        in order of health).
    worker_urls: the workers behind a router (weight sync, health and aborts go to each worker directly:
        sglang-router 0.3.2 answers 404 to /update_weights_* and /abort_request).
    unreachable_wait_s: how long a request waits for a server it cannot connect to before the batch
        fails naming it (``RetryPolicy.unreachable_wait_s``).
    vocab_size: when given, answers with ids outside [0, vocab_size) are rejected.
    nucleus_top_n: output top log-probs requested to renormalise over the nucleus
        (``SamplingParams.renormalize_logprobs`` with top_p < 1 or top_k > 0).
    on_abort: "retry" (default: aborted requests are sent again) or "return" (keep them, finish "abort").
    weight_sync_dir / hf_config: where ``update_weights(state_dict)`` writes safetensors (+ config.json).
    weight_sync: "disk" (safetensors in weight_sync_dir, ``/update_weights_from_disk``) or "distributed"
        (a broadcast from this process to every worker's ranks over a weight-update group: NCCL on GPUs, gloo
        across CPU hosts; no shared disk needed). update_group: (address, port, backend) of that group, each
        optional (``WeightSyncClient.update_distributed``).
    """

    def __init__(self, url: str | list[str], *, worker_urls: tuple[str, ...] | list[str] = (), seed: int = 0,
                 max_concurrency: int = 64, timeout_s: float = 300.0, connect_timeout_s: float = 5.0,
                 max_retries: int = 4, backoff_s: float = 0.2, vocab_size: int | None = None,
                 nucleus_top_n: int = 64, on_abort: str = "retry", weight_sync_dir: str | None = None,
                 hf_config=None, rid_prefix: str | None = None, unreachable_wait_s: float = 0.0,
                 weight_sync: str = "disk", update_group: tuple[str | None, int, str | None] = (None, 0, None)) -> None:
        super().__init__(seed)
        urls = split_urls(url)
        self.policy = RetryPolicy(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                                  max_retries=max_retries, backoff_s=backoff_s, unreachable_wait_s=unreachable_wait_s)
        workers = split_urls(worker_urls) if worker_urls else None
        self.runner = RequestRunner(WorkerPool(urls), self.policy, max_concurrency, abort_urls=workers)
        self.vocab_size, self.nucleus_top_n = vocab_size, int(nucleus_top_n)
        if on_abort not in ("retry", "return"):
            raise ValueError(f"SGLangRolloutEngine: on_abort must be 'retry' or 'return', got {on_abort!r}")
        self.on_abort = on_abort
        self.rid_prefix = rid_prefix or f"opd-{uuid.uuid4().hex[:8]}"
        self.weights = WeightSyncClient(workers or urls, self.policy, weight_sync_dir, hf_config)
        if weight_sync not in ("disk", "distributed"):
            raise ValueError(f"SGLangRolloutEngine: weight_sync must be 'disk' or 'distributed', got {weight_sync!r}")
        self.weight_sync, self.update_group = weight_sync, update_group
        self._batches = itertools.count()
        self.expected_weight_version: str | None = None
        """Set by ``update_weights``: answers from other weights are stale (None: not checked yet)."""
        self._seeds_take_effect: bool | None = None

    @property
    def urls(self) -> list[str]:
        return self.runner.pool.urls

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        validate_prompts(prompts, self.vocab_size, "SGLangRolloutEngine.generate")
        first_prompt = self.prompt_counter
        seeds = self._take_seeds(len(prompts), params)
        batch = next(self._batches)
        send_seeds = self.seeds_take_effect()
        jobs = [self._job(prompts[i], params, seeds[i][j], i, j, f"{self.rid_prefix}-b{batch}-p{first_prompt + i}-s{j}",
                          send_seeds)
                for i in range(len(prompts)) for j in range(params.n)]  # prompt-major
        samples = run_sync(self.runner.run_all(jobs))
        _check_slots(samples, len(prompts), params.n)
        return samples

    def _top_n(self, params: SamplingParams) -> int:
        truncated = params.greedy or params.top_p < 1.0 or params.effective_top_k > 0
        if not (params.renormalize_logprobs and truncated):
            return 0
        return min(self.nucleus_top_n, self.vocab_size or self.nucleus_top_n)

    def seeds_take_effect(self) -> bool:
        """Whether every server that generates runs with ``--enable-deterministic-inference`` (asked once,
        from ``/get_server_info`` of the workers: a router answers with its own info, which does not tell;
        a URL that does not tell counts as not deterministic)."""
        if self._seeds_take_effect is None:
            infos = run_sync(self.weights.server_infos(self.weights.urls))
            self._seeds_take_effect = all(bool((info or {}).get("enable_deterministic_inference"))
                                          for info in infos.values())
        return self._seeds_take_effect

    def _job(self, prompt: list[int], params: SamplingParams, seed: int, i: int, j: int, rid_base: str,
             send_seed: bool = True):
        top_n = self._top_n(params)

        def make(attempt: int) -> tuple[str, dict]:
            rid = f"{rid_base}-a{attempt}"  # a fresh rid per attempt: a timed-out one may still run
            return rid, generate_payload(prompt, params, seed if send_seed else None, rid, top_n)

        def check(body, rid: str, server: str) -> Sample:
            sample = parse_generate_answer(body, rid=rid, prompt=prompt, params=params, top_n=top_n,
                                           vocab_size=self.vocab_size, prompt_index=i, sample_index=j, seed=seed,
                                           weight_version=self.expected_weight_version)
            if sample.finish_reason == "abort" and self.on_abort == "retry":
                raise RetryableError(f"request aborted by the server: {sample.meta['finish_reason_raw']}")
            sample.meta["server"] = server
            return sample

        return make, check

    def health(self) -> dict[str, bool]:
        """GET /health of every worker (and the generate URLs): url -> healthy."""
        return run_sync(self.weights.health(sorted(set(self.urls) | set(self.weights.urls))))

    def update_weights(self, source: dict[str, torch.Tensor] | str | Path, *, weight_version: str | None = None,
                       probe: tuple[list[int], list[int], list[float]] | None = None) -> str:
        """Loads new weights on every worker; returns the weight version now reported.

        probe: (prompt_ids, response_ids, expected_logprobs); each worker's teacher-style log-probs
        of the response must match within 1e-3 (catches a load that "succeeded" on stale weights).
        """
        if self.weight_sync == "distributed" and isinstance(source, dict):
            address, port, backend = self.update_group
            version = self.weights.update_distributed(source, weight_version=weight_version, probe=probe,
                                                      address=address, port=port, backend=backend)
        else:  # a directory is loaded from disk whatever the mode: the workers read it themselves
            version = self.weights.update_from_disk(source, weight_version=weight_version, probe=probe)
        self.expected_weight_version = version
        return version

    def flush_cache(self) -> None:
        run_sync(self.weights.flush_all())

    def close(self) -> None:
        """Aborts requests still in flight (interrupted batches) on their servers."""
        if self.runner.in_flight:
            run_sync(self.runner.abort_in_flight())
        self.weights.close_update_group()


def _check_slots(samples: list[Sample], num_prompts: int, n: int) -> None:
    """Every (prompt, sample) slot filled exactly once, prompt-major: nothing lost or duplicated."""
    got = [(s.prompt_index, s.sample_index) for s in samples]
    want = [(i, j) for i in range(num_prompts) for j in range(n)]
    if got != want:
        raise SGLangError(f"rollout slots do not match: {len(got)} samples for {len(want)} slots")
