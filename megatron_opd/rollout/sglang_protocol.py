"""SGLang native ``/generate`` payloads and answer validation (DESIGN §4), as pure functions.

Pinned against ``megatron_opd.versions.SGLANG``. Every sampling value is sent explicitly (unset
values would default to the model's generation_config). Suppressed ids are sent as a
``logit_bias`` of ``SUPPRESS_BIAS`` (JSON has no -inf; exp(-1e9) is exactly 0 in fp32/bf16).
"""

from __future__ import annotations

from megatron_opd.rollout.sampler import nucleus_logmass_sorted
from megatron_opd.rollout.sglang_http import RetryableError, check_logprob
from megatron_opd.rollout.types import Sample, SamplingParams

SUPPRESS_BIAS = -1e9
SEED_MASK = 2**31 - 1
"""``sampling_seed`` is sent as ``seed & SEED_MASK``: SGLang stores it as int32 (0.5.6 crashed the
scheduler on a larger seed), and ``derive_sample_seed`` gives 63-bit seeds."""


def server_seed(seed: int) -> int:
    """The int32-safe ``sampling_seed`` sent for a sample seed (still a pure function of it)."""
    return int(seed) & SEED_MASK


def sampling_params_payload(params: SamplingParams, seed: int | None) -> dict:
    """The ``sampling_params`` object of one request (one sample).

    ``seed`` None leaves ``sampling_seed`` out: SGLang honours it only with
    ``--enable-deterministic-inference``, so it is sent only to servers that run with it."""
    if params.ignore_eos and params.stop_token_ids:
        # SGLang skips every token-based stop when ignore_eos is set (0.5.23
        # Req._check_token_based_finish), so these stop ids would silently never stop a sample.
        raise ValueError(f"SamplingParams: SGLang ignores stop_token_ids {list(params.stop_token_ids)} when "
                         "ignore_eos is set; leave one of them out")
    payload = {
        "temperature": float(params.temperature), "top_p": float(params.top_p),
        "top_k": params.effective_top_k or -1,  # SGLang rejects 0; -1 = whole vocab
        "min_p": 0.0, "max_new_tokens": int(params.max_new_tokens), "stop": [],
        "stop_token_ids": list(params.stop_token_ids), "skip_special_tokens": False, "no_stop_trim": True,
        "ignore_eos": bool(params.ignore_eos),
    }
    if seed is not None:
        payload["sampling_seed"] = server_seed(seed)
    if params.suppress_token_ids:
        payload["logit_bias"] = {str(t): SUPPRESS_BIAS for t in params.suppress_token_ids}
    return payload


def generate_payload(prompt: list[int], params: SamplingParams, seed: int | None, rid: str, top_n: int = 0) -> dict:
    """Full ``/generate`` body for one sample; ``top_n`` > 0 asks for output top log-probs (nucleus mass)."""
    return {"input_ids": list(prompt), "sampling_params": sampling_params_payload(params, seed),
            "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": int(top_n),
            "return_text_in_logprobs": False, "rid": rid}


def single_answer(body, rid: str, weight_version: str | None = None) -> dict:
    """The answer dict of a single request (a batch answer of one is unwrapped); checks meta_info.id
    and, when ``weight_version`` is given, that the answer came from those weights (a worker that
    missed a sync, or was restarted on old weights, answers with another ``meta_info.weight_version``)."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise RetryableError(f"answer is not a /generate result with meta_info: {str(body)[:120]}")
    got = body["meta_info"].get("id")
    if got != rid:
        raise RetryableError(f"meta_info.id is {got!r}, expected the request's rid {rid!r}")
    if weight_version is not None and str(body["meta_info"].get("weight_version")) != weight_version:
        raise RetryableError(f"stale answer: meta_info.weight_version is {body['meta_info'].get('weight_version')!r}, "
                             f"expected {weight_version!r} (the last weight sync)")
    return body


def parse_finish_reason(meta: dict, output_ids: list[int], max_new_tokens: int) -> tuple[str, dict]:
    """(reason in {stop, length, abort}, raw dict), checked against the output length."""
    raw = meta.get("finish_reason")
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("stop", "length", "abort"):
        raise RetryableError(f"finish_reason {raw!r} is not a dict with type stop/length/abort")
    if kind == "length" and len(output_ids) != max_new_tokens:
        raise RetryableError(f"finish_reason length but {len(output_ids)} tokens for max_new_tokens {max_new_tokens}")
    if kind == "stop" and isinstance(raw.get("matched"), int) and output_ids and output_ids[-1] != raw["matched"]:
        raise RetryableError(f"finish_reason stop matched {raw['matched']} but the last token is {output_ids[-1]}")
    return kind, raw


def parse_token_ids(values, what: str, vocab_size: int | None) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
        raise RetryableError(f"{what} is not a list of ints")
    bad = [t for t in values if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise RetryableError(f"{what} holds ids outside [0, {vocab_size}): {bad[:5]}")
    return values


def echoes_input_id(reported, sent: int, served_vocab_size: int | None) -> bool:
    """Whether ``reported`` is how SGLang echoes the input id ``sent`` in ``input_token_logprobs``.

    SGLang 0.5.23 reports id 0 for the last id of the vocabulary: in
    ``srt/managers/scheduler_components/logprob_result_processor.py``,
    ``SchedulerLogprobResultProcessor._process_input_token_logprobs`` clips with
    ``x if x < self.model_config.vocab_size - 1 else 0`` (meant for image-token hashes, off by one).
    That vocab_size is the served ``config.json``'s (not the tokenizer's), and only the ids of
    ``input_token_logprobs`` go through it: output ids and top-K ids come back as they are. The
    log-prob itself is the one of ``sent``. So exactly one substitution is accepted: 0 for
    ``served_vocab_size - 1``; a server that echoes the id unchanged passes too."""
    if reported == sent:
        return True
    return served_vocab_size is not None and sent == served_vocab_size - 1 and reported == 0


def parse_logprob_triples(entries, token_ids: list[int], what: str, *,
                          input_vocab_size: int | None = None) -> list[float]:
    """Log-probs from [logprob, token_id, text|null] triples, checked against ``token_ids``.

    ``input_vocab_size``: for ``input_token_logprobs`` only, the served model's config vocab_size,
    under which SGLang's echo of the last id is read (see :func:`echoes_input_id`)."""
    if not isinstance(entries, list) or len(entries) != len(token_ids):
        size = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise RetryableError(f"{what} has {size} entries for {len(token_ids)} tokens")
    out = []
    for t, (entry, tok) in enumerate(zip(entries, token_ids)):
        if not isinstance(entry, list) or len(entry) < 2 or not echoes_input_id(entry[1], tok, input_vocab_size):
            raise RetryableError(f"{what}[{t}] is {str(entry)[:60]}, expected [logprob, {tok}, text]")
        out.append(check_logprob(entry[0], f"{what}[{t}]"))
    return out


