"""Span boundaries for span-granularity gates: a span ends at a delimiter token (DESIGN §2.4)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def newline_token_ids(tokenizer) -> set[int]:
    """Ids whose decoded text contains a newline (decodes the whole vocab once: cache the result)."""
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return {i for i, text in enumerate(texts) if "\n" in text}


def newline_span_ends(response_ids: torch.Tensor, tokenizer=None, delimiter_ids: Iterable[int] | None = None) -> torch.Tensor:
    """bool [B, T]: True where a span ends (the token is a delimiter: its text has a newline, or it is in delimiter_ids).

    Give ``delimiter_ids`` (e.g. a cached ``newline_token_ids(tokenizer)``) or a ``tokenizer``.
    """
    if delimiter_ids is None:
        if tokenizer is None:
            raise ValueError("newline_span_ends needs a tokenizer or delimiter_ids")
        delimiter_ids = newline_token_ids(tokenizer)
    ids = torch.as_tensor(sorted(set(delimiter_ids)), dtype=response_ids.dtype, device=response_ids.device)
    return torch.isin(response_ids, ids)
