"""Fixtures for tests against real SGLang 0.5.23 servers on CPU (see ``sglang_server.py``).

- ``sglang_python``: the real-SGLang environment's python (built by ``scripts/setup_sglang_env.sh``
  when missing; a test fails, never skips, when it cannot be built).
- ``tiny_hf_dir``: a tiny random Qwen3 HF directory with the toy tokenizer (session-scoped).
- ``real_servers``: ``real_servers(hf_dir, extra_args=(...))`` returns a healthy server for any HF
  directory a test makes (e.g. one written by ``--save-hf``); the same arguments share one server for
  the whole session. At most ``MEGATRON_OPD_MAX_REAL_SERVERS`` (default 2) run at once: each costs
  ~2 GB and 20-150 s to start, so the oldest is stopped to make room.
- ``real_server``: the session's server on ``tiny_hf_dir``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import sglang_server

MAX_LIVE_SERVERS = int(os.environ.get("MEGATRON_OPD_MAX_REAL_SERVERS", 2))


@pytest.fixture(scope="session")
def sglang_python() -> Path:
    try:
        return sglang_server.ensure_sglang_env()
    except RuntimeError as exc:
        pytest.fail(f"the real-SGLang environment could not be built: {exc}")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    from megatron_opd.recipes.common import ModelShape, write_initial_model

    shape = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, max_positions=512)
    return write_initial_model(tmp_path_factory.mktemp("real_sglang_model") / "tiny_qwen3", shape, seed=0)


class ServerPool:
    """Session cache of live servers keyed by (model path, extra args), oldest stopped first."""

    def __init__(self, python: Path, log_dir: Path, max_live: int):
        self.python, self.log_dir, self.max_live = python, log_dir, max_live
        self.live: OrderedDict[tuple, sglang_server.RealServer] = OrderedDict()

    def __call__(self, model_path, extra_args=(), **kwargs) -> sglang_server.RealServer:
        key = (str(Path(model_path).resolve()), tuple(map(str, extra_args)), tuple(sorted(kwargs.items())))
        server = self.live.get(key)
        if server is not None and sglang_server.health_ok(server.url):
            self.live.move_to_end(key)
            return server
        if server is not None:  # a test killed or broke it: start afresh
            self.discard(server)
        while len(self.live) >= self.max_live:
            self.discard(next(iter(self.live.values())))
        server = sglang_server.start(model_path, self.log_dir, extra_args=extra_args, python=self.python, **kwargs)
        self.live[key] = server
        return server

    def discard(self, server: sglang_server.RealServer) -> None:
        """Stop ``server`` and forget it (a test that breaks a server on purpose calls this)."""
        sglang_server.stop(server)
        for key, live in list(self.live.items()):
            if live.pid == server.pid:
                del self.live[key]

    def stop_all(self) -> None:
        for server in list(self.live.values()):
            self.discard(server)


@pytest.fixture(scope="session")
def real_servers(sglang_python, tmp_path_factory):
    pool = ServerPool(sglang_python, tmp_path_factory.mktemp("real_sglang_logs"), MAX_LIVE_SERVERS)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def real_server(real_servers, tiny_hf_dir) -> sglang_server.RealServer:
    # Per module, not per session: the pool keeps MAX_LIVE_SERVERS and stops the oldest when a module
    # needs other servers, so a session-wide handle could point at a stopped server; the pool hands back
    # the live one (or restarts it) for each module.
    return real_servers(tiny_hf_dir)
