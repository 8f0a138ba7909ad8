"""A long-horizon synthetic task: a chain of local steps where one early slip derails the answer.

A problem is the chain's line 9: an 8-digit binary key ``k`` and the 8-digit start state ``s`` as
its result (its first operand hidden as dots). The response continues the chain: it applies the step
"advance every digit whose key digit is 1 by one, modulo 10" nine times, one line per step
(``state+key=next``), labelled with a countdown, and ends with the final state boxed::

    problem:  9:........+01101001=48213157
    solution: 8:48213157+01101001=49314158
              7:49314158+01101001=40415159
              ...
              0:........+01101001=RRRRRRRR
              \\boxed{RRRRRRRR}

The prompt is fed raw (no chat template: trainer ``--no-chat-template``, the ``chain`` benchmarks
likewise), so the first response line reads the prompt line exactly as every later line reads the
line before it: at the same distances. (With the chat template in between, a 2 x 128 model still
got 80% of the first line's digits wrong after 400 SFT steps while the later lines were nearly
right: the first line needed copies at distances used nowhere else.)

Why this shape (the regime where sampled-token OPD is fragile, and a tiny model learns it fast):

- **Long**: 9 lines of 28 characters plus the box: 278-token responses with EOS (one token per
  character), i.e. more than 4 blocks of 64 tokens; the prompt has a fixed length.
- **Local**: every character is a function of characters at fixed distances behind it (the
  previous line's result and key, the previous label, or this line's two operands; for the first
  line the prompt line), never of the k-th item of a list; the arithmetic is "add 0 or 1", as easy
  as the countdown.
- **No shortcut**: a digit advanced by one repeats only after 10 steps, so within the 9-step
  chain no line can be copied from an earlier one; every line comes from the one before it.
- **Fragile**: each line starts from the previous line's result, so one wrong digit anywhere
  propagates to the final answer.
- **Verifiable**: the final state is in ``\\boxed{}``; the project's grader compares it numerically.
- **Step delimiter**: a newline ends every step (the spans gate's default delimiter).

(A first version added a full decimal key digit by digit over 14-20 steps: a 2 x 128 model learned
the copies but not the 100-entry addition table in 350 SFT steps, and copied lines from 10 steps
back, the period of that map.)

Splits ``train``, ``validation`` and ``test`` are disjoint by construction: a problem belongs to
the split chosen by a stable hash (crc32) of its text, and generation rejects the others'. The
tokenizer is the toy task's character-level one (``data.toy_task.build_toy_tokenizer``): every
character used here is in its alphabet, so no new ids.
"""

from __future__ import annotations

import random
import zlib

SPLITS = ("train", "validation", "test")
SPLIT_PER_MILLE = {"test": 100, "validation": 100}
"""About 10% of the problem space is test, 10% validation, the rest train."""
WIDTH = 8
KEY_DIGITS = "01"
STEPS = 9
"""Fixed: the labels 8..0 are one digit; 9 steps of +1 never revisit a digit value (10 would bring
every digit back to its start, making the answer a copy of the prompt)."""
STEP_DELIMITER = "\n"
HIDDEN = "."
"""Fills the prompt line's first operand: the state before the start would give the answer away
(10 steps of the map are the identity)."""


def split_of(problem: str) -> str:
    """Stable split of a problem text (crc32: identical across runs, processes and platforms)."""
    bucket = zlib.crc32(problem.encode("utf-8")) % 1000
    if bucket < SPLIT_PER_MILLE["test"]:
        return "test"
    if bucket < SPLIT_PER_MILLE["test"] + SPLIT_PER_MILLE["validation"]:
        return "validation"
    return "train"


def apply_step(state: str, key: str) -> str:
    """One step: digit-wise (state + key) mod 10, no carries (key digits are 0 or 1)."""
    return "".join(str((int(a) + int(b)) % 10) for a, b in zip(state, key))


def render_chain_problem(start: str, key: str) -> dict:
    """``{problem, answer, solution}`` of one chain (no id); see the module docstring."""
    if len(start) != WIDTH or not start.isdigit():
        raise ValueError(f"chain task: start must be a {WIDTH}-digit string, got {start!r}")
    if len(key) != WIDTH or set(key) - set(KEY_DIGITS):
        raise ValueError(f"chain task: key must be {WIDTH} digits from {KEY_DIGITS!r}, got {key!r}")
    lines, state = [], start
    for label in range(STEPS - 1, -1, -1):
        result = apply_step(state, key)
        lines.append(f"{label}:{state}+{key}={result}")
        state = result
    lines.append(f"\\boxed{{{state}}}")
    problem = f"{STEPS}:{HIDDEN * WIDTH}+{key}={start}{STEP_DELIMITER}"
    return {"problem": problem, "answer": state, "solution": STEP_DELIMITER.join(lines)}



def _sample(rng: random.Random) -> dict:
    start = "".join(rng.choice("0123456789") for _ in range(WIDTH))
    key = "".join(rng.choice(KEY_DIGITS) for _ in range(WIDTH))
    return render_chain_problem(start, key)


def generate_chain_problems(n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` distinct problems of ``split``, deterministic in ``seed``.

    Records ``{id, problem, answer, solution}``; ``id`` is ``chain-{split}-{seed}-{i:05d}``.
    """
    if split not in SPLITS:
        raise ValueError(f"chain task: split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"chain task: n must be >= 0, got {n}")
    rng = random.Random(f"chain-{split}-{seed}")  # the split is mixed in: streams differ per split
    records, seen = [], set()
    while len(records) < n:
        record = _sample(rng)
        if record["problem"] in seen or split_of(record["problem"]) != split:
            continue
        seen.add(record["problem"])
        records.append({"id": f"chain-{split}-{seed}-{len(records):05d}", **record})
    return records
