"""Weight sync of SGLang workers: from disk (HF safetensors on a shared path) and over NCCL.

Disk: ``/update_weights_from_disk`` {model_path, load_format, flush_cache, weight_version} on every
worker (never through a router), then a check that each worker reports the new weight version
(``/model_info``; older versions ``/get_weight_version`` or ``/get_model_info``) and, optionally,
that a log-prob probe matches the trainer's, then ``/flush_cache`` (HTTP 400 while busy: retried).
Distributed (NCCL on GPUs, gloo across CPU hosts): ``/init_weights_update_group`` once, then per sync
``/update_weights_from_distributed``, with the trainer broadcasting each tensor from rank 0 of the update
group while the HTTP call is pending; the same version check (and probe) as from disk.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import shutil
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import torch

from megatron_opd.rollout.sglang_http import RetryPolicy, SGLangError, error_message, run_sync

logger = logging.getLogger(__name__)

VERSION_ENDPOINTS = ("/model_info", "/get_weight_version", "/get_model_info")
KEEP_SYNC_DIRS = 2
"""Exports kept in ``weight_sync_dir``: the one the workers now serve and the one before (a worker
still loading it, or a rollback); older ones are deleted (one export per rollout would fill the disk)."""


def write_hf_safetensors(state_dict: dict[str, torch.Tensor], directory: str | Path, hf_config=None) -> Path:
    """Writes ``model.safetensors`` (+ ``config.json`` when hf_config is given) for SGLang to load."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # clone: tied embeddings share storage, which safetensors refuses
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()},
              str(directory / "model.safetensors"))
    if hf_config is not None:
        hf_config.save_pretrained(str(directory))
    return directory


BUSY_ATTEMPTS = 10
"""attempts of a call that a busy server answers with 400 (``/flush_cache``), whatever max_retries is."""


