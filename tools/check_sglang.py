"""Checks a running SGLang server (or router) against the contract the trainer relies on (DESIGN §4).

    python tools/check_sglang.py --url http://127.0.0.1:30000 [--weights-dir /shared/hf_export] [--top-k 32]
    python tools/check_sglang.py --url ROUTER --worker-urls W1,W2 [--weights-dir ...]   # through sglang-router

Runs the same checks the test suite runs against its loopback contract server: health and model
info, generation answers (ids, finish reasons, finite log-probs, meta_info.id = rid), greedy
determinism, max_new_tokens / stop_token_ids, batch answers in request order, teacher scoring with
``max_new_tokens: 0``, ``logprob_start_len: P-1`` and the [1:] alignment, top-K lists, error bodies,
``/flush_cache`` (plain text) and ``/abort_request`` (empty body), seeded sampling reproducibility
(only on a server with ``--enable-deterministic-inference``: SGLang ignores ``sampling_seed``
otherwise, and the client then does not send it), and optionally ``/update_weights_from_disk`` with
a weight-version check on the answers. Exit code 1 if any check FAILs.
Through a router (sglang-router 0.3.2), generation goes to ``--url`` and the control calls the router
does not serve (``/abort_request``, ``/update_weights_from_disk``, ``/model_info``: 404 there) go to
each ``--worker-urls`` directly, as the trainer does; the router also refuses a batch with a list
of rids (HTTP 422), so the batch is sent without rids and its order read from ``prompt_tokens``.
Needs only token ids (no tokenizer); the GPU machine's SGLang version should equal
``megatron_opd.versions.SGLANG``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_opd.rollout.sglang_http import error_message  # noqa: E402
from megatron_opd.rollout.sglang_protocol import generate_payload, parse_generate_answer  # noqa: E402
from megatron_opd.rollout.types import SamplingParams  # noqa: E402
from megatron_opd.teacher.sglang import parse_score_answer, score_payload  # noqa: E402

PROMPT = [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30]  # ids valid in Qwen3's vocab (and any >= 151k)


class Checker:
    """Runs named checks and records PASS / FAIL / WARN with a detail line."""

    def __init__(self, url: str, prompt: list[int], top_k: int, tol: float, workers: list[str] | None = None) -> None:
        self.url, self.prompt, self.top_k, self.tol = url.rstrip("/"), prompt, top_k, tol
        self.workers = [w.rstrip("/") for w in workers] if workers else [self.url]
        self.router = bool(workers)
        self.http = httpx.Client(timeout=120.0)
        self.results: list[tuple[str, str, str]] = []
        self.rid = 0

    def run(self, name: str, fn) -> None:
        try:
            detail = fn() or ""
            self.results.append((name, "PASS" if not str(detail).startswith("WARN") else "WARN", str(detail)))
        except Exception as err:  # noqa: BLE001 - every failure becomes a FAIL row
            self.results.append((name, "FAIL", f"{type(err).__name__}: {err}"))
            traceback.print_exc(limit=2, file=sys.stderr)

    def post(self, path: str, body: dict, url: str | None = None):
        url = url or self.url
        response = self.http.post(url + path, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{path} on {url}: HTTP {response.status_code}: {error_message(response)}")
        return response.json()

    def server_info(self) -> dict:
        """The first worker's ``/get_server_info`` (a router answers with its own, without server args)."""
        response = self.http.get(self.workers[0] + "/get_server_info")
        return response.json() if response.status_code == 200 else {}

    def generate(self, params: SamplingParams, seed: int | None = None, prompt: list[int] | None = None,
                 weight_version: str | None = None):
        self.rid += 1
        rid = f"check-sglang-{self.rid}"
        prompt = prompt or self.prompt
        body = self.post("/generate", generate_payload(prompt, params, seed, rid))
        return parse_generate_answer(body, rid=rid, prompt=prompt, params=params, top_n=0, vocab_size=None,
                                     prompt_index=0, sample_index=0, seed=seed, weight_version=weight_version)

    def score(self, prompt: list[int], response: list[int], top_k: int):
        self.rid += 1
        rid = f"check-sglang-{self.rid}"
        body = self.post("/generate", score_payload(prompt, response, top_k, rid))
        return parse_score_answer(body, rid=rid, response=response, top_k=top_k)


