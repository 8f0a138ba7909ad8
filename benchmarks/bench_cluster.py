"""A cluster on one box: weight-sync time across hosts (disk vs distributed) and the router's overhead.

Three hosts (network namespaces, ``megatron_opd.testing.netns``; needs root): real SGLang 0.5.23
workers on host0 and host1, the real sglang-router 0.3.2 on host0, the trainer's side on host2. In one
run, side by side:

- weight sync of a random Qwen3 (``--layers/--hidden``) to both workers, each way ``--reps`` times,
  alternating: disk (safetensors written to the shared directory + ``/update_weights_from_disk`` on
  each worker) and distributed (one gloo broadcast group trainer -> both workers, standing in for
  NCCL; ``/update_weights_from_distributed``); median seconds, seconds per MB, MB/s;
- the router's overhead per request: the same ``/generate`` requests sent one at a time through the
  router and straight to a worker (alternating), median latency and the difference; and a batch
  of concurrent requests through the router against the client's own round robin over both workers.

    sudo .venv/bin/python benchmarks/bench_cluster.py [--reps 5] [--requests 40] [--layers 4 --hidden 512]

Run it alone on the machine (timings). Servers take ~30 s to start on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "real_sglang"))
WORKERS, TRAINER = (0, 1), 2
HOST_ENV = {"GLOO_SOCKET_IFNAME": "eth0"}  # gloo on each host's own interface (see the cluster tests)


def bench_weight_sync(engine, model_dir: Path, reps: int, master_addr: str) -> dict[str, list[float]]:
    """Seconds per sync to both workers, disk and distributed, alternating."""
    import torch
    from safetensors.torch import load_file

    named = sorted(load_file(str(model_dir / "model.safetensors")).items())
    state = dict(named)
    times: dict[str, list[float]] = {"disk": [], "distributed": []}
    group = engine.weights.init_update_group(master_addr, 29660, backend="gloo", timeout_s=300.0)
    try:
        for rep in range(reps):
            t0 = time.perf_counter()
            engine.update_weights(state, weight_version=f"disk-{rep}")
            times["disk"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.weights.update_from_distributed(named, group, weight_version=f"dist-{rep}")
            times["distributed"].append(time.perf_counter() - t0)
    finally:
        torch.distributed.destroy_process_group(group)
    return times


def bench_router_latency(router_url: str, worker_url: str, requests: int, max_new_tokens: int) -> dict:
    """Median latency of one request at a time, through the router and straight to a worker."""
    import httpx

    body = {"input_ids": [5, 6, 7, 8], "return_logprob": True,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}
    times: dict[str, list[float]] = {"router": [], "direct": []}
    with httpx.Client(timeout=120.0) as client:
        for url in (router_url, worker_url):  # warm both paths (connections, caches)
            client.post(url + "/generate", json=body).raise_for_status()
        for _ in range(requests):
            for name, url in (("router", router_url), ("direct", worker_url)):
                t0 = time.perf_counter()
                client.post(url + "/generate", json=body).raise_for_status()
                times[name].append(time.perf_counter() - t0)
    return times


def bench_batch(router_url: str, worker_urls: list[str], prompts: int, n: int, max_new_tokens: int) -> dict:
    """Seconds for one rollout batch through the router vs the client's round robin over the workers."""
    from megatron_opd.rollout.sglang_client import SGLangRolloutEngine
    from megatron_opd.rollout.types import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=n, ignore_eos=True)
    batch = [[5 + i % 40, 6, 7] for i in range(prompts)]
    out = {}
    for name, url in (("router", router_url), ("client round robin", ",".join(worker_urls))):
        engine = SGLangRolloutEngine(url, max_concurrency=16)
        t0 = time.perf_counter()
        engine.generate(batch, params)
        out[name] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="weight syncs of each kind")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per path")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch-prompts", type=int, default=16)
    parser.add_argument("--batch-n", type=int, default=4)
    args = parser.parse_args()

    import sglang_server

    from megatron_opd.testing.netns import netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason:
        sys.exit(f"bench_cluster: {reason}")
    os.environ.update(HOST_ENV)
    python = sglang_server.ensure_sglang_env()
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        _run(Path(tmp), python, args)


