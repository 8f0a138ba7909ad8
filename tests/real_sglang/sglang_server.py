"""Start and stop real SGLang 0.5.23 servers on this CPU machine (tests and scripts).

The servers run in the environment ``scripts/setup_sglang_env.sh`` builds (never the project's
``.venv``), bound to 127.0.0.1 on a free port, each in a process group of its own so that stopping
it by pid also stops its scheduler and detokenizer children. The flags are the measured CPU recipe
(issue 10): without ``--max-total-tokens`` the KV cache takes 6.4 GB, without ``--sleep-on-idle``
the idle scheduler spins a whole core.

From Python::

    with real_server(hf_dir, log_dir=tmp) as server:   # waits for /health
        requests.post(server.url + "/generate", json=...)

From a shell (the server keeps running; ``stop`` ends its process group)::

    python tests/real_sglang/sglang_server.py start --model-path DIR --log-dir DIR   # prints JSON
    python tests/real_sglang/sglang_server.py stop --pid PID
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

SGLANG_VERSION = "0.5.23"
REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup_sglang_env.sh"
# Health answers after 20-50 s on an idle machine; this box is shared by several workers, where a
# start has taken 150 s. The timeout is generous so that a slow start is not reported as a failure.
HEALTH_TIMEOUT_S = float(os.environ.get("MEGATRON_OPD_SGLANG_HEALTH_TIMEOUT", 300))
DEFAULT_MAX_TOTAL_TOKENS = 4096
# SGLang's ``--dtype auto`` serves a float32 checkpoint in float16 (measured: log-probs 3e-4 off an
# fp32 HF forward of the tiny model). Tests compare against fp32 references, so fp32 is the default.
DEFAULT_DTYPE = "float32"

# The measured recipe for SGLang 0.5.23 on CPU.
CPU_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native",
             "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
             "--disable-overlap-schedule", "--sampling-backend", "pytorch", "--grammar-backend", "none",
             "--sleep-on-idle")


def sglang_env_dir() -> Path:
    default = Path.home() / ".cache" / "megatron_opd" / f"sglang-{SGLANG_VERSION}"
    return Path(os.environ.get("MEGATRON_OPD_SGLANG_ENV", default))


def ensure_sglang_env() -> Path:
    """The real-SGLang environment's python, building the environment first if it is missing
    (seconds when it is complete; minutes on a fresh machine)."""
    env_dir = sglang_env_dir()
    done = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{SETUP_SCRIPT} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return env_dir / "bin" / "python"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RealServer:
    """One launched server; ``pid`` leads its process group."""

    url: str
    port: int
    pid: int
    model_path: str
    log_path: str

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"


def launch(model_path, log_dir, *, port: int | None = None, max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
           dtype: str = DEFAULT_DTYPE, extra_args=(), env: dict | None = None,
           python: Path | None = None, host: str = "127.0.0.1", command_prefix=()) -> RealServer:
    """Spawn a server for the HF directory ``model_path`` without waiting for it (see :func:`wait_healthy`).

    ``host``: the address it listens on; ``command_prefix``: e.g. ``ip netns exec NS`` to start it
    inside a test host (``tests/real_sglang/cluster.py``; give ``port`` then: it is free there)."""
    python = python or ensure_sglang_env()
    port = port or free_port()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"sglang-{host}-{port}.log"
    cmd = [*map(str, command_prefix), str(python), "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", host, "--port", str(port), *CPU_FLAGS, "--max-total-tokens", str(max_total_tokens),
           "--dtype", dtype, *map(str, extra_args)]
    # One thread per server process: the box is shared, and the tiny test models gain nothing from more.
    full_env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                                cwd=log_dir)
    return RealServer(url=f"http://{host}:{port}", port=port, pid=proc.pid, model_path=str(model_path),
                      log_path=str(log_path))


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reaps it when it is our exited child
        return waited == 0
    except ChildProcessError:  # not our child (started by another process): signal 0 probes it
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def health_ok(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(server: RealServer, timeout: float = HEALTH_TIMEOUT_S, probe=health_ok) -> RealServer:
    """Block until ``/health`` answers 200 (``probe(url)``: e.g. asked from inside a test host);
    raises with the server's log when it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe(server.url):
            return server
        if not _alive(server.pid):
            raise RuntimeError(f"SGLang server {server.url} (pid {server.pid}, model {server.model_path}) exited "
                               f"before /health answered; its log {server.log_path}:\n{server.log_tail()}")
        time.sleep(1.0)
    stop(server)
    raise RuntimeError(f"SGLang server {server.url} (model {server.model_path}) did not answer /health within "
                       f"{timeout:.0f} s; its log {server.log_path}:\n{server.log_tail()}")


def start(model_path, log_dir, **kwargs) -> RealServer:
    """Launch a server and wait until it is healthy."""
    return wait_healthy(launch(model_path, log_dir, **kwargs))


def stop(server_or_pid, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after ``grace_s``."""
    pid = server_or_pid if isinstance(server_or_pid, int) else server_or_pid.pid
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        _alive(pid)  # reap the leader so the group can disappear
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    _alive(pid)


@contextlib.contextmanager
def real_server(model_path, log_dir, **kwargs):
    server = launch(model_path, log_dir, **kwargs)
    try:
        yield wait_healthy(server)
    finally:
        stop(server)


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start_p = sub.add_parser("start", help="start a server, wait for /health, print its JSON description")
    start_p.add_argument("--model-path", required=True)
    start_p.add_argument("--log-dir", required=True)
    start_p.add_argument("--port", type=int, default=None)
    start_p.add_argument("--host", default="127.0.0.1", help="address to listen on (e.g. a test host's 198.18.0.x)")
    start_p.add_argument("--max-total-tokens", type=int, default=DEFAULT_MAX_TOTAL_TOKENS)
    start_p.add_argument("--dtype", default=DEFAULT_DTYPE)
    start_p.add_argument("--timeout", type=float, default=HEALTH_TIMEOUT_S)
    start_p.add_argument("extra", nargs=argparse.REMAINDER, help="further sglang flags after --")
    stop_p = sub.add_parser("stop", help="stop the server whose process group is led by PID")
    stop_p.add_argument("--pid", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "stop":
        stop(args.pid)
        return
    extra = [a for a in args.extra if a != "--"]
    server = launch(args.model_path, args.log_dir, port=args.port, max_total_tokens=args.max_total_tokens,
                    dtype=args.dtype, extra_args=extra, host=args.host)
    try:
        wait_healthy(server, timeout=args.timeout)
    except RuntimeError as exc:
        sys.exit(str(exc))
    print(json.dumps(asdict(server)))


if __name__ == "__main__":
    _main()
