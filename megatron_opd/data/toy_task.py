"""The embedded synthetic math task and its character-level tokenizer (DESIGN §9).

A problem chains 2-4 additions/subtractions of 2-digit operands through named variables::

    problem:  a=63;b=a+43;c=b-61;c+74=?
    solution: b=63+43=106;c=106-61=45;45+74=119;\\boxed{119}

Every intermediate value stays in [0, 999]. The final answer is given in ``\\boxed{}`` so the
same grader as the real benchmarks applies. Train and test are disjoint by construction: a
problem belongs to the split chosen by a stable hash of its text, and generation rejects
problems of the other split.

The tokenizer is character-level over a fixed, ordered alphabet (ids never change between
versions: checkpoints trained with it stay valid) plus the chat special tokens, and carries a
minimal ChatML template so ``apply_chat_template`` works as for a Qwen3 tokenizer.
"""

from __future__ import annotations

import random
import zlib

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPLITS = ("train", "test")
TEST_FRACTION_PER_MILLE = 100
"""About 10% of the problem space belongs to the test split."""
MIN_OPS, MAX_OPS = 2, 4
MIN_OPERAND, MAX_OPERAND = 10, 99
MIN_VALUE, MAX_VALUE = 0, 999
VARIABLES = "abcde"

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, THINK_START, THINK_END, UNK_TOKEN)
# Order is the id assignment: append only, never reorder (saved checkpoints depend on it).
CHARACTERS = tuple("0123456789abcdefghijklmnopqrstuvwxyz") + tuple("=;+-?\\{}") + ("\n", " ") + tuple("().,*/:")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _split_of(problem: str) -> str:
    """Stable split assignment of a problem text (crc32: identical across runs and platforms)."""
    bucket = zlib.crc32(problem.encode("utf-8")) % 1000
    return "test" if bucket < TEST_FRACTION_PER_MILLE else "train"


def _sample_chain(rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
    """Draw a start value and 2-4 (op, operand) steps keeping every value in [0, 999]."""
    num_ops = rng.randint(MIN_OPS, MAX_OPS)
    value = start = rng.randint(MIN_OPERAND, MAX_OPERAND)
    steps = []
    for _ in range(num_ops):
        operand = rng.randint(MIN_OPERAND, MAX_OPERAND)
        # Pick '-' only when it keeps the value non-negative; '+' only when it stays <= 999.
        allowed = [op for op, nxt in (("+", value + operand), ("-", value - operand))
                   if MIN_VALUE <= nxt <= MAX_VALUE]
        op = rng.choice(allowed)
        value = value + operand if op == "+" else value - operand
        steps.append((op, operand))
    return start, steps


def render_toy_problem(start: int, steps: list[tuple[str, int]]) -> dict:
    """Render one chain as ``{problem, answer, solution}`` text (no id).

    ``steps[:-1]`` define the variables b, c, ...; the last step is the asked expression.
    """
    problem_parts = [f"a={start}"]
    solution_parts = []
    value = start
    for i, (op, operand) in enumerate(steps):
        new_value = value + operand if op == "+" else value - operand
        if i < len(steps) - 1:
            name, prev = VARIABLES[i + 1], VARIABLES[i]
            problem_parts.append(f"{name}={prev}{op}{operand}")
            solution_parts.append(f"{name}={value}{op}{operand}={new_value}")
        else:
            problem_parts.append(f"{VARIABLES[i]}{op}{operand}=?")
            solution_parts.append(f"{value}{op}{operand}={new_value}")
        value = new_value
    solution_parts.append(f"\\boxed{{{value}}}")
    return {"problem": ";".join(problem_parts), "answer": str(value), "solution": ";".join(solution_parts)}


def generate_toy_problems(n: int, seed: int, split: str = "train") -> list[dict]:
    """Generate ``n`` distinct problems of ``split`` deterministically from ``seed``.

    Returns records ``{id, problem, answer, solution}``; ``id`` is ``toy-{split}-{seed}-{i:05d}``.
    Problems of the other split are rejected, so train and test never share a problem.
    """
    if split not in SPLITS:
        raise ValueError(f"toy task: split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"toy task: n must be >= 0, got {n}")
    # Seed mixes in the split so train and test streams differ even for the same seed.
    rng = random.Random(f"toy-{split}-{seed}")
    records, seen = [], set()
    while len(records) < n:
        record = render_toy_problem(*_sample_chain(rng))
        if record["problem"] in seen or _split_of(record["problem"]) != split:
            continue
        seen.add(record["problem"])
        records.append({"id": f"toy-{split}-{seed}-{len(records):05d}", **record})
    return records


def toy_sft_text(record: dict) -> str:
    """Assistant text a model is trained to produce for ``record``: the solution then EOS."""
    return record["solution"] + IM_END


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer of the toy task, built locally (no hub).

    Ids: the 6 special tokens (pad ``<|endoftext|>`` = 0, ``<|im_start|>``, eos ``<|im_end|>``,
    ``<think>``, ``</think>``, ``<unk>``) then ``CHARACTERS`` in order; < 64 ids in all.
    Characters outside the alphabet (e.g. upper case in real benchmarks) map to ``<unk>``.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character (newline included) is its own piece.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # concatenate pieces without spaces
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, THINK_START, THINK_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,  # also used on real benchmark text (one id per character)
        padding_side="right",  # as Qwen3 tokenizers
        clean_up_tokenization_spaces=False,
    )
