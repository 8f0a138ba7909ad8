"""Checks that student and teacher tokenizers agree, so teacher ids/log-probs index the student's vocab.

OPD scores the student's token ids with the teacher, and LSM gathers student logits at the
teacher's top-K ids: both are only meaningful when the two tokenizers map every string (and every
special/chat token) to the same id and render the chat template identically. We raise a clear
error instead of remapping: a remapping cannot fix tokens that exist in only one vocab, and
silently dropping them biases the objective.
"""

from __future__ import annotations


class TokenizerMismatchError(ValueError):
    """Student and teacher tokenizers disagree; the message names the token/prompt and both ids."""


def _special_tokens(tokenizer) -> list[str]:
    names = list(getattr(tokenizer, "all_special_tokens", []))
    added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
    return sorted(set(names) | set(added))


def check_special_tokens(student, teacher) -> None:
    """Every special/added token of either tokenizer has the same id in both; eos/pad/bos ids agree."""
    for attr in ("eos_token_id", "pad_token_id", "bos_token_id"):
        s, t = getattr(student, attr, None), getattr(teacher, attr, None)
        if s != t:
            raise TokenizerMismatchError(f"{attr}: student {s} != teacher {t}")
    sv, tv = student.get_vocab(), teacher.get_vocab()
    for token in sorted(set(_special_tokens(student)) | set(_special_tokens(teacher))):
        s, t = sv.get(token), tv.get(token)  # None: absent (convert_tokens_to_ids would give <unk>)
        if s != t:
            raise TokenizerMismatchError(f"special token {token!r}: student id {s} != teacher id {t}")


def check_vocab(student, teacher) -> None:
    """Both vocabs map the same strings to the same ids (teacher top-K ids must be student ids)."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    diff = sorted(tok for tok in set(sv) | set(tv) if sv.get(tok) != tv.get(tok))
    if diff:
        examples = ", ".join(f"{tok!r}: student {sv.get(tok)} teacher {tv.get(tok)}" for tok in diff[:3])
        raise TokenizerMismatchError(f"vocabularies differ on {len(diff)} tokens ({examples})")


def check_prompts(student, teacher, messages_list: list[list[dict]]) -> None:
    """Chat-templated prompts render to the same text and the same ids with both tokenizers."""
    for row, messages in enumerate(messages_list):
        texts = [tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                 for tok in (student, teacher)]
        if texts[0] != texts[1]:
            raise TokenizerMismatchError(f"prompt {row}: chat templates render differently: "
                                         f"student {texts[0][:80]!r} vs teacher {texts[1][:80]!r}")
        ids = [tok(texts[0], add_special_tokens=False)["input_ids"] for tok in (student, teacher)]
        if ids[0] != ids[1]:
            pos = next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))
            raise TokenizerMismatchError(f"prompt {row}: token ids differ from position {pos} "
                                         f"(student {ids[0][pos:pos + 4]} vs teacher {ids[1][pos:pos + 4]})")


def check_tokenizers_agree(student, teacher, messages_list: list[list[dict]] | None = None) -> None:
    """All three checks; raises TokenizerMismatchError on the first disagreement."""
    check_special_tokens(student, teacher)
    check_vocab(student, teacher)
    if messages_list:
        check_prompts(student, teacher, messages_list)
