"""``megatron-opd``: one console script, one sub-command per job.

    megatron-opd train [flags]     the OPD / SFT trainer (under torchrun for several processes)
    megatron-opd eval [flags]      pass@k on AIME24, AIME25, MATH500, AMC23 (or the toy task)
    megatron-opd plot RUN_DIR      PNG plots of a run's metrics.jsonl
    megatron-opd demo [--quick]    the embedded CPU default (toy task, tiny teacher and student)
    megatron-opd variants [flags]  the six-variant comparison
"""

from __future__ import annotations

import sys


def _train(argv: list[str]) -> int:
    import os

    from megatron_opd.platform.fallbacks import fallback_summary, quiet_megatron_fallbacks

    quiet_megatron_fallbacks()  # before megatron is imported: one summary line instead of a wall of warnings
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of every engine, on every rank
    from megatron_opd.training.cli import parse_config
    from megatron_opd.training.config import ConfigError

    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        print(f"megatron-opd train: error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(fallback_summary(), file=sys.stderr, flush=True)
    from megatron_opd.training.loop import train

    train(cfg)
    return 0


def _eval(argv: list[str]) -> int:
    from megatron_opd.eval.cli import main

    return main(argv) or 0


def _plot(argv: list[str]) -> int:
    from megatron_opd.training.plot import main

    return main(argv) or 0


def _demo(argv: list[str]) -> int:
    from megatron_opd.recipes.demo import main

    return main(argv) or 0


def _variants(argv: list[str]) -> int:
    from megatron_opd.recipes.variants import main

    return main(argv) or 0


COMMANDS = {"train": _train, "eval": _eval, "plot": _plot, "demo": _demo, "variants": _variants}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
