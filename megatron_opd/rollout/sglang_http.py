"""HTTP machinery shared by the SGLang rollout client and the SGLang teacher scorer.

One request per sample, each with its own ``rid``; bounded concurrency; per-request timeouts;
retries with exponential backoff that move to the next healthy worker (failover); every answer
goes through a validator, and every error names the server and the ``rid``. Requests that time
out are aborted on their server (best effort) so a retry never leaves a duplicate running there.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger(__name__)


class SGLangError(RuntimeError):
    """A request failed for good; the message names the server(s) and the rid."""

    def __init__(self, message: str, server: str | None = None, rid: str | None = None) -> None:
        super().__init__(message)
        self.server, self.rid = server, rid


class RetryableError(Exception):
    """An answer that another attempt (same or other worker) may fix: 5xx, drop, timeout, bad body."""


class FatalError(Exception):
    """An answer no retry can fix (HTTP 4xx with an error body, impossible request)."""


class UnreachableError(RetryableError):
    """No connection could be made to the server (refused, no route, connect timeout): its host is
    down or cut off, not answering wrongly."""


def run_sync(coro: Awaitable):
    """Runs a coroutine from sync code, also when the caller already runs an event loop (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", _capture(coro)))
    thread.start()
    thread.join()
    if "error" in box["out"]:
        raise box["out"]["error"]
    return box["out"]["value"]


def _capture(coro: Awaitable) -> dict:
    try:
        return {"value": asyncio.run(coro)}
    except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
        return {"error": err}


def split_urls(urls: str | list[str] | tuple[str, ...]) -> list[str]:
    """Server URLs from one string, a comma-separated list (``--rollout-url http://a,http://b``) or a
    list of either; raises ValueError naming the value when none is left."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u.strip().rstrip("/") for item in items for u in str(item).split(",") if u.strip()]
    if not out:
        raise ValueError(f"SGLang client: no server URL in {urls!r}")
    bad = [u for u in out if not u.startswith(("http://", "https://"))]
    if bad:
        raise ValueError(f"SGLang client: {bad[0]!r} (from {urls!r}) is not an http(s) URL")
    return out


@dataclass
class WorkerPool:
    """Round-robin over worker (or router) URLs; a failing worker sits out ``cooldown_s`` seconds."""

    urls: list[str]
    cooldown_s: float = 5.0
    _next: int = 0
    _down_until: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("SGLang client: give at least one server URL")
        self.urls = split_urls(self.urls)

    def pick(self, avoid: str | None = None) -> str:
        """The next worker that is not cooling down (and not ``avoid`` when another exists)."""
        now = time.monotonic()
        order = [self.urls[(self._next + i) % len(self.urls)] for i in range(len(self.urls))]
        self._next = (self._next + 1) % len(self.urls)
        healthy = [u for u in order if self._down_until.get(u, 0.0) <= now]
        preferred = [u for u in healthy if u != avoid] or healthy or [u for u in order if u != avoid] or order
        return preferred[0]

    def mark_down(self, url: str) -> None:
        self._down_until[url] = time.monotonic() + self.cooldown_s


@dataclass(kw_only=True)
class RetryPolicy:
    """Timeouts and retries of one request."""

    timeout_s: float = 300.0
    connect_timeout_s: float = 5.0
    max_retries: int = 4
    """extra attempts after the first."""
    backoff_s: float = 0.2
    """first backoff; doubles per attempt, capped at ``max_backoff_s``."""
    max_backoff_s: float = 5.0
    unreachable_wait_s: float = 0.0
    """how long a request waits for servers it cannot connect to (a host down or partitioned),
    logging which one it waits for, before it fails naming it; while it waits, failed connections do
    not use up ``max_retries``. 0: no waiting (connection failures are ordinary retries)."""

    def backoff(self, attempt: int) -> float:
        return min(self.backoff_s * (2 ** attempt), self.max_backoff_s)


def decode_json(response: httpx.Response, server: str, rid: str):
    """JSON body of a 200 answer; malformed bodies and non-200 statuses raise Retryable/FatalError."""
    if response.status_code >= 500 or response.status_code == 429:
        raise RetryableError(f"HTTP {response.status_code} from {server} for rid {rid}: {error_message(response)}")
    if response.status_code != 200:
        raise FatalError(f"HTTP {response.status_code} from {server} for rid {rid}: {error_message(response)}")
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RetryableError(f"malformed JSON from {server} for rid {rid}: {err}; body {response.text[:120]!r}") from err


def error_message(response: httpx.Response) -> str:
    """The message of an SGLang error answer, whatever its shape (measured on 0.5.23): request
    validation answers {"error": {"message": ...}}, HTTPException paths {"object": "error",
    "message": ...}, FastAPI's own errors {"detail": ...}, weight calls {"success": false, "message": ...},
    and some endpoints plain text."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:300] or "(empty body)"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if body.get(key) is not None:
                return str(body[key])
    return str(body)[:300]


def check_logprob(value, what: str) -> float:
    """A finite log-prob <= ~0, else RetryableError naming ``what``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value > 1e-3:
        raise RetryableError(f"{what} is {value!r}, not a finite log-prob <= 0")
    return float(value)


class RequestRunner:
    """Sends requests with bounded concurrency, retries and failover; tracks rids in flight.

    ``abort_urls``: where ``/abort_request`` goes for a request that timed out or is cancelled; None:
    the server it was sent to. Behind a router give its workers: sglang-router 0.3.2 has no
    ``/abort_request`` (404), and a rid is unique, so asking every worker aborts exactly that request.
    """

    def __init__(self, pool: WorkerPool, policy: RetryPolicy, max_concurrency: int,
                 abort_urls: list[str] | None = None) -> None:
        self.pool, self.policy, self.max_concurrency = pool, policy, int(max_concurrency)
        self.abort_urls = list(abort_urls) if abort_urls else None
        self.in_flight: dict[str, str] = {}  # rid -> server, for /abort_request on shutdown
        self.attempts = 0
        self.failures: list[str] = []
        self._last_wait_log: dict[str, float] = {}

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        timeout = httpx.Timeout(self.policy.timeout_s, connect=self.policy.connect_timeout_s)
        return httpx.AsyncClient(limits=limits, timeout=timeout)

    async def run_all(self, jobs: list[tuple[Callable[[int], tuple[str, dict]], Callable]], path: str = "/generate"):
        """Runs every job (make_payload(attempt) -> (rid, payload), validate(body, rid, server) -> result).

        On any failure or interrupt the other requests are cancelled and aborted on their servers.
        """
        semaphore = asyncio.Semaphore(self.max_concurrency)
        async with self.client() as client:
            tasks = [asyncio.ensure_future(self._guarded(client, semaphore, path, make, check))
                     for make, check in jobs]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self.abort_in_flight(client)
                raise

    async def _guarded(self, client, semaphore, path, make, check):
        async with semaphore:
            return await self.request(client, path, make, check)

    async def request(self, client: httpx.AsyncClient, path: str, make, check):
        """One logical request: attempts until ``check`` accepts an answer or retries run out."""
        errors: list[str] = []
        server = None
        retries, unreachable_since = 0, None
        for attempt in itertools.count():  # attempt numbers the rids; ``retries`` counts against the budget
            server = self.pool.pick(avoid=server)
            rid, payload = make(attempt)
            try:
                return await self._attempt(client, server, path, rid, payload, check)
            except FatalError as err:
                raise SGLangError(str(err), server, rid) from err
            except UnreachableError as err:
                errors.append(str(err))
                self.failures.append(str(err))
                unreachable_since = unreachable_since or time.monotonic()
                if self._still_waiting(server, unreachable_since, err):
                    await asyncio.sleep(self.policy.backoff(min(attempt, 8)))
                    continue
                if self.policy.unreachable_wait_s > 0:
                    raise SGLangError(f"SGLang server {server} unreachable for {time.monotonic() - unreachable_since:.0f} s "
                                      f"(waited up to {self.policy.unreachable_wait_s:.0f} s) for rid {rid}: {err}",
                                      server, rid) from err
            except RetryableError as err:
                errors.append(str(err))
                self.failures.append(str(err))
                unreachable_since = None
            if retries >= self.policy.max_retries:
                break
            await asyncio.sleep(self.policy.backoff(retries))
            retries += 1
        raise SGLangError(f"rid {rid} failed after {len(errors)} attempts (last server {server}): "
                          + " | ".join(errors[-3:]), server, rid)

    def _still_waiting(self, server: str, since: float, err: Exception) -> bool:
        """Whether to keep waiting for an unreachable ``server``; logs (every ~10 s per server) whom it waits for."""
        waited = time.monotonic() - since
        if waited >= self.policy.unreachable_wait_s:
            return False
        if time.monotonic() - self._last_wait_log.get(server, -math.inf) >= 10.0:
            self._last_wait_log[server] = time.monotonic()
            logger.warning("waiting for SGLang server %s: unreachable for %.0f s (%s); giving up after %.0f s",
                           server, waited, type(err.__cause__ or err).__name__, self.policy.unreachable_wait_s)
        return True

    async def _attempt(self, client, server: str, path: str, rid: str, payload: dict, check):
        self.attempts += 1
        self.in_flight[rid] = server  # stays there if cancelled: run_all/close abort it
        try:
            response = await client.post(server + path, json=payload)
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:  # no connection: nothing runs there
            self.in_flight.pop(rid, None)
            self.pool.mark_down(server)
            raise UnreachableError(f"{type(err).__name__} to {server} for rid {rid}: {err}") from err
        except httpx.TimeoutException as err:
            self.in_flight.pop(rid, None)
            self.pool.mark_down(server)
            asyncio.ensure_future(self._abort(client, server, rid))  # don't leave a duplicate running there
            raise RetryableError(f"timeout after {self.policy.timeout_s}s on {server} for rid {rid}") from err
        except httpx.TransportError as err:  # refused, reset, dropped mid-answer: the worker is gone
            self.in_flight.pop(rid, None)
            self.pool.mark_down(server)
            raise RetryableError(f"{type(err).__name__} from {server} for rid {rid}: {err}") from err
        self.in_flight.pop(rid, None)
        try:
            body = decode_json(response, server, rid)
        except RetryableError:
            self.pool.mark_down(server)  # a 5xx or malformed body: let the other workers take the load
            raise
        try:
            return check(body, rid, server)
        except RetryableError as err:
            self.pool.mark_down(server)  # a bad answer (e.g. stale weights) is not sent there again soon
            raise RetryableError(f"invalid answer from {server} for rid {rid}: {err}") from err

    async def _abort(self, client: httpx.AsyncClient, server: str, rid: str) -> None:
        async def one(url: str) -> None:
            try:
                await client.post(url + "/abort_request", json={"rid": rid}, timeout=2.0)
            except httpx.HTTPError:
                pass  # best effort: the worker may be dead or cut off

        await asyncio.gather(*(one(url) for url in (self.abort_urls or [server])))

    async def abort_in_flight(self, client: httpx.AsyncClient | None = None) -> None:
        """POST /abort_request for every rid still in flight (shutdown / interrupted batch)."""
        pending, self.in_flight = dict(self.in_flight), {}
        if not pending:
            return
        own = client is None
        client = client or self.client()
        try:
            await asyncio.gather(*(self._abort(client, server, rid) for rid, server in pending.items()))
        finally:
            if own:
                await client.aclose()
