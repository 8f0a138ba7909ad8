"""The real-server fixture itself: the server it starts serves the HF directory it was given (its
log-probs equal an HF transformers forward of that directory) and stopping it leaves no process."""

import os
import time

import requests
import sglang_server
import torch

LOGPROB_ATOL = 1e-5  # fp32 server (the fixture passes --dtype float32) vs fp32 HF


def hf_logprobs(hf_dir, ids: list[int]) -> torch.Tensor:
    """log softmax of the next-token logits at every position of ``ids`` (HF transformers, fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


def test_server_logprobs_equal_hf_forward(real_server, tiny_hf_dir):
    prompt = [5, 6, 7, 8, 9]
    reply = requests.post(real_server.url + "/generate", timeout=120, json={
        "input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                            "ignore_eos": True, "skip_special_tokens": False, "no_stop_trim": True}})
    reply.raise_for_status()
    body = reply.json()
    output = body["output_ids"]
    assert len(output) == 6
    reference = hf_logprobs(tiny_hf_dir, prompt + output)
    served = torch.tensor([lp for lp, _, _ in body["meta_info"]["output_token_logprobs"]], dtype=torch.float64)
    expected = torch.stack([reference[len(prompt) - 1 + i, tok] for i, tok in enumerate(output)])
    torch.testing.assert_close(served, expected, atol=LOGPROB_ATOL, rtol=0)
    prompt_served = torch.tensor([lp for lp, _, _ in body["meta_info"]["input_token_logprobs"][1:]],
                                 dtype=torch.float64)
    prompt_expected = torch.stack([reference[i - 1, prompt[i]] for i in range(1, len(prompt))])
    torch.testing.assert_close(prompt_served, prompt_expected, atol=LOGPROB_ATOL, rtol=0)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_stop_ends_the_whole_process_group(real_servers, tiny_hf_dir):
    # The session's own server (a later test that needs it gets a fresh one): a second server just
    # for this check would cost another start (30 s idle, minutes on a loaded machine).
    server = real_servers(tiny_hf_dir)
    assert _group_alive(server.pid)
    real_servers.discard(server)
    deadline = time.monotonic() + 5
    while _group_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(server.pid), "scheduler or detokenizer outlived the stop"
    assert not sglang_server.health_ok(server.url)
