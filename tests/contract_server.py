"""A loopback HTTP server speaking SGLang's native API (DESIGN §4), backed by a real tiny model.

Not a product engine, and no longer the client's main test: the client runs against real SGLang
0.5.23 servers (tests/real_sglang). This server is kept for faults a healthy real server cannot be
made to show (malformed JSON, NaN log-probs, short or mis-addressed answers, injected 5xx), and its
bodies follow the real server's (measured on 0.5.23): ``/flush_cache`` answers plain text (400 while
busy), ``/abort_request`` an empty 200, validation errors ``{"error": {"message": ...}}``, unknown
routes FastAPI's default ``{"detail": "Not Found"}`` (not measured), ``/get_server_info`` says whether
``enable_deterministic_inference`` is on (on by default here, so that ``sampling_seed`` is sent).
Generation runs through ``LocalRolloutEngine.sample`` with the request's ``sampling_seed``;
concurrent requests with equal sampling settings are batched (a few ms window, like continuous
batching) — results do not depend on batching because every row draws its own noise.
Scoring (``logprob_start_len`` >= 0) runs a plain forward. Faults are injected on demand with
``server.inject(name, times)``: die (drop connections and stop), http_500, http_503, delay (answer after
``delay_s``, or drop the request as soon as the client gives up on it), malformed_json, wrong_length,
nan_logprob, wrong_rid, abort, flush_busy.
"""

from __future__ import annotations

import json
import math
import queue
import select
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_opd.rollout.local import LocalRolloutEngine  # noqa: E402
from megatron_opd.rollout.sglang_protocol import server_seed  # noqa: E402
from megatron_opd.rollout.types import SamplingParams  # noqa: E402
from megatron_opd.teacher.local import LocalTeacher  # noqa: E402

FAULTS = ("die", "http_500", "http_503", "delay", "malformed_json", "wrong_length", "nan_logprob",
          "wrong_rid", "abort", "flush_busy")


class _HTTPServer(ThreadingHTTPServer):
    """socketserver listens with a backlog of 5: a client opening more connections at once (the rollout
    client opens one per sample, up to max_concurrency = 64) gets its handshakes dropped and waits for
    TCP's retransmission (1 s, then 3 s, 7 s), so answers arrive in waves seconds apart. Real servers
    (uvicorn: 2048) do not do that."""

    request_queue_size = 1024
    daemon_threads = True


class BadRequest(ValueError):
    """Answered with HTTP 400 {"error": {"message": ...}} (SGLang 0.5.23's request-validation shape)."""


FLUSH_TEXT = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
              "requests, the operation will not be performed.)\n")


def _params_from(sp: dict, vocab_size: int) -> SamplingParams:
    top_k = int(sp.get("top_k", -1))
    if top_k == 0 or top_k < -1:
        raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {top_k}")
    bias = sp.get("logit_bias") or {}
    if any(float(v) > -1e8 for v in bias.values()):
        raise BadRequest("contract server: only suppressing logit_bias values (<= -1e8) are supported")
    try:
        return SamplingParams(temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
                              top_k=top_k, max_new_tokens=int(sp.get("max_new_tokens", 128)),
                              stop_token_ids=tuple(sp.get("stop_token_ids") or ()),
                              ignore_eos=bool(sp.get("ignore_eos", False)),
                              suppress_token_ids=tuple(int(k) for k in bias))
    except ValueError as err:
        raise BadRequest(str(err)) from err


def _split_batch(body: dict) -> tuple[list[dict], bool]:
    """One request dict per item of a (possibly batched) /generate body; and whether it was a batch."""
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise BadRequest("input_ids is required (a list of ints or a list of lists)")
    batched = isinstance(ids[0], list)
    rows = ids if batched else [ids]
    items = []
    for i, row in enumerate(rows):
        item = {k: (v[i] if batched and isinstance(v, list) and k != "input_ids" else v) for k, v in body.items()}
        item["input_ids"] = row
        items.append(item)
    return items, batched


class Int32SeedLocalEngine(LocalRolloutEngine):
    """The in-process engine drawing with the int32-safe seeds the SGLang client sends: the
    reference the contract server's samples must equal."""

    def _take_seeds(self, num_prompts, params):
        return [[server_seed(s) for s in row] for row in super()._take_seeds(num_prompts, params)]


