"""Special-token masking (DESIGN §2.2): drop the loss at positions of chat/think control tokens.

The LSM paper drops positions of control tokens such as ``<|im_end|>`` and the pieces of
``<think>``. Single-token controls are matched by id anywhere; a control string that the
tokenizer splits into several ordinary tokens (e.g. ``<``, ``think``, ``>``) is matched only as
that whole contiguous sequence, so ordinary uses of its pieces keep their loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

CONTROL_STRINGS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>")


def _single_token_id(tokenizer, text: str) -> int | None:
    """The id of ``text`` when it is one token of the vocab, else None."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if token_id is None or (unk is not None and token_id == unk and text != getattr(tokenizer, "unk_token", None)):
        return None
    return int(token_id)


def default_special_token_ids(tokenizer, *, keep_eos: bool = False) -> set[int]:
    """Ids of the tokenizer's special tokens and single-token chat/think controls.

    ``keep_eos=True`` leaves the EOS id out of the set (the paper masks ``<|im_end|>`` too).
    """
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    ids |= {i for text in CONTROL_STRINGS if (i := _single_token_id(tokenizer, text)) is not None}
    if keep_eos and tokenizer.eos_token_id is not None:
        ids.discard(int(tokenizer.eos_token_id))
    return ids


def default_special_token_sequences(tokenizer) -> list[tuple[int, ...]]:
    """Multi-token encodings of the control strings that are not single tokens (e.g. ``<think>`` in pieces)."""
    sequences = []
    for text in CONTROL_STRINGS:
        if _single_token_id(tokenizer, text) is None:
            pieces = tuple(tokenizer.encode(text, add_special_tokens=False))
            if len(pieces) > 1:
                sequences.append(pieces)
    return sequences


def _sequence_hits(token_ids: torch.Tensor, sequence: Sequence[int]) -> torch.Tensor:
    """bool [B, T]: positions covered by a contiguous occurrence of ``sequence``."""
    length = len(sequence)
    hits = torch.zeros_like(token_ids, dtype=torch.bool)
    if length == 0 or token_ids.shape[1] < length:
        return hits
    target = torch.as_tensor(sequence, dtype=token_ids.dtype, device=token_ids.device)
    starts = (token_ids.unfold(1, length, 1) == target).all(-1)  # [B, T - L + 1]
    for offset in range(length):
        hits[:, offset:offset + starts.shape[1]] |= starts
    return hits


def build_special_token_mask(token_ids: torch.Tensor, mask: torch.Tensor, special_ids: Iterable[int] = (),
                             special_sequences: Iterable[Sequence[int]] = ()) -> torch.Tensor:
    """``mask`` [B, T] with the positions of special tokens removed.

    token_ids: [B, T] response ids; special_ids: ids dropped wherever they occur;
    special_sequences: id sequences dropped where they occur contiguously.
    """
    if token_ids.shape != mask.shape:
        raise ValueError(f"token_ids has shape {tuple(token_ids.shape)} but mask has {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    ids = torch.as_tensor(sorted(set(special_ids)), dtype=token_ids.dtype, device=token_ids.device)
    drop = torch.isin(token_ids, ids)
    for sequence in special_sequences:
        drop |= _sequence_hits(token_ids, sequence)
    return mask & ~drop
