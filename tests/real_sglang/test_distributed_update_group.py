"""The trainer's side of the NCCL weight-update group meets SGLang's own side (gloo on CPU).

Three processes: the trainer (rank 0, this project's code) and two SGLang workers (ranks 1 and 2,
SGLang 0.5.23's own ``WeightUpdater`` methods from the real package, in its environment). The
trainer broadcasts real tensors and every worker must receive them bit for bit, with the names,
dtypes and shapes of our ``/update_weights_from_distributed`` payload. Before the fix the trainer
raised TypeError (no timeout) and, past that, never met the workers: SGLang prefixes the store's
keys with the group name.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from megatron_opd.platform.spawn import free_port
from megatron_opd.rollout.sglang_weights import distributed_update_payload

PEER = Path(__file__).with_name("update_group_peer.py")
WORLD_SIZE = 3
JOIN_TIMEOUT_S = 60  # SGLang's own side would wait 30 min (its default); the test stops it earlier


def sample_tensors() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        ("model.embed_tokens.weight", torch.randn(37, 16, generator=gen)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 24, generator=gen).to(torch.bfloat16)),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(24, 16, generator=gen).t()),  # non-contiguous view
        ("model.norm.weight", torch.rand(16, generator=gen).to(torch.float16)),
        ("lm_head.weight", torch.full((5, 3), float("-inf"))),  # bits, not values: -inf must survive too
    ]


def test_trainer_group_meets_sglang_workers_and_broadcasts_bit_exactly(tmp_path, sglang_python):
    python = sglang_python
    named = sample_tensors()
    torch.save(named, tmp_path / "tensors.pt")
    spec = {"address": "127.0.0.1", "port": free_port(), "world_size": WORLD_SIZE, "group_name": "opd_test_group",
            "timeout_s": JOIN_TIMEOUT_S, "tensors": str(tmp_path / "tensors.pt"),
            "payload": distributed_update_payload(named, "opd_test_group", "v1")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = [tmp_path / f"worker{r}.pt" for r in (1, 2)]
    procs = [subprocess.Popen([str(python), str(PEER), "sglang", str(tmp_path / "spec.json"), str(r), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r, out in zip((1, 2), outs)]
    procs.insert(0, subprocess.Popen([sys.executable, str(PEER), "trainer", str(tmp_path / "spec.json")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    logs = finish_all(procs, JOIN_TIMEOUT_S + 60)
    for name, proc, log in zip(("trainer", "sglang rank 1", "sglang rank 2"), procs, logs):
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{log[-3000:]}"

    for out in outs:
        received = torch.load(out)
        assert [n for n, _ in received] == [n for n, _ in named]
        for (name, sent), (_, got) in zip(named, received):
            assert got.dtype == sent.dtype and got.shape == sent.shape, name
            assert torch.equal(got.contiguous().view(torch.uint8), sent.contiguous().view(torch.uint8)), name


def finish_all(procs: list[subprocess.Popen], timeout_s: float) -> list[str]:
    """Waits for every process; past the deadline kills the rest (by pid) so a hang fails the test."""
    deadline, logs = time.monotonic() + timeout_s, []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            logs.append(proc.communicate()[0] + f"\n[killed after {timeout_s:.0f} s: the group never formed]")
    return logs


def served_logprobs(url: str, ids: list[int]) -> torch.Tensor:
    body = httpx.post(url + "/generate", timeout=120.0, json={
        "input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}}).json()
    return torch.tensor([entry[0] for entry in body["meta_info"]["input_token_logprobs"][1:]], dtype=torch.float64)


def hf_token_logprobs(hf_dir, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_update_from_distributed_loads_into_a_real_server(real_servers, tiny_hf_dir, tmp_path):
    """The whole NCCL path on gloo through a real server's HTTP API, as the trainer's ``--weight-sync
    distributed`` runs it (``update_distributed``): the client sizes the group from the server's tp_size,
    forms it at its own address towards the server on a free port, broadcasts another model's weights;
    the server then computes with exactly them (log-probs equal an HF forward of that model) and reports
    the new version. The original weights go back the same way, in the same group, and closing the group
    ends it on the server too (the shared session server is left as it was).

    Before the fix: TypeError (no timeout), then no meeting (PrefixStore), then SGLang 0.5.23's
    answer 400 "must run between begin_weight_update() and end_weight_update()" while the trainer
    waited in the broadcast for the group timeout (30 min).
    """
    from safetensors.torch import load_file

    from megatron_opd.recipes.common import ModelShape, write_initial_model
    from megatron_opd.rollout.sglang_http import RetryPolicy
    from megatron_opd.rollout.sglang_weights import WeightSyncClient

    server = real_servers(tiny_hf_dir)
    config = json.loads((Path(tiny_hf_dir) / "config.json").read_text())
    shape = ModelShape(layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                       heads=config["num_attention_heads"], kv_heads=config["num_key_value_heads"],
                       head_dim=config["head_dim"], intermediate=config["intermediate_size"],
                       max_positions=config["max_position_embeddings"])
    other = write_initial_model(tmp_path / "other", shape, seed=123)
    ids = [5, 6, 7, 8, 9, 10, 11, 12]
    client = WeightSyncClient([server.url], RetryPolicy(timeout_s=120.0, connect_timeout_s=5.0, max_retries=0,
                                                         backoff_s=0.1))
    try:
        for source, version in ((other, "dist-other"), (tiny_hf_dir, "dist-restored")):
            weights = load_file(str(Path(source) / "model.safetensors"))
            assert client.update_distributed(weights, weight_version=version, backend="gloo") == version
            with httpx.Client() as http:
                assert http.get(server.url + "/model_info").json()["weight_version"] == version
            served, expected = served_logprobs(server.url, ids), hf_token_logprobs(source, ids)
            torch.testing.assert_close(served, expected, atol=2e-4, rtol=0)  # fp32 server: ~1e-6 seen
        moved = (hf_token_logprobs(other, ids) - hf_token_logprobs(tiny_hf_dir, ids)).abs().max()
        assert moved > 1e-2, "the two models must differ for this test to mean anything"
    finally:
        name = client.update_group_name
        client.close_update_group()
    # the server's side of the group went with ours: destroying it again finds nothing
    again = httpx.post(server.url + "/destroy_weights_update_group", json={"group_name": name}, timeout=30).json()
    assert again == {"success": False, "message": "The group to be destroyed does not exist."}