class ContractServer:
    """The server object: model, batcher, fault plan, counters. ``url`` once started."""

    def __init__(self, model, *, vocab_size: int | None = None, batch_window_s: float = 0.004,
                 max_batch: int = 256, name: str = "worker", deterministic: bool = True) -> None:
        self.engine = LocalRolloutEngine(model, vocab_size=vocab_size)
        self.teacher = LocalTeacher(self.engine.model, vocab_size=self.engine.vocab_size)
        self.vocab_size, self.name = self.engine.vocab_size, name
        self.batch_window_s, self.max_batch = batch_window_s, max_batch
        self.weight_version = "initial"
        self.deterministic = deterministic  # reported as enable_deterministic_inference
        self.lock = threading.Lock()  # one model computation at a time (2 shared cores)
        self.faults: Counter = Counter()
        self.fault_args: dict = {}
        self.counts: Counter = Counter()  # requests seen per rid
        self.answered: Counter = Counter()  # answers sent per rid (2xx with a body)
        self.aborted: set[str] = set()
        self.delayed: list[str] = []  # rids of requests the delay fault held
        self.dropped: list[str] = []  # rids of requests dropped unanswered: the client gave up on them
        self.calls: list[tuple[str, dict]] = []  # weight/cache calls, for tests
        self._queue: queue.Queue = queue.Queue()
        self._httpd: ThreadingHTTPServer | None = None
        self._close_lock = threading.Lock()
        self.dead = False
        self.die_after_answers: int | None = None  # die at the first request after this many answers

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> ContractServer:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _make_handler(self))
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        threading.Thread(target=self._batch_loop, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self.dead = True
        with self._close_lock:  # a dying server closes itself in a thread while a test may close it too
            httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        self._queue.put(None)

    def inject(self, fault: str, times: int = 1, **args) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
        self.faults[fault] += times
        self.fault_args.update(args)

    def take_fault(self, fault: str) -> bool:
        with self.lock:
            if self.faults[fault] > 0:
                self.faults[fault] -= 1
                return True
        return False

    # --- generation (batched) -----------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, seed: int, rid: str) -> Future:
        future: Future = Future()
        self._queue.put((prompt, params, seed, rid, future))
        return future

    def _batch_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.batch_window_s
            while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self._run_batch(batch)

    def _run_batch(self, batch: list) -> None:
        groups: dict = {}
        for item in batch:
            groups.setdefault(repr(item[1]), []).append(item)  # equal sampling settings share a forward
        for items in groups.values():
            live = [it for it in items if it[3] not in self.aborted]
            for it in items:
                if it[3] in self.aborted:
                    it[4].set_result(None)
            if not live:
                continue
            try:
                with self.lock:
                    rows = self.engine.sample([it[0] for it in live], [it[2] for it in live], live[0][1])
            except Exception as err:  # noqa: BLE001 - handed to the request threads
                for it in live:
                    it[4].set_exception(err)
                continue
            for it, row in zip(live, rows):
                it[4].set_result(row)

    # --- answers ------------------------------------------------------------------------------
    def answer_item(self, item: dict) -> dict:
        """The /generate answer of one request item (SGLang's meta_info layout)."""
        prompt, rid = [int(t) for t in item["input_ids"]], str(item.get("rid") or f"auto-{time.monotonic_ns()}")
        if any(t < 0 or t >= self.vocab_size for t in prompt):
            raise BadRequest(f"input_ids hold ids outside [0, {self.vocab_size})")
        params = _params_from(item.get("sampling_params") or {}, self.vocab_size)
        seed = int((item.get("sampling_params") or {}).get("sampling_seed", time.monotonic_ns() % 2**31))
        row = self.submit(prompt, params, seed, rid).result()
        meta = {"id": rid, "prompt_tokens": len(prompt), "cached_tokens": 0, "weight_version": self.weight_version}
        if row is None:
            out_ids, lps, finish = [], [], {"type": "abort", "message": "aborted by /abort_request"}
        else:
            out_ids, lps = row.response_ids, row.logprobs
            finish = ({"type": "stop", "matched": row.matched_stop} if row.finish_reason == "stop"
                      else {"type": "length", "length": len(out_ids)})
        meta.update(completion_tokens=len(out_ids), finish_reason=finish)
        if item.get("return_logprob"):
            self._add_logprobs(meta, item, prompt, out_ids, lps, params)
        return {"text": "", "output_ids": out_ids, "meta_info": meta}

    def _add_logprobs(self, meta, item, prompt, out_ids, lps, params) -> None:
        top_n = int(item.get("top_logprobs_num") or 0)
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, out_ids)]
        start = int(item.get("logprob_start_len", -1) if item.get("logprob_start_len") is not None else -1)
        meta["input_token_logprobs"], meta["input_top_logprobs"] = self._input_logprobs(prompt, start, top_n)
        if top_n:
            meta["output_top_logprobs"] = self._output_top(prompt, out_ids, params, top_n)

    def _input_logprobs(self, ids: list[int], start: int, top_n: int):
        """Entries for tokens ids[start:], entry 0 null (no context counted); [] when start = -1."""
        if start < 0:
            return [], []
        if start >= len(ids):
            raise BadRequest(f"logprob_start_len {start} must be < the input length {len(ids)}")
        with self.lock:
            score = self.teacher.score([ids[: start + 1]], [ids[start + 1:]], top_k=top_n)[0]
        token = [[None, ids[start], None]] + [[float(lp), t, None] for lp, t in zip(score.token_logprobs.tolist(),
                                                                                   ids[start + 1:])]
        if not top_n:
            return token, []
        tops = [None] + [[[float(lp), int(t), None] for lp, t in zip(lrow, irow)]
                         for lrow, irow in zip(score.topk_logprobs.tolist(), score.topk_ids.tolist())]
        return token, tops

    def _output_top(self, prompt, out_ids, params: SamplingParams, top_n: int) -> list:
        """Top-N of the (tempered, suppressed) sampling distribution at each output position."""
        from megatron_opd.rollout.sampler import masked_logprobs

        if not out_ids:
            return []
        ids = torch.tensor([prompt + out_ids])
        with self.lock, torch.no_grad():
            logits = self.engine.model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) + len(out_ids) - 1]
        logp = masked_logprobs(logits, params.temperature, self.vocab_size,
                               torch.tensor(params.suppress_token_ids, dtype=torch.long))
        top_lp, top_ids = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
        return [[[float(a), int(b), None] for a, b in zip(r1, r2)] for r1, r2 in zip(top_lp.tolist(), top_ids.tolist())]

    def corrupt(self, answer: dict) -> dict:
        """Applies answer-level faults (wrong length, NaN, wrong rid, abort)."""
        meta = answer["meta_info"]
        if self.take_fault("wrong_length"):
            meta["output_token_logprobs"] = meta.get("output_token_logprobs", [])[:-1]
            meta.get("input_token_logprobs", []).pop() if meta.get("input_token_logprobs") else None
        if self.take_fault("nan_logprob"):
            for key in ("output_token_logprobs", "input_token_logprobs"):
                if meta.get(key) and len(meta[key]) > 1:
                    meta[key][1][0] = math.nan
        if self.take_fault("wrong_rid"):
            meta["id"] = meta["id"] + "-other"
        if self.take_fault("abort"):
            meta["finish_reason"] = {"type": "abort", "message": "injected abort"}
        return answer

    # --- weights ------------------------------------------------------------------------------
    def update_from_disk(self, body: dict) -> dict:
        self.calls.append(("/update_weights_from_disk", body))
        try:
            with self.lock:
                self.engine.update_weights(body["model_path"])
        except (KeyError, ValueError, FileNotFoundError, OSError) as err:
            return {"success": False, "message": f"failed to load {body.get('model_path')}: {err}"}
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return {"success": True, "message": "Succeeded to update model weights."}


