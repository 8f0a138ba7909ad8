"""A long-horizon synthetic task: a chain of local steps where one early slip derails the answer.

A problem gives a 4-digit start state ``s``, a 4-digit key ``k`` and a step count ``n``; the
response applies the step "add the key digit by digit, modulo 10 (no carries)" ``n`` times, one
line per step, each line labelled with a countdown, and ends with the final state boxed::

    problem:  s=4821;k=3157;n=14
    solution: 13:4821+3157=7978
              12:7978+3157=0025
              ...
              00:....+3157=RRRR
              \\boxed{RRRR}

Why this shape (the regime where sampled-token OPD is fragile, and a tiny model learns it fast):

- **Long**: ``n`` in [14, 20] gives responses of 265-373 tokens (one token per character), i.e.
  at least 4 blocks of 64 tokens; the prompt has a fixed length.
- **Local**: every character of a line is a function of characters at fixed distances behind it
  (the previous line's result and key, the previous label, or this line's operands), never of the
  k-th item of a list, so a small transformer with rotary positions learns it quickly.
- **Fragile**: each line starts from the previous line's result, so one wrong digit anywhere
  propagates to the final answer (and a wrong label ends the chain early or late).
- **Verifiable**: the final state is in ``\\boxed{}``; the project's grader compares it numerically
  (``0025`` and ``25`` are the same answer).
- **Step delimiter**: a newline ends every step (the spans gate's default delimiter).

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
WIDTH = 4
MIN_STEPS, MAX_STEPS = 14, 20
STEP_DELIMITER = "\n"


def split_of(problem: str) -> str:
    """Stable split of a problem text (crc32: identical across runs, processes and platforms)."""
    bucket = zlib.crc32(problem.encode("utf-8")) % 1000
    if bucket < SPLIT_PER_MILLE["test"]:
        return "test"
    if bucket < SPLIT_PER_MILLE["test"] + SPLIT_PER_MILLE["validation"]:
        return "validation"
    return "train"


def apply_step(state: str, key: str) -> str:
    """One step: digit-wise (state + key) mod 10, no carries."""
    return "".join(str((int(a) + int(b)) % 10) for a, b in zip(state, key))


def render_chain_problem(start: str, key: str, steps: int) -> dict:
    """``{problem, answer, solution}`` of one chain (no id); see the module docstring."""
    if len(start) != WIDTH or len(key) != WIDTH or not (start + key).isdigit():
        raise ValueError(f"chain task: start and key must be {WIDTH}-digit strings, got {start!r}, {key!r}")
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise ValueError(f"chain task: steps must be in [{MIN_STEPS}, {MAX_STEPS}], got {steps}")
    lines, state = [], start
    for label in range(steps - 1, -1, -1):
        result = apply_step(state, key)
        lines.append(f"{label:02d}:{state}+{key}={result}")
        state = result
    lines.append(f"\\boxed{{{state}}}")
    return {"problem": f"s={start};k={key};n={steps}", "answer": state, "solution": STEP_DELIMITER.join(lines)}


def _sample(rng: random.Random) -> dict:
    start = "".join(rng.choice("0123456789") for _ in range(WIDTH))
    key = "".join(rng.choice("0123456789") for _ in range(WIDTH))
    return render_chain_problem(start, key, rng.randint(MIN_STEPS, MAX_STEPS))


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
