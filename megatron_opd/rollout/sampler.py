"""Sampling arithmetic shared by the in-process engine and the SGLang client (plain tensors, no model).

Matches SGLang's sampler: behaviour log-probs are ``log_softmax(logits / T)`` over the real vocab
*before* top-p/top-k truncation (greedy, T = 0: the untempered softmax); the nucleus keeps a token
when the probability mass ranked strictly before it is <= top_p (SGLang's torch reference), plus
the first top_k tokens. Sampling uses the exponential race ``argmax_i log p_i - log E_i`` with
``E_i = -log U_i``, U drawn per row from the row's own generator, so a row's draw never depends on
which other rows share its batch.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def masked_logprobs(logits: torch.Tensor, temperature: float, vocab_size: int,
                    suppress_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Tempered log-softmax over the real vocab.

    logits: (B, V_model) with V_model >= vocab_size (Megatron/HF may pad the vocab).
    Returns (B, vocab_size) float32; suppressed ids get -inf (no mass, never sampled).
    """
    z = logits[:, :vocab_size].float()
    if temperature > 0 and temperature != 1.0:
        z = z / temperature
    if suppress_ids is not None and suppress_ids.numel() > 0:
        z = z.index_fill(1, suppress_ids.to(z.device), NEG_INF)
    return torch.log_softmax(z, dim=-1)


def nucleus_keep_sorted(sorted_logprobs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Which entries of descending-sorted log-probs (..., N) are in the top-p/top-k nucleus (bool)."""
    probs = sorted_logprobs.exp()
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = mass_before <= top_p
    if top_k > 0:
        rank = torch.arange(sorted_logprobs.shape[-1], device=sorted_logprobs.device)
        keep &= rank < top_k
    keep[..., 0] = True  # the most likely token is always kept (SGLang keeps it too)
    return keep & torch.isfinite(sorted_logprobs)


def nucleus_mask(logprobs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Nucleus membership (B, V) bool in vocab order, for log-probs (B, V)."""
    if top_p >= 1.0 and top_k <= 0:
        return torch.isfinite(logprobs)
    sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    keep_sorted = nucleus_keep_sorted(sorted_lp, top_p, top_k)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def nucleus_logmass_sorted(sorted_logprobs: torch.Tensor, top_p: float, top_k: int) -> tuple[torch.Tensor, bool]:
    """log of the nucleus mass from the N most likely log-probs, sorted descending (..., N).

    Returns (log_mass (...,), complete). ``complete`` is False when the nucleus may extend past
    the N entries given (the SGLang client then asks for more top log-probs or reports it).
    """
    keep = nucleus_keep_sorted(sorted_logprobs, top_p, top_k)
    log_mass = torch.logsumexp(sorted_logprobs.masked_fill(~keep, NEG_INF), dim=-1)
    n = sorted_logprobs.shape[-1]
    closed_by_k = 0 < top_k <= n
    complete = closed_by_k or not bool(keep[..., -1].any())  # host sync: a Python bool
    return log_mass, complete


def exponential_noise(generators: list[torch.Generator | None], vocab_size: int) -> torch.Tensor:
    """-log E per row, (B, vocab_size); rows whose generator is None (finished) get zeros."""
    rows = []
    for gen in generators:
        if gen is None:
            rows.append(torch.zeros(vocab_size))
            continue
        u = torch.rand(vocab_size, generator=gen)
        rows.append(-torch.log(-torch.log(u)))  # -log(E), E ~ Exp(1); u = 0 gives -inf (never chosen)
    return torch.stack(rows)


def sample_tokens(logprobs: torch.Tensor, keep: torch.Tensor, generators: list[torch.Generator | None],
                  greedy: bool) -> torch.Tensor:
    """Next token per row (B,) int64 from (B, V) log-probs restricted to ``keep``."""
    if greedy:
        return torch.argmax(logprobs, dim=-1)
    # the noise comes from per-row CPU generators (samples do not depend on the device), then moves
    scores = logprobs + exponential_noise(generators, logprobs.shape[-1]).to(logprobs.device)
    return torch.argmax(scores.masked_fill(~keep, NEG_INF), dim=-1)


def chosen_logprobs(logprobs: torch.Tensor, keep: torch.Tensor, tokens: torch.Tensor,
                    renormalize: bool) -> torch.Tensor:
    """Behaviour log-prob of each chosen token (B,); optionally renormalised over the nucleus."""
    lp = logprobs.gather(1, tokens[:, None]).squeeze(1)
    if renormalize:
        lp = lp - torch.logsumexp(logprobs.masked_fill(~keep, NEG_INF), dim=-1)
    return lp
