"""Real SGLang servers and the real sglang-router on the test hosts of a ``HostNet`` (issue 16).

Every server and the router listen only on their own host's address (198.18.0.x). The test's own
HTTP calls are made from inside a host too (:func:`in_host`: a thread that joins the host's network
namespace), not from the root namespace: another live HostNet on the machine (a concurrent test run)
owns the root namespace's route to 198.18.0.0/24 when it was made first.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sglang_server

CLONE_NEWNET = 0x40000000
ROUTER_VERSION = "0.3.2"
WORKER_PORT, ROUTER_PORT, ROUTER_METRICS_PORT = 30000, 30100, 30101


def in_host(net, host: int, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a new thread that joined ``host``'s network namespace (sockets it opens
    belong to that host; the namespace is per thread on Linux). Returns its result or raises its error."""
    box: dict = {}

    def run() -> None:
        try:
            with open(f"/run/netns/{net.hosts[host].netns}") as ns:
                if ctypes.CDLL(None, use_errno=True).setns(ns.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {net.hosts[host].netns} failed")
            box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=run, name=f"in-{net.hosts[host].name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def url_of(net, host: int, port: int) -> str:
    return f"http://{net.hosts[host].addr}:{port}"


def start_worker(net, host: int, model_path, log_dir, *, python, client_host: int, port: int = WORKER_PORT,
                 extra_args=(), env: dict | None = None, launch_only: bool = False) -> sglang_server.RealServer:
    """An SGLang server inside ``host`` on its address; health asked from ``client_host``."""
    server = sglang_server.launch(model_path, log_dir, port=port, python=python, extra_args=extra_args, env=env,
                                  host=net.hosts[host].addr, command_prefix=net.command(host, []))
    if launch_only:
        return server
    return wait_worker(net, server, client_host)


def wait_worker(net, server, client_host: int, timeout: float = sglang_server.HEALTH_TIMEOUT_S):
    return sglang_server.wait_healthy(server, timeout,
                                      probe=lambda url: in_host(net, client_host, sglang_server.health_ok, url))


@dataclass
class Router:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


# The router's fault handling, tuned for seconds instead of minutes (0.3.2 defaults: health checks every
# 60 s, 3 failures to mark a worker down, 1800 s request timeout, 5 retries): a partitioned or frozen
# worker leaves the rotation after ~2 failed checks. (A 1 s check timeout is too short: 0.3.2 then never
# registers the workers on this machine.)
ROUTER_FAULT_ARGS = ("--health-check-interval-secs", "1", "--health-check-timeout-secs", "3",
                     "--health-failure-threshold", "2", "--health-success-threshold", "1")


def start_router(net, host: int, worker_urls: list[str], log_dir, *, python, client_host: int,
                 port: int = ROUTER_PORT, extra_args=ROUTER_FAULT_ARGS, timeout: float = 120.0) -> Router:
    """The real sglang-router inside ``host``, listening on its address, in front of ``worker_urls``."""
    log_path = Path(log_dir) / f"router-{net.hosts[host].addr}-{port}.log"
    cmd = [str(python), "-m", "sglang_router.launch_router", "--host", net.hosts[host].addr, "--port", str(port),
           "--worker-urls", *worker_urls, "--policy", "round_robin",
           # its Prometheus endpoint listens on 0.0.0.0:29000 unless told otherwise
           "--prometheus-host", net.hosts[host].addr, "--prometheus-port", str(ROUTER_METRICS_PORT),
           *map(str, extra_args)]
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = net.popen(host, cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    router = Router(url=url_of(net, host, port), proc=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sglang-router exited ({proc.returncode}) before /health answered:\n{router.log_tail()}")
        if in_host(net, client_host, sglang_server.health_ok, router.url):
            return router
        time.sleep(0.5)
    raise RuntimeError(f"sglang-router at {router.url} did not answer /health within {timeout:.0f} s:\n"
                       f"{router.log_tail()}")


def listening_sockets(net, host: int) -> list[tuple[str, str, str]]:
    """(address, port, process name) of every TCP socket listening inside ``host`` (``ss -ltnpH``)."""
    out = net.run(host, ["ss", "-ltnpH"], timeout=30).stdout
    sockets = []
    for line in out.splitlines():
        if line.strip():
            fields = line.split()
            addr, _, port = fields[3].rpartition(":")
            process = fields[5].split('"')[1] if len(fields) > 5 and '"' in fields[5] else "?"
            sockets.append((addr, port, process))
    return sockets