def check_health(c: Checker) -> str:
    assert c.http.get(c.url + "/health").status_code == 200, "/health is not 200"
    for path in ("/model_info", "/get_model_info"):
        r = c.http.get(c.url + path)
        if r.status_code == 200:
            info = r.json()
            return f"{path}: model_path={info.get('model_path')} weight_version={info.get('weight_version')}"
    raise RuntimeError("neither /model_info nor /get_model_info answered 200")


def check_greedy(c: Checker) -> str:
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    a, b = c.generate(params), c.generate(params)
    assert a.response_ids == b.response_ids, f"greedy differs between calls: {a.response_ids} vs {b.response_ids}"
    assert a.finish_reason == "length" and len(a.response_ids) == 16, f"{a.finish_reason}, {len(a.response_ids)}"
    return f"16 tokens, finish length, first ids {a.response_ids[:4]}"


def check_stop(c: Checker) -> str:
    # Without ignore_eos: SGLang skips every token-based stop, stop_token_ids included, when
    # ignore_eos is set (0.5.23 ``Req._check_token_based_finish``), so the two cannot be combined.
    free = c.generate(SamplingParams(temperature=0.0, max_new_tokens=12))
    assert free.response_ids, "the greedy answer is empty: no id to stop on"
    stop = free.response_ids[min(5, len(free.response_ids) - 1)]
    cut = c.generate(SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(stop,)))
    want = free.response_ids[: free.response_ids.index(stop) + 1]
    assert cut.response_ids == want, f"stop id {stop}: got {cut.response_ids}, want {want} (stop id kept)"
    assert cut.finish_reason == "stop", cut.meta["finish_reason_raw"]
    return f"stopped at id {stop}, kept in output_ids, matched={cut.meta['finish_reason_raw'].get('matched')}"


def check_scoring_alignment(c: Checker) -> str:
    gen = c.generate(SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))
    score = c.score(c.prompt, gen.response_ids, c.top_k)
    gap = max(abs(a - b) for a, b in zip(score.token_logprobs.tolist(), gen.logprobs))
    assert gap <= c.tol, f"teacher-style input log-probs differ from the output log-probs by {gap:.3g} > {c.tol}"
    top1 = score.topk_ids[:, 0].tolist()
    assert top1 == gen.response_ids, f"top-1 ids {top1} != greedy ids {gen.response_ids}"
    return f"R={len(gen.response_ids)}, K={c.top_k}, max |input - output log-prob| = {gap:.2e}"


def check_batch(c: Checker) -> str:
    prompts = [c.prompt, c.prompt[:5], c.prompt[2:]]
    rids = [f"check-batch-{i}" for i in range(3)]
    request = {"input_ids": prompts, "return_logprob": True,
               "sampling_params": {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True}}
    body = c.post("/generate", request if c.router else {**request, "rid": rids})
    assert isinstance(body, list) and len(body) == 3, f"batch answer is {type(body).__name__} of {len(body)}"
    lengths = [b["meta_info"]["prompt_tokens"] for b in body]
    assert lengths == [len(p) for p in prompts], f"batch answers out of order: prompt_tokens {lengths}"
    if c.router:
        return "3 answers in request order (the router refuses a list of rids: sent without)"
    got = [b["meta_info"]["id"] for b in body]
    assert got == rids, f"batch answers out of order or ids lost: {got}"
    return "3 answers in request order"


def check_error_body(c: Checker) -> str:
    r = c.http.post(c.url + "/generate", json={"input_ids": c.prompt, "sampling_params": {"top_k": 0}})
    assert r.status_code == 400, f"top_k=0 answered HTTP {r.status_code} (expected 400)"
    body = r.json()
    # 0.5.23: request validation answers {"error": {"message": ...}}; the client reads every shape
    assert isinstance(body.get("error"), dict) and body["error"].get("message"), body
    message = error_message(r)
    assert "top_k" in message, f"the client's error text {message!r} does not name the field"
    return f"400: {message[:60]}"