class WeightSyncClient:
    """Weight and cache calls sent to each worker directly."""

    def __init__(self, urls: list[str], policy: RetryPolicy, weight_sync_dir: str | None = None,
                 hf_config=None, probe_atol: float = 1e-3, keep_sync_dirs: int = KEEP_SYNC_DIRS) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.policy, self.weight_sync_dir, self.hf_config = policy, weight_sync_dir, hf_config
        self.probe_atol = probe_atol
        if keep_sync_dirs < 1:
            raise ValueError(f"keep_sync_dirs must be >= 1 (the served export), got {keep_sync_dirs}")
        self.keep_sync_dirs = keep_sync_dirs
        self._exports: list[Path] = []  # the exports this client wrote, oldest first
        self._versions = itertools.count(1)
        self.update_group = None
        """The trainer's side of the weight-update group (``update_distributed`` forms it on first use)."""

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=httpx.Timeout(self.policy.timeout_s, connect=self.policy.connect_timeout_s))

    async def _post(self, client, url: str, path: str, payload: dict, busy_retry: bool = False,
                    text_body: bool = False) -> dict | str:
        """POST with retries on 5xx/transport errors (and on 400 when ``busy_retry``); returns the JSON
        body, or the text body with ``text_body`` (``/flush_cache`` answers plain text)."""
        last = ""
        # A busy answer is no fault: behind sglang-router a worker is often busy with the router's health
        # checks (SGLang's /health generates one token on an idle server), so busy retries do not stop
        # at max_retries.
        attempts = max(self.policy.max_retries + 1, BUSY_ATTEMPTS if busy_retry else 0)
        for attempt in range(attempts):
            try:
                response = await client.post(url + path, json=payload)
                if response.status_code == 200 and text_body:
                    return response.text
                if response.status_code == 200 or (response.status_code == 400 and not busy_retry):
                    return _json_or_error(response, url, path)
                last = f"HTTP {response.status_code}: {error_message(response)}"
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            await asyncio.sleep(self.policy.backoff(attempt))
        raise SGLangError(f"{path} on {url} failed after {attempts} attempts: {last}", url)

    async def health(self, urls: list[str]) -> dict[str, bool]:
        async with self._client() as client:
            return dict(zip(urls, await asyncio.gather(*(self._healthy(client, u) for u in urls))))

    async def _healthy(self, client, url: str) -> bool:
        try:
            return (await client.get(url.rstrip("/") + "/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def flush(self, client, url: str) -> None:
        """/flush_cache answers plain text, HTTP 400 while requests run: retried with backoff."""
        await self._post(client, url, "/flush_cache", {}, busy_retry=True, text_body=True)

    async def flush_all(self) -> None:
        async with self._client() as client:
            await asyncio.gather(*(self.flush(client, u) for u in self.urls))

    async def server_infos(self, urls: list[str]) -> dict[str, dict | None]:
        """``/get_server_info`` of each URL (None where it does not answer a JSON object)."""
        async def one(client, url: str):
            try:
                response = await client.get(url.rstrip("/") + "/get_server_info", timeout=30.0)
                body = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                return None
            return body if isinstance(body, dict) else None

        async with self._client() as client:
            return dict(zip(urls, await asyncio.gather(*(one(client, u) for u in urls))))

    async def weight_version(self, client, url: str) -> str | None:
        """The worker's reported weight version, from the first endpoint that answers."""
        for path in VERSION_ENDPOINTS:
            try:
                response = await client.get(url + path)
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                version = response.json().get("weight_version")
                if version is not None:
                    return str(version)
        return None

    async def probe_logprobs(self, client, url: str, prompt: list[int], response: list[int]) -> list[float]:
        """Log-probs of ``response`` after ``prompt`` on one worker (teacher-style scoring request)."""
        payload = {"input_ids": list(prompt) + list(response), "return_logprob": True,
                   "logprob_start_len": len(prompt) - 1, "top_logprobs_num": 0, "rid": f"weight-probe-{url}",
                   "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}}
        body = await self._post(client, url, "/generate", payload)
        body = body[0] if isinstance(body, list) else body
        return [e[0] for e in body["meta_info"]["input_token_logprobs"][1:]]

    def resolve_source(self, source, version: str) -> str:
        """A directory path every worker can read: ``source`` itself or a fresh safetensors export."""
        if isinstance(source, (str, Path)):
            if not Path(source).is_dir():
                raise FileNotFoundError(f"weight sync: {source} is not a directory of HF safetensors")
            return str(source)
        if self.weight_sync_dir is None:
            raise ValueError("SGLang weight sync from an in-memory state dict needs weight_sync_dir "
                             "(rollout.weight_sync_dir), a path every worker can read")
        export = write_hf_safetensors(source, Path(self.weight_sync_dir) / version, self.hf_config)
        self._exports = [p for p in self._exports if p != export] + [export]
        return str(export)

    def prune_exports(self) -> None:
        """Deletes this client's exports but the newest ``keep_sync_dirs`` (after a successful sync:
        no worker reads the older ones any more). Directories it did not write are never touched."""
        while len(self._exports) > self.keep_sync_dirs:
            shutil.rmtree(self._exports.pop(0), ignore_errors=True)

    def update_from_disk(self, source, *, weight_version: str | None = None, probe=None) -> str:
        version = weight_version or f"v{next(self._versions)}"
        path = self.resolve_source(source, version)
        run_sync(self._update_all(path, version, probe))
        self.prune_exports()
        return version

    async def _update_all(self, path: str, version: str, probe) -> None:
        async with self._client() as client:
            await asyncio.gather(*(self._update_one(client, u, path, version, probe) for u in self.urls))

    async def _update_one(self, client, url: str, path: str, version: str, probe) -> None:
        body = await self._post(client, url, "/update_weights_from_disk",
                                {"model_path": path, "load_format": "auto", "flush_cache": True,
                                 "weight_version": version})
        if not body.get("success", False):
            raise SGLangError(f"/update_weights_from_disk on {url} failed: {body.get('message')}", url)
        await self._verify_one(client, url, version, probe, f"loading {path}")

    async def _verify_one(self, client, url: str, version: str, probe, what: str) -> None:
        """The worker reports ``version`` (and matches the probe), then its cache is flushed."""
        reported = await self.weight_version(client, url)
        if reported != version:
            raise SGLangError(f"{url} reports weight version {reported!r} after {what}, expected {version!r}", url)
        if probe is not None:
            await self._check_probe(client, url, probe)
        await self.flush(client, url)

    async def _verify_all(self, version: str, probe, what: str) -> None:
        async with self._client() as client:
            await asyncio.gather(*(self._verify_one(client, u, version, probe, what) for u in self.urls))

    async def _check_probe(self, client, url: str, probe) -> None:
        prompt, response, expected = probe
        got = await self.probe_logprobs(client, url, prompt, response)
        worst = max((abs(a - b) for a, b in zip(got, expected)), default=math.inf)
        if len(got) != len(expected) or worst > self.probe_atol:
            raise SGLangError(f"{url}: weight probe log-probs differ from the trainer's by {worst:.3g} "
                              f"(> {self.probe_atol}): the new weights are not in use", url)

    # --- NCCL path (GPU clusters; gloo stands in on CPU) -----------------------------------------
    def update_distributed(self, state_dict: dict[str, torch.Tensor], *, weight_version: str | None = None,
                           probe=None, address: str | None = None, port: int = 0, backend: str | None = None) -> str:
        """The trainer's whole distributed sync: forms the update group on first use, broadcasts every tensor
        of ``state_dict`` (HF names, sorted), then checks that each worker reports the new version (and the
        probe). Later calls reuse the group; ``close_update_group`` ends it.

        address: where this process (rank 0) hosts the group's rendezvous; it must be reachable from every
            worker (default: this host's address on the route to the first worker). port 0: a free port.
        backend: "nccl" on GPUs (default when CUDA is available), else "gloo".
        """
        if self.update_group is None:
            address = address or local_address_towards(self.urls[0])
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            tp_sizes = [worker_tp_size(info, url) for url, info in run_sync(self.server_infos(self.urls)).items()]
            self.update_group = self.init_update_group(address, port or free_port_on(address), backend=backend,
                                                       worker_tp_sizes=tp_sizes)
        named = [(name, tensor) for name, tensor in sorted(state_dict.items())]
        version = self.update_from_distributed(named, self.update_group, weight_version=weight_version)
        run_sync(self._verify_all(version, probe, "a distributed weight update"))
        return version

    def close_update_group(self) -> None:
        """Ends the group on every worker (best effort: a worker that is gone keeps nothing) and here."""
        if self.update_group is None:
            return

        async def destroy_all():
            async with self._client() as client:
                return await asyncio.gather(*(client.post(u + "/destroy_weights_update_group",
                                                          json={"group_name": self.update_group_name})
                                              for u in self.urls), return_exceptions=True)

        for url, answer in zip(self.urls, run_sync(destroy_all())):
            if isinstance(answer, BaseException) or answer.status_code != 200:
                logger.warning("%s: /destroy_weights_update_group failed (%s); the worker keeps the group",
                               url, answer if isinstance(answer, BaseException) else error_message(answer))
        torch.distributed.destroy_process_group(self.update_group)
        self.update_group = None

    def init_update_group(self, master_address: str, master_port: int, group_name: str | None = None,
                          backend: str = "nccl", worker_tp_sizes: list[int] | None = None,
                          timeout_s: float = 600.0):
        """Forms the update group: the trainer is rank 0, worker i's ranks start at 1 + Σ earlier TP sizes.

        group_name: None gives a fresh name per call. A server keeps its side of a group after the
        trainer dies and refuses a second group of the same name ("The specified group name has
        already been created"), so a restarted trainer must not reuse one. The name is kept for
        ``update_from_distributed``. Returns the trainer's process group (collective: blocks until
        every worker joined; a worker that answers an error stops the wait at once).
        """
        name = group_name or f"megatron_opd-{uuid.uuid4().hex[:8]}"
        tp_sizes = worker_tp_sizes or [1] * len(self.urls)
        world_size = 1 + sum(tp_sizes)
        offsets = [1 + sum(tp_sizes[:i]) for i in range(len(self.urls))]
        calls = [(u, "/init_weights_update_group",
                  {"master_address": master_address, "master_port": int(master_port), "rank_offset": off,
                   "world_size": world_size, "group_name": name, "backend": backend})
                 for u, off in zip(self.urls, offsets)]
        thread, box = self._post_in_background(calls)
        formed: dict = {}

        def form():  # in a thread, so that a worker's error answer can end the wait
            try:
                formed["group"] = trainer_update_group(master_address, master_port, world_size, name, backend,
                                                       timeout=timedelta(seconds=timeout_s))
            except BaseException as err:  # noqa: BLE001 - re-raised below
                formed["error"] = err

        former = threading.Thread(target=form, daemon=True)
        former.start()
        _wait_unless_workers_fail(lambda: not former.is_alive(), thread, box, "forming the weight-update group")
        if "error" in formed:
            raise formed["error"]
        _join(thread, box)
        self.update_group_name = name
        return formed["group"]

    def update_from_distributed(self, named_tensors: list[tuple[str, torch.Tensor]], group,
                                group_name: str | None = None, weight_version: str | None = None) -> str:
        """Broadcasts tensors (rank 0 = trainer) while every worker's HTTP call receives them.

        SGLang 0.5.23 loads distributed weights only inside a weight-update session: each worker gets
        ``/begin_weight_update`` first and ``/end_weight_update`` after (without the session it answers
        400 at once while the trainer would wait in the broadcast).
        """
        version = weight_version or f"v{next(self._versions)}"
        name = group_name or getattr(self, "update_group_name", None)
        if name is None:
            raise ValueError("update_from_distributed: no group_name and no group formed by init_update_group")
        _join(*self._post_in_background([(u, "/begin_weight_update", {}) for u in self.urls]))
        payload = distributed_update_payload(named_tensors, name, version)
        thread, box = self._post_in_background([(u, "/update_weights_from_distributed", payload) for u in self.urls])
        works = broadcast_named_tensors(named_tensors, group, async_op=True)
        _wait_unless_workers_fail(lambda: all(w.is_completed() for w in works), thread, box,
                                  "broadcasting weights (the workers' weights are now partly updated)")
        for work in works:
            work.wait()  # host sync: the last broadcast has left the trainer
        _join(thread, box)
        _join(*self._post_in_background([(u, "/end_weight_update", {}) for u in self.urls]))
        return version

    def _post_in_background(self, calls: list[tuple[str, str, dict]]):
        box: dict = {}

        async def post_all():
            async with self._client() as client:
                return await asyncio.gather(*(self._post(client, u, p, body) for u, p, body in calls))

        def target():
            try:
                box["out"] = run_sync(post_all())
            except BaseException as err:  # noqa: BLE001 - re-raised by _join
                box["error"] = err

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread, box


def _join(thread: threading.Thread, box: dict) -> None:
    thread.join()
    if "error" in box:
        raise box["error"]
    for body in box["out"]:
        if isinstance(body, dict) and body.get("success") is False:
            raise SGLangError(f"weight update call failed: {body.get('message')}")


def trainer_update_group(master_address: str, master_port: int, world_size: int, group_name: str, backend: str,
                         timeout: timedelta | None = None):
    """The trainer's side (rank 0) of SGLang's custom update group, formed through a TCP rendezvous.

    Mirrors what every SGLang worker does in ``init_custom_process_group``: rank 0 hosts the TCP store,
    the store is wrapped in ``PrefixStore(group_name, ...)`` (without the same prefix the two sides
    look for each other's keys under different names and wait until the timeout) and the group is
    made with an explicit timeout (torch >= 2.13 raises TypeError without one).
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = timeout or c10d.default_pg_timeout
    # blocks until every worker rank connected to the store (rank 0 = the trainer hosts it)
    store, rank, world_size = next(c10d.rendezvous(_tcp_url(master_address, master_port), 0, world_size,
                                                   timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    # collective: every member builds its backend from the shared store
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                              group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def distributed_update_payload(named_tensors: list[tuple[str, torch.Tensor]], group_name: str, version: str) -> dict:
    """Body of ``/update_weights_from_distributed``: each worker allocates ``torch.empty(shape,
    dtype=getattr(torch, dtype))`` per name, then receives the broadcasts in this order."""
    return {"names": [n for n, _ in named_tensors],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named_tensors],
            "shapes": [list(t.shape) for _, t in named_tensors], "group_name": group_name,
            "flush_cache": True, "weight_version": version}


def broadcast_named_tensors(named_tensors: list[tuple[str, torch.Tensor]], group, async_op: bool = False) -> list:
    """The trainer's half of an update: one broadcast from rank 0 per tensor, in payload order.

    With ``async_op`` returns the pending works (each keeps its tensor alive until it completes).
    """
    works = []
    for _, tensor in named_tensors:
        # collective: trainer -> every worker rank (a broadcast needs contiguous memory)
        work = torch.distributed.broadcast(tensor.detach().contiguous(), src=0, group=group, async_op=async_op)
        works.append(work)
    return works if async_op else []


def _wait_unless_workers_fail(done, thread: threading.Thread, box: dict, what: str, poll_s: float = 0.05) -> None:
    """Waits until ``done()``; raises as soon as the workers' HTTP calls ended in an error instead
    (a collective whose peers gave up would otherwise wait for the whole group timeout)."""
    while not done():
        if not thread.is_alive():
            failed = box.get("error") or next((b for b in box.get("out", []) if isinstance(b, dict)
                                               and b.get("success") is False), None)
            if failed is not None:
                message = failed if isinstance(failed, BaseException) else failed.get("message")
                raise SGLangError(f"{what}: a worker failed: {message}")
        time.sleep(poll_s)


def local_address_towards(url: str) -> str:
    """This host's address on the route to ``url``'s host (a UDP "connect" sends nothing; it only picks the
    source address), i.e. the address a worker there can reach us at."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    family = socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((parts.hostname, parts.port or 80))
        return probe.getsockname()[0]


def free_port_on(address: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address.strip("[]"), 0))
        return sock.getsockname()[1]


def worker_tp_size(info: dict | None, url: str) -> int:
    """A worker's tensor-parallel size (its ranks in the update group), from ``/get_server_info``."""
    if not info or not isinstance(info.get("tp_size"), int) or info["tp_size"] < 1:
        raise SGLangError(f"{url}: /get_server_info gives no tp_size (needed to size the weight-update group)", url)
    return info["tp_size"]


def _tcp_url(host: str, port: int) -> str:
    """``tcp://host:port``, an IPv6 literal in brackets (as SGLang's NetworkAddress writes it)."""
    host = host.strip("[]")
    return f"tcp://[{host}]:{int(port)}" if ":" in host else f"tcp://{host}:{int(port)}"


def _json_or_error(response: httpx.Response, url: str, path: str) -> dict:
    if response.status_code != 200:  # error bodies come in several shapes, some not JSON
        raise SGLangError(f"{path} on {url}: HTTP {response.status_code}: {error_message(response)}", url)
    try:
        return response.json()
    except ValueError as err:
        raise SGLangError(f"{path} on {url}: malformed JSON {response.text[:120]!r}", url) from err
