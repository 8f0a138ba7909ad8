"""SGLang teacher scorer: one ``/generate`` request per sequence with ``max_new_tokens: 0``.

Request: ``input_ids`` = prompt (P) + response (R), ``logprob_start_len: P-1``,
``top_logprobs_num: K``. Entry 0 of the input log-prob lists (the last prompt token) is always
null; entries [1:] are exactly the R response positions (the "[1:] alignment", DESIGN §4).
Scored at temperature 1 only: whether SGLang scales prompt log-probs by the temperature differs
between versions, so other temperatures need the in-process teacher.
"""

from __future__ import annotations

import itertools
import uuid

import torch

from megatron_opd.rollout.sglang_http import (
    RequestRunner,
    RetryableError,
    RetryPolicy,
    WorkerPool,
    run_sync,
    split_urls,
)
from megatron_opd.rollout.sglang_protocol import parse_logprob_triples, parse_top_logprobs, single_answer
from megatron_opd.rollout.sglang_weights import WeightSyncClient
from megatron_opd.teacher.base import TeacherEngine
from megatron_opd.teacher.scoring import empty_score, validate_score_inputs
from megatron_opd.teacher.types import TeacherScore


def score_payload(prompt: list[int], response: list[int], top_k: int, rid: str) -> dict:
    """``/generate`` body scoring ``response`` after ``prompt`` without generating."""
    return {"input_ids": list(prompt) + list(response),
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                "min_p": 0.0, "skip_special_tokens": False},
            "return_logprob": True, "logprob_start_len": len(prompt) - 1, "top_logprobs_num": int(top_k),
            "return_text_in_logprobs": False, "rid": rid}


def parse_score_answer(body, *, rid: str, response: list[int], top_k: int,
                       vocab_size: int | None = None) -> TeacherScore:
    """A validated, response-aligned ``TeacherScore`` from one scoring answer.

    ``vocab_size``: the served model's config vocab_size; ids outside it are rejected, and SGLang's
    echo of its last id as 0 is accepted with it (``sglang_protocol.echoes_input_id``)."""
    meta = single_answer(body, rid)["meta_info"]
    entries = meta.get("input_token_logprobs")
    if not isinstance(entries, list) or len(entries) != len(response) + 1:
        size = len(entries) if isinstance(entries, list) else entries
        raise RetryableError(f"input_token_logprobs has {size} entries, expected R + 1 = {len(response) + 1}")
    first = entries[0]
    if first is not None and not (isinstance(first, list) and first and first[0] is None):
        raise RetryableError(f"input_token_logprobs[0] should be null (no context), got {str(first)[:60]}")
    token_lp = parse_logprob_triples(entries[1:], list(response), "input_token_logprobs[1:]",
                                     input_vocab_size=vocab_size)
    if top_k <= 0:
        return TeacherScore(token_logprobs=torch.tensor(token_lp, dtype=torch.float32))
    tops = meta.get("input_top_logprobs")
    if not isinstance(tops, list) or len(tops) != len(response) + 1:
        raise RetryableError(f"input_top_logprobs has {len(tops) if isinstance(tops, list) else tops} "
                             f"entries, expected {len(response) + 1}")
    top_lp, top_ids = parse_top_logprobs(tops[1:], top_k, "input_top_logprobs[1:]", vocab_size)
    _check_token_within_top(token_lp, top_lp, top_ids, response)
    return TeacherScore(token_logprobs=torch.tensor(token_lp, dtype=torch.float32),
                        topk_ids=torch.tensor(top_ids, dtype=torch.long),
                        topk_logprobs=torch.tensor(top_lp, dtype=torch.float32))


def _check_token_within_top(token_lp, top_lp, top_ids, response) -> None:
    """The sampled token's log-prob never exceeds the top-1, and equals the top-K entry when listed."""
    for t, (lp, row_lp, row_ids) in enumerate(zip(token_lp, top_lp, top_ids)):
        if lp > max(row_lp) + 1e-4:
            raise RetryableError(f"position {t}: token log-prob {lp} exceeds the top-1 log-prob {max(row_lp)}")
        if response[t] in row_ids and abs(row_lp[row_ids.index(response[t])] - lp) > 1e-4:
            raise RetryableError(f"position {t}: token log-prob {lp} differs from its top-K entry")


class SGLangTeacher(TeacherEngine):
    """Teacher scores from SGLang (one server, a router, or several workers with failover)."""

    def __init__(self, url: str | list[str], *, worker_urls: tuple[str, ...] | list[str] = (),
                 temperature: float = 1.0, max_concurrency: int = 64, timeout_s: float = 300.0,
                 connect_timeout_s: float = 5.0, max_retries: int = 4, backoff_s: float = 0.2,
                 vocab_size: int | None = None, rid_prefix: str | None = None,
                 unreachable_wait_s: float = 0.0) -> None:
        if temperature != 1.0:
            raise ValueError(f"SGLangTeacher: temperature must be 1.0 (got {temperature}); prompt log-prob "
                             "temperature scaling differs between SGLang versions; use LocalTeacher")
        urls = split_urls(url)  # a list, or one comma-separated string
        self.policy = RetryPolicy(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                                  max_retries=max_retries, backoff_s=backoff_s, unreachable_wait_s=unreachable_wait_s)
        workers = split_urls(worker_urls) if worker_urls else None
        self.runner = RequestRunner(WorkerPool(urls), self.policy, max_concurrency, abort_urls=workers)
        self.weights = WeightSyncClient(workers or urls, self.policy)
        self.temperature, self.vocab_size = 1.0, vocab_size
        self.rid_prefix = rid_prefix or f"opd-teacher-{uuid.uuid4().hex[:8]}"
        self._batches = itertools.count()

    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int = 0) -> list[TeacherScore]:
        validate_score_inputs(prompts, responses, "SGLangTeacher.score", self.vocab_size)
        batch = next(self._batches)
        rows = [i for i, r in enumerate(responses) if r]  # empty responses need no request
        jobs = [self._job(prompts[i], responses[i], top_k, f"{self.rid_prefix}-b{batch}-r{i}") for i in rows]
        out = [empty_score(top_k) for _ in responses]
        for i, score in zip(rows, run_sync(self.runner.run_all(jobs))):
            out[i] = score
        return out

    def _job(self, prompt: list[int], response: list[int], top_k: int, rid_base: str):
        def make(attempt: int) -> tuple[str, dict]:
            rid = f"{rid_base}-a{attempt}"
            return rid, score_payload(prompt, response, top_k, rid)

        def check(body, rid: str, server: str) -> TeacherScore:
            return parse_score_answer(body, rid=rid, response=response, top_k=top_k, vocab_size=self.vocab_size)

        return make, check

    def health(self) -> dict[str, bool]:
        return run_sync(self.weights.health(sorted(set(self.runner.pool.urls) | set(self.weights.urls))))

    def close(self) -> None:
        if self.runner.in_flight:
            run_sync(self.runner.abort_in_flight())