def _make_handler(server: ContractServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            return None

        def _send(self, status: int, body, raw: bytes | None = None, content_type: str = "application/json") -> None:
            data = raw if raw is not None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _drop(self) -> None:
            """Closes the connection without an answer (a worker dying mid-request)."""
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass

        def _wait_unless_given_up(self, rids: set[str], seconds: float) -> bool:
            """Waits ``seconds``; False as soon as the client gives up on the request (it aborts one of
            ``rids`` or hangs up), which a real server answers by dropping the request. A fixed sleep
            would wake up later, inside another test, and compute an answer nobody reads (holding the
            model lock and taking that test's injected faults)."""
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                if rids & server.aborted or self._client_gone():
                    return False
                time.sleep(min(left, 0.02))
            return True

        def _client_gone(self) -> bool:
            """The client closed its end (a readable socket with nothing to read)."""
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            try:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length", 0))
            try:
                return json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as err:
                raise BadRequest(f"request body is not JSON: {err}") from err

        def do_GET(self) -> None:
            if server.dead:
                return self._drop()
            info = {"model_path": "contract-tiny-qwen3", "weight_version": server.weight_version,
                    "is_generation": True}
            routes = {"/health": {}, "/health_generate": {}, "/get_model_info": info, "/model_info": info,
                      "/get_weight_version": {"weight_version": server.weight_version},
                      "/get_server_info": {"tp_size": 1, "version": "contract", "weight_version": server.weight_version,
                                           "enable_deterministic_inference": server.deterministic}}
            if self.path in routes:
                return self._send(200, routes[self.path])
            self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            if server.dead:
                return self._drop()
            try:
                body = self._body()
                handler = {"/generate": self._generate, "/flush_cache": self._flush,
                           "/abort_request": self._abort, "/update_weights_from_disk": self._update}.get(self.path)
                if handler is None:
                    server.calls.append((self.path, body))
                    return self._send(200, {"success": True, "message": "recorded by the contract server"})
                handler(body)
            except BadRequest as err:
                self._send(400, {"error": {"message": str(err)}})
            except Exception as err:  # noqa: BLE001 - a server bug must answer, not hang the client
                self._send(500, {"object": "error", "message": f"{type(err).__name__}: {err}"})

        def _generate(self, body: dict) -> None:
            items, batched = _split_batch(body)
            for item in items:
                server.counts[str(item.get("rid"))] += 1
            done = sum(server.answered.values())
            if server.take_fault("die") or (server.die_after_answers is not None and done >= server.die_after_answers):
                server.dead = True
                threading.Thread(target=server.close, daemon=True).start()
                return self._drop()
            for status, fault in ((500, "http_500"), (503, "http_503")):
                if server.take_fault(fault):
                    return self._send(status, {"object": "error", "message": f"injected {fault}"})
            rids = {str(item.get("rid")) for item in items}
            if server.take_fault("delay"):
                server.delayed.extend(sorted(rids))
                if not self._wait_unless_given_up(rids, server.fault_args.get("delay_s", 2.0)):
                    server.dropped.extend(sorted(rids))
                    return self._drop()
            answers = [server.answer_item(item) for item in items]
            if server.dead:
                return self._drop()
            if self._client_gone():  # it timed out while the answer was computed: nobody reads it
                server.dropped.extend(sorted(rids))
                return self._drop()
            answers = [server.corrupt(answer) for answer in answers]
            if server.take_fault("malformed_json"):
                return self._send(200, None, raw=b'{"text": "", "meta_info": {"id": ')
            for a in answers:
                server.answered[a["meta_info"]["id"]] += 1
            self._send(200, answers if batched else answers[0])

        def _flush(self, body: dict) -> None:
            server.calls.append(("/flush_cache", body))
            busy = server.take_fault("flush_busy")
            self._send(400 if busy else 200, None, raw=FLUSH_TEXT.encode(), content_type="text/plain; charset=utf-8")

        def _abort(self, body: dict) -> None:
            server.calls.append(("/abort_request", body))
            if body.get("rid"):
                server.aborted.add(str(body["rid"]))
            self._send(200, None, raw=b"", content_type="text/plain")

        def _update(self, body: dict) -> None:
            result = server.update_from_disk(body)
            self._send(200 if result["success"] else 400, result)

    return Handler


class ContractRouter:
    """Round-robin proxy of /generate over workers (like sglang_router); tries the next worker when
    one is unreachable and answers 503 only when every worker failed."""

    def __init__(self, worker_urls: list[str]) -> None:
        self.worker_urls, self.forwarded = list(worker_urls), Counter()
        self._next, self._lock = 0, threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def start(self) -> ContractRouter:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _make_router_handler(self))
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def order(self) -> list[str]:
        with self._lock:
            start, self._next = self._next, (self._next + 1) % len(self.worker_urls)
        return [self.worker_urls[(start + i) % len(self.worker_urls)] for i in range(len(self.worker_urls))]

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def _make_router_handler(router: ContractRouter):
    import httpx

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            return None

        def _send(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # like sglang_router: info GETs are answered by a live worker
            for worker in router.order():
                try:
                    response = httpx.get(worker + self.path, timeout=10.0)
                except httpx.TransportError:
                    continue
                return self._send(response.status_code, response.content)
            self._send(503, json.dumps({"error": {"message": "no worker available"}}).encode())

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            for worker in router.order():
                try:
                    response = httpx.post(worker + self.path, content=data, timeout=60.0,
                                          headers={"Content-Type": "application/json"})
                except httpx.TransportError:
                    continue  # unreachable worker: next one
                router.forwarded[worker] += 1
                return self._send(response.status_code, response.content)
            self._send(503, json.dumps({"object": "error", "message": "no worker available"}).encode())

    return Handler


def start_contract_server(model, **kwargs) -> ContractServer:
    return ContractServer(model, **kwargs).start()


class single_thread_torch:  # noqa: N801 - used as a context manager / fixture helper
    """Context manager: one torch intra-op thread while a contract server runs in this process.

    With more, OpenMP workers spin against the server's HTTP threads and the client's event loop
    (measured 5-20x slower on 2 shared cores), which also makes client timeouts flaky.
    """

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.saved)