def parse_top_logprobs(entries, k: int, what: str, vocab_size: int | None = None) -> tuple[list[list[float]], list[list[int]]]:
    """(log-probs, ids), each a list of K-lists, from per-position lists of K triples."""
    lps, ids = [], []
    for t, row in enumerate(entries):
        if not isinstance(row, list) or len(row) != k:
            raise RetryableError(f"{what}[{t}] has {len(row) if isinstance(row, list) else row!r} entries, expected {k}")
        ids.append(parse_token_ids([e[1] if isinstance(e, list) and len(e) >= 2 else None for e in row],
                                   f"{what}[{t}] ids", vocab_size))
        lps.append([check_logprob(e[0], f"{what}[{t}]") for e in row])
        if len(set(ids[-1])) != k:
            raise RetryableError(f"{what}[{t}] repeats ids: {ids[-1]}")
    return lps, ids


def renormalized(logprobs: list[float], top_rows: list[list[float]], params: SamplingParams, rid: str) -> list[float]:
    """Behaviour log-probs renormalised over the nucleus, from the output top-N log-probs."""
    import torch

    top_k = 1 if params.greedy else params.effective_top_k
    out = []
    for t, (lp, row) in enumerate(zip(logprobs, top_rows)):
        sorted_lp = torch.tensor(sorted(row, reverse=True), dtype=torch.float32)
        log_mass, complete = nucleus_logmass_sorted(sorted_lp, params.top_p, top_k)
        if not complete:
            raise ValueError(f"rid {rid} position {t}: the nucleus extends past the {len(row)} top log-probs "
                             "returned; raise nucleus_top_n")
        out.append(lp - float(log_mass))
    return out


def parse_generate_answer(body, *, rid: str, prompt: list[int], params: SamplingParams, top_n: int,
                          vocab_size: int | None, prompt_index: int, sample_index: int, seed: int,
                          weight_version: str | None = None) -> Sample:
    """A validated ``Sample`` from one ``/generate`` answer; RetryableError names what is wrong."""
    body = single_answer(body, rid, weight_version)
    meta = body["meta_info"]
    output_ids = parse_token_ids(body.get("output_ids"), "output_ids", vocab_size)
    if len(output_ids) > params.max_new_tokens:
        raise RetryableError(f"{len(output_ids)} output tokens exceed max_new_tokens {params.max_new_tokens}")
    for key, want in (("prompt_tokens", len(prompt)), ("completion_tokens", len(output_ids))):
        if key in meta and meta[key] != want:
            raise RetryableError(f"meta_info.{key} is {meta[key]}, expected {want}")
    reason, raw = parse_finish_reason(meta, output_ids, params.max_new_tokens)
    logprobs = parse_logprob_triples(meta.get("output_token_logprobs"), output_ids, "output_token_logprobs")
    if top_n:
        top_rows, _ = parse_top_logprobs(meta.get("output_top_logprobs") or [], top_n, "output_top_logprobs")
        if len(top_rows) != len(output_ids):
            raise RetryableError(f"output_top_logprobs has {len(top_rows)} positions for {len(output_ids)} tokens")
        logprobs = renormalized(logprobs, top_rows, params, rid)
    return Sample(prompt_ids=list(prompt), response_ids=output_ids, logprobs=logprobs, finish_reason=reason,
                  prompt_index=prompt_index, sample_index=sample_index,
                  meta={"seed": seed, "rid": rid, "finish_reason_raw": raw,
                        "weight_version": meta.get("weight_version")})
