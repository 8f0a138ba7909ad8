"""Tiny random Qwen3 models for engine tests (built here: the hub is unreachable)."""

from __future__ import annotations

import torch


def tiny_qwen3(seed: int = 0, vocab_size: int = 64, hidden: int = 64, layers: int = 2, eos_token_id: int = 3,
               tie: bool = True, init_range: float = 0.2):
    """A random Qwen3ForCausalLM in eval mode; ``init_range`` large enough for peaked distributions."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, max_position_embeddings=512, tie_word_embeddings=tie,
                      eos_token_id=eos_token_id, bos_token_id=1, pad_token_id=0, initializer_range=init_range)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def reference_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0,
                       vocab_size: int | None = None, suppress: tuple[int, ...] = ()) -> torch.Tensor:
    """Full-vocab log-softmax of one unpadded sequence, no cache: (R, vocab) at the response positions."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) + len(response) - 1]
    logits = logits[:, : vocab_size or logits.shape[-1]].double()
    if suppress:
        logits[:, list(suppress)] = float("-inf")
    return torch.log_softmax(logits / temperature, dim=-1)