def _run(work: Path, python: Path, args) -> None:
    import cluster
    import sglang_server
    from transformers import AutoConfig

    from megatron_opd.recipes.common import ModelShape, write_initial_model
    from megatron_opd.rollout.sglang_client import SGLangRolloutEngine
    from megatron_opd.testing.netns import HostNet

    heads = max(args.hidden // 64, 1)
    shape = ModelShape(layers=args.layers, hidden=args.hidden, heads=heads, kv_heads=max(heads // 2, 1), head_dim=64,
                       intermediate=3 * args.hidden, max_positions=512)
    model_dir = write_initial_model(work / "model", shape, seed=0)
    megabytes = (model_dir / "model.safetensors").stat().st_size / 2**20
    with HostNet(n_hosts=3) as net:
        t0 = time.perf_counter()
        workers = [cluster.start_worker(net, h, model_dir, work, python=python, client_host=TRAINER, env=HOST_ENV,
                                        launch_only=True) for h in WORKERS]
        try:
            for worker in workers:
                cluster.wait_worker(net, worker, TRAINER)
            router = cluster.start_router(net, WORKERS[0], [w.url for w in workers], work, python=python,
                                          client_host=TRAINER)
            _wait_registered(net, router.url, len(workers))
            print(f"cluster up in {time.perf_counter() - t0:.0f} s: workers {[w.url for w in workers]}, "
                  f"router {router.url}, trainer side on {net.hosts[TRAINER].addr}")
            engine = SGLangRolloutEngine(router.url, worker_urls=[w.url for w in workers],
                                         weight_sync_dir=str(work / "sync"), hf_config=AutoConfig.from_pretrained(model_dir))
            sync = cluster.in_host(net, TRAINER, bench_weight_sync, engine, model_dir, args.reps,
                                   net.hosts[TRAINER].addr)
            latency = cluster.in_host(net, TRAINER, bench_router_latency, router.url, workers[0].url,
                                      args.requests, args.max_new_tokens)
            batch = cluster.in_host(net, TRAINER, bench_batch, router.url, [w.url for w in workers],
                                    args.batch_prompts, args.batch_n, args.max_new_tokens)
        finally:
            for worker in workers:
                sglang_server.stop(worker)
    _report(sync, latency, batch, megabytes, args)


def _wait_registered(net, router_url: str, count: int, timeout: float = 120.0) -> None:
    import cluster
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = cluster.in_host(net, TRAINER, lambda: httpx.get(router_url + "/workers", timeout=10).json())
        if sum(w["is_healthy"] for w in workers["workers"]) == count:
            return
        time.sleep(0.5)
    sys.exit(f"bench_cluster: the router did not register {count} healthy workers in {timeout:.0f} s")


def _report(sync: dict, latency: dict, batch: dict, megabytes: float, args) -> None:
    print(f"\nweight sync to 2 workers on other hosts, {megabytes:.1f} MB of fp32 weights, {args.reps} each:")
    print(f"  {'method':12} {'median s':>9} {'s per MB':>9} {'MB/s':>8}")
    medians = {k: statistics.median(v) for k, v in sync.items()}
    for name, med in medians.items():
        print(f"  {name:12} {med:9.3f} {med / megabytes:9.4f} {megabytes / med:8.1f}")
    print(f"  distributed / disk: {medians['distributed'] / medians['disk']:.2f}")
    lat = {k: statistics.median(v) * 1e3 for k, v in latency.items()}
    print(f"\none /generate at a time ({args.requests} each, max_new_tokens {args.max_new_tokens}), median ms:")
    print(f"  router {lat['router']:.1f}  direct {lat['direct']:.1f}  overhead {lat['router'] - lat['direct']:+.1f} ms "
          f"({lat['router'] / lat['direct']:.2f}x)")
    n = args.batch_prompts * args.batch_n
    print(f"\none rollout batch of {n} requests (16 in flight), seconds:")
    print("  " + "  ".join(f"{k} {v:.2f}" for k, v in batch.items())
          + f"  ratio {batch['router'] / batch['client round robin']:.2f}")


if __name__ == "__main__":
    main()