def check_seeded_sampling(c: Checker) -> str:
    params = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
    if not c.server_info().get("enable_deterministic_inference"):
        # SGLang honours sampling_seed only in deterministic mode; the client then sends none.
        a, b = c.generate(params), c.generate(params)
        assert a.response_ids and b.response_ids, "a sampled answer is empty"
        return ("not deterministic (no --enable-deterministic-inference): the client sends no sampling_seed; "
                "samples are not reproducible per request")
    a, b = c.generate(params, seed=1234), c.generate(params, seed=1234)
    big = c.generate(params, seed=2**62 + 1234)  # the client masks seeds to int32: this must still work
    assert a.response_ids == b.response_ids, "same sampling_seed gave different samples in deterministic mode"
    assert big.response_ids, "a large seed gave an empty answer"
    return "deterministic: same sampling_seed, same sample"


def check_control(c: Checker) -> str:
    for url in c.workers:  # a router has no /abort_request: the client aborts on each worker
        abort = c.http.post(url + "/abort_request", json={"rid": "check-sglang-nonexistent"})
        assert abort.status_code == 200, f"/abort_request on {url} answered HTTP {abort.status_code}: " \
                                         f"{error_message(abort)}"
    flush = c.http.post(c.url + "/flush_cache", json={})
    # plain text, not JSON; 400 only while requests run
    assert flush.status_code in (200, 400), f"/flush_cache answered {flush.status_code}"
    return (f"/abort_request 200 ({len(abort.content)} B body), /flush_cache {flush.status_code}: "
            f"{flush.text.strip()[:24]!r}")


def check_weights(c: Checker, weights_dir: str) -> str:
    version = "check-sglang-v1"
    found = []
    for url in c.workers:  # weights go to each worker directly (a router has no weight endpoints)
        body = c.post("/update_weights_from_disk", {"model_path": weights_dir, "load_format": "auto",
                                                    "flush_cache": True, "weight_version": version}, url=url)
        assert body.get("success"), body
        for path in ("/model_info", "/get_weight_version", "/get_model_info"):
            r = c.http.get(url + path)
            if r.status_code == 200 and r.json().get("weight_version") is not None:
                assert r.json()["weight_version"] == version, f"{path} on {url} reports {r.json()['weight_version']}"
                found.append(path)
                break
    if len(found) < len(c.workers):
        return "WARN: loaded, but no endpoint reports weight_version"
    # every generate answer names the weights that made it: the client rejects stale ones
    for _ in c.workers:  # through a router: one answer per worker at least with round robin
        c.generate(SamplingParams(temperature=0.0, max_new_tokens=2), weight_version=version)
    return f"loaded {weights_dir} on {len(c.workers)} worker(s), {found[0]} and meta_info.weight_version report {version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--url", required=True, help="SGLang server or router URL")
    parser.add_argument("--prompt-ids", default=None, help="comma-separated prompt ids (default: a Qwen3 prompt)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tol", type=float, default=0.05, help="input vs output log-prob tolerance (bf16 GPU)")
    parser.add_argument("--weights-dir", default=None, help="HF safetensors dir to test /update_weights_from_disk")
    parser.add_argument("--worker-urls", default=None,
                        help="with --url ROUTER: its workers, comma separated (control and weight calls go there)")
    args = parser.parse_args(argv)
    prompt = [int(x) for x in args.prompt_ids.split(",")] if args.prompt_ids else PROMPT
    workers = [u for u in args.worker_urls.split(",") if u.strip()] if args.worker_urls else None
    c = Checker(args.url, prompt, args.top_k, args.tol, workers)
    checks = [("health/model_info", check_health), ("greedy determinism + length", check_greedy),
              ("stop_token_ids", check_stop), ("teacher scoring [1:] alignment + top-K", check_scoring_alignment),
              ("batch answers in order", check_batch), ("error body (HTTP 400)", check_error_body),
              ("seeded sampling", check_seeded_sampling), ("/abort_request + /flush_cache", check_control)]
    if args.weights_dir:
        checks.append(("/update_weights_from_disk + version", lambda ch: check_weights(ch, args.weights_dir)))
    for name, fn in checks:
        c.run(name, lambda fn=fn: fn(c))
    width = max(len(n) for n, _, _ in c.results)
    for name, status, detail in c.results:
        print(f"{status:4}  {name:{width}}  {detail}")
    return 1 if any(s == "FAIL" for _, s, _ in c.results) else 0


if __name__ == "__main__":
    sys.exit(main())
